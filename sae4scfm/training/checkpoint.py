"""Resumable training state: ``<run>/checkpoint/state-<step>.safetensors`` (SAE, Adam moments,
dead-latent counters) and ``state.json`` (step, input scale, file), replaced last.

"Identical on resume": on CPU a run killed after checkpoint N and resumed ends with weights,
Adam state and dead-latent counters bit-identical (``torch.equal``) to an uninterrupted run
(tests/test_resume.py). On CUDA the restored state is exact too, but some kernels (atomic
adds in sparse backward passes, cuBLAS reductions) are not deterministic, so a resumed run is
as close to an uninterrupted one as two uninterrupted runs are to each other, not bitwise equal.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sae4scfm.atomic import atomic_write, atomic_write_json
from sae4scfm.saes.base import SAE


def save_checkpoint(run_dir: Path, sae: SAE, opt: torch.optim.Optimizer, since_fired: torch.Tensor,
                    step: int, scale: float) -> None:
    """Training state as safetensors + json; ``state.json`` is replaced last, atomically."""
    ckpt = run_dir / "checkpoint"
    ckpt.mkdir(exist_ok=True)
    tensors = {f"sae.{k}": v for k, v in sae.state_tensors().items()}
    index = {id(p): n for n, p in sae.named_parameters()}
    for p, state in opt.state.items():
        for k, v in state.items():
            tensors[f"opt.{index[id(p)]}.{k}"] = torch.as_tensor(v).detach().cpu().contiguous()
    tensors["since_fired"] = since_fired.cpu()
    name = f"state-{step:08d}.safetensors"
    atomic_write(ckpt / name, lambda tmp: save_file(tensors, tmp))
    atomic_write_json(ckpt / "state.json", {"step": step, "scale": scale, "file": name})
    for old in ckpt.glob("state-*.safetensors"):
        if old.name != name:
            old.unlink()


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
