"""Perturbation check on real data: does putting the model's condition features into their perturbed state in
control cells predict the expression change the real perturbation caused?

On a dataset with a condition column (``data.condition_key``, e.g. Kang 2018 ``stim`` = CTRL | STIM):

1. the ``n_features`` features that best separate ``perturbed`` from the other cells are chosen on TRAIN cells
   (``labels.select_on_train``, the run's cell activations, train AUROC);
2. in held-out (eval) ``control`` cells each chosen feature is patched, at every gene token, to its mean
   activation at that gene in train ``perturbed`` cells: f'_j = f_j + α·(m_j(g) − f_j) (α = 1: the perturbed
   mean; genes never seen in train perturbed cells are left alone), ``error_preserving``. A feature's
   activation depends on the gene it sits on, so a gene-wise patch is the edit that puts a condition feature
   into its perturbed state, where adding one direction to every token is not;
3. the predicted change per gene (the paired mean change of the model's per-gene readout across the steered
   cells, ``steering.gene_shifts``) is compared with the observed log fold change on eval cells,
   mean log1p(CP10k) of ``perturbed`` − ``control``: Spearman and Pearson r over the genes tested;
4. genes used to select the features are left out: the ``exclude_top_genes`` genes each chosen feature fires on
   most often in train cells (a feature that fires on a gene's token carries that gene's identity, so moving
   that gene says nothing about the model's knowledge of the response);
5. null: ``null_sets`` random feature sets, each feature matched on firing density to one chosen feature,
   patched the same way to their own perturbed means, with empirical p (1 + #null ≥ r)/(1 + n_null);
   ``perturbation.control=random_init`` repeats the whole check (its own selection, patch and null) on the
   run's random-init twin, side by side.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf
from scipy import stats

from sae4scfm.causal.steering import _vocab_names, check_moved, gene_shifts, matched_null, per_gene_stats
from sae4scfm.errors import InputError
from sae4scfm.saes.base import SAE
from sae4scfm.scfm.tokens import TokenizedCells

CONTROLS = ("none", "random_init")


def gene_patch(means: np.ndarray, seen: np.ndarray, alpha: float):
    """The ``stacked_run`` edit factory of the gene-wise patch: each stacked copy e is a list of features (all
    copies the same length), patched at every gene token of gene g to f_j + α·(means[g, j] − f_j) where
    ``seen[g] > 0`` (``means`` [V, d_sae], the per-gene mean activations of the state patched in). The code f is
    the ``clean`` one when given (a run from the cached prefix), else encoded from h."""
    table, known = torch.as_tensor(means, dtype=torch.float32), torch.as_tensor(seen > 0)

    def edit(sae: SAE, feature_sets, gene_ids: torch.Tensor, mode: str = "error_preserving", clean=None):
        if mode != "error_preserving":
            raise InputError(f"the gene-wise patch is error_preserving only, not {mode!r}.")
        union = sorted({int(j) for s in feature_sets for j in s})
        col = {j: c for c, j in enumerate(union)}
        U = torch.tensor(union, dtype=torch.long)
        sets = torch.tensor([[col[int(j)] for j in s] for s in feature_sets], dtype=torch.long)  # [E, n] into U
        E = len(feature_sets)

        def fn(h: torch.Tensor, gene_mask: torch.Tensor) -> torch.Tensor:
            device = sae.W_dec.device
            B = h.shape[0] // E
            rows, _ = torch.nonzero(gene_mask, as_tuple=True)
            copy = (rows // B).to(device)
            ids = gene_ids.to(gene_mask.device)[gene_mask].to(device)
            x = h[gene_mask].to(device).float()
            if clean is None:
                f_u = sae.encode(x)[:, U.to(device)]
            else:  # the clean code, encoded once (interventions.prefix_code)
                code, code_rows = clean
                f_u = code[:, U.to(device)][code_rows]
            cols = sets.to(device)[copy]  # [R, n]
            target = table.to(device)[ids][:, U.to(device)].gather(1, cols)
            current = f_u.gather(1, cols)
            delta = alpha * (target - current) * known.to(device)[ids, None]
            d_u = torch.zeros_like(f_u).scatter_(1, cols, delta)
            out = h.clone()
            out[gene_mask] = (x + d_u @ sae.W_dec[U.to(device)]).to(h.dtype).to(h.device)
            return out

        return fn

    return edit


def observed_lfc(adata, data_cfg: DictConfig, is_perturbed: np.ndarray, is_control: np.ndarray) -> pd.Series:
    """Per gene of ``adata`` (named by ``data.gene_key`` or var_names), the mean log1p(CP10k) expression of the
    ``is_perturbed`` cells − that of the ``is_control`` cells, CP10k over all of a cell's genes (scanpy's
    normalize_total + log1p; data already log-normalised is used as it is)."""
    import scipy.sparse as sp

    from sae4scfm.data import normalise_expression

    rows = np.flatnonzero(is_perturbed | is_control)
    X = adata.X[rows] if not adata.isbacked else adata[rows].X
    X = normalise_expression(sp.csr_matrix(X), data_cfg.preprocess.input_kind, 1e4, True, "the perturbation check")
    key = data_cfg.get("gene_key")
    names = (adata.var[key] if key else adata.var_names.to_series()).astype(str).to_numpy()

    def mean(mask):
        return np.asarray(X[np.flatnonzero(mask[rows])].mean(axis=0)).ravel()

    lfc = pd.Series(mean(is_perturbed) - mean(is_control), index=pd.Index(names, name="gene"))
    return lfc[~lfc.index.duplicated()]


def matched_sets(density: np.ndarray, targets: list[int], n_sets: int, rng: np.random.Generator) -> list[list[int]]:
    """``n_sets`` random feature sets of ``len(targets)`` distinct features, the i-th matched on firing density
    to ``targets[i]`` (one draw per set from ``steering.matched_null``'s candidates, skipping features already in
    the set)."""
    pools = matched_null(density, targets, n_sets, rng)
    sets = []
    for s in range(n_sets):
        chosen: list[int] = []
        for j in targets:
            chosen.append(next(int(f) for f in np.roll(pools[j], -s) if f not in chosen))
        sets.append(chosen)
    return sets


def check_run(cfg: DictConfig, run_dir: Path) -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    """The perturbation check of one run: (summary row, per-set table of the target set and the null sets,
    per-gene table of the target set: gene, observed_lfc, predicted_shift, n_cells, excluded)."""
    from sae4scfm.analysis.labels import select_on_train, train_mask
    from sae4scfm.causal.patching import own_genes
    from sae4scfm.causal.run import open_causal_run

    p = cfg.perturbation
    run_cfg = OmegaConf.merge(cfg, {"sae_checkpoint": {"experiment": run_dir.parent.name, "timestamp": run_dir.name}})
    ctx = open_causal_run(run_cfg, "the perturbation check")
    key = p.condition_key or ctx.run.run_cfg.data.get("condition_key")
    if not key:
        raise InputError(f"{run_dir}: the run's dataset names no condition_key; set perturbation.condition_key=<obs "
                         "column> (e.g. stim on data=kang).")
    key, labels = ctx.labels(key, "perturbation.condition_key")
    values = set(labels)
    for field in ("control_value", "perturbed_value"):
        if str(p[field]) not in values:
            raise InputError(f"perturbation.{field}={p[field]!r} is not a value of obs[{key!r}] in "
                             f"{run_dir}/features/features.h5ad; values: {', '.join(sorted(values))}.")
    lab = labels.to_numpy()
    is_perturbed, is_control = lab == str(p.perturbed_value), lab == str(p.control_value)
    chosen = select_on_train(ctx.run.features.X, is_perturbed.astype(int), train_mask(ctx.run.features.obs),
                             min_cells=5, top_n=int(p.n_features))
    chosen = chosen[chosen["label"] == 1]
    targets = [int(j) for j in chosen["feature_id"]]

    rng = np.random.default_rng(int(p.seed))
    split = ctx.adata.obs["split"].to_numpy()

    def sample(rows: np.ndarray, what: str) -> TokenizedCells:
        pos = np.flatnonzero(rows)
        if len(pos) < 3:
            raise InputError(f"perturbation check: fewer than 3 {what} cells in {run_dir}; use more cells.")
        return ctx.tokens.subset(np.sort(rng.choice(pos, min(int(p.n_cells), len(pos)), replace=False)))

    train = split == "train"
    stats_at = {c: per_gene_stats(ctx.adapter, ctx.sae, ctx.layer, sample(train & rows, f"train {key}={v}"),
                                  int(p.batch_size))
                for c, rows, v in (("perturbed", is_perturbed, p.perturbed_value), ("control", is_control, p.control_value))}
    sums, fires, seen = (stats_at["perturbed"][i] + stats_at["control"][i] for i in range(3))
    density = fires.sum(0) / max(seen.sum(), 1)
    silent = [j for j in targets if density[j] == 0]
    if silent:
        raise InputError(f"perturbation check: features {silent} never fire on the sampled train cells; "
                         "raise perturbation.n_cells.")
    excluded = np.unique(np.concatenate(own_genes(fires[:, targets].T, seen, int(p.exclude_top_genes), 1))).astype(int)
    p_sums, _, p_seen = stats_at["perturbed"]
    means = p_sums / np.maximum(p_seen, 1)[:, None]
    sets = [targets, *matched_sets(density, targets, int(p.null_sets), rng)]
    steer_cells = sample((split == "eval") & is_control, f"eval {key}={p.control_value}")
    shifts, output = gene_shifts(ctx.adapter, ctx.sae, ctx.layer, steer_cells, sets, output=p.output,
                                 batch_size=int(p.batch_size), per_forward=int(p.per_forward), desc="perturbation",
                                 edit=gene_patch(means, p_seen, float(p.alpha)))
    check_moved(shifts, output, ctx.layer)

    held_out = split == "eval"
    lfc = observed_lfc(ctx.adata, ctx.run.run_cfg.data, held_out & is_perturbed, held_out & is_control)
    names = _vocab_names(ctx.adapter)
    lfc_by_id = pd.Series(names).map(lfc).to_numpy(dtype=float)  # [V], NaN for genes outside the data
    rows = []
    for e, s in enumerate(sets):
        test = shifts.paired_test(e, int(p.min_cells))
        ids = test["gene_id"].to_numpy()
        keep = np.isfinite(lfc_by_id[ids]) & ~np.isin(ids, excluded)
        pred, obs = test["mean_delta"].to_numpy()[keep], lfc_by_id[ids][keep]
        rows.append({"set": "target" if e == 0 else f"null_{e - 1}", "features": " ".join(map(str, s)),
                     "n_genes": int(keep.sum()), "spearman": float(stats.spearmanr(pred, obs).statistic),
                     "pearson": float(stats.pearsonr(pred, obs).statistic)})
        if e == 0:
            genes_table = pd.DataFrame({"gene": names[ids], "observed_lfc": lfc_by_id[ids],
                                        "predicted_shift": test["mean_delta"].to_numpy(), "n_cells": test["n_cells"],
                                        "excluded": np.isin(ids, excluded)})
    table = pd.DataFrame(rows)
    null = table.iloc[1:]
    summary = {"run": str(run_dir), "condition_key": key, "control_value": str(p.control_value),
               "perturbed_value": str(p.perturbed_value), "layer": ctx.layer, "output": output, "alpha": float(p.alpha),
               "features": " ".join(map(str, targets)),
               "eval_auroc": " ".join(f"{a:.3f}" for a in chosen["eval_auroc"]),
               "n_steered_cells": len(steer_cells), "n_genes": int(table["n_genes"].iloc[0]),
               "n_excluded_genes": len(excluded)}
    for metric in ("spearman", "pearson"):
        r, v = float(table[metric].iloc[0]), null[metric].to_numpy(float)
        summary[metric] = r
        summary[f"{metric}_null_mean"] = float(np.nanmean(v))
        summary[f"{metric}_null_sd"] = float(np.nanstd(v, ddof=1)) if len(v) > 1 else np.nan
        summary[f"{metric}_p"] = float((1 + np.sum(v >= r)) / (1 + len(v)))
    return summary, table, genes_table.sort_values("predicted_shift", ascending=False, kind="stable")


def perturbation_check(cfg: DictConfig) -> pd.DataFrame:
    """``scripts/perturbation_check.py``: the check on the run (and, with ``perturbation.control=random_init``,
    on its random-init twin). Writes ``<run>/causal/perturbation/{perturbation.csv (one row per run: trained,
    random_init), sets.csv (target and null sets per run), genes.csv (the trained run's per-gene table)}``."""
    from sae4scfm.analysis.control import ensure_control_run
    from sae4scfm.atomic import atomic_write
    from sae4scfm.runs import resolve_run_dir

    p = cfg.perturbation
    if p.control not in CONTROLS:
        raise InputError(f"perturbation.control={p.control!r} is unknown; use one of {', '.join(CONTROLS)}.")
    run_dir = resolve_run_dir(cfg.runs_dir, cfg.sae_checkpoint.experiment, cfg.sae_checkpoint.timestamp)
    runs = [("trained", run_dir)]
    if p.control == "random_init":
        runs.append(("random_init", ensure_control_run(run_dir, cfg.runs_dir)))
    summaries, sets, genes = [], [], None
    for model, path in runs:
        print(f"perturbation check of the {model} model ({path})")
        summary, table, gene_table = check_run(cfg, Path(path))
        summaries.append({"model": model, **summary})
        sets.append(table.assign(model=model))
        genes = gene_table if genes is None else genes
    summary = pd.DataFrame(summaries)
    out_dir = run_dir / "causal" / "perturbation"
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "perturbation.csv", lambda path: summary.to_csv(path, index=False))
    atomic_write(out_dir / "sets.csv", lambda path: pd.concat(sets).to_csv(path, index=False))
    atomic_write(out_dir / "genes.csv", lambda path: genes.to_csv(path, index=False))
    cols = ["model", "layer", "n_genes", "spearman", "spearman_null_mean", "spearman_p", "pearson", "pearson_p"]
    print(summary[cols].to_string(index=False))
    print(f"wrote {out_dir}/perturbation.csv, sets.csv, genes.csv")
    return summary
