"""Features: encode a run's cells and tokens with its SAE into ``features.h5ad`` / ``token_features.h5ad``."""

from sae4scfm.features.generate import generate_features

__all__ = ["generate_features"]
