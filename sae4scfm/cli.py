"""Hydra entry points (also installed as ``sae4scfm-train``, ``sae4scfm-features``, ``sae4scfm-analyze``,
``sae4scfm-steer``, ``sae4scfm-patch``, ``sae4scfm-trace``,
``sae4scfm-contrast``,
``sae4scfm-benchmark-integration``).

Bad input (``InputError``) is reported as one line on stderr with exit status 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from sae4scfm.errors import InputError

CONFIG_DIR = str(Path(__file__).parent / "config")


def _report_input_errors(fn, cfg: DictConfig):
    try:
        return fn(cfg)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def train_main() -> None:
    """``sae4scfm-train``: unknown ``sae.hyperparams.*`` overrides get our ``error:`` line (naming the
    architecture's valid keys) before Hydra's struct check would reject them with its own message."""
    from sae4scfm.saes.config import check_sae_overrides

    _report_input_errors(check_sae_overrides, sys.argv[1:])
    _train_main()


@hydra.main(config_path=CONFIG_DIR, config_name="train", version_base="1.3")
def _train_main(cfg: DictConfig) -> None:
    from sae4scfm.training import train

    _report_input_errors(train, cfg)


@hydra.main(config_path=CONFIG_DIR, config_name="features", version_base="1.3")
def features_main(cfg: DictConfig) -> None:
    from sae4scfm.features.generate import generate_features

    _report_input_errors(generate_features, cfg)


@hydra.main(config_path=CONFIG_DIR, config_name="analyze", version_base="1.3")
def analyze_main(cfg: DictConfig) -> None:
    from sae4scfm.analysis.analyze import analyze_features

    _report_input_errors(analyze_features, cfg)


@hydra.main(config_path=CONFIG_DIR, config_name="layer_profile", version_base="1.3")
def layer_profile_main(cfg: DictConfig) -> None:
    from sae4scfm.analysis.layer_profile import layer_profile

    _report_input_errors(layer_profile, cfg)


@hydra.main(config_path=CONFIG_DIR, config_name="steer", version_base="1.3")
def steer_main(cfg: DictConfig) -> None:
    from sae4scfm.causal.steering import steer_features

    _report_input_errors(steer_features, cfg)


@hydra.main(config_path=CONFIG_DIR, config_name="patch", version_base="1.3")
def patch_main(cfg: DictConfig) -> None:
    from sae4scfm.causal.patching import patch_features

    _report_input_errors(patch_features, cfg)


@hydra.main(config_path=CONFIG_DIR, config_name="trace", version_base="1.3")
def trace_main(cfg: DictConfig) -> None:
    from sae4scfm.causal.tracing import trace_features

    _report_input_errors(trace_features, cfg)


@hydra.main(config_path=CONFIG_DIR, config_name="contrast", version_base="1.3")
def contrast_main(cfg: DictConfig) -> None:
    from sae4scfm.causal.contrastive import contrast_features

    _report_input_errors(contrast_features, cfg)


@hydra.main(config_path=CONFIG_DIR, config_name="benchmark_integration", version_base="1.3")
def benchmark_integration_main(cfg: DictConfig) -> None:
    from sae4scfm.analysis.integration import benchmark_integration

    _report_input_errors(benchmark_integration, cfg)


def compose(config_name: str = "train", overrides: list[str] | None = None) -> DictConfig:
    """The config an entry point would see for ``overrides``, e.g. for ``sae4scfm.train(cfg)``; also from
    inside a running entry point (Hydra already initialised on the package's config dir)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return hydra_compose(config_name=config_name, overrides=list(overrides or []))
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides or []))
