"""Contrastive steering: learn a sparse vector α over SAE features that moves cells of a source type toward a
target type, then check it on held-out source cells with metrics it did not optimise.

The edit scales every feature at every gene token of the SAE's layer, in ``error_preserving`` mode:
h' = h + Σ_j (α_j − 1)·f_j·W_dec[j] (α = 1 is the identity). Objective, on train cells of the source type:

- ``latent``: ‖e(h') − c_target‖² / ‖c_target − c_source‖², e = the cell embedding (``cell_emb``), c = the
  clean mean embedding of the train cells of a type;
- ``expression``: Σ_g w_g (r_g(h') − μ_target,g)² / Σ_g w_g (μ_source,g − μ_target,g)² over the top DE genes
  (the largest |μ_target − μ_source| of the per-gene readout, weights w = |difference|, a cell's genes only);

plus ``l1`` · Σ_j |α_j − 1|. After fitting, |α_j − 1| < ``tol`` snaps to 1; the recruited features are the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sae4scfm.causal.steering import readout
from sae4scfm.errors import InputError
from sae4scfm.saes.base import SAE
from sae4scfm.scfm.adapter import ScFMAdapter
from sae4scfm.scfm.tokens import Batch, TokenizedCells

OBJECTIVES = ("latent", "expression")


def scaled_edit(sae: SAE, alpha: torch.Tensor):
    """``fn(h, gene_mask)`` for ``adapter.intervene``: h + ((α − 1)·f)·W_dec at gene tokens, differentiable in
    ``alpha`` [d_sae] (f = the SAE's code of the clean h, held fixed)."""

    if tuple(alpha.shape) != (sae.d_sae,):
        raise InputError(f"the contrastive alpha vector has shape {tuple(alpha.shape)}; this SAE has {sae.d_sae} "
                         f"features, so give one value per feature ([{sae.d_sae}]).")

    def fn(h: torch.Tensor, gene_mask: torch.Tensor) -> torch.Tensor:
        x = h[gene_mask].float()
        with torch.no_grad():
            f = sae.encode(x)
        rows = x + ((alpha - 1) * f) @ sae.W_dec
        out = h.clone()
        out[gene_mask] = rows.to(h.dtype)
        return out

    return fn


@torch.no_grad()
def type_profiles(adapter: ScFMAdapter, tokens: TokenizedCells, output: str, batch_size: int = 16
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(cell embeddings [C, d], per-gene readout sums [V], per-gene counts [V]) of the clean model on ``tokens``."""
    V = len(adapter.vocab)
    embs, total, count = [], np.zeros(V), np.zeros(V)
    for batch in tokens.batches(adapter.cells_per_batch(batch_size), sort_by_length=False):
        out = adapter.run(batch)
        embs.append(out["cell_emb"].float().cpu().numpy())
        ids = batch.gene_ids[batch.gene_mask].numpy()
        vals = readout(out, output, batch.gene_ids)[batch.gene_mask].double().cpu().numpy()
        np.add.at(total, ids, vals)
        np.add.at(count, ids, 1)
    return np.concatenate(embs), total, count


def de_genes(target_mean: np.ndarray, source_mean: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(the vocabulary ids of the ``n`` largest nonzero |target − source| mean readouts [≤ n], weights [V]: that
    |difference| on them, 0 elsewhere); NaN means (genes not seen) count as no difference."""
    diff = np.nan_to_num(target_mean - source_mean, nan=0.0)
    de = np.argsort(-np.abs(diff), kind="stable")[:n]
    de = de[np.abs(diff[de]) > 0]
    w = np.zeros(len(diff))
    w[de] = np.abs(diff[de])
    return de, w


def given_alpha(value, d_sae: int) -> np.ndarray:
    """``contrastive.alpha`` as a vector [d_sae]: a list of d_sae values, or the path of an ``alpha.csv``
    (feature_id, alpha; features not listed stay 1) written by an earlier fit."""
    from pathlib import Path

    import pandas as pd

    if isinstance(value, str):
        path = Path(value)
        if not path.is_file():
            raise InputError(f"contrastive.alpha={value!r} is not a file; give the alpha.csv of an earlier fit or a list "
                             f"of {d_sae} values.")
        table = pd.read_csv(path)
        if not {"feature_id", "alpha"} <= set(table.columns):
            raise InputError(f"{path}: needs columns feature_id, alpha (as written by contrast_features).")
        ids = table["feature_id"].to_numpy(int)
        if len(ids) and (ids.min() < 0 or ids.max() >= d_sae):
            raise InputError(f"{path}: feature ids must lie in 0..{d_sae - 1} (this SAE); the file holds "
                             f"{ids.min()}..{ids.max()}.")
        alpha = np.ones(d_sae)
        alpha[ids] = table["alpha"].to_numpy(float)
        return alpha
    alpha = np.asarray(list(value), dtype=np.float64)
    if alpha.shape != (d_sae,):
        raise InputError(f"contrastive.alpha has {alpha.size} values; this SAE has {d_sae} features: give one value "
                         "per feature, or the path of an alpha.csv (feature_id, alpha).")
    return alpha


@dataclass
class ContrastiveFit:
    """alpha [d_sae] after snapping; recruited: feature ids with α ≠ 1 (largest |α − 1| first); losses per step;
    de_genes / de_weights: the vocabulary ids and weights of the expression objective."""

    alpha: np.ndarray
    recruited: np.ndarray
    losses: list
    de_genes: np.ndarray
    de_weights: np.ndarray


@torch.no_grad()
def check_embedding_reachable(adapter: ScFMAdapter, sae: SAE, layer: int, batch: Batch,
                              clean: torch.Tensor | None = None) -> None:
    """InputError when doubling every feature at ``layer`` leaves the cell embedding of ``batch`` unchanged (e.g.
    a <cls> embedding read at the last layer): neither the latent objective nor the held-out metrics could move.
    ``clean``: the batch's unedited cell embedding when already computed."""
    if clean is None:
        clean = adapter.run(batch)["cell_emb"]
    with adapter.intervene(layer, scaled_edit(sae, torch.full((sae.d_sae,), 2.0, device=adapter.device))):
        doubled = adapter.run(batch)["cell_emb"]
    if torch.equal(doubled, clean):
        raise InputError(f"contrastive steering at layer {layer}: the cell embedding does not depend on the edited "
                         "gene tokens there (e.g. a <cls> embedding at the last layer), so neither the objective nor "
                         "the held-out metrics can move; use a run of an earlier layer (sae.target_layer).")


def fit_contrastive(adapter: ScFMAdapter, sae: SAE, layer: int, source: TokenizedCells, target_centroid: np.ndarray,
                    source_centroid: np.ndarray, target_mean: np.ndarray, source_mean: np.ndarray, *,
                    objective: str = "latent", n_de_genes: int = 50, l1: float = 0.01, tol: float = 0.05,
                    steps: int = 50, lr: float = 0.05, batch_size: int = 8, output: str = "mvc",
                    seed: int = 0) -> ContrastiveFit:
    """Fit α on the ``source`` cells (train cells of the source type) by Adam; target/source centroids [d] of
    the cell embedding and mean per-gene readouts [V] (NaN for genes not seen) come from clean train cells."""
    if objective not in OBJECTIVES:
        raise InputError(f"contrastive objective={objective!r} is unknown; use one of {', '.join(OBJECTIVES)}.")
    device = adapter.device
    alpha = torch.ones(sae.d_sae, device=device, requires_grad=True)
    opt = torch.optim.Adam([alpha], lr=lr)
    c_t = torch.as_tensor(target_centroid, dtype=torch.float32, device=device)
    scale_latent = float(np.sum((target_centroid - source_centroid) ** 2)) or 1.0
    de, w = de_genes(target_mean, source_mean, n_de_genes)
    weights = torch.as_tensor(w, dtype=torch.float32, device=device)
    mu_t = torch.as_tensor(np.nan_to_num(target_mean), dtype=torch.float32, device=device)
    batches = [b.to(device) for b in source.batches(adapter.cells_per_batch(batch_size), sort_by_length=False)]
    rng = np.random.default_rng(seed)
    losses = []
    for _ in range(steps):
        batch: Batch = batches[int(rng.integers(len(batches)))]
        with torch.enable_grad(), adapter.intervene(layer, scaled_edit(sae, alpha)):
            out = adapter.run(batch)
            if objective == "latent":
                fit = ((out["cell_emb"].float() - c_t) ** 2).sum(1).mean() / scale_latent
            else:
                r = readout(out, output, batch.gene_ids)
                g = batch.gene_ids.to(device)
                wt = weights[g] * batch.gene_mask.to(device)
                fit = (wt * (r - mu_t[g]) ** 2).sum() / (wt * (mu_t[g] - torch.as_tensor(
                    np.nan_to_num(source_mean), dtype=torch.float32, device=device)[g]) ** 2).sum().clamp(min=1e-12)
            loss = fit + l1 * (alpha - 1).abs().sum()
            # the gradient of α only: no weight gradients of the model or the SAE (nor their .grad filled)
            (alpha.grad,) = torch.autograd.grad(loss, alpha)
            opt.step()
        losses.append(float(loss.detach()))
    a = alpha.detach().cpu().numpy().astype(np.float64)
    a[np.abs(a - 1) < tol] = 1.0
    moved = np.flatnonzero(a != 1.0)
    return ContrastiveFit(a, moved[np.argsort(-np.abs(a[moved] - 1), kind="stable")], losses, de, w[de])


@torch.no_grad()
def steered_profiles(adapter: ScFMAdapter, sae: SAE, layer: int, tokens: TokenizedCells, alpha: np.ndarray,
                     output: str, batch_size: int = 16) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``type_profiles`` of ``tokens`` with the α edit applied."""
    a = torch.as_tensor(alpha, dtype=torch.float32, device=adapter.device)
    with adapter.intervene(layer, scaled_edit(sae, a)):
        return type_profiles(adapter, tokens, output, batch_size)


def contrast_features(cfg):
    """``scripts/contrast_features.py``: fit α moving ``contrastive.source`` cells toward ``contrastive.target``
    (values of ``contrastive.label_key``) on train cells; report on held-out source cells, against the clean
    model and against ``contrastive.null_draws`` random α vectors (the fitted |α − 1| values put on random live
    features): the fraction of cells a target-vs-source logistic classifier (fitted on clean train embeddings)
    calls target, the fraction moved closer to the target centroid, and the Pearson r of the expression shift
    with the target-minus-source difference on DE genes NOT in the objective. Writes
    ``<run>/causal/contrastive/{contrastive.csv, alpha.csv}``."""
    import pandas as pd
    from scipy import stats
    from sklearn.linear_model import LogisticRegression

    from sae4scfm.atomic import atomic_write
    from sae4scfm.causal.run import open_causal_run
    from sae4scfm.causal.steering import default_output, firing_stats

    c = cfg.contrastive
    ctx = open_causal_run(cfg, "contrastive steering")
    key, labels = ctx.labels(c.label_key, "contrastive.label_key")
    if labels is None:
        raise InputError("contrastive steering needs cell labels: set contrastive.label_key=<obs column>.")
    for field in ("source", "target"):
        if str(c[field]) not in set(labels):
            raise InputError(f"contrastive.{field}={c[field]!r} is not a value of obs[{key!r}]; values: "
                             f"{', '.join(sorted(set(labels)))}.")
    rng = np.random.default_rng(int(c.seed))
    split = ctx.adata.obs["split"].to_numpy()
    lab = labels.to_numpy()

    def cells(value, part, n):
        pos = np.flatnonzero((lab == str(value)) & (split == part))
        if len(pos) < 2:
            raise InputError(f"contrastive: fewer than 2 {part} cells of {key}={value!r}.")
        return ctx.tokens.subset(np.sort(rng.choice(pos, min(n, len(pos)), replace=False)))

    n = int(c.n_cells)
    src_train, tgt_train, src_eval = cells(c.source, "train", n), cells(c.target, "train", n), cells(c.source, "eval", n)
    first = src_train.collate(np.arange(1))
    probe = ctx.adapter.run(first)
    if "cell_emb" not in probe:
        raise InputError("contrastive steering needs the model's cell embedding (cell_emb), which this model lacks.")
    check_embedding_reachable(ctx.adapter, ctx.sae, ctx.layer, first, probe["cell_emb"])
    output = c.output or default_output(probe, last_layer=ctx.layer == ctx.adapter.n_layers)
    emb_s, tot_s, cnt_s = type_profiles(ctx.adapter, src_train, output)
    emb_t, tot_t, cnt_t = type_profiles(ctx.adapter, tgt_train, output)
    with np.errstate(invalid="ignore", divide="ignore"):
        mu_s, mu_t = tot_s / cnt_s, tot_t / cnt_t
    if c.get("alpha") is not None:  # evaluate a given alpha; the objective's DE genes are still left out
        a = given_alpha(c.alpha, ctx.sae.d_sae)
        moved = np.flatnonzero(a != 1.0)
        de, w = de_genes(mu_t, mu_s, int(c.n_de_genes))
        fit = ContrastiveFit(a, moved[np.argsort(-np.abs(a[moved] - 1), kind="stable")], [], de, w[de])
    else:
        fit = fit_contrastive(ctx.adapter, ctx.sae, ctx.layer, src_train, emb_t.mean(0), emb_s.mean(0), mu_t, mu_s,
                              objective=c.objective, n_de_genes=int(c.n_de_genes), l1=float(c.l1), tol=float(c.tol),
                              steps=int(c.steps), lr=float(c.lr), output=output, seed=int(c.seed))
    clf = LogisticRegression(max_iter=2000).fit(np.r_[emb_s, emb_t], np.r_[np.zeros(len(emb_s)), np.ones(len(emb_t))])
    clean_emb, clean_tot, clean_cnt = type_profiles(ctx.adapter, src_eval, output)
    diff = np.nan_to_num(mu_t - mu_s)
    held_out_de = np.setdiff1d(np.argsort(-np.abs(diff), kind="stable")[:int(c.n_eval_de_genes)], fit.de_genes)
    centroid = emb_t.mean(0)

    def score(alpha):
        e, tot, cnt = steered_profiles(ctx.adapter, ctx.sae, ctx.layer, src_eval, alpha, output)
        seen = held_out_de[(cnt[held_out_de] > 0) & (clean_cnt[held_out_de] > 0)]
        shift = tot[seen] / cnt[seen] - clean_tot[seen] / clean_cnt[seen]
        closer = np.linalg.norm(e - centroid, axis=1) < np.linalg.norm(clean_emb - centroid, axis=1)
        r = stats.pearsonr(shift, diff[seen]).statistic if len(seen) > 2 else np.nan
        return {"target_fraction": float(clf.predict(e).mean()), "closer_fraction": float(closer.mean()),
                "held_out_de_r": float(r), "n_held_out_de": int(len(seen))}

    fitted = score(fit.alpha)
    density, _ = firing_stats(ctx.adapter, ctx.sae, ctx.layer, src_train)
    live = np.flatnonzero(density > 0)
    nulls = []
    for _ in range(int(c.null_draws)):
        a = np.ones(ctx.sae.d_sae)
        if len(fit.recruited):
            a[rng.choice(live, min(len(fit.recruited), len(live)), replace=False)] = rng.permutation(fit.alpha[fit.recruited])
        nulls.append(score(a))
    rows = [{"run": "clean", "target_fraction": float(clf.predict(clean_emb).mean()), "closer_fraction": 0.0,
             "held_out_de_r": np.nan}, {"run": "fitted", **fitted}]
    rows += [{"run": f"null_{i}", **s} for i, s in enumerate(nulls)]
    table = pd.DataFrame(rows)
    null = table[table["run"].str.startswith("null")]
    summary = {"source": c.source, "target": c.target, "objective": c.objective, "n_recruited": len(fit.recruited),
               **{f"fitted_{k}": v for k, v in fitted.items()},
               **{f"null_mean_{k}": float(null[k].mean()) for k in ("target_fraction", "closer_fraction", "held_out_de_r")},
               **{f"p_{k}": float((1 + (null[k] >= fitted[k]).sum()) / (1 + len(null)))
                  for k in ("target_fraction", "closer_fraction", "held_out_de_r")}}
    out_dir = ctx.run.run_dir / "causal" / "contrastive"
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "contrastive.csv", lambda p: table.assign(**{k: v for k, v in summary.items()
                                                                       if k in ("source", "target", "objective")}).to_csv(p, index=False))
    alpha = pd.DataFrame({"feature_id": fit.recruited, "alpha": fit.alpha[fit.recruited]})
    atomic_write(out_dir / "alpha.csv", lambda p: alpha.to_csv(p, index=False))
    for k, v in summary.items():
        print(f"{k:32s} {v}")
    print(f"wrote {out_dir}/contrastive.csv and alpha.csv ({len(fit.recruited)} recruited features)")
    return summary
