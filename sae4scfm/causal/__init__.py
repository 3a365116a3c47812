"""Causal tests of SAE features inside the model: interventions in named modes (clamp, scale, add,
zero; stacked along the batch axis), steering, and gradient attribution checked against exact ablation."""

from sae4scfm.causal.interventions import MODES, OPS, Intervention, latent_edit, stacked_run
from sae4scfm.causal.steering import feature_edit, steer

# Each causal command's main table: name -> (path under <run>/causal/, the column holding this run's feature id).
RESULT_TABLES = {"steering": ("steering/steering.csv", "target"), "patching": ("patching/patching.csv", "target"),
                 "edges": ("tracing/edges.csv", "source")}

__all__ = ["RESULT_TABLES", "MODES", "OPS", "Intervention", "feature_edit", "latent_edit", "stacked_run", "steer"]
