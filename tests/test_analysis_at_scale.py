"""Analyses at scale: co-firing from the upper triangle in feature blocks, gene scores in feature
blocks (never a dense [features, genes] whole), kNN without the brute [cells, cells] matrix.
References are computed densely with numpy here."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from sae4scfm.analysis.coactivation import _upper_cooccurrence, cofiring_pmi
from sae4scfm.analysis.gene_scoring import (
    cell_gene_correlation,
    correlation_chunks,
    feature_gene_summary,
    table_score_chunks,
    tail_participation_ratio,
    tail_threshold,
    top_genes,
)
from sae4scfm.analysis.labels import nearest_neighbors


def _sparse_acts(n_rows=300, n_feat=23, density=0.15, seed=0):
    rng = np.random.default_rng(seed)
    return sp.random(n_rows, n_feat, density=density, format="csr", random_state=rng, dtype=np.float64)


@pytest.mark.parametrize("chunk", [1, 4, 7, 100])
def test_upper_cooccurrence_is_the_upper_triangle_of_BtB(chunk):
    X = _sparse_acts()
    B = (X > 0).astype(np.int32).tocsr()
    dense = B.toarray().T @ B.toarray()
    got = _upper_cooccurrence(B, chunk=chunk)
    assert (got.row < got.col).all()
    full = np.zeros_like(dense)
    full[got.row, got.col] = got.data
    want = np.triu(dense, 1)
    np.testing.assert_array_equal(full, want)
    assert len(got.data) == np.count_nonzero(want)  # only pairs that co-fire


def test_cofiring_pmi_is_symmetric_with_the_dense_counts():
    X = _sparse_acts(seed=3)
    B = (X.toarray() > 0).astype(np.int64)
    c = B.T @ B
    n = B.sum(0)
    res = cofiring_pmi(X, min_count=2)
    counts = res.counts.toarray()
    want = np.where((c >= 2) & ~np.eye(len(c), dtype=bool), c, 0)
    np.testing.assert_array_equal(counts, want)
    i, j = np.nonzero(want)
    np.testing.assert_allclose(res.pmi.toarray()[i, j], np.log(c[i, j] * B.shape[0] / (n[i] * n[j])), rtol=1e-12,
                               atol=1e-12)


def test_correlation_chunks_stack_to_pearson_r():
    rng = np.random.default_rng(1)
    X = _sparse_acts(200, 11, 0.3, seed=1)
    counts = rng.poisson(1.0, (200, 9)).astype(np.float64)
    counts[:, 4] = 0  # a constant gene -> NaN column
    E = sp.csr_matrix(counts)
    dense_x, dense_e = X.toarray(), E.toarray()
    want = np.full((11, 9), np.nan)
    for f in range(11):
        for g in range(9):
            if dense_x[:, f].std() > 0 and dense_e[:, g].std() > 0:
                want[f, g] = np.corrcoef(dense_x[:, f], dense_e[:, g])[0, 1]
    blocks = list(correlation_chunks(X, E, chunk=4))
    assert [b[1].shape for b in blocks] == [(4, 9), (4, 9), (3, 9)]
    np.testing.assert_allclose(np.vstack([b for _, b in blocks]), want, rtol=1e-9, atol=1e-12, equal_nan=True)
    np.testing.assert_allclose(cell_gene_correlation(X, E), want, rtol=1e-9, atol=1e-12, equal_nan=True)


def test_feature_gene_summary_in_blocks_equals_the_whole_matrix():
    rng = np.random.default_rng(2)
    genes = [f"G{i}" for i in range(40)]
    s = rng.normal(0, 0.1, (13, 40))
    s[0, [3, 7]] = [2.0, 1.9]  # two dominant genes -> adaptive k = 2
    s[5] = np.nan  # no finite score
    s[6] = -1.0  # no positive score
    rows = [(slice(a, min(a + 5, 13)), s[a:a + 5]) for a in range(0, 13, 5)]
    out = feature_gene_summary(rows, genes, 13, n=6, tail_z=3.0)
    assert out["top"][0] == ["G3", "G7"] and out["top"][5] == [] and out["top"][6] == []
    assert out["top"] == top_genes(s, genes, n=6, adaptive=True, tail_z=3.0)
    assert out["top_fixed"] == top_genes(s, genes, n=6, adaptive=False)
    np.testing.assert_allclose(out["participation_ratio"], tail_participation_ratio(s, 3.0))
    np.testing.assert_allclose(out["tail_threshold"], tail_threshold(s, 3.0))
    assert np.isnan(out["max_score"][5]) and out["max_score"][0] == 2.0 and out["max_score"][6] == -1.0


def test_table_score_chunks_place_each_pair():
    table = pd.DataFrame({"feature_id": [4, 0, 2, 4], "gene": ["b", "a", "c", "a"], "v": [1.0, 2.0, 3.0, 4.0]})
    blocks = list(table_score_chunks(table, "v", n_features=5, genes=["a", "b", "c"], fill=np.nan, chunk=2))
    full = np.vstack([b for _, b in blocks])
    want = np.full((5, 3), np.nan)
    want[4, 1], want[0, 0], want[2, 2], want[4, 0] = 1.0, 2.0, 3.0, 4.0
    np.testing.assert_array_equal(full, want)


def test_exact_knn_equals_brute_force():
    rng = np.random.default_rng(4)
    X = rng.normal(size=(150, 8))
    dist, idx = nearest_neighbors(X, 6)
    d2 = ((X[:, None, :] - X[None, :, :]) ** 2).sum(-1)
    want = np.argsort(d2, axis=1, kind="stable")[:, :6]
    np.testing.assert_array_equal(idx, want)
    np.testing.assert_allclose(dist, np.sqrt(np.take_along_axis(d2, want, 1)), rtol=1e-4, atol=1e-4)


def test_approximate_knn_finds_the_true_neighbours():
    rng = np.random.default_rng(5)
    X = rng.normal(size=(400, 10))
    _, idx = nearest_neighbors(X, 10, exact_max_cells=0)
    d2 = ((X[:, None, :] - X[None, :, :]) ** 2).sum(-1)
    want = np.argsort(d2, axis=1)[:, :10]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(idx, want)])
    assert recall >= 0.95
    assert (idx[:, 0] == np.arange(400)).mean() >= 0.99  # itself first
