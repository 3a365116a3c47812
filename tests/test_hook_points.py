"""Named hook points (resid / attn_out / mlp_out) for every family, and re-entrant, composable interventions.

Each family is built untrained at a tiny size through ``from_pretrained(None, random_init=True, ...)``
(the no-checkpoint path), except the demo, which is the cached demo scGPT.
"""

from __future__ import annotations

import threading

import pytest
import torch

import sae4scfm
from sae4scfm.errors import InputError
from sae4scfm.scfm import load_scfm
from sae4scfm.scfm.aido_cell import AIDOCellAdapter
from sae4scfm.scfm.geneformer import GeneformerAdapter
from sae4scfm.scfm.scfoundation import ScFoundationAdapter
from sae4scfm.scfm.scgpt import ScGPTAdapter
from sae4scfm.scfm.tokens import Batch

B, T = 3, 12
TINY = dict(n_layers=2, d_model=16, n_heads=2, d_mlp=24)
PERFORMER = {"module_type": "performer", "hidden_dim": 8, "depth": 1, "heads": 2, "dim_head": 4}


def build(family: str):
    torch.manual_seed(0)
    if family == "demo":
        return load_scfm(sae4scfm.compose("train", ["scfm=demo"]).scfm)
    if family == "scgpt":
        return ScGPTAdapter.from_pretrained(None, random_init=True,
                                            architecture=dict(d_model=16, n_layers=2, n_heads=2, d_hid=24))
    if family == "geneformer":
        return GeneformerAdapter.from_pretrained(None, random_init=True, version="V2", model_input_size=64, **TINY)
    if family.startswith("scfoundation"):
        encoder = {"module_type": "transformer", "hidden_dim": 16, "depth": 2, "heads": 2}
        if family == "scfoundation_performer":
            encoder = {**PERFORMER, "hidden_dim": 16, "depth": 2}
        return ScFoundationAdapter.from_pretrained(None, random_init=True,
                                                   architecture={"encoder": encoder, "decoder": PERFORMER})
    return AIDOCellAdapter.from_pretrained(None, random_init=True, **TINY)


def tiny_batch(adapter) -> Batch:
    """B cells x T tokens: token 0 special, random gene tokens, the last 3 of cell 2 padding (no padding
    for AIDO.Cell, whose cells are never padded); gene_mask = gene tokens."""
    g = torch.Generator().manual_seed(1)
    n_genes = {"aido_cell": 19264, "scfoundation": 19264}.get(adapter.family, 700)
    first_gene = {"geneformer": 4, "scgpt": 3}.get(adapter.family, 0)
    ids = torch.randperm(n_genes, generator=g)[:B * T].view(B, T) + first_gene
    values = torch.rand(B, T, generator=g) * 4 + 0.5
    padding = torch.zeros(B, T, dtype=torch.bool)
    if adapter.family != "aido_cell":
        padding[2, -3:] = True
    if adapter.family == "scgpt":
        ids[:, 0], values[:, 0] = adapter.vocab["<cls>"], adapter.cfg.pad_value
        ids[padding], values[padding] = adapter.vocab["<pad>"], adapter.cfg.pad_value
        values[:, 1:] = values[:, 1:].round()
    elif adapter.family == "geneformer":
        ids[:, 0] = adapter.vocab["<cls>"]
        ids[padding] = adapter.vocab["<pad>"]
    elif adapter.family == "scfoundation":
        ids[:, 0] = 19264  # the T token
        ids[padding], values[padding] = adapter.cfg.seq_len, float(adapter.cfg.pad_token_id)
    else:
        ids[:, 0] = 19264  # a depth token
    gene_mask = ~padding
    gene_mask[:, 0] = False
    return Batch(ids, values, padding, gene_mask, torch.arange(B))


FAMILIES = ["demo", "scgpt", "geneformer", "scfoundation", "scfoundation_performer", "aido_cell"]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    adapter = build(request.param)
    return request.param, adapter, tiny_batch(adapter)


def norms(family: str, block):
    """The two post-norms of a post-LN block (None for pre-LN blocks)."""
    if family in ("demo", "scgpt", "scfoundation"):
        return block.norm1, block.norm2
    if family == "geneformer":
        return block.attention.output.LayerNorm, block.output.LayerNorm
    return None


def mlp(family: str, block, x):
    """The block's MLP sublayer on its input ``x`` (the residual after attention), by hand."""
    if family in ("demo", "scgpt", "scfoundation"):
        return block.linear2(torch.relu(block.linear1(x)))
    if family == "geneformer":
        return block.output.dense(block.act(block.intermediate.dense(x)))
    if family == "scfoundation_performer":
        return block[1](x)
    return block.mlp(block.ln(x))


def all_points(adapter):
    return [f"resid.{layer}" for layer in range(adapter.n_layers + 1)] + [
        f"{kind}.{b}" for b in range(adapter.n_layers) for kind in ("attn_out", "mlp_out")]


