"""Thin Hydra entry point; see `sae4scfm.cli.steer_main` and config/steer.yaml."""

from sae4scfm.cli import steer_main

if __name__ == "__main__":
    steer_main()
