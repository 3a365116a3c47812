"""Causal tests of SAE features inside the model: interventions in named modes (clamp, scale, add,
zero; stacked along the batch axis), steering, and gradient attribution checked against exact ablation."""

from sae4scfm.causal.interventions import MODES, OPS, Intervention, latent_edit, stacked_run
from sae4scfm.causal.steering import feature_edit, steer

__all__ = ["MODES", "OPS", "Intervention", "feature_edit", "latent_edit", "stacked_run", "steer"]
