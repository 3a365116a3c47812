"""The ``analyze_features`` stage: what each SAE feature means biologically.

Runs the analyses switched on in ``cfg.analysis`` (``config/analyze.yaml``) on a run's
``features/features.h5ad`` (cells x features) and ``features/token_features.h5ad``
(tokens x features), and writes into ``<run>/analysis/``:

- ``results.{parquet,csv}``: one row per feature, columns ``(analysis, metric)``, and
  ``results_long.{parquet,csv}``: the same numbers as rows ``(feature_id, analysis, label_key,
  label, metric, value, text)``; a re-run of one analysis replaces only its part of both
  (``sae4scfm.analysis.results``);
- ``features/features.h5ad``: each analysis's per-feature table also goes into ``var``
  (columns ``<analysis>:<metric>``) and its parameters into ``uns[<analysis>]``, as scanpy does
  (``analysis.key_added=K`` makes the prefix ``K_<analysis>``);
- long tables: ``gene_scores.parquet`` (feature x gene token scores), ``enrichment.csv``
  (significant Fisher tests), ``gsea.csv``, ``pca_comparison.csv``, ``coactivation_pairs.csv``,
  ``modules.csv``, ``cross_layer.csv``;
- ``figures/*.png`` and ``summary.md``: the top features per cell type and per gene set.

The gene universe of every gene-level statistic is the genes the model saw: the genes of the
run's tokens (its vocabulary intersected with the dataset, after any HVG subset).
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from omegaconf import DictConfig, OmegaConf

from sae4scfm.analysis.labels import INDEX_NAME, label_scoring, select_on_train, train_mask
from sae4scfm.analysis.primitives import fire_counts
from sae4scfm.analysis.report import pooled_rows, write_figures, write_summary
from sae4scfm.analysis.results import labelled, read_results, update_results, write_feature_annotations
from sae4scfm.analysis.run_data import (
    GENE_NAME,
    RunData,
    collection_name,
    load_run_data,
    marker_set_for,
    need_tokens,
    read_run_features,
)
from sae4scfm.atomic import atomic_write, atomic_write_text
from sae4scfm.errors import InputError
from sae4scfm.memory import release_freed_memory
from sae4scfm.runs import resolve_run_dir

ANALYSES = ("label_scoring", "gene_scoring", "enrichment", "gene_families", "density",
            "pca_comparison", "coactivation", "unannotated", "cross_layer")


# --------------------------------------------------------------------------- inputs


def _frame(columns: dict, n: int) -> pd.DataFrame:
    return pd.DataFrame(columns, index=pd.RangeIndex(n, name=INDEX_NAME))


# --------------------------------------------------------------------------- analyses


def run_label_scoring(run: RunData, a: DictConfig) -> pd.DataFrame:
    """AUROC / best-threshold F1 / AMI per feature x label; ``pooling`` max | mean (per cell) or token.

    Per-feature columns are on all cells; ``best:{key}`` is chosen on the train cells and
    ``best_eval_auroc:{key}`` is on the eval cells (``labels.select_on_train``)."""
    data_cfg = run.run_cfg.data
    keys = label_keys(run, a)
    if not keys:
        raise InputError("analysis.label_keys is not set and the run's dataset names no cell_type_key; "
                         "set analysis.label_keys=[<obs column>].")
    X, obs = pooled_rows(run, a)
    is_train = train_mask(obs, f"{run.run_dir}/features/features.h5ad")
    batch_key = data_cfg.batch_key if a.batch_flag else None
    scores = label_scoring(X, obs, keys, min_cells=int(a.min_cells), metrics=list(a.label_metrics),
                           batch_key=batch_key, cell_type_key=data_cfg.cell_type_key,
                           batch_auroc_threshold=float(a.batch_auroc_threshold), is_train=is_train)
    for key in keys:
        print(f"top features for {key} (ranked by train-cell AUROC; eval-cell AUROC shown, "
              f"{int((~is_train).sum())} eval cells):")
        top = select_on_train(X, obs[key], is_train, min_cells=int(a.min_cells), top_n=int(a.top_n))
        for value, rows in top.groupby("label", sort=False):
            print(f"  {str(value):<32s} " + ", ".join(f"{r.feature_id} ({r.eval_auroc:.3f})" for r in rows.itertuples()))
    if "batch_associated" in scores:
        print(f"batch-associated features ({batch_key}, all cells): "
              f"{int(scores['batch_associated'].sum())} of {len(scores)}")
    return scores


def feature_gene_score_chunks(run: RunData, a: DictConfig, features=None):
    """Blocks (feature slice, [chunk, genes]) of the score that ranks each feature's genes
    (``analysis.gene_score``), and the genes; ``features`` (ids) restricts it to those rows.

    correlation: Pearson r of the feature (max-pooled per cell) with each gene's log1p CP10k
    expression over cells. token_specificity: log2 enrichment of the gene among the feature's
    firing tokens (pairs with fewer than ``min_gene_tokens`` firing tokens score NaN).
    Never a dense [features, genes] whole (``gene_scoring.correlation_chunks``).
    """
    from sae4scfm.analysis.gene_scoring import correlation_chunks, table_score_chunks, token_gene_scores

    expr, genes = run.expression()
    if a.gene_score == "correlation":
        X = run.features.X if features is None else run.features.X[:, features]
        return correlation_chunks(X, expr), genes
    if a.gene_score == "token_specificity":
        table = token_gene_scores(need_tokens(run, "analysis.gene_score=token_specificity"), gene_key=GENE_NAME)
        table = table[table["n_fire"] >= int(a.min_gene_tokens)]
        n = run.n_features
        if features is not None:
            position = pd.Series(np.arange(len(features)), index=features)
            table = table[table["feature_id"].isin(features)]
            table = table.assign(feature_id=position.loc[table["feature_id"]].to_numpy())
            n = len(features)
        return table_score_chunks(table, "log2_enrichment", n_features=n, genes=genes, fill=np.nan), genes
    raise InputError(f"analysis.gene_score={a.gene_score!r}: use correlation or token_specificity.")


def gene_summary(run: RunData, a: DictConfig) -> dict:
    """``gene_scoring.feature_gene_summary`` of the gene score (top genes, PR, tail threshold), cached."""
    from sae4scfm.analysis.gene_scoring import feature_gene_summary

    if "gene_summary" not in run.cache:
        chunks, genes = feature_gene_score_chunks(run, a)
        run.cache["gene_summary"] = feature_gene_summary(chunks, genes, run.n_features, n=int(a.top_genes),
                                                         tail_z=float(a.top_genes_tail_z))
    return run.cache["gene_summary"]


def feature_top_genes(run: RunData, a: DictConfig) -> dict[int, list[str]]:
    """Each feature's top genes: the adaptive cut (participation ratio of the positive tail above
    ``top_genes_tail_z`` noise sigmas, at most ``top_genes``; ``gene_scoring.top_genes``)."""
    return gene_summary(run, a)["top"]


def run_gene_scoring(run: RunData, a: DictConfig) -> pd.DataFrame:
    """Per-token (frequency, mean activation, specificity per gene) and per-cell (Pearson r) gene scores."""
    from sae4scfm.analysis.gene_scoring import (
        correlation_chunks,
        feature_gene_summary,
        token_gene_scores,
        top_genes_k_summary,
    )

    n = run.n_features
    cols: dict[str, object] = {}
    if run.tokens is not None:
        table = token_gene_scores(run.tokens, gene_key=GENE_NAME)
        atomic_write(run.out_dir / "gene_scores.parquet", table.to_parquet)
        freq = table[table["n_fire"] >= int(a.min_gene_tokens)].sort_values(["feature_id", "freq"],
                                                                            ascending=[True, False])
        best = freq.groupby("feature_id").head(int(a.top_genes)).groupby("feature_id")["gene"]
        cols["top_token_genes"] = best.agg(lambda g: ";".join(map(str, g))).reindex(range(n)).fillna("").to_numpy()
    summary = gene_summary(run, a)
    adaptive, fixed = summary["top"], summary["top_fixed"]
    cols["top_genes"] = [";".join(adaptive.get(i, [])) for i in range(n)]
    cols["n_top_genes"] = [len(adaptive.get(i, [])) for i in range(n)]
    cols["top_genes_fixed"] = [";".join(fixed.get(i, [])) for i in range(n)]
    cols["participation_ratio"] = summary["participation_ratio"]
    cols["tail_threshold"] = summary["tail_threshold"]
    k = top_genes_k_summary(cols["n_top_genes"])
    print(f"adaptive top genes per feature (k, at most {int(a.top_genes)}): "
          + ", ".join(f"{q} {k[q]:g}" for q in ("min", "q10", "q25", "median", "q75", "q90", "max"))
          + f"; {k['n_empty']} of {k['n_features']} features without a tail (no top genes)")
    if a.gene_score == "correlation":
        cols["max_gene_corr"] = summary["max_score"]
    else:
        expr, genes = run.expression()
        cols["max_gene_corr"] = feature_gene_summary(correlation_chunks(run.features.X, expr), genes, n,
                                                     n=int(a.top_genes))["max_score"]
    return _frame(cols, n)


def enrichment_tables(run: RunData, a: DictConfig, top: dict[int, list[str]]) -> dict[str, pd.DataFrame]:
    """Fisher enrichment of ``top`` genes against every collection of ``analysis.gene_sets``:
    {collection: every tested pair with overlap >= 1}; BH FDR over all features x sets of a collection."""
    from sae4scfm.analysis.enrichment import fisher_enrichment, load_gene_sets

    out = {}
    for name in a.gene_sets:
        sets = load_gene_sets(name)
        out[collection_name(name)] = fisher_enrichment(top, sets, run.universe(), min_size=int(a.min_set_size))
    return out


def run_enrichment(run: RunData, a: DictConfig) -> pd.DataFrame:
    """Best gene set per feature and collection (Fisher FDR), plus prerank GSEA of selected features."""
    n = run.n_features
    tables = enrichment_tables(run, a, feature_top_genes(run, a))
    cols, keys, significant = {}, {}, []
    for coll, t in tables.items():
        keys.update({f"{m}:{coll}": (coll, None, m) for m in ("best_set", "fdr", "overlap", "n_significant")})
        best = t.sort_values(["p_value", "overlap"], ascending=[True, False]).groupby("feature_id").head(1)
        best = best.set_index("feature_id").reindex(range(n))
        cols[f"best_set:{coll}"] = best["gene_set"].fillna("").to_numpy()
        cols[f"fdr:{coll}"] = best["fdr"].fillna(1.0).to_numpy()
        cols[f"overlap:{coll}"] = best["overlap"].fillna(0).astype(int).to_numpy()
        cols[f"n_significant:{coll}"] = (t[t["fdr"] < float(a.max_fdr)].groupby("feature_id").size()
                                         .reindex(range(n)).fillna(0).astype(int).to_numpy())
        significant.append(t[t["fdr"] < float(a.max_fdr)].assign(collection=coll))
    sig = pd.concat(significant, ignore_index=True) if significant else pd.DataFrame(columns=["collection"])
    atomic_write(run.out_dir / "enrichment.csv", lambda tmp: sig.to_csv(tmp, index=False))
    if a.run_gsea:
        run_prerank(run, a)
    return labelled(_frame(cols, n), keys)


def run_prerank(run: RunData, a: DictConfig) -> pd.DataFrame:
    """Prerank GSEA (blitzgsea) of the gene scores of the best feature per cell type, chosen on
    the train cells (``select_on_train``; or the ``gsea_features`` most active features when the run
    has no cell-type labels)."""
    from sae4scfm.analysis.enrichment import load_gene_sets, prerank_gsea

    if run.cell_type_key and run.cell_type_key in run.features.obs:
        X, obs = pooled_rows(run, a)
        best = select_on_train(X, obs[run.cell_type_key], train_mask(obs), min_cells=int(a.min_cells))
        chosen = sorted(set(best["feature_id"].astype(int)))
    else:
        density = fire_counts(run.features.X)
        chosen = np.argsort(-density)[: int(a.gsea_features)].tolist()
    chunks, genes = feature_gene_score_chunks(run, a, features=chosen)
    scores = np.vstack([block for _, block in chunks]) if chosen else np.zeros((0, len(genes)))  # chosen rows only
    rows = []
    for name in a.gsea_gene_sets:
        sets = load_gene_sets(name)
        for row, f in enumerate(chosen):
            s = pd.Series(scores[row], index=genes).dropna()
            res = prerank_gsea(s, sets, min_size=int(a.min_set_size), permutations=int(a.gsea_permutations),
                               seed=int(run.run_cfg.seed))
            rows.append(res.assign(feature_id=f, collection=collection_name(name)))
    out = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()
    atomic_write(run.out_dir / "gsea.csv", lambda tmp: out.to_csv(tmp, index=False))
    print(f"prerank GSEA of {len(chosen)} features: {run.out_dir / 'gsea.csv'}")
    return out


def run_gene_families(run: RunData, a: DictConfig) -> pd.DataFrame:
    """Fraction of each feature's firing tokens on each gene family (``analysis.gene_families``)."""
    from sae4scfm.analysis.gene_scoring import gene_family_scores, token_gene_scores

    table = token_gene_scores(need_tokens(run, "analysis.run_gene_families"), gene_key=GENE_NAME)
    families = dict(a.gene_families) if a.gene_families else None
    scores = gene_family_scores(table, families=families)
    out = scores.reindex(range(run.n_features))
    out.index.name = INDEX_NAME
    return labelled(out, scores.attrs["tidy"])


