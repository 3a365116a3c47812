"""Thin Hydra entry point; see `sae4scfm.cli.trajectory_main` and config/trajectory.yaml."""

from sae4scfm.cli import trajectory_main

if __name__ == "__main__":
    trajectory_main()
