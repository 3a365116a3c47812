"""Gated SAE (Rajamanoharan et al. 2024, "Improving Dictionary Learning with Gated Sparse
Autoencoders").

One encoder matrix, two paths. With z = W_gateᵀ(x − b_dec):
  gate       π_gate = z + b_gate
  magnitude  π_mag  = exp(r_mag) ⊙ z + b_mag      (W_mag = exp(r_mag) ⊙ W_gate, tied per latent)
  f = 1[π_gate > 0] ⊙ ReLU(π_mag);  x̂ = W_dec f + b_dec.
Loss = ‖x − x̂‖² + λ · Σᵢ ReLU(π_gate,i) ‖W_dec,i‖ + ‖x − (W_dec^sg ReLU(π_gate) + b_dec^sg)‖²,
where ^sg is a stop-gradient: the auxiliary term trains only the gate encoder (W_gate, b_gate)
and never the decoder — not W_dec, and not b_dec (b_dec is also detached where the auxiliary
term's π_gate subtracts it). The Heaviside gate passes no gradient; the gate is trained by the
sparsity and auxiliary terms alone.

Parameter names: ``W_enc`` = W_gate [d_in, d_sae], ``b_enc`` = b_gate, plus ``r_mag`` and
``b_mag`` [d_sae]. Both paths share z, so ``fold_input_scale`` (W_enc *= s, b_dec /= s,
W_dec /= s) leaves z, π_gate, π_mag and the latents unchanged: r_mag and b_mag need no change.
Decoder rows are renormalised to unit norm by default (``unit_norm_decoder``); the penalty's
‖W_dec,i‖ factor then is 1, and it matters when the rows keep learned norms.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sae4scfm.saes.base import SAE


class GatedSAE(SAE):
    architecture = "gated"

    def __init__(self, d_in: int, d_sae: int, l1_coeff: float = 1.0, unit_norm_decoder: bool = True,
                 **hyperparams):
        super().__init__(d_in, d_sae, l1_coeff=l1_coeff, unit_norm_decoder=unit_norm_decoder, **hyperparams)
        self.l1_coeff = float(l1_coeff)
        self.unit_norm_decoder = bool(unit_norm_decoder)
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
        """(coefficient-weighted penalty, unweighted penalty) of ``penalty_acts``: here λ · L1."""
        l1 = acts.sum(-1).mean()
        return self.l1_coeff * l1, l1

    def aux_loss(self, x: torch.Tensor) -> torch.Tensor:
        """‖x − (W_dec^sg ReLU(π_gate) + b_dec^sg)‖²: gradient reaches W_gate and b_gate only."""
        b_dec = self.b_dec.detach()
        pi_gate = (x - b_dec) @ self.W_enc + self.b_enc
        return (x - (F.relu(pi_gate) @ self.W_dec.detach() + b_dec)).pow(2).sum(-1).mean()

    def loss(self, x: torch.Tensor, dead: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        pi_gate, pi_mag = self.gate_and_magnitude(x)
        f = self.combine(pi_gate, pi_mag)
        mse = (x - self.decode(f)).pow(2).sum(-1).mean()
        penalty, raw = self.sparsity(self.penalty_acts(x, pi_gate))
        aux = self.aux_loss(x)
        active = f > 0
        return {"loss": mse + penalty + aux, "mse": mse, "l1": raw.detach(), "aux": aux.detach(),
                "l0": active.sum(-1).float().mean(), "fired": active.any(0)}
