"""Tests for sae4scfm.coactivation (co-firing PMI, significance, modules, cross-layer matching)."""

import math
import tracemalloc

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy.stats import fisher_exact

from sae4scfm.analysis.coactivation import (
    coactivation_modules,
    cofiring_pmi,
    match_by_cofiring,
    match_by_decoder,
    persistence,
    significant_pairs,
)
from sae4scfm.errors import InputError

# 8 tokens x 4 features; fires = value > 0 (negatives and zeros do not fire)
#        f0   f1   f2   f3
TINY = np.array(
    [
        [0.5, 2.0, 0.0, 0.0],  # t0
        [1.0, 0.3, -1.0, 0.0],  # t1
        [0.2, 0.0, 4.0, 0.0],  # t2
        [0.0, 1.0, 0.0, 0.7],  # t3
        [3.0, 1.5, 0.0, 0.1],  # t4
        [-2.0, 0.0, 0.9, 0.6],  # t5
        [0.0, 0.0, 0.0, 0.0],  # t6
        [0.4, 0.0, 0.0, 0.0],  # t7
    ]
)
# n0=5 n1=4 n2=2 n3=3; c01=3 c02=1 c03=1 c12=0 c13=2 c23=1; N=8


def _dense_pmi(X, min_count):
    B = (np.asarray(X) > 0).astype(np.float64)
    N = B.shape[0]
    n = B.sum(0)
    C = B.T @ B
    with np.errstate(divide="ignore", invalid="ignore"):
        P = np.log(C * N / np.outer(n, n))
    mask = (C >= min_count) & ~np.eye(C.shape[0], dtype=bool)
    return C, P, mask


def _random_sparse(n, f, density, seed):
    rng = np.random.default_rng(seed)
    return sp.random(n, f, density=density, format="csr", random_state=rng, data_rvs=lambda k: rng.random(k) + 0.01)


# ----------------------------------------------------------------------------- PMI


def test_pmi_tiny_hand_computed():
    pmi, counts = cofiring_pmi(sp.csr_matrix(TINY), min_count=1)
    assert sp.issparse(pmi) and sp.issparse(counts)
    assert pmi.shape == counts.shape == (4, 4)
    C = counts.toarray()
    expected_counts = np.array([[0, 3, 1, 1], [3, 0, 0, 2], [1, 0, 0, 1], [1, 2, 1, 0]])
    np.testing.assert_array_equal(C, expected_counts)
    P = pmi.toarray()
    assert P[0, 1] == pytest.approx(math.log(3 * 8 / (5 * 4)))  # log 1.2
    assert P[1, 3] == pytest.approx(math.log(2 * 8 / (4 * 3)))  # log 4/3
    assert P[0, 2] == pytest.approx(math.log(1 * 8 / (5 * 2)))  # log 0.8 (negative)
    assert P[2, 3] == pytest.approx(math.log(1 * 8 / (2 * 3)))
    np.testing.assert_allclose(P, P.T)
    assert counts.nnz == pmi.nnz == 10  # 5 co-firing pairs, both triangles, no diagonal


def test_pmi_min_count_drops_pairs():
    pmi, counts = cofiring_pmi(TINY, min_count=2)  # dense input also accepted
    assert sorted(zip(*counts.nonzero())) == [(0, 1), (1, 0), (1, 3), (3, 1)]
    assert pmi.nnz == 4
    pmi3, counts3 = cofiring_pmi(TINY, min_count=3)
    assert sorted(zip(*counts3.nonzero())) == [(0, 1), (1, 0)]
    with pytest.raises(InputError):
        cofiring_pmi(TINY, min_count=0)


