"""Thin Hydra entry point; see `sae4scfm.cli.analyze_main` and config/."""

from sae4scfm.cli import analyze_main

if __name__ == "__main__":
    analyze_main()
