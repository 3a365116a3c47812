"""Steering: set, add to, scale or ablate SAE features inside the model's forward (one edit per
forward; ``sae4scfm.causal.interventions`` is the mechanism and stacks many in one forward).

Two intervention modes, always named explicitly (``../shared/DESIGN.md``): ``error_preserving``
(default, h + (f' − f)·W_dec) and ``reconstruction`` (decode(f')). Edits act on gene tokens only.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch

from sae4scfm.causal.interventions import Intervention, latent_edit
from sae4scfm.saes.base import SAE
from sae4scfm.scfm.adapter import HookPointName, ScFMAdapter
from sae4scfm.scfm.tokens import Batch


def feature_edit(sae: SAE, edits: Mapping[int, float], *, mode: str = "error_preserving",
                 op: str = "clamp") -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The residual-stream replacement ``fn(h [B, T, d], gene_mask [B, T]) -> [B, T, d]`` for
    ``adapter.intervene``: latents f = sae.encode(h) at gene tokens, then for each
    ``feature: value`` of ``edits`` f'_j = value (``clamp``; ``zero`` ablates), f_j + value (``add``)
    or f_j · value (``scale``), at every gene token."""
    features = tuple(int(j) for j in edits)
    return latent_edit(sae, [Intervention(features, op, tuple(float(v) for v in edits.values()))], mode=mode)


@torch.no_grad()
def steer(adapter: ScFMAdapter, sae: SAE, layer: HookPointName, batch: Batch, edits: Mapping[int, float], *,
          mode: str = "error_preserving", op: str = "clamp") -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The model's outputs on ``batch`` (clean, steered): ``edits`` applied at the gene tokens of ``layer``
    (a residual-stream layer, or any hook point name of ``adapter.hook_points`` the SAE was trained on)."""
    fn = feature_edit(sae, edits, mode=mode, op=op)
    clean = adapter.run(batch)
    with adapter.intervene(layer, fn):
        steered = adapter.run(batch)
    return clean, steered
