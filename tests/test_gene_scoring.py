"""Gene-level feature scores, each checked against a brute-force computation on small data."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy.stats import pearsonr

from sae4scfm.analysis.gene_scoring import (
    DEFAULT_FAMILIES,
    TOKEN_GENE_COLUMNS,
    cell_gene_correlation,
    correlation_chunks,
    density_scores,
    expression_where_firing,
    family_membership,
    gene_family_scores,
    gene_score_matrix,
    participation_ratio,
    tail_participation_ratio,
    tail_threshold,
    token_gene_scores,
    top_genes,
    top_genes_k_summary,
)
from sae4scfm.errors import InputError


def _sparse(rng, shape, density=0.3, signed=True):
    X = sp.random(*shape, density=density, format="csr", random_state=rng)
    if signed:
        X.data -= 0.3  # some negative entries: they must not count as firing
    return X


def _token_adata(seed=0, n_tok=200, m=7, genes=("A", "B", "C", "D", "E")):
    rng = np.random.default_rng(seed)
    X = _sparse(rng, (n_tok, m), 0.35)
    g = rng.choice(list(genes), size=n_tok).astype(object)
    g[:3] = None  # tokens without a gene are ignored
    obs = pd.DataFrame({"cell": rng.integers(0, 20, n_tok).astype(str), "gene": g},
                       index=[f"t{i}" for i in range(n_tok)])
    return ad.AnnData(X=X, obs=obs)


def test_token_gene_scores_brute_force():
    adata = _token_adata()
    table = token_gene_scores(adata)
    assert list(table.columns) == list(TOKEN_GENE_COLUMNS)
    X = adata.X.toarray()
    genes = adata.obs["gene"].to_numpy()
    has = pd.notna(genes)
    N = has.sum()
    expected = {}
    for f in range(X.shape[1]):
        c_f = sum(1 for t in range(X.shape[0]) if has[t] and X[t, f] > 0)
        for g in sorted(set(genes[has])):
            toks = [t for t in range(X.shape[0]) if genes[t] == g]
            fire = [X[t, f] for t in toks if X[t, f] > 0]
            if fire:
                expected[(f, g)] = (len(toks), len(fire), len(fire) / len(toks), np.mean(fire),
                                    np.log2((len(fire) / c_f) / (len(toks) / N)))
    assert len(table) == len(expected)
    for row in table.itertuples(index=False):
        n_tok, n_fire, freq, mean_act, enr = expected[(row.feature_id, row.gene)]
        assert row.n_tokens == n_tok and row.n_fire == n_fire
        assert row.freq == pytest.approx(freq)
        assert row.mean_act == pytest.approx(mean_act)
        assert row.log2_enrichment == pytest.approx(enr)
    # sorted by feature then gene
    assert (np.diff(table["feature_id"].to_numpy()) >= 0).all()


def test_token_gene_scores_categorical_and_missing_column():
    adata = _token_adata(seed=1)
    plain = token_gene_scores(adata)
    adata.obs["gene"] = adata.obs["gene"].astype("category")
    cat = token_gene_scores(adata)
    pd.testing.assert_frame_equal(plain.reset_index(drop=True), cat.reset_index(drop=True), check_dtype=False)
    with pytest.raises(InputError, match="no column 'symbol'"):
        token_gene_scores(adata, gene_key="symbol")


def test_enrichment_hand_example():
    # 4 tokens of gene A, 4 of gene B; feature 0 fires on 2 A-tokens only -> P(A|fire)=1, P(A)=0.5
    X = sp.csr_matrix(np.array([[1, 0], [2, 1], [0, 1], [0, 1], [0, 1], [0, 0], [0, 0], [0, 0]], float))
    obs = pd.DataFrame({"gene": list("AAAABBBB")}, index=[str(i) for i in range(8)])
    t = token_gene_scores(ad.AnnData(X=X, obs=obs)).set_index(["feature_id", "gene"])
    assert t.loc[(0, "A"), "log2_enrichment"] == pytest.approx(1.0)
    assert t.loc[(0, "A"), "freq"] == pytest.approx(0.5)
    assert t.loc[(0, "A"), "mean_act"] == pytest.approx(1.5)
    assert (0, "B") not in t.index
    # feature 1: 3 of its 4 firing tokens on A -> log2(0.75 / 0.5)
    assert t.loc[(1, "A"), "log2_enrichment"] == pytest.approx(np.log2(1.5))
    assert t.loc[(1, "B"), "log2_enrichment"] == pytest.approx(np.log2(0.5))
    mat, genes = gene_score_matrix(t.reset_index(), "n_fire")
    assert list(genes) == ["A", "B"] and mat.tolist() == [[2, 0], [3, 1]]


def test_cell_gene_correlation_vs_pearsonr():
    rng = np.random.default_rng(2)
    X = _sparse(rng, (60, 6), 0.3)
    E = _sparse(rng, (60, 5), 0.4, signed=False)
    X = sp.lil_matrix(X)
    X[:, 4] = 0.0  # constant feature (all zero)
    X = sp.csr_matrix(X)
    E = sp.lil_matrix(E)
    E[:, 3] = 2.5  # constant gene (non-zero)
    E = sp.csr_matrix(E)
    r = cell_gene_correlation(X, E)
    assert r.shape == (6, 5)
    Xd, Ed = X.toarray(), E.toarray()
    for f in range(6):
        for g in range(5):
            if f == 4 or g == 3:
                assert np.isnan(r[f, g])
            else:
                assert r[f, g] == pytest.approx(pearsonr(Xd[:, f], Ed[:, g])[0], abs=1e-10)
    with pytest.raises(InputError, match="cells"):
        cell_gene_correlation(X, E[:10])


def test_correlation_over_blocks_of_cells_equals_one_pass():
    """Moments summed over cell blocks (and feature chunks) give the one-pass r, also for a feature that is
    constant within every block but not over all cells, and a gene constant within one block only."""
    rng = np.random.default_rng(5)
    X = sp.lil_matrix(_sparse(rng, (60, 6), 0.3))
    X[:, 5] = np.repeat([1.0, 2.0], 30)[:, None]  # constant in each 30-cell block, not over the 60 cells
    X[:, 4] = 3.0  # constant everywhere (non-zero)
    X = sp.csr_matrix(X, dtype=np.float32)
    E = sp.lil_matrix(_sparse(rng, (60, 5), 0.4, signed=False))
    E[:30, 2] = 1.0  # constant in the first block only
    E = sp.csr_matrix(E)
    Xd, Ed = X.toarray().astype(np.float64), E.toarray()
    for cells in (1, 7, 30, 60):
        for chunk in (1, 4, 6):
            r = np.vstack([r for _, r in correlation_chunks(X, E, chunk=chunk, cells=cells)])
            assert np.isnan(r[4]).all() and not np.isnan(np.delete(r, 4, axis=0)).any()
            for f in (0, 3, 5):
                for g in range(5):
                    assert r[f, g] == pytest.approx(pearsonr(Xd[:, f], Ed[:, g])[0], abs=1e-10)


def test_participation_ratio_hand_examples():
    assert participation_ratio(np.array([[1, 1, 1, 1, 0]]))[0] == pytest.approx(4)
    assert participation_ratio(np.array([[0.3] * 7]))[0] == pytest.approx(7)
    assert participation_ratio(np.array([[5, 0, 0]]))[0] == pytest.approx(1)
    assert participation_ratio(np.array([[2, 1, -3, np.nan]]))[0] == pytest.approx(9 / 5)
    assert participation_ratio(np.array([[0, -1.0]]))[0] == 0


def test_top_genes_fixed_and_adaptive():
    genes = list("abcdefghij")
    bulk = [0.0, 0.01, -0.01, 0.0, 0.02, -0.02]  # unrelated genes: median 0, MAD 0.01
    s = np.array([
        [1, 1, 1, 0, *bulk],             # three equal outliers -> PR 3
        [10, 0.1, 0, 0, *bulk],          # one dominant (0.1 is an outlier too, but small) -> PR ~1.0 -> 1
        [0, -1, np.nan, 0, 0, 0, 0, 0, 0, 0],  # nothing positive
        [0.9, 0.3, 0.2, 0.1, *bulk],     # tail from 0.148 (median 0.015 + 3 * 1.4826 * MAD 0.03): excess
                                         # (0.752, 0.152, 0.052) -> PR 1.54 -> 2
    ])
    fixed = top_genes(s, genes, n=2, adaptive=False)
    assert fixed == {0: ["a", "b"], 1: ["a", "b"], 2: [], 3: ["a", "b"]}
    adapt = top_genes(s, genes, n=20)
    assert adapt[0] == ["a", "b", "c"]
    assert adapt[1] == ["a"]
    assert adapt[2] == []
    assert adapt[3] == ["a", "b"]
    assert top_genes(s, genes, n=1)[3] == ["a"]  # capped by n
    with pytest.raises(InputError):
        top_genes(s, genes[:3])


def _dominant_rows(n_genes, ms, seed=0):
    """One row per m in ``ms``: m dominant genes (scores spread over 0.55..0.85, at random columns) over a
    bulk of unrelated genes scoring N(0, 0.05) (like Pearson r of an unrelated gene). Returns (scores, dominant)."""
    rng = np.random.default_rng(seed)
    s = rng.normal(0.0, 0.05, (len(ms), n_genes))
    dominant = []
    for r, m in enumerate(ms):
        cols = rng.choice(n_genes, m, replace=False)
        s[r, cols] = np.linspace(0.85, 0.55, m) if m > 1 else 0.8
        dominant.append(set(cols.tolist()))
    return s, dominant


@pytest.mark.parametrize("n_genes", [700, 5000])
def test_adaptive_k_follows_the_number_of_dominant_genes(n_genes):
    """The cut is the PR of the positive tail: k ~ m for m dominant genes whatever the gene count. The PR of all
    positive scores (the old rule) sees the ~n_genes/2 positive noise genes and always hits the cap of 20."""
    ms = [1, 2, 3, 5, 8, 12]
    s, dominant = _dominant_rows(n_genes, ms)
    genes = [f"g{i}" for i in range(n_genes)]
    top = top_genes(s, genes, n=20)
    k = np.array([len(top[r]) for r in range(len(ms))])
    assert np.all(np.abs(k - np.array(ms)) <= 1), k
    assert len(set(k.tolist())) == len(ms)  # the cut adapts: a different k for every m
    for r, m in enumerate(ms):  # the genes kept are the dominant ones, best first
        kept = {int(g[1:]) for g in top[r]}
        assert kept <= dominant[r] or (len(kept) == m + 1 and len(kept - dominant[r]) == 1)
    assert (np.floor(participation_ratio(s) + 0.5) > 20).all()  # the old rule: k = 20 for every row
    np.testing.assert_allclose(tail_threshold(s), 3 * 0.05, rtol=0.15)  # median + 3 robust sigmas of the bulk


def test_tail_participation_ratio_hand_examples():
    # finite scores (5, 4, 0, 0, 0, 0, 0.1, -0.1): median 0, MAD 0.05 -> tail from 3 * 1.4826 * 0.05 = 0.2224
    s = np.array([[5.0, 4.0, 0.0, 0.0, 0.0, 0.0, 0.1, -0.1, np.nan]])
    t = 3 * 1.4826 * 0.05
    assert tail_threshold(s)[0] == pytest.approx(t)
    assert tail_threshold(s, z=1.0)[0] == pytest.approx(t / 3)
    assert tail_participation_ratio(s)[0] == pytest.approx((9 - 2 * t) ** 2 / ((5 - t) ** 2 + (4 - t) ** 2))
    assert top_genes(s, list("abcdefghi"), n=20)[0] == ["a", "b"]  # round(1.97) = 2
    # the threshold is never below 0 (a positive tail), and a row without finite scores has none
    assert tail_threshold(np.array([[-5.0, -4.0, -4.0, -3.0]]))[0] == 0.0
    assert tail_threshold(np.array([[np.nan, np.inf]]))[0] == np.inf
    # nothing above the tail threshold (nothing stands out of the bulk): the best positive gene only
    flat = np.array([[0.1, 0.05, -0.1, -0.05]])
    assert tail_participation_ratio(flat)[0] == 0
    assert top_genes(flat, list("abcd"), n=20)[0] == ["a"] and top_genes(flat, list("abcd"), adaptive=False)[0] == ["a", "b"]


def test_top_genes_k_summary():
    out = top_genes_k_summary([0, 1, 2, 3, 4, 5, 6, 7, 8, 20])
    assert out["n_features"] == 10 and out["n_empty"] == 1 and out["mean"] == pytest.approx(5.6)
    assert (out["min"], out["median"], out["max"]) == (0.0, 4.5, 20.0)
    assert out["q25"] == pytest.approx(np.quantile(np.r_[0:9, 20], 0.25))
    with pytest.raises(InputError):
        top_genes_k_summary([])

POSITIVE = {
    "ribosomal": ["RPL13A", "RPS27A", "RPLP0", "RPS4X", "RPL10"],
    "mitochondrial": ["MT-CO1", "MT-ND4", "MT-ATP6"],
    "MHC": ["HLA-DRA", "HLA-A", "HLA-DQB1"],
    "histone": ["HIST1H4C", "H2AFZ", "H3F3A", "H1-2", "H4C3", "H2BC12", "H1FX"],
    "immunoglobulin": ["IGHM", "IGKC", "IGLC2", "IGHV3-23", "IGHG1", "IGHA1", "IGHD", "IGLV1-40", "IGKV4-1"],
    "T-cell receptor": ["TRBC1", "TRAC", "TRAV1-2", "TRDC", "TRGV9", "TRBD1", "TRAJ33"],
    "metallothionein": ["MT2A", "MT1X", "MT1G", "MT3"],
}
NEGATIVE = ["MTOR", "RPE65", "HLAB", "MRPL13", "MRPS12", "RPN1", "H19", "HHEX", "IGF1", "IGFBP7", "IGHMBP2",
            "IGLON5", "TRADD", "TRAF1", "TRDN", "MTHFD2", "CD3E", "ACTB", "mt-Co1", "Rpl13a"]


def test_family_regexes_on_real_symbols():
    genes = [g for gs in POSITIVE.values() for g in gs] + NEGATIVE
    fam = family_membership(genes)
    assert list(fam.columns) == list(DEFAULT_FAMILIES)
    for name, gs in POSITIVE.items():
        for g in gs:
            hits = fam.columns[fam.loc[g].to_numpy()].tolist()
            assert hits == [name], (g, hits)
    for g in NEGATIVE:
        assert not fam.loc[g].any(), (g, fam.columns[fam.loc[g].to_numpy()].tolist())


def test_gene_family_scores_array_and_table():
    genes = ["RPL13A", "RPS3", "MT-CO1", "CD3E", "HLA-DRA"]
    s = np.array([[3, 1, 0, 0, 0], [1, 0, 1, 2, 0], [0, 0, 0, 0, 0], [0, 0, 0, -4, 1]], float)
    out = gene_family_scores(s, genes)
    assert out.loc[0, "frac:ribosomal"] == pytest.approx(1.0) and out.loc[0, "best_family"] == "ribosomal"
    assert out.loc[1, "frac:ribosomal"] == pytest.approx(0.25)
    assert out.loc[1, "frac:mitochondrial"] == pytest.approx(0.25)
    assert out.loc[1, "best_fraction"] == pytest.approx(0.25)
    assert out.loc[2, "best_family"] is None and out.loc[2, "best_fraction"] == 0
    assert out.loc[3, "best_family"] == "MHC" and out.loc[3, "frac:MHC"] == pytest.approx(1.0)  # negative ignored
    custom = gene_family_scores(s, genes, {"T cell": r"^CD3[DEG]$"})
    assert list(custom.columns) == ["frac:T cell", "best_family", "best_fraction"]
    assert custom.loc[1, "frac:T cell"] == pytest.approx(0.5)
    with pytest.raises(InputError, match="invalid regex"):
        gene_family_scores(s, genes, {"bad": "("})
    # from a token table: mass = firing token counts
    X = sp.csr_matrix(np.array([[1.0], [1.0], [1.0], [0.0]]))
    obs = pd.DataFrame({"gene": ["RPL13A", "RPL13A", "CD3E", "MT-CO1"]}, index=list("abcd"))
    t = gene_family_scores(token_gene_scores(ad.AnnData(X=X, obs=obs)))
    assert t.loc[0, "frac:ribosomal"] == pytest.approx(2 / 3) and t.loc[0, "best_family"] == "ribosomal"


def test_density_scores_constructed():
    cells = sp.csr_matrix(np.array([[1, 0, 0], [2, 0, -1], [0, 0, 3], [1, 0, 0]], float))
    tokens = sp.csr_matrix(np.array([[1, 0, 0]] * 2 + [[0, 0, 1]] * 6 + [[0, 0, 0]] * 2, float))
    d = density_scores(cells, tokens)
    assert d["cell_fraction"].tolist() == [0.75, 0.0, 0.25]
    assert d["token_fraction"].tolist() == [0.2, 0.0, 0.6]
    assert d.loc[0, "log10_cell_density"] == pytest.approx(np.log10(0.75))
    assert d.loc[1, "log10_token_density"] == -np.inf
    assert list(density_scores(cells).columns) == ["cell_fraction", "log10_cell_density"]
    with pytest.raises(InputError):
        density_scores(cells, tokens[:, :2])


def test_expression_where_firing_brute_force():
    rng = np.random.default_rng(3)
    X = _sparse(rng, (50, 5), 0.3)
    X = sp.lil_matrix(X)
    X[:, 2] = 1.0  # fires everywhere: "not" group empty
    X = sp.csr_matrix(X)
    E = sp.random(50, 30, density=0.2, format="csr", random_state=rng) * 100 + 0.0
    out = expression_where_firing(X, E)
    t = np.asarray(E.sum(axis=1)).ravel()
    Xd = X.toarray()
    for f in range(5):
        fire = Xd[:, f] > 0
        assert out.loc[f, "n_firing"] == fire.sum()
        assert out.loc[f, "mean_firing"] == pytest.approx(t[fire].mean())
        assert out.loc[f, "std_firing"] == pytest.approx(t[fire].std(), abs=1e-9)
        if (~fire).any():
            assert out.loc[f, "mean_not"] == pytest.approx(t[~fire].mean())
            assert out.loc[f, "std_not"] == pytest.approx(t[~fire].std(), abs=1e-9)
        else:
            assert np.isnan(out.loc[f, "mean_not"]) and np.isnan(out.loc[f, "std_not"])
    # a vector of library sizes gives the same table
    pd.testing.assert_frame_equal(out, expression_where_firing(X, t))


def test_correlation_of_no_cells_is_all_nan_and_lists_are_matrices():
    r = cell_gene_correlation(np.zeros((0, 4)), np.zeros((0, 3)))
    assert r.shape == (4, 3) and np.isnan(r).all()  # every feature constant over no cells
    got = cell_gene_correlation([[1.0, 2.0], [3.0, 1.0], [0.0, 5.0]], [[1.0], [2.0], [3.0]]).ravel()
    want = [pearsonr([1, 3, 0], [1, 2, 3])[0], pearsonr([2, 1, 5], [1, 2, 3])[0]]
    np.testing.assert_allclose(got, want, atol=1e-12)
