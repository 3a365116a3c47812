"""Activation store: the sharded on-disk format (``shards``), extraction into it (``extract``) and
the shuffling buffer that streams it into training (``buffer``)."""

from sae4scfm.store.buffer import ShufflingBuffer
from sae4scfm.store.extract import activation_stores, extract_activations
from sae4scfm.store.shards import DTYPES, ActivationStore

__all__ = ["DTYPES", "ActivationStore", "ShufflingBuffer", "activation_stores", "extract_activations"]
