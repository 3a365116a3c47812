"""Interventions: identity edits change nothing, reconstruction equals the SAE spliced in, stacked
interventions equal one-at-a-time ones, positions and cells restrict the edit; on the demo model and a
tiny random model of every family. Attribution (grad, ig) against exact ablation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sae4scfm.causal.attribution import agreement, attribute, exact_ablation, mean_output, projection
from sae4scfm.causal.interventions import Intervention, ablation_runs, latent_edit, stack_batch, stacked_run
from sae4scfm.errors import InputError
from sae4scfm.saes import build_sae
from tests.test_hook_points import FAMILIES, build, tiny_batch


def firing_sae(adapter, batch, layer, d_sae=64, k=4):
    """A TopK SAE whose b_dec is the mean activation, so its features fire on the batch's tokens."""
    torch.manual_seed(3)
    sae = build_sae("topk", adapter.d_model, d_sae, {"k": k})
    h = adapter.capture(batch, [layer])[layer][batch.gene_mask]
    with torch.no_grad():
        sae.b_dec.copy_(h.mean(0))
    return sae


@pytest.fixture(scope="module", params=FAMILIES)
def case(request):
    adapter = build(request.param)
    batch = tiny_batch(adapter)
    layer = 1
    return adapter, batch, layer, firing_sae(adapter, batch, layer)


def outputs_close(a: dict, b: dict, atol=1e-5):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=1e-5, msg=key)


@torch.no_grad()
def test_identity_edits_leave_outputs_unchanged(case):
    adapter, batch, layer, sae = case
    clean = adapter.run(batch)
    f = sae.encode(adapter.capture(batch, [layer])[layer][batch.gene_mask])
    live = [int(j) for j in torch.nonzero(f.sum(0) > 0).flatten()[:5]]
    assert live
    identities = [Intervention(), Intervention(tuple(live), "scale", 1.0), Intervention(tuple(live), "add", 0.0)]
    out = stacked_run(adapter, sae, layer, batch, identities)
    for e in range(len(identities)):
        outputs_close({k: v[e] for k, v in out.items()}, clean)


@torch.no_grad()
def test_reconstruction_mode_equals_the_sae_spliced_in(case):
    adapter, batch, layer, sae = case

    def splice(h, gene_mask):
        out = h.clone()
        out[gene_mask] = sae(h[gene_mask].float()).to(h.dtype)
        return out

    with adapter.intervene(layer, splice):
        spliced = adapter.run(batch)
    out = stacked_run(adapter, sae, layer, batch, [Intervention()], mode="reconstruction")
    outputs_close({k: v[0] for k, v in out.items()}, spliced)
    assert not torch.allclose(spliced[next(iter(spliced))], adapter.run(batch)[next(iter(spliced))], atol=1e-4)


@torch.no_grad()
def test_stacked_interventions_equal_one_at_a_time(case):
    adapter, batch, layer, sae = case
    f = sae.encode(adapter.capture(batch, [layer])[layer][batch.gene_mask])
    live = [int(j) for j in torch.argsort(-(f > 0).sum(0))[:3]]
    ivs = [Intervention((live[0],), "zero"), Intervention((live[1],), "clamp", 4.0),
           Intervention((live[0], live[2]), "scale", (2.0, -1.0)), Intervention((live[1],), "add", 3.0, "firing"),
           Intervention((live[2],), "add", 2.0, cells=(1,))]
    for mode in ("error_preserving", "reconstruction"):
        stacked = stacked_run(adapter, sae, layer, batch, ivs, mode=mode)
        for e, iv in enumerate(ivs):
            with adapter.intervene(layer, latent_edit(sae, [iv], mode=mode)):
                single = adapter.run(batch)
            outputs_close({k: v[e] for k, v in stacked.items()}, single, atol=2e-5)


@torch.no_grad()
def test_positions_and_cells_restrict_the_edit():
    adapter = build("demo")
    batch = tiny_batch(adapter)
    layer = 2
    sae = firing_sae(adapter, batch, layer)
    h = adapter.capture(batch, [layer])[layer]
    mask = batch.gene_mask
    f = sae.encode(h[mask])
    j = int(torch.argmax(((f > 0).float().mean(0) - 0.5).abs().neg()))  # fires on some tokens, not all
    fires = torch.zeros_like(mask)
    fires[mask] = f[:, j] > 0
    assert fires.any() and (mask & ~fires).any()
    gene = int(batch.gene_ids[0, 3])
    cases = {
        Intervention((j,), "add", 2.0, "firing"): fires,
        Intervention((j,), "add", 2.0, (gene,)): mask & (batch.gene_ids == gene),
        Intervention((j,), "add", 2.0, cells=(0, 2)): mask & torch.tensor([True, False, True])[:, None],
    }
    for iv, where in cases.items():
        out = latent_edit(sae, [iv], batch.gene_ids)(h, mask)
        moved = (out - h).abs().amax(-1) > 1e-6
        assert torch.equal(moved, where)
        torch.testing.assert_close((out - h)[where], (2.0 * sae.W_dec[j]).expand(int(where.sum()), -1),
                                   atol=1e-5, rtol=0)