@torch.no_grad()
def test_residual_stream_is_the_sum_of_the_sublayer_outputs(family):
    """Pre-LN: resid[b+1] = resid[b] + attn_out[b] + mlp_out[b]; post-LN (scGPT, Geneformer,
    scFoundation's transformer): resid[b+1] = LN2(LN1(resid[b] + attn_out[b]) + mlp_out[b])."""
    name, adapter, batch = family
    h = adapter.capture(batch, all_points(adapter))
    for b, block in enumerate(adapter.model.blocks):
        r, a, m = h[f"resid.{b}"], h[f"attn_out.{b}"], h[f"mlp_out.{b}"]
        assert a.shape == m.shape == r.shape and a.abs().sum() > 0 and m.abs().sum() > 0
        post = norms(name, block)
        expected = r + a + m if post is None else post[1](post[0](r + a) + m)
        torch.testing.assert_close(h[f"resid.{b + 1}"], expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(adapter.capture(batch, [1])[1], h["resid.1"])  # ints are the residual stream


@torch.no_grad()
def test_zeroing_attn_out_matches_a_manual_forward(family):
    """attn_out.0 := 0 gives resid.1 = block-without-attention(resid.0) computed by hand, and the same
    outputs as replacing resid.1 by that value."""
    name, adapter, batch = family
    block = adapter.model.blocks[0]
    clean = adapter.run(batch)
    r0 = adapter.capture(batch, ["resid.0"])["resid.0"]
    post = norms(name, block)
    manual = r0 + mlp(name, block, r0) if post is None else post[1](post[0](r0) + mlp(name, block, post[0](r0)))
    with adapter.intervene("attn_out.0", lambda h, mask: torch.zeros_like(h)):
        r1 = adapter.capture(batch, ["resid.1"])["resid.1"]
        ablated = adapter.run(batch)
    torch.testing.assert_close(r1, manual, atol=1e-5, rtol=1e-5)
    with adapter.intervene(1, lambda h, mask: manual):
        replaced = adapter.run(batch)
    for key in clean:
        torch.testing.assert_close(ablated[key], replaced[key], atol=1e-5, rtol=1e-5)
    assert any(not torch.allclose(ablated[k], clean[k], atol=1e-4) for k in clean)


@torch.no_grad()
def test_nested_interventions_compose(family):
    """Nested intervene at two layers = the manual composition; at one point, outer first then inner."""
    _, adapter, batch = family
    d = adapter.d_model
    shift = torch.linspace(-1, 1, d)

    def scale(h, mask):
        return torch.where(mask[..., None], h * 1.5, h)

    def add(h, mask):
        return torch.where(mask[..., None], h + shift, h)

    with adapter.intervene(1, scale), adapter.intervene("resid.2", add):
        nested = adapter.run(batch)
    h1 = scale(adapter.capture(batch, [1])[1], batch.gene_mask)
    with adapter.intervene(1, lambda h, mask: h1):
        h2 = add(adapter.capture(batch, [2])[2], batch.gene_mask)
    with adapter.intervene(2, lambda h, mask: h2):
        manual = adapter.run(batch)
    for key in nested:
        torch.testing.assert_close(nested[key], manual[key], atol=1e-5, rtol=1e-5)
    with adapter.intervene(1, scale), adapter.intervene(1, add):
        same_point = adapter.run(batch)
    with adapter.intervene(1, lambda h, mask: add(scale(h, mask), mask)):
        composed = adapter.run(batch)
    for key in nested:
        torch.testing.assert_close(same_point[key], composed[key], atol=1e-6, rtol=1e-6)


@torch.no_grad()
def test_forward_inside_a_hook_keeps_the_outer_gene_mask(family):
    """A capture run from inside an intervention sees its own gene mask; the outer forward's later
    hook points still get the outer one (the old adapter-held mask was reset to None)."""
    _, adapter, batch = family
    other = Batch(batch.gene_ids, batch.values, batch.padding_mask, torch.zeros_like(batch.gene_mask),
                  batch.cell_index)
    seen = []

    def run_inner(h, mask):
        adapter.capture(other, ["resid.0"])
        return h

    with adapter.intervene("resid.0", lambda h, mask: seen.append(("resid.0", mask)) or h), \
            adapter.intervene("attn_out.0", run_inner), \
            adapter.intervene("resid.1", lambda h, mask: seen.append(("resid.1", mask)) or h):
        adapter.run(batch)
    assert [k for k, _ in seen] == ["resid.0", "resid.0", "resid.1"]
    assert torch.equal(seen[0][1], batch.gene_mask) and not seen[1][1].any()
    assert torch.equal(seen[2][1], batch.gene_mask)


@torch.no_grad()
def test_interventions_stay_in_their_thread(family):
    """An intervention entered in one thread does not touch another thread's forward."""
    _, adapter, batch = family
    clean = adapter.run(batch)
    result = {}
    with adapter.intervene(1, lambda h, mask: h * 0):
        worker = threading.Thread(target=lambda: result.update(adapter.run(batch)))
        worker.start()
        worker.join()
        inside = adapter.run(batch)
    for key in clean:
        torch.testing.assert_close(result[key], clean[key], atol=1e-5, rtol=1e-5)  # (grad mode is per thread)
    assert any(not torch.allclose(inside[k], clean[k]) for k in clean)


def test_unknown_hook_point_lists_the_valid_ones(family):
    _, adapter, batch = family
    last = adapter.n_layers - 1
    with pytest.raises(InputError, match=rf"'attn.0' is not a hook point.*resid.0 .. resid.{adapter.n_layers}.*"
                                         rf"attn_out.0 .. attn_out.{last}, mlp_out.0 .. mlp_out.{last}"):
        adapter.capture(batch, ["attn.0"])
    with pytest.raises(InputError, match=f"mlp_out.{adapter.n_layers}' is not a hook point"):
        with adapter.intervene(f"mlp_out.{adapter.n_layers}", lambda h, mask: h):
            pass
    with pytest.raises(InputError, match="out of range"):
        adapter.capture(batch, [adapter.n_layers + 1])
