"""Causal patching: ablate each feature at the gene tokens where it fires and ask whether the model's
readout changes most on the feature's own genes, against random features matched on firing density.

Per feature j: its own genes are the ``top_genes`` genes it fires on most often (fraction of the gene's
tokens where f_j > 0, among genes held by >= ``min_cells`` cells); the ablation (f_j := 0 where it fires,
``error_preserving``) gives per gene the paired mean change of the readout (``steering.gene_shifts``);
``own_effect`` = mean |Δ| over its own genes, ``other_effect`` = mean |Δ| over the other genes tested,
``specificity`` = own / other. A specificity without a null is not evidence (ablating any feature moves the
genes it sits on): each target is compared with ``null_features`` density-matched random features, each on
its own genes — empirical p (1 + #null >= target)/(1 + n_null) and BH q over targets.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from sae4scfm.causal.interventions import Intervention
from sae4scfm.causal.steering import _vocab_names, against_null, check_moved, firing_stats, gene_shifts, matched_null
from sae4scfm.saes.base import SAE
from sae4scfm.scfm.adapter import ScFMAdapter
from sae4scfm.scfm.tokens import TokenizedCells


@torch.no_grad()
def gene_firing(adapter: ScFMAdapter, sae: SAE, layer: int, tokens: TokenizedCells, features: list[int],
                batch_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """(fires [len(features), V]: tokens of each vocabulary gene where each feature fires, seen [V]: tokens
    of each gene) over the cells of ``tokens``."""
    V = len(adapter.vocab)
    fires, seen = np.zeros((len(features), V)), np.zeros(V)
    idx = torch.tensor(features, dtype=torch.long)
    for batch in tokens.batches(adapter.cells_per_batch(batch_size)):
        h = adapter.capture(batch, [layer])[layer]
        mask = batch.gene_mask.to(h.device)
        f = sae.encode(h[mask].float())[:, idx.to(h.device)]
        ids = batch.gene_ids.to(h.device)[mask].cpu().numpy()
        np.add.at(seen, ids, 1)
        for c in range(len(features)):
            np.add.at(fires[c], ids, (f[:, c] > 0).cpu().numpy())
    return fires, seen


def own_genes(fires: np.ndarray, seen: np.ndarray, top: int, min_cells: int) -> list[np.ndarray]:
    """Per feature, the vocabulary ids of the ``top`` genes it fires on most often (firing fraction,
    ties by id), among genes seen >= ``min_cells`` times and fired on at least once."""
    frac = np.divide(fires, seen, out=np.zeros_like(fires), where=seen > 0)
    frac[:, seen < min_cells] = 0
    out = []
    for row in frac:
        order = np.lexsort((np.arange(len(row)), -row))
        out.append(order[:top][row[order[:top]] > 0])
    return out


def patch_features(cfg) -> pd.DataFrame:
    """``scripts/patch_features.py``: per target feature (``patching.features`` or the best per label),
    the ablation at its firing tokens in ``patching.n_cells`` eval cells: own / other gene effect and
    specificity, with the density-matched null. Writes ``<run>/causal/patching/{patching.csv, null.csv}``."""
    from sae4scfm.atomic import atomic_write
    from sae4scfm.causal.run import open_causal_run

    p = cfg.patching
    ctx = open_causal_run(cfg, "patching")
    rng = np.random.default_rng(int(p.seed))
    target_label = ctx.targets(p, "patching")
    cells = ctx.eval_tokens(int(p.n_cells), rng)
    density, _ = firing_stats(ctx.adapter, ctx.sae, ctx.layer, cells, int(p.batch_size))
    targets = [j for j in target_label if density[j] > 0]
    nulls = matched_null(density, targets, int(p.null_features), rng)
    plan = [(j, f) for j in targets for f in [j, *nulls[j]]]
    features = [f for _, f in plan]
    fires, seen = gene_firing(ctx.adapter, ctx.sae, ctx.layer, cells, features, int(p.batch_size))
    genes = own_genes(fires, seen, int(p.top_genes), int(p.min_cells))
    shifts, output = gene_shifts(ctx.adapter, ctx.sae, ctx.layer, cells,
                                 [Intervention((f,), "zero", 0.0, "firing") for f in features],
                                 output=p.output, batch_size=int(p.batch_size), per_forward=int(p.per_forward),
                                 desc="patching")
    check_moved(shifts, output, ctx.layer)
    names = _vocab_names(ctx.adapter)
    rows = []
    for e, (j, f) in enumerate(plan):
        test = shifts.paired_test(e, int(p.min_cells))
        own = test["gene_id"].isin(genes[e]).to_numpy()
        own_effect = float(test.loc[own, "mean_delta"].abs().mean()) if own.any() else np.nan
        other_effect = float(test.loc[~own, "mean_delta"].abs().mean()) if (~own).any() else np.nan
        rows.append({"target": j, "feature_id": f, "role": "target" if f == j else "null", "label": target_label[j],
                     "density": float(density[f]), "own_genes": " ".join(names[genes[e]]), "n_own": int(own.sum()),
                     "own_effect": own_effect, "other_effect": other_effect,
                     "specificity": own_effect / other_effect if other_effect else np.nan, "output": output})
    table = pd.DataFrame(rows)
    summary = against_null(table, ["specificity", "own_effect"], ["target"])
    out_dir = ctx.run.run_dir / "causal" / "patching"
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "patching.csv", lambda path: summary.to_csv(path, index=False))
    atomic_write(out_dir / "null.csv", lambda path: table[table["role"] == "null"].to_csv(path, index=False))
    print(summary.drop(columns=["own_genes"]).to_string(index=False))
    print(f"wrote {out_dir}/patching.csv (targets vs density-matched null) and null.csv")
    return summary