def test_bad_interventions_are_one_line_errors():
    sae = build_sae("topk", 8, 16, {"k": 2})
    h, mask = torch.randn(1, 3, 8), torch.ones(1, 3, dtype=torch.bool)
    for iv, match in [(Intervention((16,)), "out of range"), (Intervention((1, 2), "scale", (1.0,)), "2 features"),
                      (Intervention((1,), "mul"), "op='mul'"), (Intervention((1,), positions="some"), "positions")]:
        with pytest.raises(InputError, match=match):
            latent_edit(sae, [iv])(h, mask)
    with pytest.raises(InputError, match="mode='splice'"):
        latent_edit(sae, [Intervention()], mode="splice")


def test_stack_batch_repeats_copies_along_the_batch_axis():
    adapter = build("scgpt")
    batch = tiny_batch(adapter)
    stacked, n = stack_batch(batch, 3), len(batch.cell_index)
    assert stacked.gene_ids.shape == (3 * n, batch.gene_ids.shape[1])
    for e in range(3):
        assert torch.equal(stacked.values[e * n:(e + 1) * n], batch.values)
        assert torch.equal(stacked.gene_mask[e * n:(e + 1) * n], batch.gene_mask)


@pytest.fixture(scope="module")
def trained(small_run):
    """The demo model, the small run's trained layer-2 SAE and 8 of its cells."""
    from sae4scfm.data import load_dataset
    from sae4scfm.saes.base import load_sae
    from sae4scfm.scfm import load_scfm
    from sae4scfm.scfm.loading import tokenize_dataset

    cfg, run_dir = small_run
    adapter = load_scfm(cfg.scfm)
    adata = load_dataset(cfg.data)
    tokens = tokenize_dataset(adapter, adata, cfg.data)
    sae, _ = load_sae(run_dir)
    return adapter, sae, tokens.collate(np.arange(8)), int(cfg.sae.target_layer)


def test_attribution_agrees_with_exact_ablation_on_the_trained_demo_run(trained):
    """Per-feature effects (mean over 8 cells) on the cell embedding's projection on a random direction
    and on the mean predicted expression: grad and ig rank like exact ablation (Spearman >= 0.8), and
    exact ablation of one feature equals the model run with that feature zeroed by hand; no parameter
    gradient is left behind."""
    adapter, sae, batch, layer = trained
    torch.manual_seed(0)
    metrics = {"embedding": projection("cell_emb", torch.randn(adapter.d_model)), "expression": mean_output("mlm")}
    with torch.no_grad():
        f = sae.encode(adapter.capture(batch, [layer])[layer][batch.gene_mask])
    active = torch.nonzero((f > 0).sum(0) > 0).flatten().numpy()
    assert len(active) > 30
    for name, metric in metrics.items():
        exact = exact_ablation(adapter, sae, layer, batch, metric, active, per_forward=32).mean(0).numpy()
        for method in ("grad", "ig"):
            est = attribute(adapter, sae, layer, batch, metric, method=method).mean(0).numpy()
            assert np.all(attribute_silent_zero(est, active, sae.d_sae))
            score = agreement(est[active], exact)
            assert score["spearman"] >= 0.8, (name, method, score)
    # the backward runs to h only: no weight gradient is computed or left in the model's or the SAE's .grad
    assert all(p.grad is None for p in [*adapter.model.parameters(), *sae.parameters()])
    j = int(active[0])
    metric = metrics["embedding"]
    with torch.no_grad():
        clean = metric(adapter.run(batch))
        with adapter.intervene(layer, latent_edit(sae, [Intervention((j,), "zero")])):
            ablated = metric(adapter.run(batch))
    one = exact_ablation(adapter, sae, layer, batch, metric, [j])[:, 0]
    torch.testing.assert_close(one, ablated - clean, atol=1e-5, rtol=1e-5)


def attribute_silent_zero(est, active, d_sae):
    silent = np.setdiff1d(np.arange(d_sae), active)
    return est[silent] == 0