def run_density(run: RunData, a: DictConfig) -> pd.DataFrame:
    """Activation density (fraction of cells and tokens) and library size where each feature fires."""
    from sae4scfm.analysis.gene_scoring import density_scores, expression_where_firing

    dens = density_scores(run.features.X, None if run.tokens is None else run.tokens.X)
    expr = expression_where_firing(run.features.X, run.library_size())
    out = pd.concat([dens.reset_index(drop=True), expr.add_prefix("library_size_").reset_index(drop=True)], axis=1)
    out.index = pd.RangeIndex(run.n_features, name=INDEX_NAME)
    return out


def activation_pcs(run: RunData, a: DictConfig) -> dict:
    """PCA of the run's token activations at its layer (train store sample, centred) and the
    matched baseline candidates, pooled per cell exactly as the SAE features (``analysis.pooling``
    max | mean over the cell's gene tokens):

    - ``axes`` [n_svd_axes, d]: top right singular vectors;
    - ``pca`` [cells, 2 n_pcs]: pooled signed projection on axis k, PCk+ (+v_k) then PCk- (-v_k);
      ``n_pcs`` null = every axis (min(d, sample) of them);
    - ``neurons`` [cells, 2 d]: pooled signed residual coordinates, n+ (+e_n) then n- (-e_n);
    - ``pca_names`` / ``neuron_names``: the candidates' names, in column order.
    """
    from sae4scfm.scfm.loading import load_model_and_data
    from sae4scfm.store.extract import activation_stores

    pooling = _baseline_pooling(run, a)
    layer = int(run.sae_cfg["layer"])
    adapter, adata, tokens = load_model_and_data(run.run_cfg, "cpu")
    stores = activation_stores(run.run_cfg, adapter, adata, tokens, [layer])
    sample = stores["train"][layer].sample(int(a.pca_max_tokens), seed=int(run.run_cfg.seed)).double()
    mean = sample.mean(0)
    _, _, Vh = torch.linalg.svd(sample - mean, full_matrices=False)
    n_pcs = Vh.shape[0] if a.n_pcs is None else min(int(a.n_pcs), Vh.shape[0])
    d = Vh.shape[1]
    width = 2 * n_pcs + 2 * d
    init = -torch.inf if pooling == "max" else 0.0
    pooled = torch.full((adata.n_obs, width), init, dtype=torch.float64)
    counts = torch.zeros(adata.n_obs, dtype=torch.float64)
    for split in ("train", "eval"):
        for shard in stores[split][layer].iter_shards():
            genes = shard["special"] == 0 if "special" in shard else slice(None)
            h, cell = shard["acts"][genes].double(), shard["cell"][genes].long()
            proj = (h - mean) @ Vh[:n_pcs].T
            cand = torch.cat([proj, -proj, h, -h], dim=1)  # [tokens, width]
            if pooling == "max":
                pooled.scatter_reduce_(0, cell[:, None].expand_as(cand), cand, "amax")
            else:
                pooled.index_add_(0, cell, cand)
            counts.index_add_(0, cell, torch.ones(len(cell), dtype=torch.float64))
    if pooling == "mean":
        pooled /= counts.clamp(min=1)[:, None]
    pooled[counts == 0] = 0.0  # cells without gene tokens, as the SAE features
    pooled = pooled.numpy()
    return {"axes": Vh[: int(a.n_svd_axes)].float(), "pca": pooled[:, : 2 * n_pcs], "neurons": pooled[:, 2 * n_pcs :],
            "pca_names": [f"PC{i + 1}{s}" for s in "+-" for i in range(n_pcs)],
            "neuron_names": [f"n{i}{s}" for s in "+-" for i in range(d)]}


