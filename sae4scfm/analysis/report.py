"""The analyze stage's report: figures (``analysis/figures/*.png``), ``analysis/summary.md`` and
``analysis/condition_features.csv``.

Every "best feature for a label" here is chosen on the run's train cells and its AUROC reported
on the eval cells (``sae4scfm.analysis.labels.select_on_train``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from sae4scfm.analysis.control import control_markdown, read_control_comparison
from sae4scfm.analysis.labels import label_f1, select_on_train, train_mask
from sae4scfm.analysis.run_data import RunData, collection_name, marker_set_for, need_tokens, read_table
from sae4scfm.atomic import atomic_write, atomic_write_text
from sae4scfm.errors import InputError


def pooled_rows(run: RunData, a: DictConfig) -> tuple:
    """(X [rows, features], obs [rows]) scored by ``analysis.pooling``: a cell representation (rows =
    cells, ``run.representation``), or token (rows = tokens, labelled with their cell's obs, split included)."""
    if a.get("pooling") == "token":
        tokens = need_tokens(run, "analysis.pooling=token")
        return tokens.X, run.features.obs.iloc[tokens.obs["cell_index"].to_numpy()].reset_index(drop=True)
    return run.features.X, run.features.obs


def write_figures(run: RunData, table: pd.DataFrame) -> list[Path]:
    """PNG figures of what the results hold: label AUROC heatmap, density histogram, SAE vs PCA."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig_dir = run.out_dir / "figures"
    fig_dir.mkdir(exist_ok=True)
    written = []
    key = run.cell_type_key
    groups = set(table.columns.get_level_values(0))
    auroc_cols = [m for (an, m) in table.columns if an == "label_scoring" and m.startswith(f"auroc:{key}=")]
    if auroc_cols:
        auc = table["label_scoring"][auroc_cols].astype(float)
        auc.columns = [c.split("=", 1)[1] for c in auroc_cols]
        obs = run.features.obs
        chosen = select_on_train(run.features.X, obs[key], train_mask(obs), min_cells=1)
        best = list(dict.fromkeys(chosen["feature_id"].astype(int)))
        fig, ax = plt.subplots(figsize=(2.5 + 0.45 * len(best), 1.2 + 0.4 * len(auc.columns)))
        im = ax.imshow(auc.loc[best].T.to_numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(best)), [str(b) for b in best], rotation=90)
        ax.set_yticks(range(len(auc.columns)), auc.columns)
        ax.set_xlabel("feature (best per cell type on train cells)")
        fig.colorbar(im, ax=ax, label="AUROC (all cells)")
        written.append(_save(fig, fig_dir / "label_auroc.png"))
    if "density" in groups:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for col, label in (("log10_cell_density", "cells"), ("log10_token_density", "tokens")):
            if col in table["density"]:
                v = table["density"][col].to_numpy(dtype=float)
                ax.hist(v[np.isfinite(v)], bins=40, alpha=0.6, label=label)
        ax.set_xlabel("log10 activation density")
        ax.set_ylabel("features")
        ax.legend()
        written.append(_save(fig, fig_dir / "density.png"))
    pca = read_table(run, "pca_comparison.csv") if "pca_comparison" in groups else None
    methods = [m for m in ("sae", "sae_subset", "pca", "neurons") if pca is not None and f"{m}_eval_auroc" in pca]
    if methods and len(pca):
        fig, ax = plt.subplots(figsize=(1.5 + 0.8 * len(pca), 3.5))
        x, w = np.arange(len(pca)), 0.8 / len(methods)
        names = {"sae": "SAE feature", "sae_subset": "SAE, matched count", "pca": "PCA direction", "neurons": "neuron"}
        for i, m in enumerate(methods):
            ax.bar(x - 0.4 + w * (i + 0.5), pca[f"{m}_eval_auroc"], w, label=names[m])
        ax.set_xticks(x, pca["label"], rotation=60, ha="right")
        ax.set_ylim(0.5, 1)
        ax.set_ylabel("eval AUROC (chosen on train)")
        ax.legend(fontsize=7)
        written.append(_save(fig, fig_dir / "sae_vs_pca.png"))
    return written


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def cell_type_summary(run: RunData, table: pd.DataFrame, a: DictConfig) -> pd.DataFrame:
    """Per cell type at the resolution of the marker sets (labels mapped to the same marker set by
    ``data.marker_sets`` are merged, e.g. three CD4 T subsets -> ``CD4 T``; unmapped labels stay;
    ``analysis.cell_type_groups=labels``: every label on its own, scored against its marker set),
    one feature chosen on the train cells (``select_on_train``): among features whose train AUROC
    (one group vs the rest, ``analysis.pooling``) is >= ``auroc_threshold``, the one whose top genes
    are most enriched for the group's marker set (a BH FDR, corrected over all features x sets),
    else the best train-AUROC feature. Reported on the eval cells: ``eval_auroc`` and ``eval_f1``;
    also train_auroc, top genes, marker-set FDR (NaN = not significant) and the best enriched set of
    the other collections. ``interpreted``: eval AUROC >= auroc_threshold and marker FDR < max_fdr."""
    key = run.cell_type_key
    groups = set(table.columns.get_level_values(0))
    if not key or key not in run.features.obs or "gene_scoring" not in groups:
        return pd.DataFrame()
    X, obs = pooled_rows(run, a)
    is_train = train_mask(obs)
    labels = obs[key].astype("string").reset_index(drop=True)
    merge = a.get("cell_type_groups", "marker_sets")
    if merge not in ("marker_sets", "labels"):
        raise InputError(f"analysis.cell_type_groups={merge!r}: use marker_sets (labels mapped to one marker set "
                         "are one cell type) or labels (every label value on its own).")
    group_of = {v: (marker_set_for(run, v) or v) if merge == "marker_sets" else v for v in labels.dropna().unique()}
    grouped = labels.map(group_of)
    enr = table["enrichment"] if "enrichment" in groups else None
    genes = table["gene_scoring"]["top_genes"]
    sig = read_table(run, "enrichment.csv") if enr is not None else None
    markers = sig[sig["collection"] == collection_name(a.marker_collection)] if sig is not None else None
    marker_of: dict[str, str | None] = {}  # group -> its marker set (None: no built-in set)
    for v, g in group_of.items():
        marker_of.setdefault(g, marker_set_for(run, v))
    prefer = {}
    for group, marker_set in marker_of.items():
        fdr = pd.Series(np.nan, index=range(X.shape[1]))
        if markers is not None and marker_set:
            hits = markers[markers["gene_set"] == marker_set].set_index("feature_id")["fdr"]
            fdr.loc[hits.index.astype(int)] = hits.to_numpy()
        prefer[group] = fdr
    chosen = select_on_train(X, grouped, is_train, min_cells=int(a.min_cells),
                             min_train_auroc=float(a.auroc_threshold), prefer=prefer)
    f1 = label_f1(X, grouped.where(~is_train), min_cells=int(a.min_cells))
    counts = grouped.value_counts()
    rows = []
    for c in chosen.itertuples():
        group, best = c.label, int(c.feature_id)
        members = sorted(v for v, g in group_of.items() if g == group)
        fdr = float(prefer[group][best])
        row = {"cell_type": group, "labels": "; ".join(members), "n_cells": int(counts.get(group, 0)),
               "n_eval": c.n_eval, "feature": best, "train_auroc": c.train_auroc, "eval_auroc": c.eval_auroc,
               "eval_f1": float(f1[group][best]) if group in f1 else float("nan"),
               "marker_set": marker_of[group] or "", "marker_fdr": fdr,
               "top_genes": ";".join(str(genes[best]).split(";")[:8])}
        row.update(_enriched_sets(enr, best, a))
        row["interpreted"] = bool(row["eval_auroc"] >= float(a.auroc_threshold) and fdr < float(a.max_fdr))
        rows.append(row)
    out = pd.DataFrame(rows)
    return out[[c for c in out.columns if c != "interpreted"] + ["interpreted"]] if len(out) else out


def _enriched_sets(enr: pd.DataFrame | None, feature: int, a: DictConfig, skip_markers: bool = True) -> dict:
    """{top_set:<collection>: best set} of a feature, for the collections where it is enriched (FDR < max_fdr)."""
    out = {}
    for m in (m for m in (enr.columns if enr is not None else []) if m.startswith("best_set:")):
        coll = m.split(":", 1)[1]
        if skip_markers and coll == collection_name(a.marker_collection):
            continue
        if enr.loc[feature, f"fdr:{coll}"] < float(a.max_fdr):
            out[f"top_set:{coll}"] = enr.loc[feature, m]
    return out


def condition_features(run: RunData, table: pd.DataFrame, a: DictConfig) -> pd.DataFrame:
    """Per value of the dataset's ``condition_key`` (e.g. stim = CTRL/STIM), the ``top_n`` features
    ranked by train-cell AUROC (one value vs the rest, ``select_on_train``) with their eval-cell
    AUROC, top genes and best enriched set per collection (when those analyses ran). Empty when the
    dataset names no condition_key."""
    key = run.run_cfg.data.get("condition_key")
    if not key:
        return pd.DataFrame()
    if key not in run.features.obs:
        raise InputError(f"data.condition_key={key!r} is not an obs column of {run.run_dir}/features/features.h5ad "
                         f"(columns: {', '.join(map(str, run.features.obs.columns))}); fix data.condition_key.")
    X, obs = pooled_rows(run, a)
    chosen = select_on_train(X, obs[key], train_mask(obs), min_cells=int(a.min_cells), top_n=int(a.top_n))
    chosen = chosen.rename(columns={"label": "condition"})
    groups = set(table.columns.get_level_values(0))
    if "gene_scoring" in groups:
        genes = table["gene_scoring"]["top_genes"].fillna("")
        chosen["top_genes"] = [";".join(str(genes[f]).split(";")[:8]) for f in chosen["feature_id"]]
    enr = table["enrichment"] if "enrichment" in groups else None
    if enr is not None:
        sets = [_enriched_sets(enr, int(f), a, skip_markers=False) for f in chosen["feature_id"]]
        chosen = pd.concat([chosen, pd.DataFrame(sets, index=chosen.index)], axis=1)
    return chosen


def write_summary(run: RunData, table: pd.DataFrame, a: DictConfig, figures: list[Path]) -> Path:
    """``summary.md``: top features per cell type and per gene set, SAE vs PCA, density, modules."""
    groups = set(table.columns.get_level_values(0))
    lines = [f"# Feature summary: {run.run_dir.parent.name}/{run.run_dir.name}", "",
             f"Model {run.run_cfg.scfm.family}, layer {run.sae_cfg['layer']}, {run.sae_cfg['architecture']} SAE "
             f"with {run.n_features} features, {run.features.n_obs} cells.", ""]
    if "split" in run.features.obs:
        split = run.features.obs["split"].astype(str)
        lines += [f"Selection: every best feature per label below is chosen on the {int((split == 'train').sum())} "
                  f"train cells and its AUROC reported on the {int((split == 'eval').sum())} eval cells "
                  f"(cell representation: {run.representation}); per-feature AUROC columns of results.csv are on all cells.", ""]
    cells = cell_type_summary(run, table, a)
    if len(cells):
        n_ok, n_marker = int(cells["interpreted"].sum()), int((cells["marker_set"] != "").sum())
        lines += ["## Cell types", "",
                  f"{n_ok} of {n_marker} cell types with a marker set have a feature with eval AUROC >= "
                  f"{a.auroc_threshold} (chosen on train cells) whose top genes are enriched (FDR < {a.max_fdr}) "
                  f"for that marker set (labels of {run.cell_type_key} mapped to one marker set by data.marker_sets "
                  "are one cell type here; marker_fdr empty = not enriched).", "", _markdown(cells), ""]
    cond = condition_features(run, table, a)
    if len(cond):
        key = run.run_cfg.data.get("condition_key")
        atomic_write(run.out_dir / "condition_features.csv", lambda tmp: cond.to_csv(tmp, index=False))
        lines += [f"## Condition features: {key}", "",
                  f"Per value of {key}, the {a.top_n} features of highest train-cell AUROC (one value vs the rest) "
                  "with their eval-cell AUROC, top genes and enriched sets (condition_features.csv).", "",
                  _markdown(cond), ""]
    sig = read_table(run, "enrichment.csv") if "enrichment" in groups else None
    for coll, t in (sig.groupby("collection") if sig is not None and len(sig) else []):
        best = t.sort_values("p_value").groupby("gene_set").agg(
            n_features=("feature_id", "nunique"), best_feature=("feature_id", "first"), fdr=("fdr", "first"),
            overlap_genes=("overlap_genes", "first")).sort_values("fdr").head(int(a.summary_top_sets))
        lines += [f"## Gene sets: {coll}", "", f"Top {len(best)} of {t['gene_set'].nunique()} sets enriched "
                  f"(FDR < {a.max_fdr}) in some feature's top genes.", "", _markdown(best.reset_index()), ""]
    info = run.out_dir / "pca_comparison.json"
    base = read_table(run, "baselines.csv") if "pca_comparison" in groups else None
    if base is not None and info.is_file():
        pca = json.loads(info.read_text())
        lines += ["## SAE vs PCA and raw neurons (matched baselines)", "",
                  f"Each candidate (SAE feature; PCA direction and residual coordinate, each in both signs) is "
                  f"{pca['pooling']}-pooled over a cell's gene tokens, its top genes are the adaptive cut of its "
                  "correlation with expression, and the best one per cell type is chosen on train cells with its "
                  f"AUROC on eval cells. sae_subset: the SAE at {pca['baseline_seeds']} random subsets of the "
                  "smallest baseline's candidate count (mean over seeds). enriched_fraction: candidates with a set "
                  f"at FDR < {a.max_fdr} (BH within the method). baselines.csv has every seed.", "",
                  _markdown(baseline_summary(base)), "",
                  f"SAE decoder directions aligned with a top-{pca['n_svd_axes']} SVD axis "
                  f"(|cos| > {pca['svd_cos_threshold']}): {pca['svd_aligned_fraction']:.1%}.", ""]
        per_label = read_table(run, "pca_comparison.csv")
        if per_label is not None and len(per_label):
            lines += [_markdown(per_label), ""]
    if "gene_scoring" in groups:
        from sae4scfm.analysis.gene_scoring import top_genes_k_summary

        k = top_genes_k_summary(table["gene_scoring"]["n_top_genes"])
        lines += ["## Top genes per feature", "", f"Adaptive cut (positive tail above median + "
                  f"{a.top_genes_tail_z} x 1.4826 MAD; k = round(participation ratio of the excess), at most "
                  f"{a.top_genes}): k min {k['min']:.0f}, q25 {k['q25']:.0f}, median {k['median']:.0f}, "
                  f"q75 {k['q75']:.0f}, q90 {k['q90']:.0f}, max {k['max']:.0f}; {k['n_empty']} features have none.",
                  ""]
    unannotated = read_table(run, "unannotated.csv") if "unannotated" in groups else None
    if unannotated is not None:
        from sae4scfm.analysis.coactivation import unannotated_summary

        u = unannotated_summary(unannotated, run.n_features, min_jaccard=float(a.unannotated_min_jaccard),
                                min_cosine=float(a.unannotated_min_cosine), top=int(a.summary_top_sets))
        lines += ["## Unannotated features", "",
                  f"{u['n_unannotated']} of {u['n_features']} features ({u['fraction_unannotated']:.1%}) have no "
                  f"enriched term (FDR < {a.max_fdr}); {u['n_never_fire']} never fire. Guilt by association: "
                  f"{u['n_cofiring_partner']} co-fire with an annotated feature (Jaccard >= {a.unannotated_min_jaccard})"
                  f", {u['n_decoder_partner']} have an annotated decoder neighbour (|cos| >= "
                  f"{a.unannotated_min_cosine}); unannotated.csv has every one.", "",
                  _markdown(pd.DataFrame(u["top"])) if u["top"] else "", ""]
    if "density" in groups:
        d = table["density"]
        lines += ["## Density", "", f"Median fraction of cells a feature fires in: "
                  f"{d['cell_fraction'].astype(float).median():.3f}; features that never fire: "
                  f"{int((d['cell_fraction'].astype(float) == 0).sum())}.", ""]
    if "gene_families" in groups:
        fam = table["gene_families"]
        dominated = fam[fam["best_fraction"].astype(float) >= 0.5]["best_family"].value_counts()
        lines += ["## Gene families", "", "Features with at least half their firing tokens on one family: " +
                  (", ".join(f"{k} {v}" for k, v in dominated.items()) or "none") + ".", ""]
    mods = read_table(run, "modules.csv") if "coactivation" in groups else None
    if mods is not None:
        lines += ["## Co-activation modules", "", f"{len(mods)} Leiden modules of significantly co-firing features.",
                  "", _markdown(mods.drop(columns="features").head(int(a.summary_top_sets)).fillna("")), ""]
    cross = read_table(run, "cross_layer.csv") if "cross_layer" in groups else None
    if cross is not None:
        lines += ["## Cross-layer persistence", "", _markdown(cross), ""]
    control = read_control_comparison(run.run_dir)
    if control is not None:
        lines += ["## Trained vs random-init control", "", "The same data, layer, SAE and analysis on the model's "
                  "scfm.random_init=true twin (analysis.control=random_init; control_comparison.csv).", "",
                  control_markdown(control), ""]
    if figures:
        lines += ["## Figures", ""] + [f"![{p.stem}](figures/{p.name})" for p in figures] + [""]
    path = run.out_dir / "summary.md"
    atomic_write_text(path, "\n".join(lines))
    return path


def baseline_summary(base: pd.DataFrame) -> pd.DataFrame:
    """baselines.csv with the sae_subset seeds averaged: one row per method (``seeds`` = rows averaged)."""
    numeric = [c for c in base.columns if c not in ("method", "seed")]
    out = base.groupby("method", sort=False)[numeric].mean()
    out.insert(0, "seeds", base.groupby("method", sort=False).size())
    return out.reset_index()


def _markdown(df: pd.DataFrame) -> str:
    def fmt(v) -> str:
        if isinstance(v, (float, np.floating)):
            return "" if np.isnan(v) else f"{v:.3g}"
        return str(v).replace("|", "/")

    head = "| " + " | ".join(map(str, df.columns)) + " |"
    sep = "| " + " | ".join("---" for _ in df.columns) + " |"
    body = ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, sep, *body])