@torch.no_grad()
def test_run_from_a_cached_layer_equals_the_full_forward(case):
    """"Run from layer l": the outputs from the cached clean resid.l equal the full forward (every layer, every
    family), skip the blocks before l (a cached state that differs only at l changes the outputs as an
    intervention at l would), and stacked ablations from the prefix equal those of full forwards."""
    adapter, batch, layer, sae = case
    full = adapter.run(batch)
    for start in range(adapter.n_layers + 1):
        h = adapter.capture(batch, [start])[start].clone()
        resumed = adapter.run_from(start, h, batch)
        if adapter.family == "geneformer" and start > adapter.emb_hidden_layer:  # its cell_emb is read upstream
            assert "cell_emb" not in resumed
            resumed["cell_emb"] = full["cell_emb"]
        outputs_close(resumed, full)
    h = adapter.capture(batch, [layer])[layer].clone()
    bumped = h + 0.5 * torch.ones_like(h) * batch.gene_mask[..., None]
    with adapter.intervene(layer, lambda x, m: x + 0.5 * torch.ones_like(x) * m[..., None]):
        want = adapter.run(batch)
    outputs_close(adapter.run_from(layer, bumped, batch), want)
    ivs = [Intervention((j,), "zero") for j in range(4)] + [Intervention((1, 2), "add", 2.0)]
    with_prefix = stacked_run(adapter, sae, layer, batch, ivs, prefix=h)
    without = stacked_run(adapter, sae, layer, batch, ivs)
    outputs_close(with_prefix, without, atol=2e-5)


@torch.no_grad()
def test_capture_from_a_cached_layer_runs_only_the_blocks_in_between(case):
    """Tracing's early exit (every family): ``capture`` of resid.{l+1} from the cached resid.{l} runs block l
    only (no block before it, none after: the forward stops at the last hook point read) and equals the
    full forward's resid.{l+1}."""
    adapter, batch, _, _ = case
    calls = []
    handles = [block.register_forward_hook(lambda _m, _i, _o, b=b: calls.append(b))
               for b, block in enumerate(adapter.model.blocks)]
    try:
        full = adapter.capture(batch, list(range(adapter.n_layers + 1)))
        for start in range(adapter.n_layers):
            calls.clear()
            with adapter.starting_at(start, full[start].clone()):
                got = adapter.capture(batch, [start + 1])[start + 1]
            assert set(calls) == {start}, (start, calls)
            torch.testing.assert_close(got, full[start + 1], atol=1e-5, rtol=1e-5)
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def test_ablation_runs_only_the_cells_where_each_feature_fires(case):
    """The stacked (feature, cell) pairs are exactly those where the feature fires; ablating a feature in a
    cell where it is silent is exactly the clean forward, so exact_ablation's 0 there is the measured effect."""
    adapter, batch, layer, sae = case
    f = sae.encode(adapter.capture(batch, [layer])[layer][batch.gene_mask])
    rows = torch.nonzero(batch.gene_mask, as_tuple=True)[0]
    fires = torch.zeros(len(batch.cell_index), sae.d_sae).index_add_(0, rows, (f > 0).float()) > 0
    features = [int(j) for j in torch.nonzero(fires.any(0) & ~fires.all(0)).flatten()[:4]]
    assert len(features) == 4
    pairs = set()
    for fi, ci, n in ablation_runs(adapter, sae, layer, batch, features, lambda b: len(b.cell_index), per_forward=2):
        assert n == len(ci) <= 2 * len(batch.cell_index)
        pairs |= {(features[i], c) for i, c in zip(fi.tolist(), ci.tolist())}
    assert pairs == {(j, c) for j in features for c in range(len(batch.cell_index)) if fires[c, j]}
    def metric(out):
        return out["cell_emb"].float().sum(1)

    effect = exact_ablation(adapter, sae, layer, batch, metric, features, per_forward=2)
    clean = metric(adapter.run(batch))
    for i, j in enumerate(features):
        with adapter.intervene(layer, latent_edit(sae, [Intervention((j,), "zero")])):
            by_hand = metric(adapter.run(batch)) - clean
        silent = ~fires[:, j]
        assert torch.equal(by_hand[silent], torch.zeros(int(silent.sum()))) and torch.all(effect[silent, i] == 0)
        torch.testing.assert_close(effect[:, i], by_hand, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_vocab_readout_is_scgpts_gepc_and_a_clear_error_elsewhere(case):
    """Only scGPT's GEPC head reads out genes outside a cell's input (``mvc_vocab``); the other families say so."""
    adapter, batch, _, _ = case
    out = adapter.run(batch)
    if adapter.family != "scgpt":
        with pytest.raises(InputError, match="no readout of genes outside a cell's input"):
            adapter.vocab_readout(out)
        return
    values, ids = adapter.vocab_readout(out)
    assert values.shape == (len(batch.cell_index), len(ids)) and len(ids) == len(adapter.vocab) - 3
    column = {int(g): c for c, g in enumerate(ids.tolist())}
    genes = batch.gene_ids[0][batch.gene_mask[0]]
    torch.testing.assert_close(values[0, [column[int(g)] for g in genes]], out["mvc"][0][batch.gene_mask[0]],
                               atol=1e-5, rtol=1e-5)
    import copy
    import dataclasses

    headless = copy.copy(adapter)  # the same model read as a checkpoint without the GEPC head
    headless.cfg = dataclasses.replace(adapter.cfg, do_mvc=False)
    assert adapter.reads_any_gene and not headless.reads_any_gene
    with pytest.raises(InputError, match="no GEPC head"):
        headless.vocab_readout(out)
