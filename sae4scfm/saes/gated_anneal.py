"""Gated SAE (``GatedSAE``) whose sparsity penalty on the gate is p-annealed (``PAnnealing``):
Loss = ‖x − x̂‖² + λ_t · Σᵢ (ReLU(π_gate,i) ‖W_dec,i‖)^p_t + aux, with the p schedule, the
continuity-preserving rescaling of λ at each change of p and the dead-latent resampling of the
``p_anneal`` SAE (Karvonen et al. 2024 train their gated SAEs this way). Resampling also resets
a latent's magnitude parameters (r_mag = b_mag = 0, so W_mag = W_gate). ``l1_coeff`` is the
initial λ; the mutable state lives in the same buffers as ``p_anneal``'s.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sae4scfm.saes.config import knob
from sae4scfm.saes.gated import GatedConfig, GatedSAE
from sae4scfm.saes.p_anneal import AnnealConfig, PAnnealing


@dataclass(frozen=True)
class GatedAnnealConfig(AnnealConfig, GatedConfig):
    """Gated SAE (Rajamanoharan et al. 2024) with the p-annealed Lp penalty on the gate and dead-latent resampling (as p_anneal)."""

    l1_coeff: float = knob(5.5, "initial coefficient of the penalty on ReLU(pi_gate) * ||W_dec,i||; rescaled at "
                                "each change of p; L0 ~16 on the demo model")


class GatedAnnealSAE(PAnnealing, GatedSAE):
    architecture = "gated_anneal"
    config_class = GatedAnnealConfig

    @torch.no_grad()
    def reset_extra(self, latents: torch.Tensor) -> None:
        self.r_mag[latents] = 0
        self.b_mag[latents] = 0
