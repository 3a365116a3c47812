"""Thin Hydra entry point; see `sae4scfm.cli.regulate_main` and config/regulate.yaml."""

from sae4scfm.cli import regulate_main

if __name__ == "__main__":
    regulate_main()
