"""BatchTopK SAE (Bussmann et al. 2024, "BatchTopK Sparse Autoencoders") with AuxK.

Training: the k·B largest ReLU pre-activations over the whole batch [B, d_sae] are kept, so
the number of active latents varies per token with mean k. Inference is per-sample with a
global threshold θ (buffer ``threshold``, saved with the weights): f = ReLU(pre) · (pre > θ).
θ is the paper's estimator, the expected smallest activation kept per batch, E_X[min kept]:
during training an EMA of it (for mid-run checkpoints), and after the last step
``calibrate`` recomputes it at the final weights over a set of training batches. The EMA
alone lags: the cut-off falls as training proceeds, so an EMA θ sits above it and the
inference L0 comes out below k (6.5 instead of 8 after 300 steps in
``benchmarks/sae_quality.py``; calibrated: 7.95). θ acts on latents, so ``fold_input_scale``
leaves it unchanged. AuxK on dead latents as in ``TopKSAE``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sae4scfm.saes.base import SAE, base_tensors
from sae4scfm.saes.config import SAEConfig, knob
from sae4scfm.saes.topk import linear_tensors, sparse_code_loss


@dataclass(frozen=True)
class BatchTopKConfig(SAEConfig):
    """BatchTopK SAE with AuxK (Bussmann et al. 2024); inference uses a learned global threshold."""

    k: int = knob(16, "mean active latents per token (k x batch_size kept per training batch)")
    auxk_alpha: float = knob(0.03125, "weight of the AuxK loss (1/32)")
    aux_k: int | None = knob(None, "dead latents used by AuxK; null = d_model / 2")
    threshold_momentum: float = knob(0.99, "EMA momentum of the inference threshold (min activation kept per batch)")


class BatchTopKSAE(SAE):
    architecture = "batchtopk"
    config_class = BatchTopKConfig
    # f = ReLU(z)·1[ReLU(z) > θ] == ReLU(z)·1[z > max(θ, 0)]: SAELens' JumpReLU with θ for every latent
    # (SAELens' own convention for trained BatchTopK SAEs)
    saelens_architecture = "jumprelu"

    def __init__(self, d_in: int, d_sae: int, cfg: BatchTopKConfig | None = None, **hyperparams):
        super().__init__(d_in, d_sae, cfg, **hyperparams)
        self.k, self.auxk_alpha = self.cfg.k, self.cfg.auxk_alpha
        self.aux_k = self.cfg.aux_k or max(1, d_in // 2)
        self.threshold_momentum = self.cfg.threshold_momentum
        # < 0: not estimated yet (the first training batch sets it); encode is then plain ReLU
        self.register_buffer("threshold", torch.tensor(-1.0))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.pre_acts(x))
        return pre * (pre > self.threshold)

    def batch_topk(self, pre: torch.Tensor) -> torch.Tensor:
        """Keep the k·B largest entries of ReLU'd ``pre`` [B, d_sae] over the flattened batch."""
        flat = F.relu(pre).flatten()
        values, indices = flat.topk(min(self.k * pre.shape[0], flat.numel()), sorted=False)
        return torch.zeros_like(flat).scatter(0, indices, values).view_as(pre)

    def batch_topk_entries(self, acts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows, cols, values) of the k·B largest entries of ``acts`` [B, d_sae] (>= 0), in
        row-major order. Exact, but fast: the global top k·B is found among each row's top 4k
        candidates, and a row is taken whole only if it could hold more than that."""
        B, d = acts.shape
        n_keep = min(self.k * B, acts.numel())
        m = min(d, 4 * self.k)
        cand, cand_idx = acts.topk(m, dim=-1, sorted=False)  # [B, m]
        top, pos = cand.flatten().topk(n_keep, sorted=False)
        rows, cols = pos // m, cand_idx.flatten()[pos]
        # a row whose m-th candidate reaches the cut-off may hold more: take those rows whole
        full = (cand.min(dim=-1).values >= top.min()) & (top.min() > 0) if m < d else torch.zeros(B, dtype=torch.bool)
        if full.any():
            part, whole = (~full).nonzero().squeeze(1), full.nonzero().squeeze(1)
            values = torch.cat([cand[part].flatten(), acts[whole].flatten()])
            top, pos = values.topk(n_keep, sorted=False)
            n_part = len(part) * m
            rows = torch.where(pos < n_part, part[pos.clamp(max=n_part - 1) // m],
                               whole[(pos - n_part).clamp(min=0) // d])
            cols = torch.where(pos < n_part, cand_idx[part].flatten()[pos.clamp(max=n_part - 1)],
                               (pos - n_part).clamp(min=0) % d)
        order = torch.argsort(rows * acts.shape[1] + cols)
        return rows[order], cols[order], top[order]

    @torch.no_grad()
    def update_threshold(self, f: torch.Tensor) -> None:
        kept = f[f > 0]
        if kept.numel() == 0:
            return
        low = kept.min().to(self.threshold.dtype)
        if self.threshold < 0:
            self.threshold.copy_(low)
        else:
            self.threshold.lerp_(low, 1 - self.threshold_momentum)

    @torch.no_grad()
    def calibrate(self, batches: Iterable[torch.Tensor]) -> None:
        """θ = mean over ``batches`` (scaled training inputs [B, d_in]) of the smallest activation
        BatchTopK keeps in each, at the current weights; unchanged when no batch has one."""
        cutoffs = []
        for x in batches:
            _, _, top = self.batch_topk_entries(F.relu(self.pre_acts(x)))
            kept = top[top > 0]
            if kept.numel():
                cutoffs.append(kept.min())
        if cutoffs:
            self.threshold.copy_(torch.stack(cutoffs).mean().to(self.threshold.dtype))

    def loss(self, x: torch.Tensor, dead: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            rows, cols, top = self.batch_topk_entries(F.relu(self.pre_acts(x)))
        out, values = sparse_code_loss(self, x, rows, cols, top, dead)
        if self.training:
            self.update_threshold(values.detach())
        return out

    # --- interop ------------------------------------------------------------------------
    def saelens_export(self):
        threshold = self.threshold.detach().float().clamp(min=0).expand(self.d_sae).contiguous().cpu()
        return {**base_tensors(self), "threshold": threshold}, {}

    @classmethod
    def from_dictionary_learning(cls, sd, apply_b_dec_to_input):
        """BatchTopKSAE: ReLU(z)·1[ReLU(z) > θ], the same rule and buffers (``k``, ``threshold``) as ours."""
        return cls.from_tensors({**linear_tensors(sd), "threshold": sd.scalar("threshold")},
                                {"k": sd.int("k")}, sd.source)
