"""End to end on the built-in data: demo scGPT -> activations -> TopK SAE -> features -> label AUROC."""

from __future__ import annotations

import json
import logging

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from safetensors.torch import load_file

import sae4scfm
from sae4scfm.analysis.results import read_results
from sae4scfm.data import load_pbmc
from sae4scfm.saes import load_sae
from sae4scfm.store.shards import ActivationStore


def test_run_dir_contract(small_run):
    cfg, run_dir = small_run
    for name in ("sae.safetensors", "cfg.json", "config.yaml", "metrics.jsonl", "eval.json"):
        assert (run_dir / name).is_file(), name
    meta = json.loads((run_dir / "cfg.json").read_text())
    assert meta["architecture"] == "topk" and meta["layer"] == 2 and meta["d_in"] == 128
    assert meta["d_sae"] == 4 * 128 and meta["hyperparams"]["k"] == 16
    assert meta["input_scaling"]["folded"] and meta["input_scaling"]["factor"] > 0
    assert set(load_file(run_dir / "sae.safetensors")) == {"W_enc", "W_dec", "b_enc", "b_dec"}
    for shared in ("sae.safetensors", "analysis/results.csv", "analysis/results.parquet"):
        assert (run_dir / shared).stat().st_mode & 0o044, f"{shared} is private"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows]
    assert steps == sorted(steps) and steps[-1] == meta["steps"]
    assert rows[-1]["fvu"] < rows[0]["fvu"]  # it learned
    ev = json.loads((run_dir / "eval.json").read_text())
    assert 0 < ev["fvu"] < 0.5 and abs(ev["explained_variance"] - (1 - ev["fvu"])) < 1e-9
    assert abs(ev["l0"] - 16) < 1e-6  # TopK: exactly k active (ReLU rarely zeroes one)
    assert 0 <= ev["dead_fraction"] < 0.5
    # splicing the SAE in costs less of the model's loss than mean-ablating the layer
    assert ev["loss_clean"] <= ev["loss_spliced"] < ev["loss_mean_ablated"]


def test_eval_metrics_recomputed_from_store(small_run, store_dir):
    """eval.json's FVU/L0 equal a direct recomputation on the held-out store."""
    _, run_dir = small_run
    sae, meta = load_sae(run_dir)
    (store_path,) = list(store_dir.glob("*/eval/layer_2"))
    x = torch.cat([s["acts"].float() for s in ActivationStore(store_path).iter_shards()])
    with torch.no_grad():
        f = sae.encode(x)
        x_hat = sae.decode(f)
    fvu = float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    ev = json.loads((run_dir / "eval.json").read_text())
    assert abs(ev["fvu"] - fvu) < 1e-4
    assert abs(ev["l0"] - float((f > 0).sum(1).float().mean())) < 1e-4


def test_split_is_by_cell(small_run, store_dir):
    cfg, _ = small_run
    (root,) = list(store_dir.glob("*"))
    cells = {split: np.unique(np.concatenate([s["cell"].numpy() for s in
                                              ActivationStore(root / split / "layer_2").iter_shards()]))
             for split in ("train", "eval")}
    assert len(np.intersect1d(cells["train"], cells["eval"])) == 0
    assert len(cells["train"]) + len(cells["eval"]) == 500
    assert abs(len(cells["eval"]) / 500 - 0.2) < 0.01


