"""Thin Hydra entry point; see `sae4scfm.cli.train_main` and config/."""

from sae4scfm.cli import train_main

if __name__ == "__main__":
    train_main()
