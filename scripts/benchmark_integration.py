"""Thin Hydra entry point; see `sae4scfm.cli.benchmark_integration_main` and config/."""

from sae4scfm.cli import benchmark_integration_main

if __name__ == "__main__":
    benchmark_integration_main()
