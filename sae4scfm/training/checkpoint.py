"""Resumable training state: ``<run>/checkpoint/state-<step>.safetensors`` (SAE, Adam moments,
dead-latent counters) and ``state.json`` (step, input scale, file), replaced last.

Checkpoints of large SAEs do not stall training: ``CheckpointWriter`` copies the state to the
CPU at the step and writes it in a background thread (atomically, one write at a time).

"Identical on resume": on CPU a run killed after checkpoint N and resumed ends with weights,
Adam state and dead-latent counters bit-identical (``torch.equal``) to an uninterrupted run
(tests/test_resume.py). On CUDA the restored state is exact too, but some kernels (atomic
adds in sparse backward passes, cuBLAS reductions) are not deterministic, so a resumed run is
as close to an uninterrupted one as two uninterrupted runs are to each other, not bitwise equal.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sae4scfm.atomic import atomic_write, atomic_write_json
from sae4scfm.saes.base import SAE


def checkpoint_tensors(sae: SAE, opt: torch.optim.Optimizer, since_fired: torch.Tensor) -> dict[str, torch.Tensor]:
    """A CPU copy of the training state (SAE, Adam moments, dead-latent counters), safe to write
    while training goes on."""
    tensors = {f"sae.{k}": v.detach().to("cpu", copy=True) for k, v in sae.state_tensors().items()}
    index = {id(p): n for n, p in sae.named_parameters()}
    for p, state in opt.state.items():
        for k, v in state.items():
            tensors[f"opt.{index[id(p)]}.{k}"] = torch.as_tensor(v).detach().to("cpu", copy=True).contiguous()
    tensors["since_fired"] = since_fired.to("cpu", copy=True)
    return tensors


def write_checkpoint(run_dir: Path, tensors: dict[str, torch.Tensor], step: int, scale: float) -> None:
    """``tensors`` (``checkpoint_tensors``) as ``state-<step>.safetensors``; ``state.json`` is
    replaced last, atomically, then older state files are removed."""
    ckpt = run_dir / "checkpoint"
    ckpt.mkdir(exist_ok=True)
    name = f"state-{step:08d}.safetensors"
    atomic_write(ckpt / name, lambda tmp: save_file(tensors, tmp))
    atomic_write_json(ckpt / "state.json", {"step": step, "scale": scale, "file": name})
    for old in ckpt.glob("state-*.safetensors"):
        if old.name != name:
            old.unlink()


def save_checkpoint(run_dir: Path, sae: SAE, opt: torch.optim.Optimizer, since_fired: torch.Tensor,
                    step: int, scale: float) -> None:
    """Training state as safetensors + json, written now; ``state.json`` is replaced last, atomically."""
    write_checkpoint(run_dir, checkpoint_tensors(sae, opt, since_fired), step, scale)


class CheckpointWriter:
    """Writes checkpoints without stalling training: the state is copied to the CPU at the step
    (``checkpoint_tensors``) and written to disk in a background thread while the next steps run.
    One write at a time (a new checkpoint first waits for the previous one), each still atomic, so
    a kill at any moment leaves the last *completed* checkpoint. ``wait()`` before reading the run
    dir or exiting."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def save(self, sae: SAE, opt: torch.optim.Optimizer, since_fired: torch.Tensor, step: int, scale: float) -> None:
        self.wait()
        tensors = checkpoint_tensors(sae, opt, since_fired)

        def write():
            try:
                write_checkpoint(self.run_dir, tensors, step, scale)
            except BaseException as e:  # noqa: BLE001 - re-raised by wait()
                self.error = e

        self.thread = threading.Thread(target=write, name="sae4scfm-checkpoint")
        self.thread.start()

    def wait(self) -> None:
        """Block until the checkpoint being written is on disk; re-raise its error, if any."""
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise error


def load_checkpoint(run_dir: Path, sae: SAE, opt: torch.optim.Optimizer) -> tuple[int, float, torch.Tensor]:
    """Restore SAE and optimizer in place; returns (step, scale, since_fired [d_sae] long, CPU).

    The Adam state goes through ``Optimizer.load_state_dict``, which puts each moment on its
    parameter's device and dtype and ``step`` where the optimizer's kernels expect it (float32 on
    the parameter's device for fused or capturable Adam, else on the CPU)."""
    meta = json.loads((run_dir / "checkpoint" / "state.json").read_text())
    tensors = load_file(run_dir / "checkpoint" / meta["file"])
    sae.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("sae.")})
    params = dict(sae.named_parameters())
    position = {id(p): i for i, p in enumerate(p for g in opt.param_groups for p in g["params"])}
    state = {}
    for name, p in params.items():
        entry = {k[len(f"opt.{name}."):]: v for k, v in tensors.items() if k.startswith(f"opt.{name}.")}
        if entry:
            state[position[id(p)]] = entry
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})
    return int(meta["step"]), float(meta["scale"]), tensors["since_fired"]
