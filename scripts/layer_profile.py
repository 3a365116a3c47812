"""Thin Hydra entry point of the layer profile (`sae4scfm.analysis.layer_profile`, config/layer_profile.yaml):

    python scripts/layer_profile.py [train overrides] [layer_profile.layers=[0,2,4]] [layer_profile.control=none]
"""

import hydra
from omegaconf import DictConfig

from sae4scfm.cli import CONFIG_DIR, _report_input_errors


@hydra.main(config_path=CONFIG_DIR, config_name="layer_profile", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from sae4scfm.analysis.layer_profile import layer_profile

    _report_input_errors(layer_profile, cfg)


if __name__ == "__main__":
    main()
