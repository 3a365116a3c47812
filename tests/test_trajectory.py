"""Trajectory steering: the stage's pseudotime is scanpy's own diffusion pseudotime on the same cells, a planted
signature that a feature's edit follows scores high and its matched null does not, bad lineages are one clear
line each, and the stage runs from its Hydra config on a trained run."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

import sae4scfm
from sae4scfm.causal.contrastive import type_profiles
from sae4scfm.causal.interventions import Intervention, latent_edit
from sae4scfm.causal.steering import firing_stats, gene_shifts, matched_null, readout
from sae4scfm.causal.trajectory import end_points, lineage_positions, toward_scores, trajectory_shifts
from sae4scfm.errors import InputError

LINEAGE = ["CD14+ Monocyte", "Dendritic"]  # 97 + 173 of the small run's 500 pbmc cells


@pytest.fixture(scope="module")
def stage(small_run, runs_dir):
    """The stage run once from its Hydra config on the small run: (config, run dir, summary, the opened run)."""
    from sae4scfm.causal.run import open_causal_run
    from sae4scfm.causal.trajectory import trajectory_steering

    _, run_dir = small_run
    address = [f"runs_dir={runs_dir}", "sae_checkpoint.experiment=small", f"sae_checkpoint.timestamp={run_dir.name}"]
    cfg = sae4scfm.compose("trajectory", [*address, f"trajectory.lineage=[{','.join(LINEAGE)}]", "trajectory.n_cells=6",
                                          "trajectory.null_features=3", "trajectory.n_features=2",
                                          "trajectory.alphas=[-2,2]", "trajectory.per_forward=24",
                                          "trajectory.n_signature_genes=50"])
    summary = trajectory_steering(cfg)
    return cfg, run_dir, summary, open_causal_run(cfg, "test")


def test_pseudotime_is_scanpys_dpt_and_features_are_chosen_on_train_cells(stage):
    import anndata as ad
    import scanpy as sc

    _, run_dir, summary, ctx = stage
    out = run_dir / "causal" / "trajectory"
    pt = pd.read_csv(out / "pseudotime.csv")
    labels = ctx.adata.obs["bulk_labels"].astype(str).to_numpy()
    cells = np.flatnonzero(np.isin(labels, LINEAGE))
    assert pt["cell"].tolist() == ctx.adata.obs_names[cells].tolist()
    # scanpy itself on the same cells: log1p CP10k of the model's genes -> PCA -> gauss kNN -> diffmap -> dpt
    a = ad.AnnData(ctx.run.expression()[0][cells])
    sc.pp.pca(a, n_comps=30, random_state=0)
    sc.pp.neighbors(a, n_neighbors=15, method="gauss", random_state=0)
    sc.tl.diffmap(a, n_comps=11)
    dc1, first = a.obsm["X_diffmap"][:, 1], labels[cells] == LINEAGE[0]
    away = -1 if dc1[labels[cells] == LINEAGE[1]].mean() > dc1[first].mean() else 1  # the root lies away from the end
    a.uns["iroot"] = int(np.flatnonzero(first)[np.argmax(away * dc1[first])])
    assert pt["root"].to_numpy().nonzero()[0].tolist() == [a.uns["iroot"]]
    sc.tl.dpt(a, n_dcs=10)
    np.testing.assert_allclose(pt["pseudotime"], a.obs["dpt_pseudotime"], rtol=1e-6, atol=1e-9)
    # the lineage runs monocyte -> dendritic; early/late are the lineage's pseudotime quartiles
    med = pt.groupby("label")["pseudotime"].median()
    assert med[LINEAGE[0]] < 0.5 * med[LINEAGE[1]]
    q1, q3 = np.quantile(pt["pseudotime"], [0.25, 0.75])
    assert (pt["phase"] == np.where(pt["pseudotime"] <= q1, "early", np.where(pt["pseudotime"] >= q3, "late", "mid"))).all()
    steered = pt[pt["steered"]]
    assert len(steered) == 6 and (steered["phase"] == "early").all() and (steered["split"] == "eval").all()
    # features: the largest |Spearman rho| with pseudotime on train lineage cells (scipy's spearmanr as reference)
    train = (pt["split"] == "train").to_numpy()
    X = ctx.run.features.X[cells[train]].toarray()
    rho = np.array([stats.spearmanr(X[:, j], pt["pseudotime"][train]).statistic if X[:, j].std() else np.nan
                    for j in range(X.shape[1])])
    chosen = summary.drop_duplicates("target")
    np.testing.assert_allclose(chosen["rho_train"], rho[chosen["target"]], rtol=1e-9)
    assert np.abs(chosen["rho_train"]).min() >= np.sort(np.abs(rho[np.isfinite(rho)]))[-5]  # among the top (live)
    assert (chosen["sign"] == np.sign(chosen["rho_train"])).all()


def test_stage_writes_its_tables_against_the_null(stage):
    _, run_dir, summary, _ = stage
    out = run_dir / "causal" / "trajectory"
    assert len(summary) == 4 and sorted(summary["alpha"].unique()) == [-2.0, 2.0]
    for m in ("signature_r", "progress", "closer_fraction"):
        assert summary[f"{m}_p"].between(1 / 4, 1).all() and f"{m}_q" in summary
    null = pd.read_csv(out / "null.csv")
    assert len(null) == 2 * 3 * 2 + 3 * 2 and not set(null["feature_id"]) & set(summary["target"])
    sets = pd.read_csv(out / "set.csv")
    assert len(sets) == 2 and (sets["features"].str.split().str.len() == 2).all()
    sig = pd.read_csv(out / "signature.csv")
    np.testing.assert_allclose(sig["signature"], sig["late_mean"] - sig["early_mean"])
    # the signature genes: the trajectory.n_signature_genes=50 largest |late - early| among genes seen in >= 3 cells at both ends
    ok = sig[(sig["n_early"] >= 3) & (sig["n_late"] >= 3)]
    assert sig["in_signature"].sum() == min(50, len(ok)) == 50 and ok["in_signature"].sum() == 50
    assert ok.loc[ok["in_signature"], "signature"].abs().min() >= ok.loc[~ok["in_signature"], "signature"].abs().max()


def test_planted_signature_scores_high_and_the_matched_null_does_not(stage):
    """Plant the late end where adding feature j moves the readout (measured on OTHER cells with gene_shifts):
    steering j in fresh cells must follow the signature, the density-matched null must not."""
    *_, ctx = stage
    adapter, sae, layer, tokens = ctx.adapter, ctx.sae, ctx.layer, ctx.tokens
    plant, steer_on = tokens.subset(np.arange(0, 8)), tokens.subset(np.arange(8, 14))  # planted on other cells
    density, scale = firing_stats(adapter, sae, layer, plant)
    live = np.flatnonzero(density > 0)
    j = int(live[np.argsort(density[live], kind="stable")[len(live) // 2]])  # a feature of median firing density
    alpha = 3.0 * float(scale[j])
    # the per-token head and the tokens where a feature fires: the GEPC head (mvc) reads the edit through the
    # <cls> embedding only, and an edit at every token moves every gene the same way, whatever the feature
    edit = lambda f, a: Intervention((f,), "add", a, "firing")  # noqa: E731
    moved, output = gene_shifts(adapter, sae, layer, plant, [edit(j, alpha)], output="mlm")
    _, total, count = type_profiles(adapter, plant, output)  # the clean readout's per-gene sums and counts
    assert (count == moved.n[0]).all()
    # early = the clean mean of the planting cells, late = early + the mean change adding j causes there
    ends = end_points(total, count, total + moved.total[0], count, None, 100, 3)
    np.testing.assert_allclose(ends.signature[ends.genes], moved.total[0][ends.genes] / count[ends.genes])
    nulls = matched_null(density, [j], 5, np.random.default_rng(0))[j]
    ivs = [edit(j, alpha), edit(j, -alpha), *(edit(f, 3.0 * float(scale[f])) for f in nulls)]
    shifts, closer, emb_closer, _ = trajectory_shifts(adapter, sae, layer, steer_on, ivs, ends, output=output,
                                                      per_forward=4)
    plus = toward_scores(shifts, closer, emb_closer, 0, 1.0, ends, 2)
    minus = toward_scores(shifts, closer, emb_closer, 1, -1.0, ends, 2)  # aims early: -signature
    null = [toward_scores(shifts, closer, emb_closer, e, 1.0, ends, 2) for e in range(2, len(ivs))]
    assert plus["n_signature_genes"] > 20
    assert plus["signature_r"] > 0.7 and minus["signature_r"] > 0.3  # the edit's response is not exactly odd in α
    assert 0.5 < plus["progress"] < 2 and plus["closer_fraction"] >= 5 / 6
    assert max(n["signature_r"] for n in null) < plus["signature_r"] - 0.3
    assert max(n["progress"] for n in null) < 0.3
    assert np.mean([n["closer_fraction"] for n in null]) < 0.7
    # the per-cell "closer" flags against one forward per cell, by hand
    for c in range(3):
        b = steer_on.collate(np.array([c]))
        g = b.gene_ids[b.gene_mask].numpy()
        w = ends.genes[g]
        with torch.no_grad():
            r0 = readout(adapter.run(b), output, b.gene_ids)[b.gene_mask].double().numpy()
            with adapter.intervene(layer, latent_edit(sae, [ivs[0]])):
                r1 = readout(adapter.run(b), output, b.gene_ids)[b.gene_mask].double().numpy()
        late = ends.mean[1][g]
        assert closer[0, 1, c] == float(((r1 - late)[w] ** 2).sum() < ((r0 - late)[w] ** 2).sum())


def test_bad_lineages_are_one_clear_line_each(stage):
    from sae4scfm.causal.trajectory import steer_trajectory

    labels = np.array(["a"] * 20 + ["b"] * 5)
    with pytest.raises(InputError, match="at least 2 distinct"):
        lineage_positions(labels, ["a", "a"], "trajectory.lineage", 10)
    with pytest.raises(InputError, match=r"\['z'\] not among.*values: a, b"):
        lineage_positions(labels, ["a", "z"], "trajectory.lineage", 10)
    with pytest.raises(InputError, match="only 25 cells"):
        lineage_positions(labels, ["a", "b"], "trajectory.lineage", 30)
    np.testing.assert_array_equal(lineage_positions(labels, ["b", "a"], "f", 10), np.arange(25))
    cfg, *_, ctx = stage
    for key, value, match in [("lineage", ["CD14+ Monocyte", "Martian"], r"\['Martian'\] not among"),
                              ("lineage", ["CD34+", "CD4+/CD45RA+/CD25- Naive T"], "only 17 cells"),
                              ("lineage", ["Dendritic"], "at least 2"),
                              ("label_key", "nope", "trajectory.label_key='nope' is not an obs column"),
                              ("early_quantile", 0.8, "below trajectory.late_quantile"),
                              ("features", [9999], "out of range")]:
        t = cfg.trajectory.copy()
        t[key] = value
        with pytest.raises(InputError, match=match):
            steer_trajectory(ctx, t)
