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
    "layer_profile": ("sae4scfm.analysis.layer_profile", "layer_profile"),
    "compose": ("sae4scfm.cli", "compose"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'sae4scfm' has no attribute {name!r}")


# Modules of the former flat layout and where they live now: importing an old name is an ImportError
# that says the new one (a user's script breaks with the fix in the message, not a bare "no module").
MOVED = {
    "activations": "sae4scfm.store",
    "pipeline": "sae4scfm.scfm.loading",
    "gene_scoring": "sae4scfm.analysis.gene_scoring",
    "enrichment": "sae4scfm.analysis.enrichment",
    "coactivation": "sae4scfm.analysis.coactivation",
    "integration": "sae4scfm.analysis.integration",
    "interpretation": "sae4scfm.analysis.analyze",
    "steering": "sae4scfm.causal.steering",
}


class _MovedModuleFinder:
    """Meta-path finder that turns ``import sae4scfm.<old>`` into an ImportError naming the new module."""

    @staticmethod
    def find_spec(fullname, path=None, target=None):
        prefix, _, name = fullname.partition(".")
        if prefix == "sae4scfm" and MOVED.get(name):
            raise ImportError(f"{fullname} moved to {MOVED[name]} (the package is organised by "
                              "pipeline stage; see the README's Development section).", name=fullname)
        return None


def _install_moved_module_finder() -> None:
    import sys

    if not any(isinstance(f, _MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.append(_MovedModuleFinder())


_install_moved_module_finder()
