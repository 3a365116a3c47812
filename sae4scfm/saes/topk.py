"""TopK SAE (Gao et al. 2024, "Scaling and evaluating sparse autoencoders") with AuxK.

f = scatter(TopK(ReLU(W_encᵀ(x − b_dec) + b_enc), k)); x̂ = W_dec f + b_dec.
Loss = ‖x − x̂‖² + α · ‖e − ê‖² / ‖e − ē‖², where e = x − x̂ is the residual and ê
its reconstruction from the top ``aux_k`` pre-activations of dead latents alone
(gradient reaches the encoder through ê; b_dec is not used in ê).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sae4scfm.saes.base import SAE, auxk_loss, base_tensors, selected_pre_acts
from sae4scfm.saes.config import SAEConfig, knob


@dataclass(frozen=True)
class TopKConfig(SAEConfig):
    """TopK SAE with AuxK (Gao et al. 2024)."""

    k: int = knob(16, "active latents per token")
    auxk_alpha: float = knob(0.03125, "weight of the AuxK loss (1/32)")
    aux_k: int | None = knob(None, "dead latents used by AuxK; null = d_model / 2")


class TopKSAE(SAE):
    architecture = "topk"
    config_class = TopKConfig
    saelens_architecture = "topk"

    def __init__(self, d_in: int, d_sae: int, cfg: TopKConfig | None = None, **hyperparams):
        super().__init__(d_in, d_sae, cfg, **hyperparams)
        self.k, self.auxk_alpha = self.cfg.k, self.cfg.auxk_alpha
        self.aux_k = self.cfg.aux_k or max(1, d_in // 2)

    def topk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(values [N, k] >= 0, indices [N, k]) of the k largest ReLU pre-activations."""
        values, indices = self.pre_acts(x).topk(self.k, dim=-1, sorted=False)
        return F.relu(values), indices

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        values, indices = self.topk(x)
        return torch.zeros(x.shape[0], self.d_sae, dtype=values.dtype, device=x.device).scatter_(-1, indices, values)

    def decode_sparse(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """x̂ from the k active latents only: [N, k], [N, k] -> [N, d_in]."""
        return F.embedding_bag(indices, self.W_dec, per_sample_weights=values, mode="sum") + self.b_dec

    def loss(self, x: torch.Tensor, dead: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            top, indices = self.pre_acts(x).topk(self.k, dim=-1, sorted=False)
        rows = torch.arange(len(x), device=x.device).repeat_interleave(self.k)
        return sparse_code_loss(self, x, rows, indices.flatten(), top.flatten(), dead)[0]

    # --- interop ------------------------------------------------------------------------
    def saelens_export(self):
        return base_tensors(self), {"k": self.k, "rescale_acts_by_decoder_norm": False}

    @classmethod
    def from_saelens(cls, weights, cfg):
        W_enc, W_dec, b_enc, b_dec = weights.saelens_base(cfg)
        if cfg.get("rescale_acts_by_decoder_norm", False):  # z·‖W_dec,i‖ then TopK: fold the norms in
            n = W_dec.norm(dim=1)
            W_enc, b_enc, W_dec = W_enc * n, b_enc * n, W_dec / n[:, None]
        return cls.from_tensors({"W_enc": W_enc, "W_dec": W_dec, "b_enc": b_enc, "b_dec": b_dec},
                                {"k": weights.cfg_int(cfg, "k")}, weights.source)

    @classmethod
    def from_dictionary_learning(cls, sd, apply_b_dec_to_input):
        """AutoEncoderTopK: nn.Linear weights, ``b_dec``, a ``k`` buffer; inference is per-token TopK
        (their threshold is only used on request)."""
        return cls.from_tensors(linear_tensors(sd), {"k": sd.int("k")}, sd.source)


def linear_tensors(sd) -> dict[str, torch.Tensor]:
    """W_enc, W_dec, b_enc, b_dec of a dictionary_learning TopK-family state dict (nn.Linear
    encoder.weight [d_sae, d_in], decoder.weight [d_in, d_sae], encoder.bias, b_dec)."""
    return {"W_enc": sd["encoder.weight"].t(), "W_dec": sd["decoder.weight"].t(), "b_enc": sd["encoder.bias"],
            "b_dec": sd["b_dec"]}


def sparse_code_loss(sae: SAE, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, top: torch.Tensor,
                     dead: torch.Tensor | None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The TopK-family loss of a code chosen without grad: entries (``rows`` [nnz] ascending,
    ``cols`` [nnz]) with pre-activations ``top`` [nnz]. One dense encoder GEMM was spent on the
    choice; gradients flow through the chosen pre-activations and their decoder rows only.
    ``sae`` has ``aux_k`` and ``auxk_alpha``. Returns (loss dict, ReLU'd values [nnz])."""
    values = F.relu(selected_pre_acts(sae, x, rows, cols, top))
    offsets = torch.searchsorted(rows, torch.arange(len(x), device=x.device))
    x_hat = F.embedding_bag(cols, sae.W_dec, offsets, per_sample_weights=values, mode="sum") + sae.b_dec
    mse = (x - x_hat).pow(2).sum(-1).mean()
    active = values > 0
    fired = torch.zeros(sae.d_sae, dtype=torch.bool, device=x.device)
    fired[cols[active]] = True
    aux = auxk_loss(sae, x, (x - x_hat).detach(), dead, sae.aux_k) if sae.auxk_alpha > 0 \
        else torch.zeros((), device=x.device)
    out = {"loss": mse + sae.auxk_alpha * aux, "mse": mse, "auxk": aux.detach(),
           "l0": active.sum().float() / len(x), "fired": fired}
    return out, values
