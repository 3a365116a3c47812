"""The analyze stage's report: figures (``analysis/figures/*.png``) and ``analysis/summary.md``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from sae4scfm.analysis.labels import label_auroc
from sae4scfm.analysis.run_data import RunData, collection_name, marker_set_for, read_table
from sae4scfm.atomic import atomic_write_text


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
        best = list(dict.fromkeys(int(auc[c].idxmax()) for c in auc.columns))
        fig, ax = plt.subplots(figsize=(2.5 + 0.45 * len(best), 1.2 + 0.4 * len(auc.columns)))
        im = ax.imshow(auc.loc[best].T.to_numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(best)), [str(b) for b in best], rotation=90)
        ax.set_yticks(range(len(auc.columns)), auc.columns)
        ax.set_xlabel("feature (best per cell type)")
        fig.colorbar(im, ax=ax, label="AUROC")
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
    if pca is not None and len(pca):
        fig, ax = plt.subplots(figsize=(1.5 + 0.6 * len(pca), 3.5))
        x = np.arange(len(pca))
        ax.bar(x - 0.2, pca["sae_best_auroc"], 0.4, label="SAE feature")
        ax.bar(x + 0.2, pca["pca_best_auroc"], 0.4, label="PCA direction")
        ax.set_xticks(x, pca["label"], rotation=60, ha="right")
        ax.set_ylim(0.5, 1)
        ax.set_ylabel("best AUROC")
        ax.legend()
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
    ``data.marker_sets`` are merged, e.g. three CD4 T subsets -> ``CD4 T``; unmapped labels stay):
    among features whose AUROC (max-pooled per cell, one group vs the rest) is >= ``auroc_threshold``,
    the one whose top genes are most enriched for the group's marker set, else the best-AUROC
    feature; its AUROC, F1, top genes, marker-set FDR (NaN = not significant) and best enriched
    set of the other collections."""
    from sae4scfm.analysis.labels import label_f1

    key = run.cell_type_key
    groups = set(table.columns.get_level_values(0))
    if not key or key not in run.features.obs or "gene_scoring" not in groups:
        return pd.DataFrame()
    labels = run.features.obs[key].astype("string")
    group_of = {v: marker_set_for(run, v) or v for v in labels.dropna().unique()}
    grouped = labels.map(group_of)
    auc_all = label_auroc(run.features.X, grouped, min_cells=int(a.min_cells))
    f1_all = label_f1(run.features.X, grouped, min_cells=int(a.min_cells))
    enr = table["enrichment"] if "enrichment" in groups else None
    genes = table["gene_scoring"]["top_genes"]
    sig = read_table(run, "enrichment.csv") if enr is not None else None
    markers = sig[sig["collection"] == collection_name(a.marker_collection)] if sig is not None else None
    counts = grouped.value_counts()
    rows = []
    for group in auc_all.columns:
        auc = auc_all[group].astype(float)
        members = sorted(v for v, g in group_of.items() if g == group)
        marker_set = group if any(marker_set_for(run, v) == group for v in members) else None
        fdr = pd.Series(np.nan, index=auc.index)
        if markers is not None and marker_set:
            hits = markers[markers["gene_set"] == marker_set].set_index("feature_id")["fdr"]
            fdr.loc[hits.index.astype(int)] = hits.to_numpy()
        candidates = auc.index[auc >= float(a.auroc_threshold)]
        best = (min(candidates, key=lambda f: (np.nan_to_num(fdr[f], nan=1.0), -auc[f])) if len(candidates)
                else int(auc.idxmax()))
        row = {"cell_type": group, "labels": "; ".join(members), "n_cells": int(counts.get(group, 0)),
               "feature": int(best), "auroc": float(auc[best]), "f1": float(f1_all[group][best]),
               "marker_set": marker_set or "", "marker_fdr": float(fdr[best]),
               "top_genes": ";".join(str(genes[best]).split(";")[:8])}
        if enr is not None:
            for m in (m for m in enr.columns if m.startswith("best_set:")):
                coll = m.split(":", 1)[1]
                if coll != collection_name(a.marker_collection) and enr.loc[best, f"fdr:{coll}"] < float(a.max_fdr):
                    row[f"top_set:{coll}"] = enr.loc[best, m]
        row["interpreted"] = bool(row["auroc"] >= float(a.auroc_threshold) and row["marker_fdr"] < float(a.max_fdr))
        rows.append(row)
    return pd.DataFrame(rows)


