"""Feature edits: the two intervention modes do what their formulas say, on gene tokens only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sae4scfm.causal.steering import feature_edit
from sae4scfm.errors import InputError
from sae4scfm.saes import build_sae


@pytest.fixture()
def sae_and_inputs():
    torch.manual_seed(0)
    sae = build_sae("topk", 16, 64, {"k": 4})
    with torch.no_grad():
        sae.b_dec.normal_()
    h = torch.randn(3, 5, 16)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[:, 0] = False  # a special token
    mask[2, 3:] = False  # padding
    return sae, h, mask


def test_error_preserving_adds_the_decoder_row_delta(sae_and_inputs):
    sae, h, mask = sae_and_inputs
    f = sae.encode(h[mask])
    j = int(f.sum(0).argmax())  # a feature that fires
    out = feature_edit(sae, {j: 7.0})(h, mask)
    expected = h[mask] + (7.0 - f[:, j])[:, None] * sae.W_dec[j]
    torch.testing.assert_close(out[mask], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[~mask], h[~mask])


def test_empty_edit_is_identity_only_when_error_preserving(sae_and_inputs):
    sae, h, mask = sae_and_inputs
    torch.testing.assert_close(feature_edit(sae, {})(h, mask), h)
    recon = feature_edit(sae, {}, mode="reconstruction")(h, mask)
    torch.testing.assert_close(recon[mask], sae(h[mask]), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(recon[mask], h[mask], atol=1e-3)


def test_add_and_scale_ops(sae_and_inputs):
    sae, h, mask = sae_and_inputs
    f = sae.encode(h[mask])
    j = int(f.sum(0).argmax())
    added = feature_edit(sae, {j: 2.0}, op="add", mode="reconstruction")(h, mask)
    f_new = f.clone()
    f_new[:, j] += 2.0
    torch.testing.assert_close(added[mask], sae.decode(f_new), atol=1e-5, rtol=1e-5)
    doubled = feature_edit(sae, {j: 2.0}, op="scale")(h, mask)
    torch.testing.assert_close(doubled[mask], h[mask] + f[:, j, None] * sae.W_dec[j], atol=1e-5, rtol=1e-5)


def test_bad_edits_are_input_errors(sae_and_inputs):
    sae, _, _ = sae_and_inputs
    with pytest.raises(InputError, match="out of range"):
        feature_edit(sae, {64: 1.0})
    with pytest.raises(InputError, match="mode=.splice."):
        feature_edit(sae, {1: 1.0}, mode="splice")
    with pytest.raises(InputError, match="op='mul'"):
        feature_edit(sae, {1: 1.0}, op="mul")


@pytest.fixture(scope="module")
def demo_and_batch():
    import sae4scfm
    from sae4scfm.data import load_pbmc
    from sae4scfm.scfm import load_scfm

    adapter = load_scfm(sae4scfm.compose("train", ["scfm=demo"]).scfm)
    tokens = adapter.tokenize(load_pbmc()[:6], seed=0)
    batch = tokens.collate(np.arange(6))
    assert batch.padding_mask.any() and (~batch.gene_mask & ~batch.padding_mask).any()  # padding and <cls>
    return adapter, batch


@torch.no_grad()
def test_error_preserving_steering_is_local(demo_and_batch):
    """Adding 3 to feature j at layer 2: only gene tokens of resid.2 change, each by exactly 3 * W_dec[j];
    <cls>, padding and everything upstream are untouched; the outputs equal a forward with that
    precomputed residual put in by hand."""
    from sae4scfm.causal.steering import steer

    adapter, batch = demo_and_batch
    torch.manual_seed(0)
    sae = build_sae("topk", adapter.d_model, 256, {"k": 8})
    layer, j = 2, 5
    points = [f"resid.{l}" for l in range(adapter.n_layers + 1)] + [
        f"{kind}.{b}" for b in range(adapter.n_layers) for kind in ("attn_out", "mlp_out")]
    clean = adapter.capture(batch, points)
    with adapter.intervene(layer, feature_edit(sae, {j: 3.0}, op="add")):
        steered = adapter.capture(batch, points)
    delta = steered[f"resid.{layer}"] - clean[f"resid.{layer}"]
    mask = batch.gene_mask
    torch.testing.assert_close(delta[mask], (3.0 * sae.W_dec[j]).expand(int(mask.sum()), -1), atol=1e-5, rtol=0)
    assert torch.equal(delta[~mask], torch.zeros_like(delta[~mask]))  # <cls> and padding untouched
    upstream = [p for p in points if int(p.split(".")[1]) < layer]
    assert all(torch.equal(steered[p], clean[p]) for p in upstream)
    assert not torch.allclose(steered[f"resid.{layer + 1}"], clean[f"resid.{layer + 1}"])

    replacement = steered[f"resid.{layer}"]
    clean_out, steered_out = steer(adapter, sae, layer, batch, {j: 3.0}, op="add")
    with adapter.intervene(layer, lambda h, gene_mask: replacement):
        manual = adapter.run(batch)
    for key in steered_out:
        torch.testing.assert_close(steered_out[key], manual[key], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(steered_out["mlm"], clean_out["mlm"], atol=1e-4)
