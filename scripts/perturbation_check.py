"""Thin Hydra entry point; see `sae4scfm.cli.perturb_main` and config/perturb.yaml."""

from sae4scfm.cli import perturb_main

if __name__ == "__main__":
    perturb_main()
