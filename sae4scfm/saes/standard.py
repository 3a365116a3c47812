"""Standard ReLU SAE with an L1 sparsity penalty (Bricken et al. 2023).

f = ReLU(W_encᵀ(x − b_dec) + b_enc); x̂ = W_dec f + b_dec.
Loss = ‖x − x̂‖² + λ · Σᵢ fᵢ (λ warmed up by the trainer's ``sparsity_scale``), with unit-norm
decoder rows (the shared loop renormalises them).
With ``decoder_norm_l1`` (Anthropic's April 2024 update) the penalty is λ · Σᵢ fᵢ ‖W_dec,i‖ and
the decoder rows keep their learned norms (``unit_norm_decoder = False``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sae4scfm.saes.base import SAE, base_tensors, has_unit_rows
from sae4scfm.saes.config import SAEConfig, knob


@dataclass(frozen=True)
class StandardConfig(SAEConfig):
    """Standard ReLU SAE with an L1 penalty (Bricken et al. 2023; Anthropic April 2024 update via decoder_norm_l1)."""

    l1_coeff: float = knob(2.5, "weight of the L1 penalty (centred inputs are scaled to unit variance per "
                                "dimension); L0 ~16 on the demo model (decoder_norm_l1: ~3.5)")
    decoder_norm_l1: bool = knob(False, "true: penalty sum_i f_i * ||W_dec,i|| and decoder rows are not renormalised")


class StandardSAE(SAE):
    architecture = "standard"
    config_class = StandardConfig
    saelens_architecture = "standard"

    def __init__(self, d_in: int, d_sae: int, cfg: StandardConfig | None = None, **hyperparams):
        super().__init__(d_in, d_sae, cfg, **hyperparams)
        self.l1_coeff, self.decoder_norm_l1 = self.cfg.l1_coeff, self.cfg.decoder_norm_l1
        self.unit_norm_decoder = not self.decoder_norm_l1
        with torch.no_grad():  # small initial latents: a dense ReLU code of unit rows overshoots x
            self.W_enc *= 0.1
            if self.decoder_norm_l1:  # Anthropic (April 2024): decoder rows of norm 0.1, W_enc = W_decᵀ
                self.W_dec *= 0.1
                self.W_enc.copy_(self.W_dec.t())

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.pre_acts(x))

    def l1_penalty(self, f: torch.Tensor) -> torch.Tensor:
        """Per-token Σᵢ fᵢ (· ‖W_dec,i‖ with ``decoder_norm_l1``), batch mean."""
        if self.decoder_norm_l1:
            f = f * self.W_dec.norm(dim=1)
        return f.sum(-1).mean()

    def loss(self, x: torch.Tensor, dead: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        f = self.encode(x)
        mse = (x - self.decode(f)).pow(2).sum(-1).mean()
        l1 = self.l1_penalty(f)
        active = f > 0
        return {"loss": mse + self.sparsity_scale * self.l1_coeff * l1, "mse": mse, "l1": l1.detach(),
                "l0": active.sum(-1).float().mean(), "fired": active.any(0)}

    # --- interop ------------------------------------------------------------------------
    def saelens_export(self):
        return base_tensors(self), {}

    @classmethod
    def from_saelens(cls, weights, cfg):
        W_enc, W_dec, b_enc, b_dec = weights.saelens_base(cfg)
        return cls.from_tensors({"W_enc": W_enc, "W_dec": W_dec, "b_enc": b_enc, "b_dec": b_dec},
                                {"decoder_norm_l1": not has_unit_rows(W_dec)}, weights.source)

    @classmethod
    def from_dictionary_learning(cls, sd, apply_b_dec_to_input):
        """AutoEncoder: nn.Linear weights (encoder.weight [d_sae, d_in], decoder.weight [d_in, d_sae]),
        b_dec named ``bias``; learned decoder norms unless every row has norm 1."""
        W_dec = sd["decoder.weight"].t()
        tensors = {"W_enc": sd["encoder.weight"].t(), "W_dec": W_dec, "b_enc": sd["encoder.bias"], "b_dec": sd["bias"]}
        return cls.from_tensors(tensors, {"decoder_norm_l1": not has_unit_rows(W_dec)}, sd.source)
