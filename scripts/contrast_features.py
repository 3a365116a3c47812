"""Thin Hydra entry point; see `sae4scfm.cli.contrast_main` and config/contrast.yaml."""

from sae4scfm.cli import contrast_main

if __name__ == "__main__":
    contrast_main()
