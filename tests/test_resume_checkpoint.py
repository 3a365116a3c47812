"""Background checkpoints (``CheckpointWriter``): ``save`` returns before the file is written,
the file holds the state *at the step* even though training mutates it meanwhile, a write error
surfaces at the next ``wait``/``save``, and a checkpoint under its final name is always complete."""

from __future__ import annotations

import json
import threading

import pytest
import torch

import sae4scfm.training.checkpoint as checkpoint
from sae4scfm.saes import TopKSAE
from sae4scfm.training.checkpoint import CheckpointWriter, load_checkpoint


def stepped_sae():
    torch.manual_seed(0)
    sae = TopKSAE(8, 32, k=4)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    sae.loss(torch.randn(16, 8))["loss"].backward()
    opt.step()
    return sae, opt


def test_save_returns_at_once_and_writes_the_state_of_its_step(tmp_path, monkeypatch):
    sae, opt = stepped_sae()
    at_step = {k: v.clone() for k, v in sae.state_dict().items()}
    release, real_write = threading.Event(), checkpoint.write_checkpoint

    def slow_write(*args):
        release.wait(30)
        real_write(*args)

    monkeypatch.setattr(checkpoint, "write_checkpoint", slow_write)
    writer = CheckpointWriter(tmp_path)
    writer.save(sae, opt, torch.arange(32), step=3, scale=0.5)  # returns while the write is held
    assert not (tmp_path / "checkpoint" / "state.json").exists()
    with torch.no_grad():  # training goes on and changes the weights in place
        sae.W_dec.add_(1.0)
    release.set()
    writer.wait()
    assert json.loads((tmp_path / "checkpoint" / "state.json").read_text())["step"] == 3
    fresh = TopKSAE(8, 32, k=4)
    step, scale, since_fired = load_checkpoint(tmp_path, fresh, torch.optim.Adam(fresh.parameters(), lr=1e-3))
    assert (step, scale) == (3, 0.5) and torch.equal(since_fired, torch.arange(32))
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in at_step.items())


def test_a_failed_background_write_is_raised_and_leaves_the_last_checkpoint(tmp_path, monkeypatch):
    sae, opt = stepped_sae()
    writer = CheckpointWriter(tmp_path)
    writer.save(sae, opt, torch.zeros(32, dtype=torch.long), step=2, scale=1.0)
    writer.wait()

    def full_disk(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise OSError("No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", lambda tensors, tmp: full_disk(tmp))
    writer.save(sae, opt, torch.zeros(32, dtype=torch.long), step=4, scale=1.0)
    with pytest.raises(OSError, match="No space"):
        writer.wait()
    ckpt = tmp_path / "checkpoint"
    assert json.loads((ckpt / "state.json").read_text())["step"] == 2
    assert sorted(p.name for p in ckpt.iterdir()) == ["state-00000002.safetensors", "state.json"]
