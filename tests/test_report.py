"""summary.md / condition_features.csv: held-out cell-type and condition tables on the small demo run.

A synthetic condition column (``stim``: STIM for the CD14 monocytes, CTRL for the others) is added to a copy
of the run's dataset and features, and the dataset's ``condition_key`` set to it, as ``data=kang`` does with its
``stim`` column. Numbers are recomputed with sklearn on the eval cells.
"""

from __future__ import annotations

import shutil

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf
from sklearn.metrics import roc_auc_score

import sae4scfm
from sae4scfm.analysis.report import cell_type_summary
from sae4scfm.analysis.results import read_results
from sae4scfm.analysis.run_data import load_run_data, marker_set_for
from sae4scfm.data import load_pbmc

STIM_TYPES = ("CD14+ Monocyte",)


@pytest.fixture(scope="module")
def condition_run(small_run, tmp_path_factory):
    _, run_dir = small_run
    runs = tmp_path_factory.mktemp("cond") / "runs"
    dst = runs / "cond" / run_dir.name
    shutil.copytree(run_dir, dst)
    shutil.rmtree(dst / "analysis", ignore_errors=True)
    # the run's dataset, with the condition column: data=pbmc written as an .h5ad (data=h5ad samples
    # the same cells for the same seed and size)
    cells = load_pbmc()
    cells.obs["stim"] = pd.Categorical(np.where(cells.obs["bulk_labels"].isin(STIM_TYPES), "STIM", "CTRL"))
    cells.write_h5ad(runs.parent / "pbmc_stim.h5ad")
    cfg_file = dst / "config.yaml"
    run_cfg = OmegaConf.load(cfg_file)
    run_cfg.data.name, run_cfg.data.path = "h5ad", str(runs.parent / "pbmc_stim.h5ad")
    run_cfg.data.condition_key = "stim"
    OmegaConf.save(run_cfg, cfg_file)
    feats = ad.read_h5ad(dst / "features" / "features.h5ad")
    stim = feats.obs["bulk_labels"].isin(STIM_TYPES).to_numpy()
    feats.obs["stim"] = pd.Categorical(np.where(stim, "STIM", "CTRL"))
    feats.write_h5ad(dst / "features" / "features.h5ad")
    address = [f"runs_dir={runs}", "sae_checkpoint.experiment=cond", f"sae_checkpoint.timestamp={dst.name}"]
    cfg = sae4scfm.compose("analyze", [*address, "analysis.run_gene_scoring=true", "analysis.run_enrichment=true",
                                       "analysis.gene_sets=[markers]", "analysis.top_n=3"])
    table = sae4scfm.analyze_features(cfg)
    return cfg, dst, table


def test_condition_key_is_scored_by_default(condition_run):
    _, _, table = condition_run
    cols = set(table["label_scoring"].columns)
    assert {"auroc:stim=STIM", "auroc:stim=CTRL", "best:stim", "best_eval_auroc:stim",
            "best_eval_auroc:bulk_labels"} <= cols
    assert "best_auroc:stim" not in cols


def test_condition_features_are_chosen_on_train_and_reported_on_eval(condition_run):
    cfg, run_dir, table = condition_run
    cond = pd.read_csv(run_dir / "analysis" / "condition_features.csv", keep_default_na=False, na_values=[""])
    run = load_run_data(cfg)
    obs = run.features.obs
    D = run.features.X.toarray()
    train = (obs["split"] == "train").to_numpy()
    assert sorted(cond["condition"].unique()) == ["CTRL", "STIM"]
    for value, rows in cond.groupby("condition"):
        y = (obs["stim"] == value).to_numpy()
        train_auc = np.array([roc_auc_score(y[train], D[train, j]) for j in range(D.shape[1])])
        expected = np.argsort(-train_auc, kind="stable")[:3]
        assert list(rows["feature_id"]) == list(expected) and list(rows["rank"]) == [0, 1, 2]
        for r in rows.itertuples():
            assert r.train_auroc == pytest.approx(train_auc[r.feature_id], abs=1e-9)
            assert r.eval_auroc == pytest.approx(roc_auc_score(y[~train], D[~train, r.feature_id]), abs=1e-9)
            assert r.n_eval == int(y[~train].sum())
            genes = str(table["gene_scoring"]["top_genes"][r.feature_id]).split(";")[:8]
            assert str(r.top_genes).split(";") == genes
    stim = cond[cond["condition"] == "STIM"].iloc[0]
    assert stim["eval_auroc"] > 0.8  # the planted condition (the monocytes) is found on held-out cells
    summary = (run_dir / "analysis" / "summary.md").read_text()
    assert "## Condition features: stim" in summary
    assert "chosen on the" in summary and "train cells and its AUROC reported on the" in summary


def test_cell_type_summary_reports_eval_auroc_of_train_choice(condition_run):
    cfg, run_dir, _ = condition_run
    run = load_run_data(cfg)
    cells = cell_type_summary(run, read_results(run_dir / "analysis"), cfg.analysis)
    obs = run.features.obs
    D = run.features.X.toarray()
    train = (obs["split"] == "train").to_numpy()
    grouped = obs["bulk_labels"].astype(str).map(lambda v: marker_set_for(run, v) or v).to_numpy()
    sig = pd.read_csv(run_dir / "analysis" / "enrichment.csv")
    for r in cells.itertuples():
        y = grouped == r.cell_type
        train_auc = np.array([roc_auc_score(y[train], D[train, j]) for j in range(D.shape[1])])
        assert r.train_auroc == pytest.approx(train_auc[r.feature], abs=1e-9)
        assert r.eval_auroc == pytest.approx(roc_auc_score(y[~train], D[~train, r.feature]), abs=1e-9)
        eligible = np.flatnonzero(train_auc >= cfg.analysis.auroc_threshold)
        hits = sig[(sig["collection"] == "markers") & (sig["gene_set"] == r.marker_set)] if r.marker_set else sig[:0]
        fdr = pd.Series(hits["fdr"].to_numpy(), index=hits["feature_id"]).reindex(eligible).fillna(np.inf)
        if len(eligible) and np.isfinite(fdr).any():  # the most marker-enriched eligible feature
            assert fdr[r.feature] == fdr.min()
        elif len(eligible) == 0:  # none eligible: the best train AUROC
            assert r.feature == int(np.argmax(train_auc))
        assert r.interpreted == (r.eval_auroc >= 0.9 and r.marker_fdr < 0.05)
    print(cells[["cell_type", "n_eval", "feature", "train_auroc", "eval_auroc", "marker_fdr", "interpreted"]])
