"""bf16 autocast (used on GPUs) keeps float32 master weights and gives the float32 loss,
for every architecture. Checked with CPU autocast, which exercises the same dtype paths."""

from __future__ import annotations

import pytest
import torch

from sae4scfm.saes import ARCHITECTURES, build_sae


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_bf16_autocast_step(name):
    torch.manual_seed(0)
    sae = build_sae(name, 32, 128, {"k": 4} if name in ("topk", "batchtopk", "matryoshka") else {})
    x = torch.randn(256, 32) + 1.0
    dead = torch.rand(128) < 0.3
    ref = sae.loss(x, dead=dead)["loss"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sae.loss(x, dead=dead)
    out["loss"].backward()
    assert out["loss"].dtype == torch.float32
    assert all(p.dtype == torch.float32 and p.grad is not None and torch.isfinite(p.grad).all()
               for p in sae.parameters() if p.requires_grad and p.grad is not None)
    assert sae.W_enc.grad is not None and sae.W_enc.grad.abs().sum() > 0
    torch.testing.assert_close(out["loss"], ref.detach(), rtol=0.05, atol=0.05)
