"""Gene-set enrichment: GMT reading, built-in collections, Fisher/hypergeometric test, prerank GSEA."""

from __future__ import annotations

import socket

import numpy as np
import pandas as pd
import pytest
from scipy.stats import fisher_exact, hypergeom
from statsmodels.stats.multitest import multipletests

from sae4scfm.analysis.enrichment import (
    FISHER_COLUMNS,
    GeneSets,
    fisher_enrichment,
    load_gene_sets,
    prerank_gsea,
    read_gmt,
)
from sae4scfm.analysis.primitives import bh_fdr
from sae4scfm.errors import InputError


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def _random_case(seed=0, n_genes=300, n_sets=25, n_feat=12):
    rng = np.random.default_rng(seed)
    universe = [f"G{i}" for i in range(n_genes)]
    outside = [f"X{i}" for i in range(200)]  # in the GMT, not in the model's universe
    sets = {}
    for j in range(n_sets):
        size = int(rng.integers(3, 40))
        sets[f"S{j}"] = list(rng.choice(universe, size, replace=False)) + list(rng.choice(outside, 5, replace=False))
    top = {}
    for f in range(n_feat):
        genes = list(rng.choice(universe, int(rng.integers(5, 30)), replace=False))
        if f % 3 == 0:  # plant some real enrichment
            genes[:6] = sets[f"S{f % n_sets}"][:6]
        top[f] = list(dict.fromkeys(genes + ["X0"]))  # an out-of-universe top gene is ignored
    return universe, sets, top


# --------------------------------------------------------------------------- GMT reading


def test_read_gmt_parses_descriptions_weights_blank_lines_and_duplicates(tmp_path):
    gmt = _write(tmp_path / "sets.gmt",
                 "SET_A\thttp://x\tCD3E\tCD4\t\tCD4\r\n"
                 "\n"
                 "SET B\t\tMS4A1,1.0\tCD79A,0.5\t\n"
                 "SET_A\tagain\tIL7R\n")
    sets = read_gmt(gmt)
    assert isinstance(sets, GeneSets) and sets.source == str(gmt)
    assert sets == {"SET_A": ["CD3E", "CD4", "IL7R"], "SET B": ["MS4A1", "CD79A"]}


def test_read_gmt_errors_name_file_and_line(tmp_path):
    with pytest.raises(InputError, match=r"does not exist.*GMT.*markers"):
        read_gmt(tmp_path / "missing.gmt")
    with pytest.raises(InputError, match=r"empty\.gmt is empty"):
        read_gmt(_write(tmp_path / "empty.gmt", "\n  \n"))
    bad = _write(tmp_path / "bad.gmt", "OK\tdesc\tA\tB\n\nSPACES desc A B C\n")
    with pytest.raises(InputError, match=r"bad\.gmt, line 3: malformed.*no genes.*tabs") as e:
        read_gmt(bad)
    assert "SPACES desc A B C" in str(e.value)
    with pytest.raises(InputError, match=r"line 1: malformed.*no set name"):
        read_gmt(_write(tmp_path / "noname.gmt", "\tdesc\tA\n"))


# --------------------------------------------------------------------------- built-in collections


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*a, **k):
        raise OSError("network disabled in this test")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_builtin_collections_load_offline(no_network):
    kegg = load_gene_sets("KEGG_2021_Human")
    assert len(kegg) > 300 and "blitzgsea" in kegg.source
    assert {"HK1", "PKM", "GAPDHS", "LDHA"} <= set(kegg["Glycolysis / Gluconeogenesis"])
    assert {"CD4", "CD8A", "ZAP70"} <= set(kegg["T cell receptor signaling pathway"])
    assert load_gene_sets("kegg") == kegg
    go = load_gene_sets("go_bp")
    assert len(go) > 5000
    assert {"CD3E", "CD3G", "CD28", "LCP2"} <= set(go["T Cell Receptor Signaling Pathway (GO:0050852)"])
    markers = load_gene_sets("markers")
    assert "MS4A1" in markers["B"] and "CD3E" in markers["CD4 T"] and not any(k.startswith("_") for k in markers)


