"""The analyze_features stage end to end on the demo model: every analysis, figures, summary, errors.

Statistics themselves are checked against sklearn/scipy/statsmodels in test_analysis.py,
test_enrichment.py, test_gene_scoring.py and test_coactivation.py; here the stage's wiring is
checked against independent recomputations from the run's files.
"""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
from scipy.stats import fisher_exact
from statsmodels.stats.multitest import multipletests

import sae4scfm
from sae4scfm.analysis.analyze import ANALYSES, load_run_data
from sae4scfm.analysis.enrichment import load_gene_sets
from sae4scfm.analysis.report import cell_type_summary
from sae4scfm.analysis.results import read_results
from sae4scfm.errors import InputError

ALL_BUT_CROSS = [f"analysis.run_{name}=true" for name in ANALYSES if name != "cross_layer"]


def _address(runs_dir, run_dir):
    return [f"runs_dir={runs_dir}", f"sae_checkpoint.experiment={run_dir.parent.name}",
            f"sae_checkpoint.timestamp={run_dir.name}"]


@pytest.fixture(scope="module")
def analysed(small_run, runs_dir):
    """The small run with every analysis but cross-layer done (GO/KEGG included)."""
    _, run_dir = small_run
    cfg = sae4scfm.compose("analyze", [*_address(runs_dir, run_dir), *ALL_BUT_CROSS, "analysis.run_gsea=true",
                                       "analysis.gsea_permutations=200"])
    table = sae4scfm.analyze_features(cfg)
    return cfg, run_dir, table