@pytest.mark.parametrize("min_count", [1, 3])
def test_pmi_matches_dense_bruteforce(min_count):
    X = _random_sparse(300, 25, 0.15, seed=1)
    pmi, counts = cofiring_pmi(X, min_count=min_count)
    C, P, mask = _dense_pmi(X.toarray(), min_count)
    np.testing.assert_array_equal(counts.toarray(), np.where(mask, C, 0))
    got_mask = np.zeros_like(mask)
    r, c = counts.nonzero()
    got_mask[r, c] = True
    np.testing.assert_array_equal(got_mask, mask)
    np.testing.assert_allclose(np.asarray(pmi[r, c]).ravel(), P[r, c], rtol=1e-12, atol=1e-12)


def test_pmi_stays_sparse_on_large_input():
    """50k x 4096 at 0.1% density: the result is sparse and no dense 4096^2 float64 is ever allocated."""
    F = 4096
    X = _random_sparse(50_000, F, 0.001, seed=2)
    dense_bytes = F * F * 8
    tracemalloc.start()
    try:
        pmi, counts = cofiring_pmi(X, min_count=2)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sp.issparse(pmi) and sp.issparse(counts)
    assert counts.nnz == pmi.nnz
    assert 0 < counts.nnz < 0.01 * F * F
    assert peak < dense_bytes / 4, f"peak {peak / 2**20:.1f} MiB vs dense {dense_bytes / 2**20:.0f} MiB"


# ----------------------------------------------------------------------------- significance


def _planted_cofiring(seed=3, N=400, F=12):
    """N rows x F features: f1 follows f0, f5 follows f4; f8..f11 fire rarely and f10/f11 are disjoint
    (pairs that never co-fire, and pairs co-firing on fewer than 5 rows)."""
    rng = np.random.default_rng(seed)
    X = (rng.random((N, F)) < 0.2).astype(float)
    X[:, 1] = np.where(rng.random(N) < 0.8, X[:, 0], X[:, 1])
    X[:, 5] = np.where(rng.random(N) < 0.7, X[:, 4], X[:, 5])
    X[:, 8:] = (rng.random((N, 4)) < 0.02).astype(float)
    X[:, 10] = np.where(X[:, 11] > 0, 0.0, X[:, 10])
    return X


def test_significant_pairs_pvalues_match_fisher_and_bh():
    X = _planted_cofiring()
    df = significant_pairs(sp.csr_matrix(X), min_count=5, max_fdr=1.0)
    assert list(df.columns) == ["i", "j", "count", "pmi", "p_value", "fdr"]
    assert (df["i"] < df["j"]).all() and (df["count"] >= 5).all()
    B = X > 0
    for _, row in df.sample(6, random_state=0).iterrows():
        i, j = int(row.i), int(row.j)
        a = int((B[:, i] & B[:, j]).sum())
        b = int((B[:, i] & ~B[:, j]).sum())
        c = int((~B[:, i] & B[:, j]).sum())
        d = int((~B[:, i] & ~B[:, j]).sum())
        assert row["count"] == a
        _, p = fisher_exact([[a, b], [c, d]], alternative="greater")
        assert row.p_value == pytest.approx(p, rel=1e-9, abs=1e-300)
    sig = significant_pairs(sp.csr_matrix(X), min_count=5, max_fdr=0.01)
    pairs = set(zip(sig["i"], sig["j"]))
    assert (0, 1) in pairs and (4, 5) in pairs
    assert (sig["fdr"] <= 0.01).all()