def test_load_gene_sets_gmt_path_and_unknown_name(tmp_path):
    gmt = _write(tmp_path / "mine.gmt", "S\t\tA\tB\n")
    assert load_gene_sets(str(gmt)) == {"S": ["A", "B"]}
    with pytest.raises(InputError, match=r"unknown gene-set collection 'reactome'.*KEGG_2021_Human.*GMT"):
        load_gene_sets("reactome")


# --------------------------------------------------------------------------- Fisher / hypergeometric


def test_fisher_pvalues_and_counts_match_scipy_per_cell():
    universe, sets, top = _random_case()
    res = fisher_enrichment(top, sets, universe, min_size=5, min_overlap=0)
    assert list(res.columns) == FISHER_COLUMNS
    U = set(universe)
    kept_sets = [s for s, g in sets.items() if len(set(g) & U) >= 5]
    assert len(res) == len(top) * len(kept_sets)  # every pair, zeros included
    assert set(res["gene_set"]) == set(kept_sets)
    N = len(universe)
    for row in res.itertuples():
        t = [g for g in top[row.feature_id] if g in U]
        s = set(sets[row.gene_set]) & U
        k = len(set(t) & s)
        assert (row.overlap, row.set_size, row.n_top) == (k, len(s), len(t))
        assert row.overlap_genes.split(";") == ([g for g in t if g in s] if k else [""])
        table = [[k, len(t) - k], [len(s) - k, N - len(t) - len(s) + k]]
        ref = fisher_exact(table, alternative="greater")
        assert row.p_value == pytest.approx(ref.pvalue, rel=1e-9, abs=1e-300)
        assert row.p_value == pytest.approx(hypergeom.sf(k - 1, N, len(s), len(t)), rel=1e-12, abs=1e-300)
        if np.isfinite(ref.statistic):
            assert row.odds_ratio == pytest.approx(ref.statistic, rel=1e-12)
        else:
            assert np.isnan(ref.statistic) == np.isnan(row.odds_ratio)
    assert res["p_value"].is_monotonic_increasing
    assert res["p_value"].min() < 1e-4  # the planted features are found


def test_fdr_is_benjamini_hochberg_over_all_tests():
    universe, sets, top = _random_case(seed=1)
    full = fisher_enrichment(top, sets, universe, min_overlap=0)
    ref = multipletests(full["p_value"].to_numpy(), method="fdr_bh")[1]
    np.testing.assert_allclose(full["fdr"].to_numpy(), ref, rtol=1e-12)
    # the default drops overlap-0 rows from the output, but its FDR still counts those tests
    part = fisher_enrichment(top, sets, universe)
    assert (part["overlap"] >= 1).all() and len(part) < len(full)
    key = ["feature_id", "gene_set"]
    merged = part.merge(full, on=key, suffixes=("", "_full"))
    assert len(merged) == len(part)
    np.testing.assert_allclose(merged["fdr"], merged["fdr_full"], rtol=1e-12)
    sig = fisher_enrichment(top, sets, universe, max_fdr=0.05)
    assert len(sig) and (sig["fdr"] <= 0.05).all()
    assert set(map(tuple, sig[key].values)) == set(map(tuple, full.loc[full["fdr"] <= 0.05, key].values))
    p = np.random.default_rng(0).uniform(size=50) ** 3
    np.testing.assert_allclose(bh_fdr(p, n_tests=80), multipletests(np.r_[p, np.ones(30)], method="fdr_bh")[1][:50])


