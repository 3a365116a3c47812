"""Matryoshka BatchTopK SAE (Bussmann et al. 2025, "Learning Multi-Level Features with Matryoshka
Sparse Autoencoders"; Nabeshima 2024, "Matryoshka Sparse Autoencoders") with AuxK.

The d_sae latents are split into nested groups 0..G−1 of sizes ``group_fractions`` · d_sae
(contiguous index ranges, the first ones the coarsest). Latents are selected as in
``BatchTopKSAE`` (the k·B largest ReLU pre-activations of the batch, all groups together), and

  Loss = Σ_g w_g ‖x − x̂_{≤g}‖² + α · AuxK,   x̂_{≤g} = Σ_{i in groups 0..g} fᵢ W_dec,i + b_dec,

so each prefix of the dictionary has to reconstruct x on its own (w = ``group_weights``; the
last prefix is the whole SAE, whose error is reported as ``mse``). Inference, the learned global
threshold θ and AuxK are BatchTopK's, inherited unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sae4scfm.errors import InputError
from sae4scfm.saes.base import auxk_loss
from sae4scfm.saes.batchtopk import BatchTopKConfig, BatchTopKSAE
from sae4scfm.saes.config import knob


@dataclass(frozen=True)
class MatryoshkaConfig(BatchTopKConfig):
    """Matryoshka BatchTopK SAE with AuxK (Bussmann et al. 2025; Nabeshima 2024): nested latent groups, each prefix reconstructs x."""

    k: int = knob(16, "mean active latents per token (k x batch_size kept per training batch, all groups together)")
    group_fractions: tuple[float, ...] = knob((0.0625, 0.125, 0.25, 0.5625), "sizes of the nested groups as "
                                              "fractions of d_sae (positive, sum 1; first = coarsest)")
    group_weights: tuple[float, ...] | None = knob(None, "weight of each prefix's reconstruction error in the "
                                                   "loss (one per group); null = equal, 1 / n_groups")

    def __post_init__(self):
        fractions = list(self.group_fractions)
        if not fractions or min(fractions) <= 0 or abs(sum(fractions) - 1) > 1e-6:
            raise InputError(f"sae.hyperparams.group_fractions={fractions} must be positive and sum to 1.")
        if self.group_weights is not None and (len(self.group_weights) != len(fractions)
                                               or min(self.group_weights) < 0):
            raise InputError(f"sae.hyperparams.group_weights={list(self.group_weights)} must be {len(fractions)} "
                             "non-negative numbers (one per group), or null for equal weights.")


class MatryoshkaSAE(BatchTopKSAE):
    architecture = "matryoshka"
    config_class = MatryoshkaConfig

    def __init__(self, d_in: int, d_sae: int, cfg: MatryoshkaConfig | None = None, **hyperparams):
        super().__init__(d_in, d_sae, cfg, **hyperparams)
        fractions = list(self.cfg.group_fractions)
        weights = [1.0 / len(fractions)] * len(fractions) if self.cfg.group_weights is None else \
            list(self.cfg.group_weights)
        ends = [round(c * d_sae) for c in torch.tensor(fractions, dtype=torch.float64).cumsum(0).tolist()]
        ends[-1] = d_sae
        if any(b <= a for a, b in zip([0, *ends], ends)):
            raise InputError(f"sae.hyperparams.group_fractions={fractions} leaves an empty group of "
                             f"d_sae={d_sae} latents.")
        self.group_ends, self.group_weights = ends, weights  # group g = latents [ends[g-1], ends[g])

    def prefix_mses(self, x: torch.Tensor, f: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(‖x − x̂_{≤g}‖² per token, batch mean, for each prefix g of groups; the full x̂ [B, d_in])."""
        x_hat, start, out = self.b_dec.expand_as(x), 0, []
        for end in self.group_ends:
            x_hat = x_hat + f[:, start:end] @ self.W_dec[start:end]
            out.append((x - x_hat).pow(2).sum(-1).mean())
            start = end
        return out, x_hat

    def loss(self, x: torch.Tensor, dead: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        pre = self.pre_acts(x)
        f = self.batch_topk(pre)
        if self.training:
            self.update_threshold(f)
        mses, x_hat = self.prefix_mses(x, f)
        mse = mses[-1]  # the whole dictionary
        matryoshka = sum(w * m for w, m in zip(self.group_weights, mses))
        aux = auxk_loss(self, x, (x - x_hat).detach(), dead, self.aux_k) if self.auxk_alpha > 0 \
            else torch.zeros((), device=x.device)
        active = f > 0
        return {"loss": matryoshka + self.auxk_alpha * aux, "mse": mse, "auxk": aux.detach(),
                "prefix_mse": torch.stack(mses).detach(),
                "l0": active.sum(-1).float().mean(), "fired": active.any(0)}

    # --- interop ------------------------------------------------------------------------
    @classmethod
    def from_dictionary_learning(cls, sd, apply_b_dec_to_input):
        """MatryoshkaBatchTopKSAE: W_enc [d_in, d_sae] as ours, groups as sizes (``group_sizes``),
        ``k`` and ``threshold`` buffers."""
        tensors = {k: sd[k] for k in ("W_enc", "W_dec", "b_enc", "b_dec")}
        d_sae = tensors["W_enc"].shape[-1]
        hp = {"k": sd.int("k"), "group_fractions": [int(n) / d_sae for n in sd["group_sizes"].flatten().tolist()]}
        return cls.from_tensors({**tensors, "threshold": sd.scalar("threshold")}, hp, sd.source)