def write_summary(run: RunData, table: pd.DataFrame, a: DictConfig, figures: list[Path]) -> Path:
    """``summary.md``: top features per cell type and per gene set, SAE vs PCA, density, modules."""
    groups = set(table.columns.get_level_values(0))
    lines = [f"# Feature summary: {run.run_dir.parent.name}/{run.run_dir.name}", "",
             f"Model {run.run_cfg.scfm.family}, layer {run.sae_cfg['layer']}, {run.sae_cfg['architecture']} SAE "
             f"with {run.n_features} features, {run.features.n_obs} cells.", ""]
    cells = cell_type_summary(run, table, a)
    if len(cells):
        n_ok, n_marker = int(cells["interpreted"].sum()), int((cells["marker_set"] != "").sum())
        lines += ["## Cell types", "",
                  f"{n_ok} of {n_marker} cell types with a marker set have a feature with AUROC >= "
                  f"{a.auroc_threshold} whose top genes are enriched (FDR < {a.max_fdr}) for that marker set "
                  f"(labels of {run.cell_type_key} mapped to one marker set by data.marker_sets are one cell "
                  "type here; marker_fdr empty = not enriched).", "", _markdown(cells), ""]
    sig = read_table(run, "enrichment.csv") if "enrichment" in groups else None
    for coll, t in (sig.groupby("collection") if sig is not None and len(sig) else []):
        best = t.sort_values("p_value").groupby("gene_set").agg(
            n_features=("feature_id", "nunique"), best_feature=("feature_id", "first"), fdr=("fdr", "first"),
            overlap_genes=("overlap_genes", "first")).sort_values("fdr").head(int(a.summary_top_sets))
        lines += [f"## Gene sets: {coll}", "", f"Top {len(best)} of {t['gene_set'].nunique()} sets enriched "
                  f"(FDR < {a.max_fdr}) in some feature's top genes.", "", _markdown(best.reset_index()), ""]
    info = run.out_dir / "pca_comparison.json"
    if "pca_comparison" in groups and info.is_file():
        pca = json.loads(info.read_text())
        lines += ["## SAE vs PCA", "", f"SAE decoder directions aligned with a top-{pca['n_svd_axes']} SVD axis "
                  f"(|cos| > {pca['svd_cos_threshold']}): {pca['svd_aligned_fraction']:.1%}.", ""]
        lines += [f"- {coll}: {n['sae']} of {pca['n_features']} SAE features vs {n['pca']} of "
                  f"{pca['n_pca_directions']} PCA directions have an enriched set (FDR < {a.max_fdr})."
                  for coll, n in pca["n_enriched"].items()]
        table_pca = read_table(run, "pca_comparison.csv")
        lines += ["", _markdown(table_pca) if table_pca is not None and len(table_pca) else "", ""]
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
    if figures:
        lines += ["## Figures", ""] + [f"![{p.stem}](figures/{p.name})" for p in figures] + [""]
    path = run.out_dir / "summary.md"
    atomic_write_text(path, "\n".join(lines))
    return path


def _markdown(df: pd.DataFrame) -> str:
    def fmt(v) -> str:
        if isinstance(v, (float, np.floating)):
            return "" if np.isnan(v) else f"{v:.3g}"
        return str(v).replace("|", "/")

    head = "| " + " | ".join(map(str, df.columns)) + " |"
    sep = "| " + " | ".join("---" for _ in df.columns) + " |"
    body = ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, sep, *body])
