"""The fused attention every family runs (``scfm.attention``): equal to ``nn.MultiheadAttention`` and to
the unfused softmax formula in float32, padding never attended to, gradients intact; and the bf16
autocast tolerance of a whole model against float32 (``BF16_REL_TOL``, documented in the README)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import sae4scfm
from sae4scfm.scfm import load_scfm
from sae4scfm.scfm.attention import PackedSelfAttention, attend

# bf16 autocast vs float32, per residual-stream layer: ||h_bf16 - h_fp32|| / ||h_fp32|| over the gene tokens
# of a batch (bf16 keeps 8 mantissa bits, ~0.4% per rounding; measured 0.15-0.27% on the demo scGPT's 5 layers)
BF16_REL_TOL = 0.01


def _padding(lengths, T):
    return torch.arange(T)[None, :] >= torch.tensor(lengths)[:, None]


def test_packed_attention_equals_multihead_attention():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    torch.manual_seed(0)
    ours = PackedSelfAttention(32, 4).eval()
    assert ours.state_dict().keys() == mha.state_dict().keys()  # official checkpoints load unchanged
    for key, value in mha.state_dict().items():  # and the same random init (random_init models)
        torch.testing.assert_close(ours.state_dict()[key], value, rtol=0, atol=0)
    x = torch.randn(3, 9, 32)
    pad = _padding([9, 5, 2], 9)
    with torch.no_grad():
        want = mha(x, x, x, key_padding_mask=pad, need_weights=False)[0]
        got = ours(x, pad)
    real = ~pad
    torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)


def test_attend_equals_the_softmax_formula_and_ignores_padded_keys():
    torch.manual_seed(1)
    B, T, d, H = 2, 7, 16, 4
    q, k, v = (torch.randn(B, T, d) for _ in range(3))
    pad = _padding([7, 4], T)
    out = attend(q, k, v, H, pad)
    heads = [t.view(B, T, H, d // H).transpose(1, 2) for t in (q, k, v)]
    scores = heads[0] @ heads[1].transpose(-1, -2) / (d // H) ** 0.5
    scores = scores.masked_fill(pad[:, None, None, :], float("-inf"))
    want = (torch.softmax(scores, -1) @ heads[2]).transpose(1, 2).reshape(B, T, d)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    k2, v2 = k.clone(), v.clone()
    k2[1, 4:], v2[1, 4:] = 100.0, -100.0  # what sits at padded keys changes nothing
    torch.testing.assert_close(attend(q, k2, v2, H, pad), out, rtol=0, atol=0)
    torch.testing.assert_close(attend(q, k, v, H, torch.zeros(B, T, dtype=torch.bool)), attend(q, k, v, H),
                               rtol=0, atol=0)  # no padding: the unmasked kernel


def test_gradients_flow_through_the_fused_attention():
    """Steering and attribution differentiate through the model: the fused path must keep autograd."""
    torch.manual_seed(2)
    att = PackedSelfAttention(16, 2)
    x = torch.randn(2, 5, 16, requires_grad=True)
    att(x, _padding([5, 3], 5)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0 and att.in_proj_weight.grad.abs().sum() > 0


@pytest.fixture(scope="module")
def demo_batch():
    from sae4scfm.data import load_pbmc

    adapter = load_scfm(sae4scfm.compose("train", ["scfm=demo"]).scfm)
    tokens = adapter.tokenize(load_pbmc()[:12].copy())
    return adapter, tokens.collate(np.arange(12))


def test_bf16_autocast_stays_within_the_documented_tolerance(demo_batch):
    adapter, batch = demo_batch
    layers = list(range(adapter.n_layers + 1))
    fp32 = adapter.capture(batch, layers)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = adapter.capture(batch, layers)
    mask = batch.gene_mask
    rel = [float((bf16[i][mask].float() - fp32[i][mask]).norm() / fp32[i][mask].norm()) for i in layers]
    assert max(rel) <= BF16_REL_TOL, rel
    assert rel[-1] > 1e-4, rel  # autocast really ran the blocks in bf16