def test_features_files(small_run):
    _, run_dir = small_run
    feats = ad.read_h5ad(run_dir / "features" / "features.h5ad")
    tokens = ad.read_h5ad(run_dir / "features" / "token_features.h5ad")
    assert feats.shape == (500, 512) and sp.issparse(feats.X) and feats.X.format == "csr"
    original = set(load_pbmc().obs.columns)
    assert original <= set(feats.obs.columns) and "split" in feats.obs
    assert feats.obs_names.isin(load_pbmc().obs_names).all()
    assert {"cell", "cell_index", "gene", "gene_id", "split"} <= set(tokens.obs.columns)
    # pooling: max and mean over each cell's gene tokens, recomputed from the token file
    T = tokens.X.tocsr()
    for cell in [0, 17, 499]:
        rows = np.flatnonzero(tokens.obs["cell_index"].to_numpy() == cell)
        block = T[rows].toarray()
        np.testing.assert_allclose(feats.X[cell].toarray().ravel(), block.max(0), rtol=1e-6)
        np.testing.assert_allclose(feats.layers["mean"][cell].toarray().ravel(), block.mean(0), rtol=1e-5, atol=1e-6)
    # every token of a cell is one of its expressed genes; no special tokens
    assert not tokens.obs["gene"].isin(["<cls>", "<pad>", "<eoc>"]).any()
    assert ((T > 0).sum(1) == 16).mean() > 0.99
    # the genes the model read (the gene universe of every gene-level analysis) are recorded in features.h5ad
    assert feats.uns["sae4scfm"]["genes_seen"].tolist() == sorted(set(tokens.obs["gene_name"].astype(str)))


def test_cell_type_features_found(small_run):
    """At the default layer, >= 3 PBMC cell types each have a feature with AUROC >= 0.9."""
    _, run_dir = small_run
    table = read_results(run_dir / "analysis")
    assert table.index.name == "feature_id" and table.columns.nlevels == 2
    auroc = table["label_scoring"][[c for c in table["label_scoring"].columns if c.startswith("auroc:bulk_labels=")]]
    best = auroc.astype(float).max(axis=0)
    assert (best >= 0.9).sum() >= 3, best.sort_values(ascending=False)
    csv = pd.read_csv(run_dir / "analysis" / "results.csv", header=[0, 1], index_col=0)
    assert csv.shape == table.shape


def test_duplicate_obs_names_are_made_unique_for_every_stage(tmp_path, caplog):
    """Defect 4: a concatenated .h5ad whose cells share obs_names (two halves with the same barcodes)
    goes through data=h5ad -> train -> generate_features; the names are made unique once, at loading
    (anndata's rule, with a logged note), so features.h5ad and token_features.h5ad name the same cells."""
    pbmc = load_pbmc()[:80].copy()
    names = pbmc.obs_names[:40].tolist() * 2
    pbmc.obs_names = names
    path = tmp_path / "concatenated.h5ad"
    pbmc.write_h5ad(path)
    expected = ad.read_h5ad(path)
    expected.obs_names_make_unique()
    runs = tmp_path / "runs"
    with caplog.at_level(logging.WARNING, logger="sae4scfm.data"):
        run_dir = sae4scfm.train(sae4scfm.compose("train", [
            "scfm=demo", "data=h5ad", f"data.path={path}", "data.cell_type_key=bulk_labels", "sae=topk",
            "sae.target_layer=2", "sae.dictionary_multiplier=1", "sae.hyperparams.k=8", "train.n_epochs=1",
            "wandb.mode=disabled", f"runs_dir={runs}", f"buffer.store_dir={tmp_path / 'stores'}", "experiment=dup"]))
    assert "40 cells share their obs_name with an earlier cell" in caplog.text
    assert f"{names[0]!r} -> {names[0] + '-1'!r}" in caplog.text
    out = sae4scfm.generate_features(sae4scfm.compose("features", [
        f"runs_dir={runs}", "sae_checkpoint.experiment=dup", f"sae_checkpoint.timestamp={run_dir.name}"]))
    features = ad.read_h5ad(out / "features.h5ad")
    tokens = ad.read_h5ad(out / "token_features.h5ad")
    assert features.obs_names.tolist() == expected.obs_names.tolist() and features.obs_names.is_unique
    assert list(tokens.obs["cell"].cat.categories) == expected.obs_names.tolist()
    assert (tokens.obs["cell"].astype(str).to_numpy() == expected.obs_names.to_numpy()[tokens.obs["cell_index"]]).all()