def run_pca_comparison(run: RunData, a: DictConfig) -> pd.DataFrame:
    """Matched baselines: SAE features vs PCA directions vs raw residual neurons, each candidate
    pooled per cell as the SAE features, scored by the same rules (``baseline_table``), plus each
    decoder direction's best |cos| with the top SVD axes of the same activations.

    Writes ``baselines.csv`` (per method), ``pca_comparison.csv`` (per cell type) and
    ``pca_comparison.json`` (SVD alignment and the matching)."""
    from sae4scfm.saes.base import load_sae

    pcs = activation_pcs(run, a)
    X, _ = pooled_rows(run, a)
    methods = {"sae": (X, [str(i) for i in range(run.n_features)]), "pca": (pcs["pca"], pcs["pca_names"]),
               "neurons": (pcs["neurons"], pcs["neuron_names"])}
    per_method, per_label = baseline_table(run, a, methods)
    sae, _ = load_sae(run.run_dir)
    W = torch.nn.functional.normalize(sae.W_dec.detach().float(), dim=1)
    cos = (W @ pcs["axes"].T).abs().max(1).values.numpy()
    aligned = float((cos > float(a.svd_cos_threshold)).mean())
    atomic_write_text(run.out_dir / "pca_comparison.json", json.dumps({
        "n_features": run.n_features, "n_pca_directions": len(pcs["pca_names"]),
        "n_neuron_directions": len(pcs["neuron_names"]), "pooling": _baseline_pooling(run, a),
        "n_svd_axes": int(pcs["axes"].shape[0]), "svd_cos_threshold": float(a.svd_cos_threshold),
        "svd_aligned_fraction": aligned, "baseline_seeds": int(a.baseline_seeds)}, indent=1))
    atomic_write(run.out_dir / "baselines.csv", lambda tmp: per_method.to_csv(tmp, index=False))
    atomic_write(run.out_dir / "pca_comparison.csv", lambda tmp: per_label.to_csv(tmp, index=False))
    shown = [c for c in per_method.columns if c in ("method", "seed", "n_candidates", "mean_eval_auroc")
             or c.startswith("enriched_fraction:")]
    print(f"matched baselines ({_baseline_pooling(run, a)}-pooled; best per cell type chosen on train cells, AUROC on eval cells):")
    print(per_method[shown].to_string(index=False))
    print(f"SAE decoder directions aligned with a top-{pcs['axes'].shape[0]} SVD axis "
          f"(|cos| > {a.svd_cos_threshold}): {aligned:.1%}")
    return _frame({"max_svd_cos": cos}, run.n_features)


