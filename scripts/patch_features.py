"""Thin Hydra entry point; see `sae4scfm.cli.patch_main` and config/patch.yaml."""

from sae4scfm.cli import patch_main

if __name__ == "__main__":
    patch_main()
