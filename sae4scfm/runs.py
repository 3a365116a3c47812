"""Run directories: ``<runs_dir>/<experiment>/<timestamp>``, e.g. ``runs/layer_sweeps/Jan29-10-00``.

A run dir holds ``sae.safetensors``, ``cfg.json``, ``config.yaml`` (the resolved
Hydra config), ``metrics.jsonl``, ``eval.json``, ``checkpoint/`` (training state
for resume) and, after the later stages, ``features/`` and ``analysis/``.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from sae4scfm.errors import InputError


def new_run_dir(runs_dir: str | Path, experiment: str, suffix: str = "") -> Path:
    """Create ``runs_dir/experiment/<Mon DD-HH-MM><suffix>`` (``-2``, ``-3``… appended if taken)."""
    parent = Path(runs_dir) / experiment
    parent.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%b%d-%H-%M") + suffix
    for n in range(1, 10_000):
        path = parent / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"no free run dir under {parent}")


def resolve_run_dir(runs_dir: str | Path, experiment: str | None, timestamp: str | None) -> Path:
    """The run dir addressed by ``sae_checkpoint.experiment`` / ``sae_checkpoint.timestamp``
    (``timestamp=latest`` picks the newest); a clear error lists what exists."""
    root = Path(runs_dir)
    if not experiment or not timestamp:
        raise InputError("set sae_checkpoint.experiment=<name> sae_checkpoint.timestamp=<stamp|latest> "
                         f"to choose a trained run under {root}/.")
    exp_dir = root / experiment
    # finished runs, oldest first by when training wrote cfg.json (later stages never touch it)
    runs = sorted((p for p in exp_dir.glob("*") if (p / "cfg.json").is_file()),
                  key=lambda p: (p / "cfg.json").stat().st_mtime)
    if not exp_dir.is_dir():
        known = sorted(p.name for p in root.glob("*") if p.is_dir()) if root.is_dir() else []
        raise InputError(f"sae_checkpoint.experiment={experiment!r}: no such experiment under {root}/; "
                         f"known: {', '.join(known) or 'none'}.")
    if timestamp == "latest":
        if not runs:
            raise InputError(f"sae_checkpoint.experiment={experiment!r} has no finished run under {exp_dir}/.")
        return runs[-1]
    path = exp_dir / str(timestamp)
    if not (path / "cfg.json").is_file():
        raise InputError(f"sae_checkpoint.timestamp={timestamp!r}: no finished run {path}; runs of "
                         f"{experiment!r}: {', '.join(p.name for p in runs) or 'none'} (or use latest).")
    return path


def resolve_checkpointed_run(runs_dir: str | Path, experiment: str | None, timestamp: str | None) -> Path:
    """The run dir that ``resume=true`` continues: ``sae_checkpoint.timestamp=<stamp>``, or ``latest``
    for the run of ``sae_checkpoint.experiment`` whose checkpoint was written last."""
    root = Path(runs_dir)
    if not experiment or not timestamp:
        raise InputError("resume=true: set sae_checkpoint.experiment=<name> sae_checkpoint.timestamp=<stamp|latest> "
                         f"to choose the run under {root}/ to continue.")
    exp_dir = root / str(experiment)
    runs = sorted((p.parent.parent for p in exp_dir.glob("*/checkpoint/state.json")), key=lambda p: (
        (p / "checkpoint" / "state.json").stat().st_mtime, p.name))
    if timestamp == "latest":
        if not runs:
            raise InputError(f"resume=true sae_checkpoint.timestamp=latest: no run of sae_checkpoint.experiment="
                             f"{experiment!r} under {exp_dir}/ has a checkpoint; train one first (resume=false).")
        return runs[-1]
    path = exp_dir / str(timestamp)
    if not (path / "checkpoint" / "state.json").is_file():
        raise InputError(f"resume=true: {path} has no checkpoint to resume from; check sae_checkpoint.experiment "
                         f"and sae_checkpoint.timestamp (runs of {experiment!r} with one: "
                         f"{', '.join(p.name for p in runs) or 'none'}; or use latest).")
    return path


def load_run_config(run_dir: Path) -> DictConfig:
    return OmegaConf.load(run_dir / "config.yaml")