def _coactivation_rows(run: RunData, a: DictConfig):
    """The rows co-firing is counted on (``analysis.coactivation_rows``): cells [cells, features]
    (max-pooled features.h5ad, the default) or tokens [tokens, features]."""
    rows = a.get("coactivation_rows", "cells")
    if rows == "tokens":
        return need_tokens(run, "analysis.coactivation_rows=tokens").X
    if rows == "cells":
        return run.features.X
    raise InputError(f"analysis.coactivation_rows={rows!r}: use cells (default) or tokens.")


def run_coactivation(run: RunData, a: DictConfig) -> pd.DataFrame:
    """Significant co-firing pairs (hypergeometric, BH over all feature pairs), PMI, and Leiden modules
    labelled by the most common best gene set (and cell type) of their member features."""
    from sae4scfm.analysis.coactivation import coactivation_modules, significant_pairs

    pairs = significant_pairs(_coactivation_rows(run, a), min_count=int(a.coactivation_min_count),
                              max_fdr=float(a.max_fdr))
    atomic_write(run.out_dir / "coactivation_pairs.csv", lambda tmp: pairs.to_csv(tmp, index=False))
    module = coactivation_modules(pairs, run.n_features, resolution=float(a.leiden_resolution),
                                  seed=int(run.run_cfg.seed))
    results = read_results(run.out_dir) if (run.out_dir / "results.parquet").is_file() else pd.DataFrame()
    rows = []
    for m in range(module.max() + 1):
        members = np.flatnonzero(module == m)
        row = {"module": m, "size": len(members), "features": ";".join(map(str, members))}
        for (analysis, metric) in results.columns:
            label_col = (analysis == "enrichment" and metric.startswith("best_set:")) or \
                        (analysis == "label_scoring" and metric == f"best:{run.cell_type_key}")
            if not label_col:
                continue
            vals = results.loc[members, (analysis, metric)]
            if analysis == "enrichment":
                fdr = results.loc[members, (analysis, metric.replace("best_set:", "fdr:"))]
                vals = vals[fdr < float(a.max_fdr)]
            else:
                vals = vals[results.loc[members, (analysis, f"best_eval_auroc:{run.cell_type_key}")] >= float(a.auroc_threshold)]
            row[f"label:{metric.split(':', 1)[1]}"] = vals.mode().iloc[0] if len(vals) else ""
        rows.append(row)
    modules = pd.DataFrame(rows) if rows else pd.DataFrame(columns=["module", "size", "features"])
    atomic_write(run.out_dir / "modules.csv", lambda tmp: modules.to_csv(tmp, index=False))
    degree = np.bincount(np.concatenate([pairs["i"], pairs["j"]]).astype(np.int64), minlength=run.n_features)
    print(f"co-activation on {a.get('coactivation_rows', 'cells')}: {len(pairs)} significant pairs of "
          f"{pairs.attrs['n_tests']} tested (BH over all pairs), {module.max() + 1} modules")
    return _frame({"module": module, "n_partners": degree[: run.n_features]}, run.n_features)


