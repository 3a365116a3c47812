"""Model adapters: one subpackage per family behind the contract in ``adapter.py``."""

from __future__ import annotations

import importlib

from sae4scfm.errors import InputError
from sae4scfm.scfm.adapter import ScFMAdapter

# family -> "module:AdapterClass"; each class implements ``from_config(cfg, device)``
FAMILIES = {
    "scgpt": "sae4scfm.scfm.scgpt:ScGPTAdapter",
    "geneformer": "sae4scfm.scfm.geneformer:GeneformerAdapter",
    "scfoundation": "sae4scfm.scfm.scfoundation:ScFoundationAdapter",
    "aido_cell": "sae4scfm.scfm.aido_cell:AIDOCellAdapter",
}


def adapter_class(family: str) -> type[ScFMAdapter]:
    if family not in FAMILIES:
        raise InputError(f"scfm.family={family!r} is unknown; available: demo, {', '.join(FAMILIES)}.")
    module, name = FAMILIES[family].split(":")
    return getattr(importlib.import_module(module), name)


def load_scfm(cfg, device: str = "cpu") -> ScFMAdapter:
    """The adapter for an ``scfm`` config group (``family``, ``checkpoint_dir``, ``random_init``,
    and the family's own keys, documented in ``config/scfm/<name>.yaml``)."""
    if cfg.family == "demo":
        from omegaconf import DictConfig, OmegaConf

        from sae4scfm.scfm.demo import demo_checkpoint
        from sae4scfm.scfm.scgpt import ScGPTAdapter

        pretrain = cfg.pretrain
        path = demo_checkpoint(OmegaConf.to_container(pretrain, resolve=True) if isinstance(pretrain, DictConfig)
                               else dict(pretrain))
        return ScGPTAdapter.from_pretrained(path, device, random_init=bool(cfg.get("random_init", False)))
    return adapter_class(cfg.family).from_config(cfg, device)


__all__ = ["FAMILIES", "ScFMAdapter", "adapter_class", "load_scfm"]
