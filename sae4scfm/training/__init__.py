"""SAE training: the shared loop (``trainer``), schedules and initialisation (``schedules``),
resumable checkpoints (``checkpoint``) and held-out evaluation (``evaluation``)."""

from sae4scfm.training.trainer import train

__all__ = ["train"]