def run_cross_layer(run: RunData, a: DictConfig, runs_dir) -> pd.DataFrame:
    """Match this run's features to those of other runs (other layers, same tokens) by decoder
    cosine and by co-firing Jaccard; persistence = fraction of features matched."""
    from sae4scfm.analysis.coactivation import match_by_cofiring, match_by_decoder, persistence
    from sae4scfm.saes.base import load_sae

    if not a.cross_layer_runs:
        raise InputError("analysis.run_cross_layer=true needs analysis.cross_layer_runs=[<experiment>/<timestamp>, ...] "
                         "(runs on other layers of the same model and data).")
    tokens = need_tokens(run, "analysis.run_cross_layer")
    sae, _ = load_sae(run.run_dir)
    cols, keys, rows = {}, {}, []
    for address in a.cross_layer_runs:
        experiment, _, stamp = str(address).partition("/")
        other_dir = resolve_run_dir(runs_dir, experiment, stamp or "latest")
        other_file = other_dir / "features" / "token_features.h5ad"
        other = read_run_features(other_dir, "token_features.h5ad")
        same = other.n_obs == tokens.n_obs and all(
            np.array_equal(other.obs[c].to_numpy(), tokens.obs[c].to_numpy()) for c in ("cell_index", "gene_id"))
        if not same:
            raise InputError(f"{other_file} is not on the same tokens as {run.run_dir} (different model, data or "
                             "tokenization); cross-layer matching needs runs on the same model and dataset.")
        other_sae, other_cfg = load_sae(other_dir)
        if other_sae.d_in != sae.d_in:
            raise InputError(f"{address}: its SAE has d_in={other_sae.d_in}, this run's {sae.d_in}; not the same model.")
        layer = int(other_cfg["layer"])
        dec = match_by_decoder(sae.W_dec.detach(), other_sae.W_dec.detach())
        fire = match_by_cofiring(tokens.X, other.X).set_index("feature_a").reindex(range(run.n_features))
        cols[f"decoder_match@{layer}"] = dec["best_b"].to_numpy()
        cols[f"decoder_cos@{layer}"] = dec["cosine"].to_numpy()
        cols[f"cofiring_match@{layer}"] = fire["best_b"].fillna(-1).astype(int).to_numpy()
        cols[f"jaccard@{layer}"] = fire["jaccard"].to_numpy()
        keys.update({f"{m}@{layer}": ("layer", str(layer), m)
                     for m in ("decoder_match", "decoder_cos", "cofiring_match", "jaccard")})
        rows.append({"run": str(other_dir), "layer_a": int(run.sae_cfg["layer"]), "layer_b": layer,
                     "decoder_persistence": persistence(dec, float(a.cross_layer_cosine)),
                     "cofiring_persistence": persistence(fire.reset_index(), float(a.cross_layer_jaccard))})
    table = pd.DataFrame(rows)
    atomic_write(run.out_dir / "cross_layer.csv", lambda tmp: table.to_csv(tmp, index=False))
    print(table.to_string(index=False))
    return labelled(_frame(cols, run.n_features), keys)


