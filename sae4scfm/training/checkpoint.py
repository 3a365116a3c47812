"""Resumable training state: ``<run>/checkpoint/state-<step>.safetensors`` (SAE, Adam moments,
dead-latent counters) and ``state.json`` (step, input scale, file), replaced last."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sae4scfm.atomic import make_shareable
from sae4scfm.saes.base import SAE


def save_checkpoint(run_dir: Path, sae: SAE, opt: torch.optim.Optimizer, since_fired: torch.Tensor,
                    step: int, scale: float) -> None:
    """Training state as safetensors + json; ``state.json`` is replaced last, atomically."""
    ckpt = run_dir / "checkpoint"
    ckpt.mkdir(exist_ok=True)
    tensors = {f"sae.{k}": v for k, v in sae.state_tensors().items()}
    names = dict(sae.named_parameters())
    index = {id(p): n for n, p in names.items()}
    for p, state in opt.state.items():
        for k, v in state.items():
            tensors[f"opt.{index[id(p)]}.{k}"] = torch.as_tensor(v).detach().cpu().contiguous()
    tensors["since_fired"] = since_fired.cpu()
    name = f"state-{step:08d}.safetensors"
    save_file(tensors, ckpt / (name + ".tmp"))
    os.replace(ckpt / (name + ".tmp"), ckpt / name)
    make_shareable(ckpt / name)
    (ckpt / "state.json.tmp").write_text(json.dumps({"step": step, "scale": scale, "file": name}))
    os.replace(ckpt / "state.json.tmp", ckpt / "state.json")
    for old in ckpt.glob("state-*.safetensors"):
        if old.name != name:
            old.unlink()


def load_checkpoint(run_dir: Path, sae: SAE, opt: torch.optim.Optimizer) -> tuple[int, float, torch.Tensor]:
    """Restore SAE and optimizer in place; returns (step, scale, since_fired)."""
    meta = json.loads((run_dir / "checkpoint" / "state.json").read_text())
    tensors = load_file(run_dir / "checkpoint" / meta["file"])
    sae.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("sae.")})
    for name, p in sae.named_parameters():
        state = {k.split(".")[-1]: v for k, v in tensors.items() if k.startswith(f"opt.{name}.")}
        if state:
            opt.state[p] = state
    return int(meta["step"]), float(meta["scale"]), tensors["since_fired"]
