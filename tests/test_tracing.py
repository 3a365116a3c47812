"""Circuit tracing and higher-order ablation: edges equal hand-made ablations, consistency ignores cells where
the target did not change, the sign-flip p-value matches scipy's permutation test, tracing resumes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from sae4scfm.causal.attribution import mean_output
from sae4scfm.causal.interventions import Intervention, latent_edit
from sae4scfm.causal.tracing import edge_deltas, edge_statistics, higher_order_ablation, pooled_codes, trace_circuit
from sae4scfm.errors import InputError
from tests.test_hook_points import build, tiny_batch
from tests.test_interventions import firing_sae


@pytest.fixture(scope="module")
def demo_case():
    adapter = build("demo")
    batch = tiny_batch(adapter)
    saes = {layer: firing_sae(adapter, batch, layer, d_sae=48, k=6) for layer in (1, 3, 4)}
    return adapter, batch, saes


def test_consistency_counts_only_cells_where_the_target_changed():
    """A mostly silent target (17 of 20 cells never fire, Δ = 0): a positive effect in the 3 cells that change
    is fully consistent; counting the zeros as negative (the published rule) would give 3/20 and reject it,
    and would pass a negative effect with mixed signs (19/20)."""
    up = np.zeros((20, 1))
    up[:3, 0] = 0.5
    mixed_down = np.zeros((20, 1))
    mixed_down[:3, 0] = [-0.5, -0.5, 0.4]
    table = edge_statistics(np.hstack([up, mixed_down]), n_perm=200)
    assert table["n_changed"].tolist() == [3, 3]
    assert table.loc[0, "consistency"] == 1.0
    assert table.loc[1, "consistency"] == pytest.approx(2 / 3)
    published = [(up[:, 0] > 0).mean(), (mixed_down[:, 0] <= 0).mean()]  # zeros counted as "not positive"
    assert published == [0.15, 0.95]
    assert edge_statistics(np.zeros((5, 3))).empty  # silent targets are not edges


def test_sign_flip_p_matches_scipys_exact_permutation_test():
    rng = np.random.default_rng(1)
    d = np.c_[rng.normal(0.8, 1, 8), rng.normal(0, 1, 8), rng.normal(-1.5, 1, 8)]
    ours = edge_statistics(d, n_perm=40000, rng=np.random.default_rng(2))
    for t in range(3):
        ref = stats.permutation_test((d[:, t],), np.mean, permutation_type="samples", n_resamples=np.inf,
                                     alternative="two-sided")
        assert ours.loc[t, "p"] == pytest.approx(ref.pvalue, abs=0.01)
        assert ours.loc[t, "effect"] == pytest.approx(d[:, t].mean())
        assert ours.loc[t, "effect_size"] == pytest.approx(d[:, t].mean() / d[:, t].std(ddof=1))


@torch.no_grad()
def test_edge_deltas_equal_hand_made_ablations(demo_case):
    adapter, batch, saes = demo_case
    source, targets = saes[1], {3: saes[3], 4: saes[4]}
    features = [0, 5, 11]
    deltas = edge_deltas(adapter, source, 1, targets, batch, features, per_forward=2)
    clean = adapter.capture(batch, [3, 4])
    for i, j in enumerate(features):
        with adapter.intervene(1, latent_edit(source, [Intervention((j,), "zero")])):
            ablated = adapter.capture(batch, [3, 4])
        for layer in (3, 4):
            want = (pooled_codes(ablated[layer], batch.gene_mask, targets[layer])
                    - pooled_codes(clean[layer], batch.gene_mask, targets[layer]))
            np.testing.assert_allclose(deltas[layer][i], want.numpy(), atol=1e-5)
    h = clean[3]
    by_hand = torch.stack([saes[3].encode(h[b][batch.gene_mask[b]]).amax(0) for b in range(h.shape[0])])
    torch.testing.assert_close(pooled_codes(h, batch.gene_mask, saes[3], "max"), by_hand.clamp(min=0))
    by_hand = torch.stack([saes[3].encode(h[b][batch.gene_mask[b]]).mean(0) for b in range(h.shape[0])])
    torch.testing.assert_close(pooled_codes(h, batch.gene_mask, saes[3]), by_hand)
    with pytest.raises(InputError, match="downstream"):
        edge_deltas(adapter, source, 1, {1: saes[1]}, batch, features)


def test_trace_circuit_writes_edges_and_resumes(demo_case, tmp_path, monkeypatch):
    adapter, batch, saes = demo_case
    out = tmp_path / "trace"
    edges = trace_circuit(adapter, saes[1], 1, {3: saes[3]}, batch, out, n_perm=99, chunk=8)
    assert len(edges) and set(edges.columns) >= {"source", "target_layer", "target", "consistency", "p", "q"}
    assert edges["consistency"].between(0, 1).all() and edges["q"].between(0, 1).all()
    hubs = pd.read_csv(out / "hubs.csv")
    assert set(hubs["role"]) <= {"source", "target"}
    parts = sorted((out / "parts").glob("*.csv"))
    assert len(parts) > 1
    parts[-1].unlink()
    calls = []
    import sae4scfm.causal.tracing as tracing

    real = tracing.edge_deltas
    monkeypatch.setattr(tracing, "edge_deltas", lambda *a, **k: calls.append(a[5]) or real(*a, **k))
    again = trace_circuit(adapter, saes[1], 1, {3: saes[3]}, batch, out, n_perm=99, chunk=8)
    assert len(calls) == 1  # only the missing part is traced again
    pd.testing.assert_frame_equal(again, edges)
    with pytest.raises(InputError, match="other settings"):
        trace_circuit(adapter, saes[1], 1, {3: saes[3]}, batch, out, n_perm=50, chunk=8)


@torch.no_grad()
def test_higher_order_ablation_interaction_terms(demo_case):
    adapter, batch, saes = demo_case
    metric = mean_output("mlm")
    clean = metric(adapter.run(batch))

    def effect(features):
        with adapter.intervene(1, latent_edit(saes[1], [Intervention(tuple(features), "zero")])):
            return float((metric(adapter.run(batch)) - clean).mean())

    pairs = higher_order_ablation(adapter, saes[1], 1, batch, metric, [0, 5, 11], order=2, per_forward=4)
    assert pairs["features"].tolist() == ["0 5", "0 11", "5 11"]
    row = pairs.iloc[0]
    assert row["joint"] == pytest.approx(effect([0, 5]), abs=1e-5)
    assert row["interaction"] == pytest.approx(effect([0, 5]) - effect([0]) - effect([5]), abs=1e-5)
    triple = higher_order_ablation(adapter, saes[1], 1, batch, metric, [0, 5, 11], order=3)
    want = (effect([0, 5, 11]) - effect([0, 5]) - effect([0, 11]) - effect([5, 11])
            + effect([0]) + effect([5]) + effect([11]))
    assert triple.loc[0, "interaction"] == pytest.approx(want, abs=1e-5)
    with pytest.raises(InputError, match="order=4"):
        higher_order_ablation(adapter, saes[1], 1, batch, metric, [0, 5, 11, 12], order=4)
