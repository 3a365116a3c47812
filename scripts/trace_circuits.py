"""Thin Hydra entry point; see `sae4scfm.cli.trace_main` and config/trace.yaml."""

from sae4scfm.cli import trace_main

if __name__ == "__main__":
    trace_main()
