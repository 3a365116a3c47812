"""Gated SAE (Rajamanoharan et al. 2024, "Improving Dictionary Learning with Gated Sparse
Autoencoders").

One encoder matrix, two paths. With z = W_gateᵀ(x − b_dec):
  gate       π_gate = z + b_gate
  magnitude  π_mag  = exp(r_mag) ⊙ z + b_mag      (W_mag = exp(r_mag) ⊙ W_gate, tied per latent)
  f = 1[π_gate > 0] ⊙ ReLU(π_mag);  x̂ = W_dec f + b_dec.
Loss = ‖x − x̂‖² + λ · Σᵢ ReLU(π_gate,i) ‖W_dec,i‖ + ‖x − (W_dec^sg ReLU(π_gate) + b_dec^sg)‖²,
where ^sg is a stop-gradient: the auxiliary term trains only the gate encoder (W_gate, b_gate),
never the decoder (b_dec is also detached where the auxiliary term's π_gate subtracts it). The
Heaviside gate passes no gradient; the gate is trained by the sparsity and auxiliary terms alone.

That is the paper's loss, with unit-norm decoder rows (the default). With learned norms
(``unit_norm_decoder: false``) the auxiliary term uses the live decoder (W_dec and b_dec, no
stop-gradient): a frozen one leaves a direction, W_dec,i → a·W_dec,i with r_mag,i → r_mag,i −
log a, that keeps x̂ and the gates unchanged while the penalty scales by a, so the decoder
norms decay, the penalty with them, and the SAE ends dense or dead (benchmarks/sae_quality.py,
demo, L0 16: FVU 0.57 with 70% dead latents frozen; 0.125 with W_dec live; 0.093 with W_dec and
b_dec live). Rajamanoharan's note on combining Gated SAEs with the ‖W_dec‖-weighted penalty
gives the same rule: unfreeze the decoder in the auxiliary task (or freeze it in the penalty),
not one without the other.

Parameter names: ``W_enc`` = W_gate [d_in, d_sae], ``b_enc`` = b_gate, plus ``r_mag`` and
``b_mag`` [d_sae]. Both paths share z, so ``fold_input_scale`` (W_enc *= s, b_dec /= s,
W_dec /= s) leaves z, π_gate, π_mag and the latents unchanged: r_mag and b_mag need no change.
Decoder rows are renormalised to unit norm by default (``unit_norm_decoder``); the penalty's
‖W_dec,i‖ factor then is 1, and it matters when the rows keep learned norms.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sae4scfm.saes.base import SAE, base_tensors, has_unit_rows
from sae4scfm.saes.config import SAEConfig, knob


@dataclass(frozen=True)
class GatedConfig(SAEConfig):
    """Gated SAE (Rajamanoharan et al. 2024): gate path decides which latents fire, magnitude path (W_mag = exp(r_mag) W_gate) how much."""

    l1_coeff: float = knob(5.0, "weight of the L1 penalty on ReLU(pi_gate) * ||W_dec,i|| (centred inputs are scaled "
                                "to unit variance per dimension); L0 ~16 on the demo model")
    unit_norm_decoder: bool = knob(True, "true: decoder rows renormalised to 1 after each step; false: they keep "
                                         "learned norms (and the auxiliary term trains the decoder)")


class GatedSAE(SAE):
    architecture = "gated"
    config_class = GatedConfig
    saelens_architecture = "gated"

    def __init__(self, d_in: int, d_sae: int, cfg: GatedConfig | None = None, **hyperparams):
        super().__init__(d_in, d_sae, cfg, **hyperparams)
        self.l1_coeff = self.cfg.l1_coeff
        self.unit_norm_decoder = self.cfg.unit_norm_decoder
        self.r_mag = nn.Parameter(torch.zeros(d_sae))
        self.b_mag = nn.Parameter(torch.zeros(d_sae))
        with torch.no_grad():  # small initial latents, as for the standard SAE
            self.W_enc *= 0.1

    def gate_and_magnitude(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(π_gate, π_mag), each [N, d_sae]."""
        z = (x - self.b_dec) @ self.W_enc
        return z + self.b_enc, z * self.r_mag.exp() + self.b_mag

    @staticmethod
    def combine(pi_gate: torch.Tensor, pi_mag: torch.Tensor) -> torch.Tensor:
        return (pi_gate > 0).to(pi_mag.dtype) * F.relu(pi_mag)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.combine(*self.gate_and_magnitude(x))

    def penalty_acts(self, x: torch.Tensor, pi_gate: torch.Tensor | None = None) -> torch.Tensor:
        """The non-negative activations the sparsity penalty acts on: ReLU(π_gate,i) ‖W_dec,i‖."""
        if pi_gate is None:
            pi_gate = self.pre_acts(x)
        return F.relu(pi_gate) * self.W_dec.norm(dim=1)

    def sparsity(self, acts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(coefficient-weighted penalty, unweighted penalty) of ``penalty_acts``: here λ · L1
        (λ times the trainer's warm-up factor ``sparsity_scale``)."""
        l1 = acts.sum(-1).mean()
        return self.sparsity_scale * self.l1_coeff * l1, l1

    def aux_loss(self, x: torch.Tensor) -> torch.Tensor:
        """‖x − (W_dec^sg ReLU(π_gate) + b_dec^sg)‖²: gradient reaches W_gate and b_gate (and, when
        decoder norms are learned, W_dec and b_dec; see the module docstring)."""
        W_dec, b_dec = self.W_dec, self.b_dec
        if self.unit_norm_decoder:
            W_dec, b_dec = W_dec.detach(), b_dec.detach()
        pi_gate = (x - b_dec) @ self.W_enc + self.b_enc
        return (x - (F.relu(pi_gate) @ W_dec + b_dec)).pow(2).sum(-1).mean()

    def loss(self, x: torch.Tensor, dead: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        pi_gate, pi_mag = self.gate_and_magnitude(x)
        f = self.combine(pi_gate, pi_mag)
        mse = (x - self.decode(f)).pow(2).sum(-1).mean()
        penalty, raw = self.sparsity(self.penalty_acts(x, pi_gate))
        aux = self.aux_loss(x)
        active = f > 0
        return {"loss": mse + penalty + aux, "mse": mse, "l1": raw.detach(), "aux": aux.detach(),
                "l0": active.sum(-1).float().mean(), "fired": active.any(0)}

    # --- interop ------------------------------------------------------------------------
    def saelens_export(self):
        """SAELens' GatedSAE: our b_enc is its b_gate."""
        tensors = base_tensors(self)
        tensors["b_gate"] = tensors.pop("b_enc")
        tensors.update({k: getattr(self, k).detach().float().contiguous().cpu() for k in ("b_mag", "r_mag")})
        return tensors, {}

    @classmethod
    def from_saelens(cls, weights, cfg):
        W_enc, W_dec, b_dec = (weights[k] for k in ("W_enc", "W_dec", "b_dec"))
        b_enc, b_mag, r_mag = weights["b_gate"], weights["b_mag"], weights["r_mag"]
        if not cfg.get("apply_b_dec_to_input", True):  # both paths share z = x W: fold b_dec into each bias
            shift = b_dec @ W_enc
            b_enc, b_mag = b_enc + shift, b_mag + r_mag.exp() * shift
        return cls.from_tensors({"W_enc": W_enc, "W_dec": W_dec, "b_enc": b_enc, "b_dec": b_dec, "r_mag": r_mag,
                                 "b_mag": b_mag}, {"unit_norm_decoder": has_unit_rows(W_dec)}, weights.source)

    @classmethod
    def from_dictionary_learning(cls, sd, apply_b_dec_to_input):
        """GatedAutoEncoder: encoder(x − decoder_bias) as ours; nn.Linear weights, ``gate_bias``,
        ``mag_bias``, ``r_mag``."""
        W_dec = sd["decoder.weight"].t()
        tensors = {"W_enc": sd["encoder.weight"].t(), "W_dec": W_dec, "b_enc": sd["gate_bias"],
                   "b_dec": sd["decoder_bias"], "r_mag": sd["r_mag"], "b_mag": sd["mag_bias"]}
        return cls.from_tensors(tensors, {"unit_norm_decoder": has_unit_rows(W_dec)}, sd.source)
