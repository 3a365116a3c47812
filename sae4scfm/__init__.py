"""sae4scfm: sparse autoencoders for single-cell foundation models.

The pipeline's stages as functions of a Hydra config (see ``compose``)::

    cfg = sae4scfm.compose("train", ["sae.target_layer=2"])
    run_dir = sae4scfm.train(cfg)
"""

__version__ = "0.1.0"

_LAZY = {
    "train": ("sae4scfm.training", "train"),
    "generate_features": ("sae4scfm.features", "generate_features"),
    "analyze_features": ("sae4scfm.analysis.analyze", "analyze_features"),
    "benchmark_integration": ("sae4scfm.analysis.integration", "benchmark_integration"),
    "compose": ("sae4scfm.cli", "compose"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'sae4scfm' has no attribute {name!r}")
