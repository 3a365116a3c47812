"""Causal tests of SAE features inside the model: steering (set, add, scale features) in named modes."""

from sae4scfm.causal.steering import MODES, OPS, feature_edit, steer

__all__ = ["MODES", "OPS", "feature_edit", "steer"]
