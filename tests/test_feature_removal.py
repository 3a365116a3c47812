"""Feature removal by selection (sae4scfm.causal.removal): the steered cell embedding of a removal on the demo
run against a clean forward, a one-at-a-time latent_edit run and a hand-written ablation; the selection made on
train cells only (checked with sklearn's AUROC); the density-matched random control; bad input. The removal
rows of the integration table are tested in tests/test_integration.py."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from sklearn.metrics import roc_auc_score

import sae4scfm
from sae4scfm.causal.interventions import Intervention, latent_edit
from sae4scfm.causal.removal import RemovalSet, removal_sets, removed_embeddings, selection_scores
from sae4scfm.errors import InputError

# --------------------------------------------------------------------------- the steered embedding (demo run)


@pytest.fixture(scope="module")
def opened(small_run):
    """(causal run, 6 eval cells, clean cell_emb [n_obs, d] of those rows, the 8 features firing most there)."""
    from sae4scfm.causal.run import open_causal_run

    _, run_dir = small_run
    cfg = sae4scfm.compose("benchmark_integration", [f"runs_dir={run_dir.parents[1]}", "sae_checkpoint.experiment=small",
                                                     f"sae_checkpoint.timestamp={run_dir.name}", "device=cpu"])
    ctx = open_causal_run(cfg, "feature removal")
    tokens = ctx.eval_tokens(6, np.random.default_rng(0))
    clean = np.full((ctx.adata.n_obs, ctx.adapter.d_model), np.nan, dtype=np.float32)
    fired = torch.zeros(ctx.sae.d_sae)
    with torch.no_grad():
        for batch in tokens.batches(6):
            clean[batch.cell_index.numpy()] = ctx.adapter.run(batch)["cell_emb"].numpy()
            h = ctx.adapter.capture(batch, [ctx.layer])[ctx.layer][batch.gene_mask]
            fired += (ctx.sae.encode(h) > 0).sum(0)
    live = [int(j) for j in torch.argsort(-fired)[:8]]
    assert fired[live].min() > 0
    return ctx, tokens, clean, live


def test_empty_removal_is_the_clean_embedding(opened):
    ctx, tokens, clean, _ = opened
    sets = [RemovalSet("n0", "removed", 0, None, ()), RemovalSet("n0_s0", "random", 0, 0, ())]
    for mode in ("error_preserving", "reconstruction"):
        out = removed_embeddings(ctx.adapter, ctx.sae, ctx.layer, tokens, sets, ctx.adata.n_obs, batch_size=4,
                                 mode=mode)
        rows = tokens.cell_index
        assert set(out) == {"n0", "n0_s0"} and np.isnan(np.delete(out["n0"], rows, axis=0)).all()
        if mode == "error_preserving":  # the stacked, prefix-cached path changes nothing
            for name in out:
                np.testing.assert_allclose(out[name][rows], clean[rows], atol=1e-5, rtol=0)
        else:  # the SAE spliced in: its reconstruction error moves the embedding
            assert np.abs(out["n0"][rows] - clean[rows]).max() > 1e-3


def test_removal_acts_only_through_the_zeroed_features(opened):
    """Stacked (2 removals per forward, from the cached prefix) == one latent_edit per forward via
    adapter.intervene == a hand-written h - f_S W_dec[S] at the gene tokens; and it does move the embedding."""
    ctx, tokens, clean, live = opened
    adapter, sae, layer = ctx.adapter, ctx.sae, ctx.layer
    sets = [RemovalSet("a", "removed", 3, None, tuple(live[:3])),
            RemovalSet("b", "random", 3, 0, tuple(live[3:6])),
            RemovalSet("c", "random", 2, 1, (live[6], live[7]))]
    out = removed_embeddings(adapter, sae, layer, tokens, sets, ctx.adata.n_obs, batch_size=4, per_forward=2)
    rows = tokens.cell_index
    for s in sets:
        S = torch.tensor(s.features)

        def by_hand(h, gene_mask):
            h = h.clone()
            x = h[gene_mask]
            h[gene_mask] = x - sae.encode(x)[:, S] @ sae.W_dec[S]
            return h

        for fn in (latent_edit(sae, [Intervention(s.features, "zero")]), by_hand):
            expected = np.zeros_like(clean)
            with torch.no_grad():
                for batch in tokens.batches(3):
                    with adapter.intervene(layer, fn):
                        expected[batch.cell_index.numpy()] = adapter.run(batch)["cell_emb"].numpy()
            np.testing.assert_allclose(out[s.name][rows], expected[rows], atol=1e-5, rtol=1e-5)
        assert np.abs(out[s.name][rows] - clean[rows]).max() > 1e-3


# --------------------------------------------------------------------------- selection on train cells


def synthetic(seed: int = 0, n: int = 240):
    """X [n, 12]: feature 0 marks batch a on the train cells only, feature 1 marks batch a on the eval cells
    only, feature 2 marks cell type T (and, less, batch a) everywhere; 3..10 random; 11 silent."""
    rng = np.random.default_rng(seed)
    obs = pd.DataFrame({"batch": np.tile(["a", "b"], n // 2), "cell_type": np.repeat(["T", "B", "T", "B"], n // 4),
                        "split": np.where(rng.random(n) < 0.5, "train", "eval")})
    train, a = (obs["split"] == "train").to_numpy(), (obs["batch"] == "a").to_numpy()
    X = rng.random((n, 12)) * (rng.random((n, 12)) < rng.uniform(0.1, 0.9, 12))
    X[:, 0] = np.where(train, a * 2.0, rng.random(n))
    X[:, 1] = np.where(~train, a * 2.0, rng.random(n))
    X[:, 2] = (obs["cell_type"] == "T").to_numpy() * 1.5 + a * 0.2
    X[:, 11] = 0
    return sp.csr_matrix(X), obs, train


def test_scores_are_sklearn_auroc_on_train_cells():
    X, obs, train = synthetic()
    dense = X.toarray()
    for rule in ("auroc", "auroc_over_cell_type"):
        score = selection_scores(X, obs, train, "batch", rule=rule, cell_type_key="cell_type")
        for j in range(11):
            expected = max(roc_auc_score(obs["batch"][train] == v, dense[train, j]) for v in ("a", "b"))
            if rule == "auroc_over_cell_type":
                expected -= max(roc_auc_score(obs["cell_type"][train] == v, dense[train, j]) for v in ("T", "B"))
            assert score[j] == pytest.approx(expected, abs=1e-9), (rule, j)
    # the cell-type feature 2 (batch AUROC 0.75) is a batch feature by auroc, not by auroc_over_cell_type
    by_batch = selection_scores(X, obs, train, "batch")
    over = selection_scores(X, obs, train, "batch", rule="auroc_over_cell_type", cell_type_key="cell_type")
    assert by_batch[0] == pytest.approx(1.0) and by_batch[2] == pytest.approx(0.75, abs=0.05)
    assert over[0] > 0.3 and over[2] < -0.2


def test_selection_uses_train_cells_only():
    X, obs, train = synthetic()
    sets, _ = removal_sets(X, obs, train, "batch", [1], [0])
    assert sets[0].features == (0,)  # batch a on the train cells
    flipped = obs.assign(split=np.where(train, "eval", "train"))
    sets, _ = removal_sets(X, flipped, ~train, "batch", [1], [0])
    assert sets[0].features == (1,)  # the other split's batch feature
    # changing the eval cells' activations changes nothing
    Y = X.toarray()
    Y[~train, 3] = (obs["batch"][~train] == "a") * 5.0
    assert removal_sets(sp.csr_matrix(Y), obs, train, "batch", [3], [0])[0][0] == \
        removal_sets(X, obs, train, "batch", [3], [0])[0][0]


def test_random_control_is_matched_distinct_and_seeded():
    X, obs, train = synthetic()
    sets, score = removal_sets(X, obs, train, "batch", [0, 2, 5], [0, 1])
    names = [s.name for s in sets]
    assert names == ["model_cell_emb_removed_n0", "model_cell_emb_random_n0_s0", "model_cell_emb_random_n0_s1",
                     "model_cell_emb_removed_n2", "model_cell_emb_random_n2_s0", "model_cell_emb_random_n2_s1",
                     "model_cell_emb_removed_n5", "model_cell_emb_random_n5_s0", "model_cell_emb_random_n5_s1"]
    assert sets[0].features == sets[1].features == ()
    live = np.flatnonzero(np.asarray((X[train] > 0).sum(0)).ravel())
    assert 11 not in live
    top = live[np.argsort(-score[live], kind="stable")]
    by_n = {s.name: s for s in sets}
    for n in (2, 5):
        removed = by_n[f"model_cell_emb_removed_n{n}"].features
        assert removed == tuple(top[:n])
        draws = [by_n[f"model_cell_emb_random_n{n}_s{s}"].features for s in (0, 1)]
        for d in draws:
            assert len(d) == n == len(set(d)) and not set(d) & set(removed) and set(d) <= set(live)
    assert removal_sets(X, obs, train, "batch", [5], [0])[0][1] == by_n["model_cell_emb_random_n5_s0"]


def test_bad_input():
    X, obs, train = synthetic()
    with pytest.raises(InputError, match=r"integration.removal.label_key='donor' is not an obs column.*batch"):
        removal_sets(X, obs, train, "donor", [2], [0])
    with pytest.raises(InputError, match=r"n=6 needs 12 live features .* 11 of the SAE's 12 features fire"):
        removal_sets(X, obs, train, "batch", [2, 6], [0])
    with pytest.raises(InputError, match=r"n_features_list=\[-1\]"):
        removal_sets(X, obs, train, "batch", [-1], [0])
    with pytest.raises(InputError, match=r"seeds=\[\]"):
        removal_sets(X, obs, train, "batch", [2], [])
    with pytest.raises(InputError, match=r"selection='best'.*auroc, auroc_over_cell_type"):
        removal_sets(X, obs, train, "batch", [2], [0], rule="best")
    with pytest.raises(InputError, match=r"label_key='one' on the train cells: .*found 1"):
        removal_sets(X, obs.assign(one="x"), train, "one", [2], [0])
