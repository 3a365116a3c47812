"""Model adapters: one module per family behind the contract in ``adapter.py``."""

from __future__ import annotations

from sae4scfm.errors import InputError
from sae4scfm.scfm.adapter import ScFMAdapter


def load_scfm(cfg, device: str = "cpu") -> ScFMAdapter:
    """The adapter for an ``scfm`` config group (``family``, ``checkpoint_dir``, ``random_init``)."""
    from sae4scfm.scfm.scgpt import ScGPTAdapter

    family = cfg.family
    if family == "demo":
        from sae4scfm.scfm.demo import demo_checkpoint

        path = demo_checkpoint(dict(cfg.pretrain))
        return ScGPTAdapter.from_pretrained(path, device, random_init=bool(cfg.get("random_init", False)))
    if family == "scgpt":
        if not cfg.get("checkpoint_dir"):
            raise InputError("scfm.checkpoint_dir is not set; point it at the downloaded scGPT folder "
                             "(best_model.pt, args.json, vocab.json).")
        return ScGPTAdapter.from_pretrained(cfg.checkpoint_dir, device, random_init=bool(cfg.get("random_init", False)))
    raise InputError(f"scfm.family={family!r} is unknown; available: demo, scgpt.")


__all__ = ["ScFMAdapter", "load_scfm"]
