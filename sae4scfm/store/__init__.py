"""Activation store: the sharded on-disk format (``shards``) and extraction into it (``extract``)."""

from sae4scfm.store.extract import activation_stores, extract_activations
from sae4scfm.store.shards import DTYPES, ActivationStore

__all__ = ["DTYPES", "ActivationStore", "activation_stores", "extract_activations"]