def test_significant_pairs_fdr_is_bh_over_all_pairs():
    """Every pair i < j is a test (never co-firing pairs and pairs below min_count included): the FDR
    equals statsmodels' BH over the p-values of all F(F-1)/2 pairs, each from scipy.stats.hypergeom."""
    import statsmodels.stats.multitest as sm
    from scipy.stats import hypergeom

    X = _planted_cofiring()
    B = X > 0
    N, F = B.shape
    ii, jj = np.triu_indices(F, k=1)
    count = np.array([int((B[:, i] & B[:, j]).sum()) for i, j in zip(ii, jj)])
    p_ref = np.array([hypergeom.sf(c - 1, N, B[:, i].sum(), B[:, j].sum()) for c, i, j in zip(count, ii, jj)])
    assert (count == 0).sum() >= 1 and ((count > 0) & (count < 5)).sum() >= 3  # the example has both kinds
    fdr_ref = sm.multipletests(p_ref, method="fdr_bh")[1]
    everything = significant_pairs(sp.csr_matrix(X), min_count=1, max_fdr=1.0)
    assert everything.attrs["n_tests"] == F * (F - 1) // 2 == 66
    assert len(everything) == int((count > 0).sum())
    ref = pd.DataFrame({"i": ii, "j": jj, "count": count, "p": p_ref, "fdr": fdr_ref}).query("count > 0")
    np.testing.assert_array_equal(everything[["i", "j", "count"]].to_numpy(), ref[["i", "j", "count"]].to_numpy())
    np.testing.assert_allclose(everything["p_value"], ref["p"], rtol=1e-9)
    np.testing.assert_allclose(everything["fdr"], ref["fdr"], rtol=1e-9)
    # min_count filters what is reported, not what is tested: the reported FDRs stay BH over all pairs
    reported = significant_pairs(sp.csr_matrix(X), min_count=5, max_fdr=1.0)
    ref5 = ref.query("count >= 5")
    np.testing.assert_allclose(reported["fdr"], ref5["fdr"], rtol=1e-9)


# ----------------------------------------------------------------------------- modules


def test_leiden_recovers_planted_blocks():
    rng = np.random.default_rng(4)
    N = 3000
    block_a, block_b, noise = list(range(0, 6)), list(range(6, 12)), [12, 13]
    X = np.zeros((N, 15))
    which = rng.integers(0, 2, N)  # each token activates one block's program
    for t in range(N):
        block = block_a if which[t] == 0 else block_b
        on = rng.random(len(block)) < 0.5
        X[t, np.asarray(block)[on]] = rng.random(on.sum()) + 0.1
    X[rng.random(N) < 0.001, 12] = 1.0  # very rare noise feature: below min_count
    # feature 13 never fires; feature 14 fires everywhere (PMI 0 with everything)
    X[:, 14] = 1.0
    pairs = significant_pairs(sp.csr_matrix(X), min_count=5, max_fdr=0.05)
    labels = coactivation_modules(pairs, 15, resolution=1.0, seed=0)
    assert labels.shape == (15,)
    assert len(set(labels[block_a])) == 1 and len(set(labels[block_b])) == 1
    assert labels[block_a[0]] != labels[block_b[0]]
    assert labels[block_a[0]] >= 0 and labels[block_b[0]] >= 0
    assert (labels[noise] == -1).all() and labels[14] == -1
    assert set(labels[labels >= 0]) == {0, 1}


def test_modules_edge_cases():
    empty = pd.DataFrame({"i": [], "j": [], "pmi": []})
    np.testing.assert_array_equal(coactivation_modules(empty, 3), [-1, -1, -1])
    neg = pd.DataFrame({"i": [0], "j": [1], "pmi": [-0.5]})  # clipped to 0 -> no edge
    np.testing.assert_array_equal(coactivation_modules(neg, 2), [-1, -1])
    with pytest.raises(InputError):
        coactivation_modules(pd.DataFrame({"i": [0], "j": [5], "pmi": [1.0]}), 3)
    with pytest.raises(InputError):
        coactivation_modules(pd.DataFrame({"i": [0], "j": [1]}), 3)


# ----------------------------------------------------------------------------- matching