def test_every_analysis_writes_its_columns_files_and_figures(analysed):
    cfg, run_dir, table = analysed
    out = run_dir / "analysis"
    assert set(ANALYSES) - {"cross_layer"} <= set(table.columns.get_level_values(0))
    assert table.index.name == "feature_id" and len(table) == 512
    for name in ("enrichment.csv", "gsea.csv", "pca_comparison.csv", "coactivation_pairs.csv", "modules.csv",
                 "gene_scores.parquet", "summary.md"):
        assert (out / name).is_file(), name
    for png in ("label_auroc.png", "density.png", "sae_vs_pca.png"):
        assert (out / "figures" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    gs = table["gene_scoring"]
    n_top = gs["n_top_genes"].astype(int)
    assert ((n_top >= 0) & (n_top <= 20)).all() and (n_top > 0).mean() > 0.9
    fixed = gs["top_genes_fixed"].fillna("").str.split(";")
    adaptive = gs["top_genes"].fillna("").str.split(";")
    # the adaptive list is a prefix of the fixed top-20
    assert all(f[: len(a)] == a for a, f in zip(adaptive, fixed) if a != [""])
    dens = table["density"]
    X = load_run_data(cfg).features.X
    np.testing.assert_allclose(dens["cell_fraction"].astype(float), np.asarray((X > 0).mean(0)).ravel())
    assert (table["pca_comparison"]["max_svd_cos"].astype(float).between(0, 1 + 1e-6)).all()
    summary = (out / "summary.md").read_text()
    for section in ("## Cell types", "## Gene sets: markers", "## SAE vs PCA", "## Density", "## Co-activation modules"):
        assert section in summary


def test_marker_enrichment_matches_scipy_and_statsmodels(analysed):
    """Recompute the markers Fisher tests of the stage from its own top genes and universe."""
    cfg, run_dir, table = analysed
    run = load_run_data(cfg)
    universe = set(run.universe())
    sets = {name: [g for g in genes if g in universe] for name, genes in load_gene_sets("markers").items()}
    sets = {k: v for k, v in sets.items() if len(v) >= cfg.analysis.min_set_size}
    top = table["gene_scoring"]["top_genes"].fillna("")
    N = len(universe)
    p = {}
    for f, genes in top.items():
        genes = [g for g in genes.split(";") if g]
        for name, members in sets.items():
            k = len(set(genes) & set(members))
            p[(f, name)] = fisher_exact([[k, len(genes) - k], [len(members) - k, N - len(genes) - len(members) + k]],
                                        alternative="greater")[1]
    keys = list(p)
    fdr = dict(zip(keys, multipletests([p[k] for k in keys], method="fdr_bh")[1]))
    sig = pd.read_csv(run_dir / "analysis" / "enrichment.csv")
    sig = sig[sig["collection"] == "markers"]
    expected = {k for k, v in fdr.items() if v < 0.05}
    assert {(int(f), s) for f, s in zip(sig["feature_id"], sig["gene_set"])} == expected
    for row in sig.head(50).itertuples():
        assert row.p_value == pytest.approx(p[(row.feature_id, row.gene_set)], rel=1e-6)
        assert row.fdr == pytest.approx(fdr[(row.feature_id, row.gene_set)], rel=1e-6)


def test_summary_names_marker_enriched_cell_type_features(analysed):
    """The summary's cell-type table: per cell type with a marker set, a feature chosen on train cells; those
    with eval AUROC >= 0.9 and top genes enriched (FDR < 0.05) for the type's marker set are counted, and
    the summary says how many."""
    cfg, run_dir, table = analysed
    cells = cell_type_summary(load_run_data(cfg), read_results(run_dir / "analysis"), cfg.analysis)
    with_markers = cells[cells["marker_set"] != ""]
    # CD4 T (3 bulk labels), CD8 T (2), CD14 Monocyte, B, Dendritic (cDC); NK has fewer than
    # analysis.min_cells (5) of the 100 eval cells, so it is not reported
    assert len(with_markers) == 5
    assert cells.set_index("cell_type").loc["CD4 T", "n_cells"] == (
        load_run_data(cfg).features.obs["bulk_labels"]).isin(
        ["CD4+/CD25 T Reg", "CD4+/CD45RO+ Memory", "CD4+/CD45RA+/CD25- Naive T"]).sum()
    ok = with_markers[with_markers["interpreted"]]
    # held out (100 eval cells, layer 2 of the shipped demo): Dendritic (cDC) passes both bars; B, CD8 T and
    # CD14 monocytes have marker-enriched features below AUROC 0.9 on the eval cells
    assert len(ok) >= 1, with_markers[["cell_type", "feature", "eval_auroc", "marker_set", "marker_fdr"]]
    assert (ok["eval_auroc"] >= 0.9).all() and (ok["marker_fdr"] < 0.05).all()
    summary = (run_dir / "analysis" / "summary.md").read_text()
    assert f"{len(ok)} of {len(with_markers)} cell types with a marker set" in summary


def test_rerun_of_one_analysis_keeps_the_others(analysed, runs_dir):
    cfg, run_dir, table = analysed
    before = read_results(run_dir / "analysis")
    again = sae4scfm.analyze_features(sae4scfm.compose("analyze", [
        *_address(runs_dir, run_dir), "analysis.run_label_scoring=false", "analysis.run_density=true"]))
    pd.testing.assert_frame_equal(again.drop(columns="density", level=0), before.drop(columns="density", level=0))


def _planted_partner(run_dir, runs, layer: int, seed: int = 0):
    """A second run "at layer ``layer``" on the same tokens: its SAE's first half of the features are
    planted copies of well-separated real features of ``run_dir`` (permuted, half sign-flipped,
    perturbed by 1% noise; token activations = the real feature's), the other half unrelated
    (random decoder directions; sparse random firing). Returns (run dir, {B feature: A feature})."""
    import json

    import anndata as ad
    import torch
    from safetensors.torch import load_file, save_file

    rng = np.random.default_rng(seed)
    dst = runs / "planted" / run_dir.name
    shutil.copytree(run_dir, dst)
    shutil.rmtree(dst / "analysis")
    cfg = json.loads((dst / "cfg.json").read_text())
    cfg["layer"] = layer
    (dst / "cfg.json").write_text(json.dumps(cfg))
    state = load_file(dst / "sae.safetensors")
    W = state["W_dec"].double()
    n, d = W.shape
    unit = torch.nn.functional.normalize(W, dim=1)
    cos = (unit @ unit.T).abs().fill_diagonal_(0).max(1).values.numpy()
    tokens = ad.read_h5ad(dst / "features" / "token_features.h5ad")
    fires = np.asarray((tokens.X > 0).sum(0)).ravel()
    candidates = np.flatnonzero((cos < 0.9) & (fires >= 5))
    planted_a = rng.choice(candidates, min(len(candidates), n // 2), replace=False)
    slots = rng.permutation(n)
    planted = dict(zip(slots[: len(planted_a)].tolist(), planted_a.tolist()))  # B feature -> A feature
    unrelated = slots[len(planted_a):]
    W_b = torch.randn(n, d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * W.norm(dim=1).mean()
    X_a = tokens.X.tocsc()
    cols = [None] * n
    for b_, a_ in planted.items():
        sign = -1.0 if b_ % 2 else 1.0
        W_b[b_] = sign * W[a_] + 0.01 * W[a_].norm() * torch.randn(d, dtype=torch.float64) / d**0.5
        cols[b_] = X_a[:, a_]
    import scipy.sparse as sp

    for b_ in unrelated:
        cols[b_] = sp.random(tokens.n_obs, 1, density=0.002, format="csc", random_state=int(b_), dtype=np.float32)
    tokens.X = sp.hstack(cols, format="csr", dtype=np.float32)
    tokens.write_h5ad(dst / "features" / "token_features.h5ad")
    state["W_dec"] = W_b.float()
    save_file(state, dst / "sae.safetensors")
    return dst, planted, unrelated


def test_cross_layer_finds_a_planted_correspondence(analysed, tmp_path):
    """Two runs on different layers (layer 2, a planted "layer 3"): every planted feature is matched
    to its source feature by decoder (|cos| > 0.99, sign-flipped or not) and by co-firing (Jaccard 1);
    the unrelated features score low on both, and persistence is exactly the planted fraction."""
    _, run_dir, _ = analysed
    runs, a_dir = _copy_run(run_dir, tmp_path)
    b_dir, planted, unrelated = _planted_partner(a_dir, runs, layer=3)
    table = sae4scfm.analyze_features(sae4scfm.compose("analyze", [
        *_address(runs, b_dir), "analysis.run_label_scoring=false", "analysis.run_cross_layer=true",
        f"analysis.cross_layer_runs=[{a_dir.parent.name}/{a_dir.name}]"]))
    cl = table["cross_layer"]
    b_planted = sorted(planted)
    assert len(b_planted) > 100
    assert cl.loc[b_planted, "decoder_match@2"].astype(int).tolist() == [planted[b] for b in b_planted]
    assert (cl.loc[b_planted, "decoder_cos@2"].astype(float) > 0.99).all()
    assert cl.loc[b_planted, "cofiring_match@2"].astype(int).tolist() == [planted[b] for b in b_planted]
    assert (cl.loc[b_planted, "jaccard@2"].astype(float) == 1.0).all()
    assert (cl.loc[unrelated, "decoder_cos@2"].astype(float) < 0.5).all()
    assert (cl.loc[unrelated, "jaccard@2"].fillna(0).astype(float) < 0.3).all()
    row = pd.read_csv(b_dir / "analysis" / "cross_layer.csv").iloc[0]
    assert (row["layer_a"], row["layer_b"]) == (3, 2)
    assert row["decoder_persistence"] == pytest.approx(len(planted) / len(cl))
    assert row["cofiring_persistence"] == pytest.approx(len(planted) / len(cl))


def _copy_run(run_dir, tmp_path):
    dst = tmp_path / "runs" / "copy" / run_dir.name
    shutil.copytree(run_dir, dst)
    return tmp_path / "runs", dst


def test_bad_label_columns(analysed, tmp_path):
    _, run_dir, _ = analysed
    runs, dst = _copy_run(run_dir, tmp_path)
    with pytest.raises(InputError, match="'donor' not found in obs"):
        sae4scfm.analyze_features(sae4scfm.compose("analyze", [*_address(runs, dst), "analysis.label_keys=[donor]"]))
    import anndata as ad

    f = ad.read_h5ad(dst / "features" / "features.h5ad")
    f.obs["empty"] = np.nan
    f.write_h5ad(dst / "features" / "features.h5ad")
    with pytest.raises(InputError, match="'empty' in obs is entirely missing"):
        sae4scfm.analyze_features(sae4scfm.compose("analyze", [*_address(runs, dst), "analysis.label_keys=[empty]"]))


def test_gmt_without_model_genes(analysed, tmp_path):
    _, run_dir, _ = analysed
    runs, dst = _copy_run(run_dir, tmp_path)
    gmt = tmp_path / "mouse.gmt"
    gmt.write_text("Mouse_B\tdesc\tCd79a\tMs4a1\tCd19\nMouse_T\tdesc\tCd3e\tCd4\tCd8a\n")
    with pytest.raises(InputError, match="mouse.gmt"):
        sae4scfm.analyze_features(sae4scfm.compose("analyze", [
            *_address(runs, dst), "analysis.run_label_scoring=false", "analysis.run_gene_scoring=true",
            "analysis.run_enrichment=true", f"analysis.gene_sets=[{gmt}]"]))


def test_features_file_of_another_run(analysed, tmp_path):
    _, run_dir, _ = analysed
    runs, dst = _copy_run(run_dir, tmp_path)
    import anndata as ad

    f = ad.read_h5ad(dst / "features" / "features.h5ad")
    f[:, :100].copy().write_h5ad(dst / "features" / "features.h5ad")
    with pytest.raises(InputError, match="has 100 features but the run's SAE has d_sae=512"):
        sae4scfm.analyze_features(sae4scfm.compose("analyze", _address(runs, dst)))
    f[::-1].copy().write_h5ad(dst / "features" / "features.h5ad")
    with pytest.raises(InputError, match="does not hold the cells of the run's dataset"):
        sae4scfm.analyze_features(sae4scfm.compose("analyze", [*_address(runs, dst), "analysis.run_density=true"]))


def test_token_pooling_scores_tokens_labelled_by_their_cell(analysed, tmp_path):
    """analysis.pooling=token: AUROC over tokens, each labelled with its cell's label (sklearn)."""
    from sklearn.metrics import roc_auc_score

    cfg, run_dir, _ = analysed
    runs, dst = _copy_run(run_dir, tmp_path)
    table = sae4scfm.analyze_features(sae4scfm.compose("analyze", [*_address(runs, dst), "analysis.pooling=token",
                                                                   "analysis.label_metrics=[auroc]"]))
    run = load_run_data(cfg)
    labels = run.features.obs["bulk_labels"].to_numpy()[run.tokens.obs["cell_index"].to_numpy()]
    X = run.tokens.X[:].tocsc()  # token_features.h5ad is opened backed (streamed in row blocks)
    for value in ("CD56+ NK", "CD19+ B"):
        col = table["label_scoring"][f"auroc:bulk_labels={value}"].astype(float)
        for f in (0, int(col.idxmax())):
            assert col[f] == pytest.approx(roc_auc_score(labels == value, X[:, f].toarray().ravel()), abs=1e-12)


@pytest.mark.slow
def test_default_run_at_the_last_layer_interprets_most_cell_types(tmp_path):
    """The main job's defaults on the built-in data (all 700 PBMC cells, TopK k=16, 4x dictionary), SAE on
    the shipped demo's last layer, features chosen on the 560 train cells, AUROC on the 140 eval cells:
    2 of the 6 cell types with a marker set pass both bars (CD14 monocytes, CD8 T). The demo that saw
    only these 700 cells passed 5 of 6 with selection and report on the same cells; the issue's bars
    on real labels are measured by benchmarks/biology.py (data=kang)."""
    runs = tmp_path / "runs"
    run_dir = sae4scfm.train(sae4scfm.compose("train", [
        f"runs_dir={runs}", "experiment=default", "sae.target_layer=4", "wandb.mode=disabled"]))
    address = _address(runs, run_dir)
    sae4scfm.generate_features(sae4scfm.compose("features", address))
    cfg = sae4scfm.compose("analyze", [*address, "analysis.run_gene_scoring=true", "analysis.run_enrichment=true",
                                       "analysis.gene_sets=[markers]"])
    table = sae4scfm.analyze_features(cfg)
    cells = cell_type_summary(load_run_data(cfg), table, cfg.analysis)
    with_markers = cells[cells["marker_set"] != ""]
    ok = with_markers[with_markers["interpreted"]]
    assert len(ok) >= 2, with_markers[["cell_type", "feature", "eval_auroc", "marker_fdr"]]
    assert (ok["eval_auroc"] >= 0.9).all() and (ok["marker_fdr"] < 0.05).all()


# The README walk-through's step 3, verbatim (after its steps 1-2, which are conftest.SMALL_RUN).
WALKTHROUGH_ANALYZE = ["analysis.run_gene_scoring=true", "analysis.run_enrichment=true", "analysis.run_density=true",
                       "analysis.run_pca_comparison=true"]


def test_walkthrough_commands_write_the_summary_and_three_figures(analysed, tmp_path):
    """What the README promises for its walk-through: step 3 writes results (wide and long), the
    features' var annotations, summary.md with its cell-type, gene-set, SAE-vs-PCA and density
    sections, and the three figures; the default alone (label scoring) writes one figure."""
    import time

    import anndata as ad

    _, run_dir, _ = analysed
    runs, dst = _copy_run(run_dir, tmp_path)
    shutil.rmtree(dst / "analysis")
    start = time.perf_counter()
    sae4scfm.analyze_features(sae4scfm.compose("analyze", [*_address(runs, dst), *WALKTHROUGH_ANALYZE]))
    print(f"walk-through step 3: {time.perf_counter() - start:.0f} s")
    out = dst / "analysis"
    assert sorted(p.name for p in (out / "figures").iterdir()) == ["density.png", "label_auroc.png", "sae_vs_pca.png"]
    for name in ("results.csv", "results.parquet", "results_long.csv", "results_long.parquet", "summary.md",
                 "enrichment.csv", "pca_comparison.csv", "gene_scores.parquet"):
        assert (out / name).is_file(), name
    summary = (out / "summary.md").read_text()
    for section in ("## Cell types", "## Gene sets: markers", "## Gene sets: go_bp", "## SAE vs PCA", "## Density",
                    "## Figures"):
        assert section in summary, section
    var = ad.read_h5ad(dst / "features" / "features.h5ad").var
    assert {"label_scoring:best:bulk_labels", "gene_scoring:top_genes", "density:cell_fraction"} <= set(var.columns)

    runs2, only_default = _copy_run(run_dir, tmp_path / "default")
    shutil.rmtree(only_default / "analysis")
    sae4scfm.analyze_features(sae4scfm.compose("analyze", _address(runs2, only_default)))
    assert [p.name for p in (only_default / "analysis" / "figures").iterdir()] == ["label_auroc.png"]
    assert "## Cell types" not in (only_default / "analysis" / "summary.md").read_text()