def label_keys(run: RunData, a: DictConfig) -> list[str]:
    """The obs columns label scoring scores: ``analysis.label_keys``, else the dataset's
    cell_type_key, batch_key and condition_key (those it names)."""
    data_cfg = run.run_cfg.data
    if a.label_keys:
        return list(a.label_keys)
    return [k for k in (data_cfg.get("cell_type_key"), data_cfg.get("batch_key"), data_cfg.get("condition_key")) if k]


def _baseline_pooling(run: RunData, a: DictConfig) -> str:
    """How PCA and neuron candidates are pooled per cell to match the SAE's cell representation: max for
    max, else mean (mean of token latents, SAE of the mean vector; cell-level SAEs read one row per cell)."""
    if a.get("pooling") == "token":
        raise InputError("analysis.run_pca_comparison pools its PCA and neuron candidates per cell as the SAE "
                         "features; analysis.pooling='token' is not a cell representation: use null, max, mean, "
                         "sae_of_mean or the cell-level SAE's hook point.")
    return "max" if run.representation == "max" else "mean"


def candidate_top_genes(run: RunData, a: DictConfig, M) -> dict[int, list[str]]:
    """Adaptive top genes of each candidate (column of M [cells, candidates]): Pearson r with
    log1p CP10k expression over cells, cut as the SAE's (``top_genes_tail_z``, at most ``top_genes``)."""
    from sae4scfm.analysis.gene_scoring import cell_gene_correlation, top_genes

    expr, genes = run.expression()
    return top_genes(cell_gene_correlation(sp.csr_matrix(M), expr), genes, n=int(a.top_genes), adaptive=True,
                     tail_z=float(a.top_genes_tail_z))


