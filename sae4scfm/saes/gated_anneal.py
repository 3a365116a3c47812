"""Gated SAE (``GatedSAE``) whose sparsity penalty on the gate is p-annealed (``PAnnealing``):
Loss = ‖x − x̂‖² + λ_t · Σᵢ (ReLU(π_gate,i) ‖W_dec,i‖)^p_t + aux, with the p schedule, the
continuity-preserving rescaling of λ at each change of p and the dead-latent resampling of the
``p_anneal`` SAE (Karvonen et al. 2024 train their gated SAEs this way). Resampling also resets
a latent's magnitude parameters (r_mag = b_mag = 0, so W_mag = W_gate). ``l1_coeff`` is the
initial λ; the mutable state lives in the same buffers as ``p_anneal``'s.
"""

from __future__ import annotations

import torch

from sae4scfm.saes.gated import GatedSAE
from sae4scfm.saes.p_anneal import PAnnealing


class GatedAnnealSAE(PAnnealing, GatedSAE):
    architecture = "gated_anneal"

    def __init__(self, d_in: int, d_sae: int, l1_coeff: float = 1.0, unit_norm_decoder: bool = True,
                 p_start: float = 1.0, p_end: float = 0.2, anneal_start_frac: float = 0.1,
                 anneal_frac: float = 0.6, n_p_updates: int = 10, resample_every: int = 0, **hyperparams):
        anneal = dict(p_start=p_start, p_end=p_end, anneal_start_frac=anneal_start_frac, anneal_frac=anneal_frac,
                      n_p_updates=n_p_updates, resample_every=resample_every)
        super().__init__(d_in, d_sae, l1_coeff=l1_coeff, unit_norm_decoder=unit_norm_decoder, **anneal,
                         **hyperparams)
        self.init_annealing(l1_coeff, **anneal)

    @torch.no_grad()
    def reset_extra(self, latents: torch.Tensor) -> None:
        self.r_mag[latents] = 0
        self.b_mag[latents] = 0
