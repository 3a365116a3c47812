"""Held-out evaluation of a trained SAE: reconstruction on the eval store and the model's own loss
with the SAE spliced in."""

from __future__ import annotations

import numpy as np
import torch

from sae4scfm.saes.base import SAE
from sae4scfm.scfm.adapter import ScFMAdapter
from sae4scfm.scfm.tokens import TokenizedCells
from sae4scfm.store.shards import ActivationStore


@torch.no_grad()
def evaluate(sae: SAE, store: ActivationStore, adapter: ScFMAdapter, tokens: TokenizedCells, layer: int,
             seed: int, max_cells: int, batch_size: int = 4096) -> dict:
    """Held-out metrics of an SAE acting on raw activations.

    FVU = Σ‖x − x̂‖² / Σ‖x − x̄‖² over all held-out tokens; explained_variance = 1 − FVU;
    l0 = mean active latents per token; dead_fraction = latents that never fire on them.
    Output loss: the model's own loss (masked-value MSE for scGPT, same masks) on up to
    ``max_cells`` held-out cells clean, with the SAE reconstruction spliced in at gene
    tokens of ``layer``, and with those tokens mean-ablated; ``loss_recovered`` =
    (ablated − spliced) / (ablated − clean).
    """
    device = next(sae.parameters()).device
    sse = sum_x2 = l0 = n = 0.0
    sum_x = torch.zeros(sae.d_in, dtype=torch.float64, device=device)
    fired = torch.zeros(sae.d_sae, dtype=torch.bool, device=device)
    for shard in store.iter_shards():
        for x in shard["acts"].split(batch_size):
            x = x.to(device).float()
            f = sae.encode(x)
            x_hat = sae.decode(f)
            sse += float((x - x_hat).pow(2).sum())
            sum_x += x.sum(0).double()
            sum_x2 += float(x.double().pow(2).sum())
            active = f > 0
            l0 += float(active.sum())
            fired |= active.any(0)
            n += len(x)
    total_var = sum_x2 - float(sum_x.pow(2).sum()) / n
    mean = (sum_x / n).float()
    metrics = {"fvu": sse / total_var, "explained_variance": 1 - sse / total_var, "l0": l0 / n,
               "dead_fraction": float((~fired).float().mean()), "n_eval_tokens": int(n)}

    cells = tokens.subset(np.arange(min(max_cells, len(tokens))))

    def loss_with(fn=None) -> float:
        gen = torch.Generator().manual_seed(seed)
        total = count = 0.0
        for batch in cells.batches(32):
            if fn is None:
                s, c = adapter.output_loss(batch, gen)
            else:
                with adapter.intervene(layer, fn):
                    s, c = adapter.output_loss(batch, gen)
            total, count = total + s, count + c
        return total / max(count, 1)

    def splice(h, mask):
        return _replace(h, mask, sae(h[mask].to(device)))

    def ablate(h, mask):
        return _replace(h, mask, mean.to(h.device).expand(int(mask.sum()), -1))

    clean, spliced, ablated = loss_with(), loss_with(splice), loss_with(ablate)
    metrics.update(loss_clean=clean, loss_spliced=spliced, loss_mean_ablated=ablated,
                   loss_delta=spliced - clean,
                   loss_recovered=(ablated - spliced) / (ablated - clean) if ablated != clean else float("nan"))
    return metrics


def _replace(h: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """h [B, T, d] with the positions of ``mask`` [B, T] replaced by ``rows`` [mask.sum(), d]."""
    out = h.clone()
    out[mask] = rows.to(h.dtype)
    return out
