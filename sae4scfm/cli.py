"""Hydra entry points (also installed as ``sae4scfm-train``, ``sae4scfm-features``, ``sae4scfm-analyze``,
``sae4scfm-steer``, ``sae4scfm-patch``, ``sae4scfm-trace``,
``sae4scfm-contrast``,
``sae4scfm-benchmark-integration``).

Bad input (``InputError``) is reported as one line on stderr with exit status 2.
"""

from __future__ import annotations

import importlib
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


def entry_point(config_name: str, stage: str):
    """A Hydra entry point on ``config/<config_name>.yaml`` that runs ``stage`` (``"module:function"``,
    imported when called) with the composed config; an ``InputError`` is one ``error:`` line, exit 2."""

    @hydra.main(config_path=CONFIG_DIR, config_name=config_name, version_base="1.3")
    def main(cfg: DictConfig) -> None:
        module, _, function = stage.partition(":")
        _report_input_errors(getattr(importlib.import_module(module), function), cfg)

    main.__doc__ = f"Runs ``{stage}`` on config/{config_name}.yaml."
    return main


_train_main = entry_point("train", "sae4scfm.training:train")
features_main = entry_point("features", "sae4scfm.features.generate:generate_features")
analyze_main = entry_point("analyze", "sae4scfm.analysis.analyze:analyze_features")
layer_profile_main = entry_point("layer_profile", "sae4scfm.analysis.layer_profile:layer_profile")
steer_main = entry_point("steer", "sae4scfm.causal.steering:steer_features")
patch_main = entry_point("patch", "sae4scfm.causal.patching:patch_features")
trace_main = entry_point("trace", "sae4scfm.causal.tracing:trace_features")
contrast_main = entry_point("contrast", "sae4scfm.causal.contrastive:contrast_features")
perturb_main = entry_point("perturb", "sae4scfm.causal.perturbation:perturbation_check")
trajectory_main = entry_point("trajectory", "sae4scfm.causal.trajectory:trajectory_steering")
regulate_main = entry_point("regulate", "sae4scfm.causal.regulatory:regulatory_probe")
benchmark_integration_main = entry_point("benchmark_integration", "sae4scfm.analysis.integration:benchmark_integration")
_atlas_main = entry_point("atlas", "sae4scfm.atlas.build:build_atlas")


def train_main() -> None:
    """``sae4scfm-train``: unknown ``sae.hyperparams.*`` overrides get our ``error:`` line (naming the
    architecture's valid keys) before Hydra's struct check would reject them with its own message."""
    from sae4scfm.saes.config import check_sae_overrides

    _report_input_errors(check_sae_overrides, sys.argv[1:])
    _train_main()


def atlas_main() -> None:
    """``sae4scfm-atlas`` / ``scripts/build_atlas.py``: Hydra overrides; ``--serve`` is ``atlas.serve=true``."""
    sys.argv[1:] = ["atlas.serve=true" if a == "--serve" else a for a in sys.argv[1:]]
    _atlas_main()


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