def _score_candidates(run: RunData, a: DictConfig, M, names: list[str], columns=None) -> tuple[dict, pd.DataFrame | None, dict]:
    """One method's numbers: ({metric: value}, train-selected best per cell type, {coll: table}) of the
    candidates ``columns`` (default all) of M [cells, candidates] (ids in the tables = column positions)."""
    cols = np.arange(M.shape[1]) if columns is None else np.asarray(columns)
    sub = M[:, cols]
    top = candidate_top_genes(run, a, sub)
    tables = enrichment_tables(run, a, top)
    row = {"n_candidates": len(cols)}
    best = None
    if run.cell_type_key and run.cell_type_key in run.features.obs:
        obs = run.features.obs
        best = select_on_train(sub, obs[run.cell_type_key], train_mask(obs), min_cells=int(a.min_cells))
        best["candidate"] = [names[cols[f]] for f in best["feature_id"]]
        row["mean_eval_auroc"] = float(best["eval_auroc"].mean())
        row.update({f"eval_auroc:{v}": x for v, x in zip(best["label"], best["eval_auroc"])})
        marker_coll = collection_name(a.marker_collection)
        if marker_coll in tables:
            t = tables[marker_coll]
            best["marker_set"] = [marker_set_for(run, str(v)) or "" for v in best["label"]]
            best["marker_fdr"] = [_pair_fdr(t, f, m) if m else np.nan for f, m in zip(best["feature_id"], best["marker_set"])]
    for coll, t in tables.items():
        row[f"enriched_fraction:{coll}"] = t.loc[t["fdr"] < float(a.max_fdr), "feature_id"].nunique() / len(cols)
    return row, best, tables


def _pair_fdr(table: pd.DataFrame | None, feature, gene_set: str) -> float:
    if table is None:
        return float("nan")
    hit = table[(table["feature_id"] == feature) & (table["gene_set"] == gene_set)]
    return float(hit["fdr"].iloc[0]) if len(hit) else 1.0


def baseline_table(run: RunData, a: DictConfig, methods: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Matched comparison of candidate sets {method: (M [cells, candidates], names)} ("sae" first).

    Every method: the same cells and pooling (its M), the same selection (``select_on_train`` on the
    cell-type labels: chosen on train cells, eval AUROC reported), the same gene scoring
    (``candidate_top_genes``) and enrichment (``enrichment_tables``; BH within the method's
    candidates). When the SAE has more candidates than the smallest baseline, it is also scored at
    ``baseline_seeds`` random subsets of that size (method ``sae_subset``, one row per seed): the
    count-matched numbers. Returns (per method: method, seed, n_candidates, mean_eval_auroc,
    eval_auroc:<type>, enriched_fraction:<collection>; per cell type: label, n_train, n_eval and
    per method <method>_candidate / _train_auroc / _eval_auroc / _marker_fdr; sae_subset: mean eval AUROC).
    """
    rows, per_label = [], None
    for method, (M, names) in methods.items():
        row, best, _ = _score_candidates(run, a, M, names)
        rows.append({"method": method, "seed": np.nan, **row})
        if best is not None:
            part = best.set_index("label")[["candidate", "train_auroc", "eval_auroc"]
                                           + (["marker_fdr"] if "marker_fdr" in best else [])].add_prefix(f"{method}_")
            per_label = (best.set_index("label")[["n_train", "n_eval"]
                                                 + (["marker_set"] if "marker_set" in best else [])].join(part)
                         if per_label is None else per_label.join(part))
    M, names = methods["sae"]
    n_match = min(m.shape[1] for k, (m, _) in methods.items() if k != "sae")
    if M.shape[1] > n_match:
        subset_auc = []
        for s in range(int(a.baseline_seeds)):
            cols = np.sort(np.random.default_rng([int(run.run_cfg.seed), s]).choice(M.shape[1], n_match, replace=False))
            row, best, _ = _score_candidates(run, a, M, names, cols)
            rows.append({"method": "sae_subset", "seed": s, **row})
            if best is not None:
                subset_auc.append(best.set_index("label")["eval_auroc"])
        if subset_auc and per_label is not None:
            per_label["sae_subset_eval_auroc"] = pd.concat(subset_auc, axis=1).mean(axis=1)
    per_label = per_label.reset_index() if per_label is not None else pd.DataFrame()
    return pd.DataFrame(rows), per_label


def annotated_features(run: RunData, a: DictConfig) -> tuple[np.ndarray, np.ndarray]:
    """From the run's enrichment results: bool [features] (an enriched term, FDR < ``max_fdr``, in any
    collection) and the best term of each (``<collection>:<set>`` of the smallest FDR; "" if none)."""
    results = read_results(run.out_dir) if (run.out_dir / "results.parquet").is_file() else pd.DataFrame()
    fdr_cols = [m for (an, m) in results.columns if an == "enrichment" and m.startswith("fdr:")]
    if not fdr_cols:
        raise InputError(f"analysis.run_unannotated needs the enrichment results of {run.run_dir}: set "
                         "analysis.run_enrichment=true (in the same call or an earlier one).")
    fdr = np.column_stack([results[("enrichment", m)].to_numpy(dtype=np.float64) for m in fdr_cols])
    sets = np.column_stack([results[("enrichment", m.replace("fdr:", "best_set:", 1))].astype(str).to_numpy()
                            for m in fdr_cols])
    best = np.argmin(fdr, axis=1)
    rows = np.arange(len(fdr))
    annotated = fdr[rows, best] < float(a.max_fdr)
    colls = np.asarray([m.split(":", 1)[1] for m in fdr_cols], dtype=object)
    terms = np.where(annotated, colls[best] + ":" + sets[rows, best].astype(object), "")
    return annotated, terms


def run_unannotated(run: RunData, a: DictConfig) -> pd.DataFrame:
    """Features with no enriched term in any collection, characterised by their best co-firing annotated
    partner (Jaccard, PMI; rows = ``coactivation_rows``) and their closest annotated decoder direction,
    with the partners' best terms: ``analysis/unannotated.csv`` (``coactivation.guilt_by_association``)."""
    from sae4scfm.analysis.coactivation import guilt_by_association, unannotated_summary
    from sae4scfm.saes.base import load_sae

    annotated, terms = annotated_features(run, a)
    sae, _ = load_sae(run.run_dir)
    table = guilt_by_association(_coactivation_rows(run, a), sae.W_dec.detach(), annotated, terms)
    atomic_write(run.out_dir / "unannotated.csv", lambda tmp: table.to_csv(tmp, index=False))
    s = unannotated_summary(table, run.n_features, min_jaccard=float(a.unannotated_min_jaccard),
                            min_cosine=float(a.unannotated_min_cosine))
    print(f"unannotated features: {s['n_unannotated']} of {s['n_features']} ({s['fraction_unannotated']:.1%}; "
          f"{s['n_never_fire']} never fire); co-firing partner with Jaccard >= {s['min_jaccard']}: "
          f"{s['n_cofiring_partner']}, decoder partner with |cos| >= {s['min_cosine']}: {s['n_decoder_partner']}")
    per_feature = table.set_index("feature_id").drop(columns=["n_fire"]).reindex(range(run.n_features))
    out = _frame({"annotated": annotated.astype(np.int64), "term": terms.astype(str)}, run.n_features)
    for col in per_feature.columns:
        vals = per_feature[col]
        out[col] = vals.fillna("").astype(str).to_numpy() if col.endswith("_term") else vals.to_numpy()
    return out