def test_match_by_decoder_permutation_and_sign_flip():
    rng = np.random.default_rng(5)
    W_a = rng.normal(size=(40, 16)).astype(np.float32)
    perm = rng.permutation(40)
    W_b = W_a[perm] * rng.uniform(0.5, 2.0, size=(40, 1))  # rescaled rows do not change cosine
    inv = np.argsort(perm)  # feature a sits at row inv[a] of W_b
    df = match_by_decoder(W_a, W_b)
    assert list(df.columns[:3]) == ["feature_a", "best_b", "cosine"]
    np.testing.assert_array_equal(df["best_b"].to_numpy(), inv)
    np.testing.assert_allclose(df["cosine"].to_numpy(), 1.0, atol=1e-6)
    flip = np.where(rng.random(40) < 0.5, -1.0, 1.0)[:, None]
    df_flip = match_by_decoder(W_a, W_b * flip, chunk=7)
    np.testing.assert_array_equal(df_flip["best_b"].to_numpy(), inv)
    np.testing.assert_allclose(df_flip["cosine"].to_numpy(), 1.0, atol=1e-6)
    np.testing.assert_allclose(df_flip["signed_cosine"].to_numpy(), flip[inv, 0], atol=1e-6)
    assert persistence(df_flip, 0.99) == 1.0


def test_match_by_decoder_rejects_width_mismatch():
    with pytest.raises(InputError, match="d_in"):
        match_by_decoder(np.ones((3, 4)), np.ones((3, 5)))


def test_match_by_decoder_partial_persistence():
    rng = np.random.default_rng(6)
    W_a = rng.normal(size=(10, 64))
    W_b = np.vstack([W_a[:4], rng.normal(size=(20, 64))])  # only the first 4 survive
    df = match_by_decoder(W_a, W_b)
    np.testing.assert_array_equal(df["best_b"].to_numpy()[:4], np.arange(4))
    assert persistence(df, 0.9) == pytest.approx(0.4)


@pytest.mark.parametrize("metric", ["jaccard", "pmi"])
def test_match_by_cofiring_finds_permuted_copy(metric):
    X_a = _random_sparse(2000, 30, 0.05, seed=7)
    perm = np.random.default_rng(8).permutation(30)
    X_b = X_a[:, perm]  # column k of B is feature perm[k] of A
    inv = np.argsort(perm)
    df = match_by_cofiring(X_a, X_b, metric=metric)
    assert list(df.columns) == ["feature_a", "best_b", metric, "count"]
    np.testing.assert_array_equal(df["best_b"].to_numpy(), inv)
    if metric == "jaccard":
        np.testing.assert_allclose(df["jaccard"].to_numpy(), 1.0)
        assert persistence(df, 0.99) == 1.0
    n_fire = np.asarray((X_a > 0).sum(axis=0)).ravel()
    np.testing.assert_array_equal(df["count"].to_numpy(), n_fire)


def test_match_by_cofiring_jaccard_vs_dense_and_unmatched():
    rng = np.random.default_rng(9)
    Xa = (rng.random((500, 8)) < 0.1).astype(float)
    Xb = (rng.random((500, 11)) < 0.1).astype(float)
    Xa[:, 7] = 0.0  # never fires -> no match
    df = match_by_cofiring(sp.csr_matrix(Xa), sp.csr_matrix(Xb))
    A, B = Xa > 0, Xb > 0
    inter = A.T.astype(int) @ B.astype(int)
    union = A.sum(0)[:, None] + B.sum(0)[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        J = np.where(union > 0, inter / union, 0.0)
    for a in range(7):
        assert df.loc[a, "best_b"] == int(np.argmax(J[a]))
        assert df.loc[a, "jaccard"] == pytest.approx(J[a].max())
    assert df.loc[7, "best_b"] == -1 and df.loc[7, "jaccard"] == 0.0
    assert persistence(df, 0.0) == pytest.approx(7 / 8)  # the unmatched feature never counts
    with pytest.raises(InputError, match="rows"):
        match_by_cofiring(Xa, Xb[:100])
    with pytest.raises(InputError):
        match_by_cofiring(Xa, Xb, metric="cosine")


def test_persistence_errors():
    with pytest.raises(InputError):
        persistence(pd.DataFrame({"feature_a": [0], "best_b": [0]}), 0.5)
    with pytest.raises(InputError):
        persistence(pd.DataFrame({"feature_a": [], "best_b": [], "cosine": []}), 0.5)
