"""Causal tests of SAE features: set, add to or ablate features inside the model's forward.

Two intervention modes, always named explicitly (``../shared/DESIGN.md``):

- ``reconstruction``: h := decode(f'), the SAE's reconstruction with edited latents f';
- ``error_preserving`` (default): h := h + (f' − f) @ W_dec, i.e. decode(f') + (h − decode(f)),
  so an empty edit leaves the model's forward exactly unchanged.

Edits act on gene tokens only (``gene_mask``); special tokens and padding are untouched.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch

from sae4scfm.errors import InputError
from sae4scfm.saes.base import SAE
from sae4scfm.scfm.adapter import ScFMAdapter
from sae4scfm.scfm.tokens import Batch

MODES = ("error_preserving", "reconstruction")
OPS = ("set", "add", "scale")


def feature_edit(sae: SAE, edits: Mapping[int, float], *, mode: str = "error_preserving",
                 op: str = "set") -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The residual-stream replacement ``fn(h [B, T, d], gene_mask [B, T]) -> [B, T, d]`` for
    ``adapter.intervene``: latents f = sae.encode(h) at gene tokens, then for each
    ``feature: value`` of ``edits`` f'_j = value (``set``; 0 ablates), f_j + value (``add``)
    or f_j · value (``scale``)."""
    if mode not in MODES:
        raise InputError(f"steering mode={mode!r} is unknown; use one of {', '.join(MODES)}.")
    if op not in OPS:
        raise InputError(f"steering op={op!r} is unknown; use one of {', '.join(OPS)}.")
    bad = [j for j in edits if not 0 <= int(j) <= sae.d_sae - 1]
    if bad:
        raise InputError(f"steering features {bad} are out of range: this SAE has features 0..{sae.d_sae - 1}.")
    idx = torch.tensor([int(j) for j in edits], dtype=torch.long)
    val = torch.tensor([float(v) for v in edits.values()], dtype=torch.float32)

    def fn(h: torch.Tensor, gene_mask: torch.Tensor) -> torch.Tensor:
        device = next(sae.parameters()).device
        x = h[gene_mask].to(device).float()
        f = sae.encode(x)
        f_new = f.clone()
        i, v = idx.to(device), val.to(device)
        if op == "set":
            f_new[:, i] = v
        elif op == "add":
            f_new[:, i] += v
        else:
            f_new[:, i] *= v
        if mode == "reconstruction":
            rows = sae.decode(f_new)
        else:
            rows = x + (f_new[:, i] - f[:, i]) @ sae.W_dec[i]
        out = h.clone()
        out[gene_mask] = rows.to(h.dtype).to(h.device)
        return out

    return fn


@torch.no_grad()
def steer(adapter: ScFMAdapter, sae: SAE, layer: int | str, batch: Batch, edits: Mapping[int, float], *,
          mode: str = "error_preserving", op: str = "set") -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The model's outputs on ``batch`` (clean, steered): ``edits`` applied at the gene tokens of ``layer``
    (a residual-stream layer, or any hook point name of ``adapter.hook_points`` the SAE was trained on)."""
    fn = feature_edit(sae, edits, mode=mode, op=op)
    clean = adapter.run(batch)
    with adapter.intervene(layer, fn):
        steered = adapter.run(batch)
    return clean, steered