# --------------------------------------------------------------------------- entry point


def analyze_features(cfg: DictConfig) -> pd.DataFrame:
    """Run the analyses switched on in ``cfg.analysis`` (``run_<analysis>=true``) on a run's features;
    returns the updated results table (also written with figures and ``summary.md``). With
    ``analysis.control=random_init`` the same analyses also run on the run's random-init twin and
    ``analysis/control_comparison.csv`` is written (``sae4scfm.analysis.control``)."""
    from sae4scfm.analysis.control import analyze_control, control_name

    a = cfg.analysis
    selected = [name for name in ANALYSES if a.get(f"run_{name}")]
    if not selected:
        raise InputError("no analysis selected; set e.g. analysis.run_label_scoring=true "
                         f"(available: {', '.join('run_' + n for n in ANALYSES)}).")
    control = control_name(cfg)  # a bad value stops before any analysis runs
    run = load_run_data(cfg)
    steps = {"label_scoring": run_label_scoring, "gene_scoring": run_gene_scoring, "enrichment": run_enrichment,
             "gene_families": run_gene_families, "density": run_density, "pca_comparison": run_pca_comparison,
             "coactivation": run_coactivation, "unannotated": run_unannotated,
             "cross_layer": lambda r, c: run_cross_layer(r, c, cfg.runs_dir)}
    table = None
    params = OmegaConf.to_container(a, resolve=True)
    for name in selected:
        print(f"analysis: {name}")
        scores = steps[name](run, a)
        table = update_results(run.out_dir, name, scores)
        write_feature_annotations(run.run_dir / "features" / "features.h5ad", name, scores, params,
                                  key_added=f"{a.key_added}_{name}" if a.get("key_added") else name)
        release_freed_memory()  # the analysis's working arrays, before the next one
    if control == "random_init":  # before the summary, which can show analysis/control_comparison.csv
        analyze_control(cfg, run.run_dir)
    figures = write_figures(run, table)
    summary = write_summary(run, table, a, figures)
    print(f"results: {run.out_dir / 'results.csv'} and {run.out_dir / 'results.parquet'}; summary: {summary}")
    return table
