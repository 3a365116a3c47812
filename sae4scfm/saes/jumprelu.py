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

import torch

from sae4scfm.saes.base import SAE


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


class JumpReLUSAE(SAE):
    architecture = "jumprelu"

    def __init__(self, d_in: int, d_sae: int, l0_coeff: float = 0.1, bandwidth: float = 0.05,
                 init_threshold: float = 1.5, **hyperparams):
        super().__init__(d_in, d_sae, l0_coeff=l0_coeff, bandwidth=bandwidth, init_threshold=init_threshold,
                         **hyperparams)
        self.l0_coeff, self.bandwidth = float(l0_coeff), float(bandwidth)
        self.log_threshold = torch.nn.Parameter(torch.full((d_sae,), math.log(float(init_threshold))))

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
