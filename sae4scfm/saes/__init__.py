"""SAE architectures, one module each with its typed config (``config.py``); ``build_sae`` picks one
by its config name. An architecture registers itself by subclassing ``SAE`` with an
``architecture`` name (``base.ARCHITECTURES``); its SAELens / dictionary_learning conversions
are hooks on the class (``interop.py``)."""

from sae4scfm.errors import InputError
from sae4scfm.saes.base import ARCHITECTURES, SAE, load_sae
from sae4scfm.saes.batchtopk import BatchTopKConfig, BatchTopKSAE
from sae4scfm.saes.config import SAEConfig
from sae4scfm.saes.gated import GatedConfig, GatedSAE
from sae4scfm.saes.gated_anneal import GatedAnnealConfig, GatedAnnealSAE
from sae4scfm.saes.jumprelu import JumpReLUConfig, JumpReLUSAE
from sae4scfm.saes.matryoshka import MatryoshkaConfig, MatryoshkaSAE
from sae4scfm.saes.p_anneal import PAnnealConfig, PAnnealSAE
from sae4scfm.saes.standard import StandardConfig, StandardSAE
from sae4scfm.saes.topk import TopKConfig, TopKSAE


def sae_class(architecture: str) -> type[SAE]:
    """The registered SAE class named ``architecture`` (``sae.architecture``)."""
    if architecture not in ARCHITECTURES:
        raise InputError(f"sae.architecture={architecture!r} is unknown; available: {', '.join(ARCHITECTURES)}.")
    return ARCHITECTURES[architecture]


def check_hyperparams(architecture: str, hyperparams: dict) -> SAEConfig:
    """The typed config of ``sae.hyperparams`` (InputError naming a bad key and the valid ones)."""
    cls = sae_class(architecture)
    return cls.config_class.from_dict(hyperparams, architecture)


def build_sae(architecture: str, d_in: int, d_sae: int, hyperparams: dict) -> SAE:
    """A fresh SAE of ``architecture`` for ``hyperparams`` (``sae.hyperparams``, ``lr`` included)."""
    return sae_class(architecture)(d_in, d_sae, check_hyperparams(architecture, hyperparams))


__all__ = ["SAE", "SAEConfig", "ARCHITECTURES", "build_sae", "check_hyperparams", "load_sae", "sae_class",
           "BatchTopKConfig", "BatchTopKSAE", "GatedConfig", "GatedSAE", "GatedAnnealConfig", "GatedAnnealSAE",
           "JumpReLUConfig", "JumpReLUSAE", "MatryoshkaConfig", "MatryoshkaSAE", "PAnnealConfig", "PAnnealSAE",
           "StandardConfig", "StandardSAE", "TopKConfig", "TopKSAE"]
