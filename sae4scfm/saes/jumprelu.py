"""JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping Ahead: Improving Reconstruction Fidelity
with JumpReLU Sparse Autoencoders").

z = W_encᵀ(x − b_dec) + b_enc; f = z · H(z − θ), θ = exp(log_threshold) > 0 per latent.
Loss = ‖x − x̂‖² + λ · Σᵢ H(zᵢ − θᵢ) (λ warmed up by the trainer's ``sparsity_scale``). H has no
useful gradient, so θ is trained with the paper's straight-through pseudo-derivatives, rectangle
kernel K(u) = 1[|u| < ½], bandwidth ε:
  JumpReLU: ∂f/∂z = H(z − θ),  ∂f/∂θ = −(θ/ε) K((z − θ)/ε)
  step:     ∂H/∂z = 0,         ∂H/∂θ = −(1/ε) K((z − θ)/ε)
Both kernels act on the raw pre-activations z, not on ReLU(z) (cf. dictionary_learning issue 55:
with ReLU(z) every z < 0 would count as 0 and sit inside the window of a θ below ε/2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sae4scfm.saes.base import SAE, base_tensors, fold_b_dec_into_b_enc
from sae4scfm.saes.config import SAEConfig, knob


def rectangle(u: torch.Tensor) -> torch.Tensor:
    return (u.abs() < 0.5).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, theta, bandwidth):
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth
        return z * (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, grad):
        z, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_z = (z > theta).to(z.dtype) * grad
        grad_theta = (-(theta / eps) * rectangle((z - theta) / eps) * grad).sum(0)
        return grad_z, grad_theta, None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, theta, bandwidth):
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, grad):
        z, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_theta = (-(1.0 / eps) * rectangle((z - theta) / eps) * grad).sum(0)
        return torch.zeros_like(z), grad_theta, None


def jumprelu(z: torch.Tensor, theta: torch.Tensor, bandwidth: float) -> torch.Tensor:
    return _JumpReLU.apply(z, theta, bandwidth)


def step(z: torch.Tensor, theta: torch.Tensor, bandwidth: float) -> torch.Tensor:
    return _Step.apply(z, theta, bandwidth)


@dataclass(frozen=True)
class JumpReLUConfig(SAEConfig):
    """JumpReLU SAE with an L0 penalty via straight-through pseudo-derivatives (Rajamanoharan et al. 2024)."""

    l0_coeff: float = knob(0.1, "weight of the L0 penalty (centred inputs are scaled to unit variance per dimension)")
    bandwidth: float = knob(0.05, "width of the rectangle kernel of the pseudo-derivatives (paper: 0.001)")
    init_threshold: float = knob(1.25, "initial per-latent threshold theta, learned as log theta (paper: 0.001); "
                                       "sets L0 on short runs (~16 on the demo model), since Adam moves log theta "
                                       "by ~lr per step")


class JumpReLUSAE(SAE):
    architecture = "jumprelu"
    config_class = JumpReLUConfig
    saelens_architecture = "jumprelu"

    def __init__(self, d_in: int, d_sae: int, cfg: JumpReLUConfig | None = None, **hyperparams):
        super().__init__(d_in, d_sae, cfg, **hyperparams)
        self.l0_coeff, self.bandwidth = self.cfg.l0_coeff, self.cfg.bandwidth
        self.log_threshold = torch.nn.Parameter(torch.full((d_sae,), math.log(self.cfg.init_threshold)))

    @property
    def threshold(self) -> torch.Tensor:
        return self.log_threshold.exp()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return jumprelu(self.pre_acts(x), self.threshold, self.bandwidth)

    def loss(self, x: torch.Tensor, dead: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        z = self.pre_acts(x)
        theta = self.threshold
        f = jumprelu(z, theta, self.bandwidth)
        mse = (x - self.decode(f)).pow(2).sum(-1).mean()
        l0 = step(z, theta, self.bandwidth).sum(-1).mean()
        active = f.detach() != 0
        return {"loss": mse + self.sparsity_scale * self.l0_coeff * l0, "mse": mse, "l0": l0.detach(),
                "fired": active.any(0)}

    # --- interop ------------------------------------------------------------------------
    def saelens_export(self):
        return {**base_tensors(self), "threshold": self.threshold.detach().float().contiguous().cpu()}, {}

    @classmethod
    def from_saelens(cls, weights, cfg):
        # SAELens: ReLU(z)·1[z > θ]; ours z·1[z > θ] with θ > 0; θ ≤ 0 acts as θ = 0
        W_enc, W_dec, b_enc, b_dec = weights.saelens_base(cfg)
        return cls.from_tensors({"W_enc": W_enc, "W_dec": W_dec, "b_enc": b_enc, "b_dec": b_dec,
                                 "log_threshold": weights["threshold"].clamp(min=0).log()}, {}, weights.source)

    @classmethod
    def from_dictionary_learning(cls, sd, apply_b_dec_to_input):
        """JumpReluAutoEncoder: W_enc [d_in, d_sae] as ours, its b_enc without b_dec subtraction unless
        ``apply_b_dec_to_input``; theirs ReLU(z·1[z > θ]), ours z·1[z > θ] with θ > 0 (θ ≤ 0 acts as 0)."""
        W_enc, W_dec, b_enc, b_dec = (sd[k] for k in ("W_enc", "W_dec", "b_enc", "b_dec"))
        if not apply_b_dec_to_input:
            b_enc = fold_b_dec_into_b_enc(W_enc, b_enc, b_dec)
        return cls.from_tensors({"W_enc": W_enc, "W_dec": W_dec, "b_enc": b_enc, "b_dec": b_dec,
                                 "log_threshold": sd["threshold"].clamp(min=0).log()}, {}, sd.source)
