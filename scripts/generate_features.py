"""Thin Hydra entry point; see `sae4scfm.cli.features_main` and config/."""

from sae4scfm.cli import features_main

if __name__ == "__main__":
    features_main()
