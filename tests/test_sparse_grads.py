"""The sparse-in-k training paths give the same loss and gradients as plain dense autograd."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sae4scfm.saes import BatchTopKSAE, TopKSAE


def dense_reference_loss(sae, x, f_mask, dead, k_aux, alpha):
    """Written the obvious way: dense pre-activations, mask, dense decoder, dense AuxK."""
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    f = F.relu(pre) * f_mask
    x_hat = f @ sae.W_dec + sae.b_dec
    mse = (x - x_hat).pow(2).sum(-1).mean()
    e = (x - x_hat).detach()
    dead_pre = pre.masked_fill(~dead, float("-inf"))
    v, i = dead_pre.topk(k_aux, dim=-1)
    e_hat = torch.zeros_like(pre).scatter(-1, i, F.relu(v)) @ sae.W_dec
    aux = (e - e_hat).pow(2).sum(-1).mean() / (e - e.mean(0)).pow(2).sum(-1).mean()
    return mse + alpha * aux


def grads(sae, loss):
    sae.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in sae.named_parameters()}


def check(sae, x, dead, mask_fn):
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(0, 0.1)
    ours = sae.loss(x, dead=dead)
    g_ours = grads(sae, ours["loss"])
    with torch.no_grad():
        mask = mask_fn((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
    ref = dense_reference_loss(sae, x, mask, dead, min(sae.aux_k, int(dead.sum())), sae.auxk_alpha)
    g_ref = grads(sae, ref)
    torch.testing.assert_close(ours["loss"], ref, rtol=1e-5, atol=1e-5)
    for name in g_ref:
        torch.testing.assert_close(g_ours[name], g_ref[name], rtol=1e-4, atol=1e-5, msg=name)


def test_topk_sparse_gradients_equal_dense():
    torch.manual_seed(0)
    sae = TopKSAE(24, 96, k=6, aux_k=5)
    x = torch.randn(50, 24)
    dead = torch.rand(96) < 0.3

    def topk_mask(pre):
        return torch.zeros_like(pre).scatter(-1, pre.topk(6, dim=-1).indices, 1.0)

    check(sae, x, dead, topk_mask)


def test_batchtopk_sparse_gradients_equal_dense():
    torch.manual_seed(1)
    sae = BatchTopKSAE(24, 96, k=6, aux_k=5).train()
    x = torch.randn(50, 24)
    dead = torch.rand(96) < 0.3

    def batch_mask(pre):
        flat = F.relu(pre).flatten()
        return torch.zeros_like(flat).scatter(0, flat.topk(6 * 50).indices, 1.0).view_as(pre)

    check(sae, x, dead, batch_mask)
    assert sae.threshold > 0


def test_batch_topk_candidates_are_exact_including_fallback():
    """The candidate shortcut selects exactly the global top k·B, also when one row holds
    more than 4k of them (the case that needs the full flattened top-k)."""
    torch.manual_seed(2)
    sae = BatchTopKSAE(8, 256, k=4)
    acts = F.relu(torch.randn(32, 256))
    skewed = acts.clone()
    skewed[5] = 10.0 + torch.rand(256)  # row 5 alone holds far more than 4k of the top 128 (no ties)
    for a in (acts, skewed):
        rows, cols, values = sae.batch_topk_entries(a)
        expected = set(a.flatten().topk(4 * 32).indices.tolist())
        assert set((rows * 256 + cols).tolist()) == expected
        torch.testing.assert_close(values, a[rows, cols])
        assert torch.all(torch.diff(rows * 256 + cols) > 0)  # row-major order
