"""data=pbmc_batches (two real PBMC experiments) and the scib-metrics integration benchmark."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp
from omegaconf import OmegaConf
from sklearn.decomposition import TruncatedSVD
from sklearn.metrics import silhouette_score

import sae4scfm
from sae4scfm.analysis.labels import label_scoring
from sae4scfm.data import PBMC_BATCHES, load_dataset, load_pbmc, load_pbmc_batches, sample_balanced
from sae4scfm.data.markers import UNASSIGNED, load_marker_sets
from sae4scfm.errors import InputError

REPO = Path(__file__).resolve().parents[1]
needs_desc = pytest.mark.skipif(importlib.util.find_spec("desc") is None,
                                reason="pbmc_batches needs desc: pip install --no-deps desc==2.1.1")
needs_scib = pytest.mark.skipif(importlib.util.find_spec("scib_metrics") is None,
                                reason='needs scib-metrics: pip install "sae4scfm[integration]"')

# A tiny run on both batches (100 cells each). kBET is left out of the benchmark here only because
# its diffusion-map kNN (pynndescent) spends ~1 min on numba compilation; every other default metric runs.
TINY_RUN = [
    "scfm=demo", "data=pbmc_batches", "data.n_cells=200", "sae=topk", "sae.target_layer=2",
    "sae.dictionary_multiplier=2", "sae.hyperparams.k=8", "sae.hyperparams.lr=1e-3", "seed=0",
    "train.n_epochs=1", "train.eval_max_cells=20", "wandb.mode=disabled", "device=cpu",
]
# a lower AUROC threshold than the default 0.7, so that this tiny SAE has a dozen batch features to remove
BENCH = ["integration.batch_correction.kbet_per_label=false", "integration.batch_auroc_threshold=0.6"]
BIO = ["Isolated labels", "KMeans NMI", "KMeans ARI", "Silhouette label", "cLISI"]
BATCH = ["BRAS", "iLISI", "Graph connectivity", "PCR comparison"]


# --------------------------------------------------------------------------- dataset


@pytest.fixture(scope="module")
def batches():
    return load_pbmc_batches()


@needs_desc
def test_two_batches_shared_genes_counts(batches):
    from sae4scfm.data.pbmc3k import load_pbmc3k

    pbmc68k, pbmc3k = load_pbmc(), load_pbmc3k()
    shared = [g for g in pbmc68k.var_names if g in set(pbmc3k.var_names)]
    assert list(batches.var_names) == shared and len(shared) == 765
    assert batches.obs["batch"].value_counts().to_dict() == {PBMC_BATCHES[0]: 700, PBMC_BATCHES[1]: 2700}
    assert list(batches.obs["batch"].cat.categories) == list(PBMC_BATCHES)
    assert batches.obs_names.is_unique
    X = batches.X
    assert sp.isspmatrix_csr(X) and X.dtype == np.float32 and np.array_equal(X.data, np.round(X.data))
    # the counts are the sources' own, cell for cell, on the shared genes
    in68k = (batches.obs["batch"] == PBMC_BATCHES[0]).to_numpy()
    np.testing.assert_array_equal(X[in68k].toarray(), pbmc68k.X.toarray())
    np.testing.assert_array_equal(X[~in68k].toarray(), pbmc3k[:, shared].X.toarray())
    assert np.array_equal(batches.obs_names[in68k].str.replace(f"-{PBMC_BATCHES[0]}", ""), pbmc68k.obs_names)
    assert batches.var.loc["CD3E", "ensembl_id"] == pbmc3k.var.loc["CD3E", "ensembl_id"]
    np.testing.assert_allclose(batches.obs["n_counts"], np.asarray(X.sum(1)).ravel())


@needs_desc
def test_one_label_column_from_the_same_marker_sets(batches):
    labels = batches.obs["cell_type"]
    meta = batches.uns["cell_type"]
    assert meta["derived"] is True and "not ground truth" in meta["note"]
    sets = load_marker_sets()
    # one annotation for both batches: the same sets, with the same genes (all among the shared genes)
    assert set(meta["markers_used"]) <= set(sets) and len(meta["markers_used"]) >= 8
    for name, genes in meta["markers_used"].items():
        assert set(genes) <= set(sets[name]) and set(genes) <= set(batches.var_names)
    assert set(labels.cat.categories) == {*meta["markers_used"], UNASSIGNED}
    assert list(batches.obsm["cell_type_scores"].columns) == list(meta["markers_used"])
    # the labels mean the same thing in both batches: marker expression of labelled cells
    logn = sc.pp.log1p(sc.pp.normalize_total(ad.AnnData(batches.X.copy()), target_sum=1e4, copy=True), copy=True).X
    for batch in PBMC_BATCHES:
        in_batch = (batches.obs["batch"] == batch).to_numpy()
        counts = labels[in_batch].value_counts()
        assert (counts >= 30).sum() >= 4, (batch, counts.to_dict())
        assert counts.get(UNASSIGNED, 0) < 0.05 * in_batch.sum()
        for cell_type, gene in (("B", "MS4A1"), ("NK", "GNLY"), ("CD8 T", "CD8A"), ("CD4 T", "IL7R")):
            col = np.asarray(logn[:, batches.var_names.get_loc(gene)].todense()).ravel()
            is_type = in_batch & (labels == cell_type).to_numpy()
            assert col[is_type].mean() > 2 * col[in_batch & ~is_type].mean(), (batch, cell_type, gene)


def test_sample_balanced():
    groups = np.array(["b"] * 2700 + ["a"] * 700)
    rows = sample_balanced(groups, 1200, seed=0)
    assert len(np.unique(rows)) == 1200 and np.all(np.diff(rows) > 0)
    assert pd.Series(groups[rows]).value_counts().to_dict() == {"a": 600, "b": 600}
    rows = sample_balanced(groups, 1601, seed=0)  # the small group is taken whole, the rest from the other
    assert pd.Series(groups[rows]).value_counts().to_dict() == {"a": 700, "b": 901}
    np.testing.assert_array_equal(sample_balanced(groups, 1601, seed=0), rows)
    assert not np.array_equal(sample_balanced(groups, 1601, seed=1), rows)
    np.testing.assert_array_equal(sample_balanced(groups, None, seed=0), np.arange(3400))


@needs_desc
def test_preset_config():
    cfg = sae4scfm.compose("train", ["data=pbmc_batches", "data.n_cells=200"])
    assert (cfg.data.batch_key, cfg.data.cell_type_key, cfg.data.gene_key) == ("batch", "cell_type", None)
    assert sae4scfm.compose("train", ["data=pbmc_batches"]).data.n_cells == 1200
    adata = load_dataset(cfg.data)
    assert adata.obs["batch"].value_counts().to_dict() == {PBMC_BATCHES[0]: 100, PBMC_BATCHES[1]: 100}
    assert {"batch", "cell_type", "split"} <= set(adata.obs.columns)


# --------------------------------------------------------------------------- benchmark on a real run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """(runs_dir, run dir) of a tiny SAE on data=pbmc_batches with features.h5ad."""
    if importlib.util.find_spec("desc") is None:
        pytest.skip("pbmc_batches needs desc: pip install --no-deps desc==2.1.1")
    root = tmp_path_factory.mktemp("integration")
    runs_dir = root / "runs"
    run_dir = sae4scfm.train(sae4scfm.compose("train", [*TINY_RUN, f"runs_dir={runs_dir}",
                                                        f"buffer.store_dir={root / 'stores'}", "experiment=tiny"]))
    sae4scfm.generate_features(sae4scfm.compose("features", [*address(runs_dir, "tiny", run_dir.name), "device=cpu",
                                                             "features.token_features=false"]))
    return runs_dir, run_dir


def address(runs_dir, experiment, stamp):
    return [f"runs_dir={runs_dir}", f"sae_checkpoint.experiment={experiment}", f"sae_checkpoint.timestamp={stamp}"]


def bench_cfg(runs_dir, experiment, stamp, *overrides):
    return sae4scfm.compose("benchmark_integration", [*address(runs_dir, experiment, stamp), "device=cpu",
                                                      *BENCH, *overrides])


@pytest.fixture(scope="module")
def table(tiny_run):
    from sae4scfm.analysis.integration import benchmark_integration

    runs_dir, run_dir = tiny_run
    return benchmark_integration(bench_cfg(runs_dir, "tiny", run_dir.name))


@needs_scib
def test_table_shape_and_ranges(tiny_run, table):
    from sae4scfm.analysis.integration import EMBEDDINGS, read_integration_table

    _, run_dir = tiny_run
    assert list(table.index) == list(EMBEDDINGS)
    expected = [*(("Bio conservation", m) for m in BIO), *(("Batch correction", m) for m in BATCH),
                *(("Aggregate score", m) for m in ("Batch correction", "Bio conservation", "Total")),
                ("Embedding", "dims"), ("Embedding", "features")]
    assert sorted(table.columns) == sorted(expected)
    scores = table.drop(columns="Embedding", level=0)
    assert scores.notna().all().all()
    ari = scores[("Bio conservation", "KMeans ARI")]
    assert ((ari >= -0.5) & (ari <= 1)).all()
    assert ((scores.drop(columns=[("Bio conservation", "KMeans ARI")]) >= 0)
            & (scores.drop(columns=[("Bio conservation", "KMeans ARI")]) <= 1)).all().all()
    bio, batch = scores["Bio conservation"].mean(axis=1), scores["Batch correction"].mean(axis=1)
    np.testing.assert_allclose(scores[("Aggregate score", "Bio conservation")], bio, atol=1e-6)
    np.testing.assert_allclose(scores[("Aggregate score", "Total")], 0.4 * batch + 0.6 * bio, atol=1e-6)
    assert scores.loc["expression_pca", ("Batch correction", "PCR comparison")] == 0  # its own reference
    assert table.loc["model_cell_emb", ("Embedding", "dims")] == 128  # the demo model's d_model
    assert table.loc["expression_pca", ("Embedding", "dims")] == 50
    pd.testing.assert_frame_equal(read_integration_table(run_dir / "analysis" / "integration.csv"), table,
                                  check_exact=False, check_dtype=False)


def _run_cells(run_dir):
    features = ad.read_h5ad(run_dir / "features" / "features.h5ad")
    return features, load_dataset(OmegaConf.load(run_dir / "config.yaml").data)


@needs_scib
def test_batch_features_removed(tiny_run, table):
    _, run_dir = tiny_run
    features, _ = _run_cells(run_dir)
    d_sae = json.loads((run_dir / "cfg.json").read_text())["d_sae"]
    flag = label_scoring(features.X, features.obs, ["batch", "cell_type"], min_cells=5, batch_key="batch",
                         cell_type_key="cell_type", batch_auroc_threshold=0.6)["batch_associated"].to_numpy()
    assert 5 <= flag.sum() < d_sae  # two real experiments: the SAE does have batch features
    assert table.loc["sae_features", ("Embedding", "features")] == d_sae
    assert table.loc["sae_features_batch_removed", ("Embedding", "features")] == d_sae - flag.sum()
    # the removed row was scored on the remaining features: its silhouette, recomputed independently
    emb = TruncatedSVD(n_components=50, random_state=0).fit_transform(features.X[:, ~flag].astype(np.float32))
    labels = features.obs["cell_type"].to_numpy()
    expected = (silhouette_score(emb, labels) + 1) / 2
    assert table.loc["sae_features_batch_removed", ("Bio conservation", "Silhouette label")] == pytest.approx(
        expected, abs=2e-4)


@needs_scib
def test_silhouette_of_pca_independently(tiny_run, table):
    """PCA by numpy SVD (signs of components do not change distances) + sklearn's silhouette,
    rescaled as scIB does: (ASW + 1) / 2."""
    _, run_dir = tiny_run
    _, adata = _run_cells(run_dir)
    X = adata.X.toarray().astype(np.float64)
    X = np.log1p(X / X.sum(1, keepdims=True) * 1e4)
    X -= X.mean(0)
    u, s, _ = np.linalg.svd(X, full_matrices=False)
    pcs = u[:, :50] * s[:50]
    expected = (silhouette_score(pcs, adata.obs["cell_type"].to_numpy()) + 1) / 2
    assert table.loc["expression_pca", ("Bio conservation", "Silhouette label")] == pytest.approx(expected, abs=2e-4)


# --------------------------------------------------------------------------- bad input


def _copy_run(tiny_run, experiment: str, *, features: bool = True) -> tuple[Path, Path]:
    runs_dir, run_dir = tiny_run
    dst = runs_dir / experiment / run_dir.name
    shutil.copytree(run_dir, dst, ignore=shutil.ignore_patterns("checkpoint", *([] if features else ["features"])))
    return runs_dir, dst


def test_no_batch_key(tiny_run):
    from sae4scfm.analysis.integration import benchmark_integration

    runs_dir, dst = _copy_run(tiny_run, "nobatch", features=False)
    cfg = OmegaConf.load(dst / "config.yaml")
    cfg.data.batch_key = None
    OmegaConf.save(cfg, dst / "config.yaml")
    with pytest.raises(InputError, match=r"no data.batch_key.*data=pbmc_batches"):
        benchmark_integration(bench_cfg(runs_dir, "nobatch", dst.name))
    # from the command line: one line on stderr, exit status 2
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "benchmark_integration.py"),
                           *address(runs_dir, "nobatch", dst.name)], capture_output=True, text=True)
    assert proc.returncode == 2 and "error:" in proc.stderr and "batch_key" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_features_missing_or_from_another_run(tiny_run):
    from sae4scfm.analysis.integration import benchmark_integration

    runs_dir, dst = _copy_run(tiny_run, "nofeatures", features=False)
    with pytest.raises(InputError, match=r"features.h5ad does not exist.*generate_features"):
        benchmark_integration(bench_cfg(runs_dir, "nofeatures", dst.name))

    runs_dir, dst = _copy_run(tiny_run, "otherrun")
    info = json.loads((dst / "cfg.json").read_text())
    (dst / "cfg.json").write_text(json.dumps({**info, "d_sae": info["d_sae"] * 2}))
    with pytest.raises(InputError, match=rf"has {info['d_sae']} features but the run's SAE has d_sae="):
        benchmark_integration(bench_cfg(runs_dir, "otherrun", dst.name))


def test_features_of_other_cells(tiny_run):
    from sae4scfm.analysis.integration import benchmark_integration

    runs_dir, dst = _copy_run(tiny_run, "othercells")
    path = dst / "features" / "features.h5ad"
    ad.read_h5ad(path)[::-1].copy().write_h5ad(path)  # same features, cells in another order
    with pytest.raises(InputError, match=r"features.h5ad does not hold the cells of the run.s dataset"):
        benchmark_integration(bench_cfg(runs_dir, "othercells", dst.name))


def test_bad_settings_and_missing_scib(tiny_run, monkeypatch):
    from sae4scfm.analysis.integration import benchmark_integration

    runs_dir, run_dir = tiny_run
    with pytest.raises(InputError, match=r"integration.embeddings=\['umap'\]: choose one or more of"):
        benchmark_integration(bench_cfg(runs_dir, "tiny", run_dir.name, "integration.embeddings=[umap]"))
    with pytest.raises(InputError, match=r"integration.pooling='median'"):
        benchmark_integration(bench_cfg(runs_dir, "tiny", run_dir.name, "integration.pooling=median"))
    monkeypatch.setitem(sys.modules, "scib_metrics", None)
    with pytest.raises(InputError, match=r"scib-metrics .*pip install \"sae4scfm\[integration\]\""):
        benchmark_integration(bench_cfg(runs_dir, "tiny", run_dir.name))


# --------------------------------------------------------------------------- feature removal rows

# all cells: the tiny run has 40 eval cells, fewer than scib's 90-NN graphs need (the default for removal is eval)
REMOVAL = ["integration.removal.enabled=true", "integration.cells=all", "integration.embeddings=[model_cell_emb]",
           "integration.removal.n_features_list=[3]", "integration.removal.seeds=[0]"]
REMOVAL_ROWS = ["model_cell_emb", "model_cell_emb_removed_n3", "model_cell_emb_random_n3_s0"]


@pytest.fixture(scope="module")
def removal_table(tiny_run):
    from sae4scfm.analysis.integration import benchmark_integration

    runs_dir, run_dir = tiny_run
    return benchmark_integration(bench_cfg(runs_dir, "tiny", run_dir.name, *REMOVAL))


@needs_scib
def test_removal_rows(tiny_run, table, removal_table):
    from sae4scfm.analysis.integration import read_integration_table

    _, run_dir = tiny_run
    assert list(removal_table.index) == REMOVAL_ROWS
    scores = removal_table.drop(columns="Embedding", level=0)
    assert np.isfinite(scores.to_numpy(dtype=np.float64)).all()
    np.testing.assert_array_equal(removal_table[("Embedding", "removed")], [np.nan, 3, 3])
    # the unsteered row is the main table's (same cells, same metrics); removing 3 features moved the embedding
    pd.testing.assert_series_equal(scores.loc["model_cell_emb"], table.drop(columns="Embedding", level=0)
                                   .loc["model_cell_emb"], check_exact=False, atol=1e-6)
    assert not np.allclose(scores.loc[REMOVAL_ROWS[1]], scores.loc["model_cell_emb"], atol=1e-4)
    pd.testing.assert_frame_equal(read_integration_table(run_dir / "analysis" / "integration.csv"), removal_table,
                                  check_exact=False, check_dtype=False)
    # the removed features: the 3 live features of highest batch AUROC (sklearn) on the train cells
    sets = pd.read_csv(run_dir / "analysis" / "integration_removal_sets.csv").set_index("embedding")
    removed = [int(j) for j in sets.loc[REMOVAL_ROWS[1], "features"].split()]
    random = [int(j) for j in sets.loc[REMOVAL_ROWS[2], "features"].split()]
    features, _ = _run_cells(run_dir)
    train = (features.obs["split"] == "train").to_numpy()
    X, batch = features.X[train].toarray(), features.obs["batch"].to_numpy()[train]
    from sklearn.metrics import roc_auc_score

    auc = np.array([max(roc_auc_score(batch == v, X[:, j]) for v in PBMC_BATCHES) if X[:, j].any() else -np.inf
                    for j in range(X.shape[1])])
    others = np.delete(auc, removed)
    assert len(removed) == 3 and auc[removed].min() >= others.max() - 1e-9
    assert len(set(random)) == 3 and not set(random) & set(removed) and X[:, random].any(axis=0).all()
    assert sets.loc[REMOVAL_ROWS[1], "train_score"] == pytest.approx(auc[removed].mean(), abs=1e-9)
    held = features.X[~train].toarray()
    held_auc = [max(roc_auc_score(features.obs["batch"].to_numpy()[~train] == v, held[:, j]) for v in PBMC_BATCHES)
                for j in removed]
    assert sets.loc[REMOVAL_ROWS[1], "eval_score"] == pytest.approx(np.mean(held_auc), abs=1e-9)
    assert (sets["emb_shift"] > 1e-4).all()
    # removed vs random summary, per metric: the table's numbers and an empirical p over the one seed
    summary = pd.read_csv(run_dir / "analysis" / "integration_removal.csv")
    assert len(summary) == scores.shape[1] and set(summary["p_random_ge"]) <= {0.5, 1.0}
    total = summary[(summary["metric type"] == "Aggregate score") & (summary["metric"] == "Total")].iloc[0]
    assert total["removed"] == pytest.approx(scores.loc[REMOVAL_ROWS[1], ("Aggregate score", "Total")])
    assert total["random_mean"] == pytest.approx(scores.loc[REMOVAL_ROWS[2], ("Aggregate score", "Total")])


def test_removal_bad_input(tiny_run):
    from sae4scfm.analysis.integration import benchmark_integration

    runs_dir, run_dir = tiny_run
    stamp = run_dir.name
    with pytest.raises(InputError, match=r"integration.removal.label_key='donor' is not an obs column"):
        benchmark_integration(bench_cfg(runs_dir, "tiny", stamp, *REMOVAL, "integration.removal.label_key=donor"))
    with pytest.raises(InputError, match=r"n=999 needs 1998 live features"):
        benchmark_integration(bench_cfg(runs_dir, "tiny", stamp, *REMOVAL, "integration.removal.n_features_list=[999]"))
    # by default removal rows are scored on the eval cells, which the selection never saw
    with pytest.raises(InputError, match=r"40 labelled eval \(held-out\) cells.*integration.cells=all"):
        benchmark_integration(bench_cfg(runs_dir, "tiny", stamp, *REMOVAL, "integration.cells=null"))
