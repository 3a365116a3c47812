"""analysis.control=random_init: the random-init twin is trained once, really untrained, reused on
a rerun, and control_comparison.csv compares the claim metrics of both."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import sae4scfm
from sae4scfm.analysis.control import control_comparison, control_markdown, read_control_comparison
from sae4scfm.errors import InputError

# A tiny run: 300 PBMC cells, 256 TopK latents, one epoch (about 15 s of training on 2 cores).
TINY_RUN = [
    "scfm=demo", "data=pbmc", "sae=topk", "sae.target_layer=2", "sae.dictionary_multiplier=2",
    "sae.hyperparams.k=8", "seed=0", "data.n_cells=300", "data.preprocess.split=0.3",
    "data.preprocess.subset_hvg=true", "wandb.mode=disabled", "train.n_epochs=1", "train.batch_size=256",
    "train.calibration_batches=4", "train.eval_max_cells=20",
]
CONTROL_ANALYSIS = ["analysis.control=random_init", "analysis.run_gene_scoring=true", "analysis.run_enrichment=true",
                    "analysis.gene_sets=[markers]"]


@pytest.fixture(scope="module")
def controlled(tmp_path_factory):
    """(runs dir, trained run dir, analyze overrides) after one analysis with the control."""
    runs = tmp_path_factory.mktemp("control_runs")
    run_dir = sae4scfm.train(sae4scfm.compose("train", [*TINY_RUN, f"runs_dir={runs}",
                                                        f"buffer.store_dir={runs / 'stores'}", "experiment=tiny"]))
    address = [f"runs_dir={runs}", "sae_checkpoint.experiment=tiny", f"sae_checkpoint.timestamp={run_dir.name}"]
    sae4scfm.generate_features(sae4scfm.compose("features", address))
    sae4scfm.analyze_features(sae4scfm.compose("analyze", [*address, *CONTROL_ANALYSIS]))
    return runs, run_dir, address


def test_control_twin_is_random_init_and_its_features_come_from_a_fresh_init(controlled):
    from sae4scfm.runs import load_run_config
    from sae4scfm.saes import load_sae
    from sae4scfm.scfm import load_scfm
    from sae4scfm.scfm.loading import load_model_and_data

    runs, run_dir, _ = controlled
    twin = runs / "tiny-random_init" / run_dir.name
    assert (twin / "cfg.json").is_file() and (twin / "features" / "token_features.h5ad").is_file()
    twin_cfg, run_cfg = load_run_config(twin), load_run_config(run_dir)
    assert twin_cfg.scfm.random_init is True and run_cfg.scfm.random_init is False
    for key in ("data", "sae", "seed", "train", "buffer"):
        assert twin_cfg[key] == run_cfg[key]
    trained = load_scfm(run_cfg.scfm).model.state_dict()
    adapter, adata, tokens = load_model_and_data(twin_cfg, "cpu")
    control = adapter.model.state_dict()
    assert trained.keys() == control.keys()
    differs = [k for k in trained if trained[k].is_floating_point() and not torch.equal(trained[k], control[k])]
    assert len(differs) >= len([k for k in trained if trained[k].is_floating_point()]) - 2  # (e.g. LayerNorm 1/0)
    torch.manual_seed(int(twin_cfg.seed))
    fresh = load_scfm(twin_cfg.scfm).model.state_dict()
    assert all(torch.equal(fresh[k], control[k]) for k in fresh)
    # the twin's features are its SAE on this fresh init's activations (first cells, max over gene tokens)
    import anndata as ad

    sae, sae_cfg = load_sae(twin)
    features = ad.read_h5ad(twin / "features" / "features.h5ad")
    batch = tokens.collate(list(range(4)))
    with torch.no_grad():
        h = adapter.capture(batch, [int(sae_cfg["layer"])])[int(sae_cfg["layer"])]
        f = torch.stack([sae.encode(h[i][batch.gene_mask[i]].float()).max(0).values for i in range(4)])
    cells = batch.cell_index.numpy()
    np.testing.assert_allclose(features.X[cells].toarray(), f.numpy(), rtol=1e-4, atol=1e-5)


def test_comparison_table_compares_trained_and_control(controlled):
    from sae4scfm.analysis.results import read_results

    runs, run_dir, _ = controlled
    twin = runs / "tiny-random_init" / run_dir.name
    table = read_control_comparison(run_dir)
    assert list(table.columns) == ["metric", "label", "trained", "control", "trained_beats_control"]
    assert table["trained_beats_control"].tolist() == (table["trained"] > table["control"]).tolist()
    auc = table[table["metric"] == "heldout_auroc"].set_index("label")
    per_type = auc.drop("mean")
    assert len(per_type) >= 3 and per_type[["trained", "control"]].stack().between(0, 1).all()
    assert auc.loc["mean", "trained"] == pytest.approx(per_type["trained"].mean())
    assert auc.loc["mean", "control"] == pytest.approx(per_type["control"].mean())
    n = table[table["metric"] == "n_types_heldout_auroc>=0.9"].iloc[0]
    assert n["trained"] == (per_type["trained"] >= 0.9).sum() and n["control"] == (per_type["control"] >= 0.9).sum()
    # enrichment fraction = features whose best marker FDR < 0.05, read from each run's own results
    frac = table[table["metric"] == "enriched_fraction"].set_index("label")
    for column, path in (("trained", run_dir), ("control", twin)):
        fdr = read_results(path / "analysis")[("enrichment", "fdr:markers")].to_numpy(dtype=float)
        assert frac.loc["markers", column] == pytest.approx((fdr < 0.05).mean())
    # the numbers are the twin's own: its held-out AUROC differs from the trained run's
    assert not np.allclose(per_type["trained"], per_type["control"])
    # the recomputed table is the written one
    from omegaconf import OmegaConf

    again = control_comparison(run_dir, twin, OmegaConf.create({"pooling": "max", "min_cells": 5,
                                                                 "auroc_threshold": 0.9, "max_fdr": 0.05}))
    pd.testing.assert_frame_equal(again.reset_index(drop=True), table, check_dtype=False)


def test_rerun_reuses_the_control(controlled, capsys):
    runs, run_dir, address = controlled
    twin = runs / "tiny-random_init" / run_dir.name
    # not retrained, not re-encoded (features.h5ad itself is rewritten: the analyses annotate its var)
    stamps = {p: p.stat().st_mtime_ns for p in (twin / "sae.safetensors", twin / "cfg.json",
                                                 twin / "features" / "token_features.h5ad")}
    sae4scfm.analyze_features(sae4scfm.compose("analyze", [*address, *CONTROL_ANALYSIS]))
    assert f"random-init control: reusing {twin}" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert sorted(p.name for p in twin.parent.iterdir()) == [run_dir.name]


def test_a_twin_with_another_config_is_an_error(controlled, tmp_path):
    import shutil

    from omegaconf import OmegaConf

    from sae4scfm.analysis.control import ensure_control_run

    runs, run_dir, _ = controlled
    other = tmp_path / "runs"
    shutil.copytree(run_dir, other / "tiny" / run_dir.name)
    shutil.copytree(runs / "tiny-random_init" / run_dir.name, other / "tiny-random_init" / run_dir.name)
    path = other / "tiny-random_init" / run_dir.name / "config.yaml"
    cfg = OmegaConf.load(path)
    cfg.sae.hyperparams.k = 4
    OmegaConf.save(cfg, path)
    with pytest.raises(InputError, match="holds a run of another config.*tiny-random_init.*delete it to retrain"):
        ensure_control_run(other / "tiny" / run_dir.name, other)


def test_bad_control_value_and_control_of_a_control(controlled):
    runs, run_dir, address = controlled
    with pytest.raises(InputError, match="analysis.control='trained': use random_init"):
        sae4scfm.analyze_features(sae4scfm.compose("analyze", [*address, "analysis.control=trained"]))
    twin_address = [f"runs_dir={runs}", "sae_checkpoint.experiment=tiny-random_init",
                    f"sae_checkpoint.timestamp={run_dir.name}", "analysis.control=random_init"]
    with pytest.raises(InputError, match="already uses scfm.random_init=true"):
        sae4scfm.analyze_features(sae4scfm.compose("analyze", twin_address))


def test_control_markdown_names_the_claims_the_control_matches():
    table = pd.DataFrame({"metric": ["heldout_auroc", "n_types_heldout_auroc>=0.9", "enriched_fraction"],
                          "label": ["mean", "", "go_bp"], "trained": [0.9, 4.0, 0.3],
                          "control": [0.8, 4.0, 0.4]})
    table["trained_beats_control"] = table["trained"] > table["control"]
    md = control_markdown(table)
    assert "| heldout_auroc | mean | 0.900 | 0.800 | yes |" in md
    assert "| n_types_heldout_auroc>=0.9 |  | 4 | 4 | **no** |" in md
    assert md.rstrip().endswith("does not beat its random-init control on: n_types_heldout_auroc>=0.9, "
                                "enriched_fraction (go_bp).")
    assert "No claim metric" in control_markdown(table.iloc[:0])
