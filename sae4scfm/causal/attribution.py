"""Attribution: estimate, in a few passes, the effect of ablating each SAE feature on a metric of the
model's outputs, and measure it exactly by ablation to check the estimate.

The effect of feature j in cell b is m_b(h with f_j → target) − m_b(h), target 0 (zero ablation), with
the edit made at every gene token of the cell in ``error_preserving`` mode (h + (f' − f)·W_dec).

- ``grad`` (attribution patching, first order): ∇_h m_b · Δh = Σ_t (target − f_tj) (∂m_b/∂h_t · W_dec[j]),
  one forward and one backward for every feature at once, both through only the blocks after the SAE's layer
  (the forward starts from the cached clean residual stream there);
- ``ig`` (integrated gradients, as Marks et al.'s sparse feature circuits do): the same product with the
  gradient averaged over ``steps`` points on the path h + α·Σ_j (target − f_j)·W_dec[j], α ∈ (0, 1)
  (all features moved together), the points stacked in one forward;
- ``exact``: one ablation per feature and cell where it fires (``interventions.ablation_runs``), many stacked
  along the batch axis of each forward from the cached clean state.

A metric maps the model's outputs {name: [B, ...]} to one number per cell [B] (differentiable).
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Callable

import numpy as np
import torch
from scipy import stats

from sae4scfm.causal.interventions import ablation_runs, resid_layer, stack_batch
from sae4scfm.errors import InputError
from sae4scfm.saes.base import SAE
from sae4scfm.scfm.adapter import HookPointName, ScFMAdapter
from sae4scfm.scfm.tokens import Batch

Metric = Callable[[dict[str, torch.Tensor]], torch.Tensor]
METHODS = ("grad", "ig")


def per_cell(values: torch.Tensor, rows: torch.Tensor, n_cells: int) -> torch.Tensor:
    """Sum token rows [N, F] into their cells [n_cells, F] (``rows`` [N] = each token's batch row)."""
    return torch.zeros(n_cells, values.shape[1], dtype=values.dtype, device=values.device).index_add_(0, rows, values)


def _gradient_at(adapter: ScFMAdapter, hook_point: HookPointName, batch: Batch, metric: Metric,
                 shift: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                 prefix: torch.Tensor | None = None) -> torch.Tensor:
    """∂(Σ_b m_b)/∂h at ``hook_point`` [B, T, d], with h replaced by ``shift(h, gene_mask)`` when given
    (cells do not interact in a forward, so row b holds ∂m_b/∂h_b). ``prefix`` [B, T, d]: the batch's clean
    state at a residual-stream ``hook_point``, so the forward (and the backward) run only the blocks after it."""
    leaf = {}

    def fn(h, gene_mask):
        x = (shift(h, gene_mask) if shift else h).detach().requires_grad_(True)
        leaf["h"] = x
        return x

    with ExitStack() as stack:
        stack.enter_context(torch.enable_grad())
        if prefix is not None:
            stack.enter_context(adapter.starting_at(resid_layer(hook_point), prefix.clone()))
        stack.enter_context(adapter.intervene(hook_point, fn))
        m = metric(adapter.run(batch))
        # only the path to h: no weight gradients computed (nor accumulated into the model's .grad)
        (grad,) = torch.autograd.grad(m.sum(), leaf["h"])
    return grad


@torch.no_grad()
def _clean_code(adapter: ScFMAdapter, sae: SAE, hook_point: HookPointName, batch: Batch):
    """(h [B, T, d], f [N, d_sae] the SAE code of the N gene tokens, rows [N] their batch rows)."""
    h = adapter.capture(batch, [hook_point])[hook_point]
    mask = batch.gene_mask.to(h.device)
    f = sae.encode(h[mask].float())
    return h, f, torch.nonzero(mask, as_tuple=True)[0]


def attribute(adapter: ScFMAdapter, sae: SAE, hook_point: HookPointName, batch: Batch, metric: Metric, *,
              method: str = "grad", steps: int = 8) -> torch.Tensor:
    """Estimated zero-ablation effect of every feature on ``metric`` per cell: [B, d_sae]
    (``method`` grad | ig; ``steps`` path points for ig). Features silent in a cell get 0."""
    if method not in METHODS:
        raise InputError(f"attribution method={method!r} is unknown; use one of {', '.join(METHODS)}.")
    batch = batch.to(adapter.device)
    B = len(batch.cell_index)
    h, f, rows = _clean_code(adapter, sae, hook_point, batch)
    resid = resid_layer(hook_point) is not None
    delta_f = -f  # target 0
    if method == "grad":
        g = _gradient_at(adapter, hook_point, batch, metric, prefix=h if resid else None)[batch.gene_mask]
    else:
        if steps < 1:
            raise InputError(f"attribution steps={steps}: use at least 1 path point.")
        alphas = (torch.arange(steps, dtype=torch.float32) + 0.5) / steps  # midpoints of (0, 1)
        stacked = stack_batch(batch, steps)
        shift_rows = (delta_f @ sae.W_dec).detach()  # [N, d]: the move of all features to target

        def shift(h, gene_mask):
            out = h.clone()
            r = torch.nonzero(gene_mask, as_tuple=True)[0]
            a = alphas.to(h.device)[r // B]
            out[gene_mask] = h[gene_mask] + a[:, None] * shift_rows.repeat(steps, 1).to(h.dtype)
            return out

        grads = _gradient_at(adapter, hook_point, stacked, metric, shift,
                             prefix=h.repeat(steps, 1, 1) if resid else None)[stacked.gene_mask]
        g = grads.reshape(steps, -1, grads.shape[-1]).mean(0)
    with torch.no_grad():
        token_effect = (g.float() @ sae.W_dec.T) * delta_f
        return per_cell(token_effect, rows, B)


@torch.no_grad()
def exact_ablation(adapter: ScFMAdapter, sae: SAE, hook_point: HookPointName, batch: Batch, metric: Metric,
                   features: list[int] | np.ndarray, *, per_forward: int = 16) -> torch.Tensor:
    """Measured zero-ablation effect of each of ``features`` on ``metric`` per cell: [B, len(features)]
    (error_preserving, every gene token; ``ablation_runs``: ``per_forward`` ablations × the cells where each
    fires stacked per forward, on the residual stream from the cached clean state at ``hook_point``; 0 where
    it is silent)."""
    batch = batch.to(adapter.device)
    clean = metric(adapter.run(batch))
    out = torch.zeros(len(batch.cell_index), len(features), dtype=clean.dtype, device=clean.device)
    for fi, ci, m in ablation_runs(adapter, sae, hook_point, batch, features, lambda stacked: metric(adapter.run(stacked)),
                                   per_forward=per_forward):
        out[ci.to(out.device), fi.to(out.device)] = m - clean[ci.to(clean.device)]
    return out


def agreement(estimated: np.ndarray, exact: np.ndarray, top: int = 50) -> dict[str, float]:
    """How well per-feature effects ``estimated`` [F] rank like ``exact`` [F]: Spearman ρ of the
    effects, and the overlap of the ``top`` features by |effect| (fraction of ``top``)."""
    estimated, exact = np.asarray(estimated, float), np.asarray(exact, float)
    top = min(top, len(exact))
    overlap = len(set(np.argsort(-np.abs(estimated))[:top]) & set(np.argsort(-np.abs(exact))[:top])) / max(top, 1)
    rho = stats.spearmanr(estimated, exact).statistic if len(exact) > 1 else float("nan")
    return {"spearman": float(rho), f"top{top}_overlap": float(overlap), "n_features": int(len(exact))}


def mean_output(key: str, tokens: torch.Tensor | None = None) -> Metric:
    """Metric: the mean of output ``key`` per cell over the positions ``tokens`` [B, T] bool
    (all positions when None), e.g. the predicted expression (``mlm``) of some genes."""

    def metric(out: dict[str, torch.Tensor]) -> torch.Tensor:
        v = out[key]
        if v.dim() == 1:
            return v
        if tokens is None:
            return v.reshape(v.shape[0], -1).mean(1)
        w = tokens.to(v.device).repeat(v.shape[0] // tokens.shape[0], 1).to(v.dtype)
        return (v * w).sum(1) / w.sum(1).clamp(min=1)

    return metric


def projection(key: str, direction: torch.Tensor) -> Metric:
    """Metric: output ``key`` [B, d] (e.g. ``cell_emb``) projected on ``direction`` [d]."""
    return lambda out: out[key].float() @ direction.to(out[key].device).float()