def test_model_universe_background_differs_from_naive_background():
    # The model saw 100 (immune) genes; a set has 40 of them plus 400 genes the model never saw.
    # 4 of a feature's 10 top genes are in the set: expected under the model's background
    # (10 * 40/100 = 4), but looks highly enriched against the genome or the GMT's genes.
    universe = [f"U{i}" for i in range(100)]
    sets = {"immune": universe[:40] + [f"X{i}" for i in range(400)],
            "other": universe[60:90] + [f"X{i}" for i in range(400, 10000)]}  # GMTs span ~10k+ genes
    top = {0: universe[:4] + universe[40:46]}
    model = fisher_enrichment(top, sets, universe, min_overlap=0).set_index("gene_set")
    genome = universe + [f"X{i}" for i in range(20000)]
    naive = fisher_enrichment(top, sets, genome, min_overlap=0).set_index("gene_set")
    gmt_union = list(dict.fromkeys(g for s in sets.values() for g in s))
    naive_gmt = fisher_enrichment(top, sets, gmt_union, min_overlap=0).set_index("gene_set")
    assert model.loc["immune", "set_size"] == 40 and naive.loc["immune", "set_size"] == 440
    assert model.loc["immune", "p_value"] > 0.3
    assert naive.loc["immune", "p_value"] < 1e-3
    assert naive_gmt.loc["immune", "p_value"] < 1e-3
    assert model.loc["immune", "fdr"] > 0.3 and naive.loc["immune", "fdr"] < 1e-3


def test_min_size_filter_and_empty_results():
    universe = [f"G{i}" for i in range(50)]
    sets = {"big": universe[:10], "small_in_universe": universe[10:13] + ["X1", "X2", "X3"]}
    res = fisher_enrichment({7: universe[:5]}, sets, universe, min_size=5)
    assert list(res["gene_set"]) == ["big"] and res.loc[0, "feature_id"] == 7
    assert res.loc[0, "overlap_genes"] == "G0;G1;G2;G3;G4"
    empty = fisher_enrichment({7: universe[:5]}, sets, universe, min_size=20)
    assert list(empty.columns) == FISHER_COLUMNS and empty.empty
    # features without any top gene (e.g. no positive gene score) are no namespace error: nothing is enriched
    none = fisher_enrichment({0: [], 1: []}, sets, universe, min_size=5)
    assert list(none.columns) == FISHER_COLUMNS and none.empty


def test_no_overlap_with_universe_names_file_and_both_namespaces(tmp_path):
    gmt = _write(tmp_path / "symbols.gmt", "TCR\t\tCD3E\tCD3D\tCD4\tCD8A\tLCK\n")
    ensembl = ["ENSG00000198851", "ENSG00000167286", "ENSG00000010610", "ENSG00000153563"]
    with pytest.raises(InputError) as e:
        fisher_enrichment({0: ensembl[:2]}, read_gmt(gmt), ensembl)
    msg = str(e.value)
    assert "symbols.gmt" in msg and "CD3E" in msg and "ENSG00000198851" in msg and "Ensembl" in msg
    with pytest.raises(InputError, match=r"ignoring case"):
        fisher_enrichment({0: ["Cd3e"]}, {"TCR": ["CD3E", "CD4"]}, ["Cd3e", "Cd4", "Lck"], min_size=1)
    with pytest.raises(InputError, match=r"top genes is in the gene universe"):
        fisher_enrichment({0: ["ENSG1"]}, {"TCR": ["CD3E", "CD4"]}, ["CD3E", "CD4"], min_size=1)


# --------------------------------------------------------------------------- prerank GSEA


def test_prerank_gsea_ranks_planted_set_first():
    rng = np.random.default_rng(0)
    genes = [f"G{i}" for i in range(2000)]
    sets = {f"S{j}": list(rng.choice(genes, 30, replace=False)) for j in range(40)}
    scores = pd.Series(rng.normal(size=len(genes)), index=genes)
    scores[sets["S7"]] += 2.0
    res = prerank_gsea(scores, sets)
    assert list(res.columns) == ["gene_set", "es", "nes", "p_value", "fdr", "set_size", "leading_edge"]
    assert res.loc[0, "gene_set"] == "S7"
    assert res.loc[0, "nes"] > 3 and res.loc[0, "fdr"] < 1e-3
    assert (res.loc[1:, "fdr"] > 0.05).all()
    assert set(res.loc[0, "leading_edge"].split(";")) <= set(sets["S7"])
    with pytest.raises(InputError, match=r"none of the .* genes"):
        prerank_gsea(scores, {"A": ["CD3E", "CD4", "CD8A", "LCK", "ZAP70"]})
