"""SAE architectures, one module each; ``build_sae`` picks one by its config name."""

from sae4scfm.errors import InputError
from sae4scfm.saes.base import SAE, load_sae
from sae4scfm.saes.batchtopk import BatchTopKSAE
from sae4scfm.saes.gated import GatedSAE
from sae4scfm.saes.gated_anneal import GatedAnnealSAE
from sae4scfm.saes.jumprelu import JumpReLUSAE
from sae4scfm.saes.matryoshka import MatryoshkaSAE
from sae4scfm.saes.p_anneal import PAnnealSAE
from sae4scfm.saes.standard import StandardSAE
from sae4scfm.saes.topk import TopKSAE

ARCHITECTURES: dict[str, type[SAE]] = {cls.architecture: cls for cls in (
    StandardSAE, TopKSAE, BatchTopKSAE, MatryoshkaSAE, GatedSAE, JumpReLUSAE, PAnnealSAE, GatedAnnealSAE)}


def build_sae(architecture: str, d_in: int, d_sae: int, hyperparams: dict) -> SAE:
    if architecture not in ARCHITECTURES:
        raise InputError(f"sae.architecture={architecture!r} is unknown; available: {', '.join(ARCHITECTURES)}.")
    hp = {k: v for k, v in dict(hyperparams).items() if k != "lr"}
    return ARCHITECTURES[architecture](d_in, d_sae, **hp)


__all__ = ["SAE", "ARCHITECTURES", "build_sae", "load_sae", *(cls.__name__ for cls in ARCHITECTURES.values())]
