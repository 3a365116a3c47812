"""Regulatory probe: does steering a TF-associated SAE feature move the TF's targets more than matched non-targets?

Inputs: a TF → target table, either TRRUST v2 (``TF<TAB>target<TAB>mode<TAB>PMIDs``, no header, mode
Activation | Repression | Unknown) or a GMT of TF target sets (a path, or a ``load_gene_sets`` name such as
``msigdb:c3.tft``; every target has mode Unknown). Set names map to TF symbols by :func:`gmt_tf`.

Per TF (a vocabulary gene with >= ``min_targets`` targets tested):

1. **feature** (train cells): ``select`` token (default): the feature j maximising the standardised mean
   difference (mean f_j on the TF's own gene tokens − mean f_j on all gene tokens) / sd f_j over all gene tokens,
   among features firing on >= ``min_firing`` of the TF's tokens (:func:`tf_features`; a feature of the TF's token);
   ``select`` expression: the feature whose cell activation correlates best with the TF's expression across the
   cells (:func:`tf_expression_features`; a feature tracking the TF's level);
2. **steering** (eval cells): add α·scale_j·W_dec[j] at every gene token (``positions`` all; ``firing``: where
   f_j > 0; ``tf``: only at the TF's own gene token) with ``steering.gene_shifts`` (the mechanism of
   ``steer_features``), per gene the paired mean change Δ of the readout across cells;
3. **matching**: each target is matched to the ``n_matched`` non-targets (tested genes that are neither the TF
   nor its targets) nearest in (percentile of the number of steered cells holding the gene, percentile of the
   gene's clean mean readout), Euclidean; the matched set is the union (:func:`match_non_targets`);
4. **statistic**: AUC = P(|Δ| of a target > |Δ| of a matched non-target) (Mann–Whitney U / (n_t·n_m)), one-sided
   Mann–Whitney p (scipy, asymptotic with ties), BH q over all (TF, α) rows;
5. **sign** (TRRUST modes): with expected direction sign(α)·(+1 Activation, −1 Repression), ``sign_agreement``
   = fraction of signed targets moved that way, ``mode_auc`` / ``mode_p`` = one-sided Mann–Whitney of sign(α)·Δ,
   Activation vs Repression targets (>= 3 of each);
6. **null**: ``null_features`` random features matched on firing density (``steering.matched_null``), steered the
   same way and scored on the same targets and matched genes; ``steering.against_null`` gives the null mean,
   empirical p and BH q of ``auc`` and ``target_shift``.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import stats

from sae4scfm.analysis.primitives import bh_fdr
from sae4scfm.causal.interventions import Intervention
from sae4scfm.causal.steering import (
    _vocab_names,
    against_null,
    check_moved,
    firing_stats,
    gene_shifts,
    matched_null,
    paired_readout,
)
from sae4scfm.errors import InputError
from sae4scfm.saes.base import SAE
from sae4scfm.scfm.adapter import ScFMAdapter
from sae4scfm.scfm.tokens import TokenizedCells

TRRUST_MODES = ("Activation", "Repression", "Unknown")
_SUFFIX = re.compile(r"^(\d+|Q\d+|[BC]\d*)$")  # legacy TRANSFAC set-name tails: _01, _Q6, _Q4_01, _B, _C, _B1
_MOTIF = re.compile(r"^[ACGTRYKMSWBDHVN]{6,}$")  # a leading IUPAC consensus, e.g. TTCYNRGAA_STAT5B_01


# --------------------------------------------------------------------------- reading TF tables


def gmt_tf(name: str) -> str | None:
    """The TF symbol of a GMT set name (None for motif-only sets): ``STAT1_TARGET_GENES`` → STAT1 (GTRD);
    legacy TRANSFAC names drop a leading ``V$``, trailing version/quality tokens (``_01``, ``_Q6``, ``_Q4_01``,
    ``_B``, ``_C``) and a leading IUPAC consensus (``TTCYNRGAA_STAT5B_01`` → STAT5B); ``*_UNKNOWN`` → None.
    Family names (``STAT_01`` → STAT) are kept and later dropped as not vocabulary genes."""
    name = str(name).strip().upper().removeprefix("V$")
    if name.endswith("_TARGET_GENES"):
        return name[: -len("_TARGET_GENES")] or None
    parts = name.split("_")
    while len(parts) > 1 and _SUFFIX.match(parts[-1]):
        parts.pop()
    if len(parts) > 1 and _MOTIF.match(parts[0]):
        parts.pop(0)
    tf = "_".join(parts)
    return None if not tf or tf == "UNKNOWN" or _MOTIF.match(tf) else tf


def read_trrust(path) -> pd.DataFrame:
    """A TRRUST v2 TSV (``TF, target, mode, PMIDs``; no header; ``#`` lines skipped) as rows tf, target, mode;
    a missing mode reads as Unknown. InputError naming the file and line for a row of < 2 fields or an
    unknown mode."""
    path = Path(path)
    rows = []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.rstrip("\r\n")
            if not line.strip() or line.startswith("#"):
                continue
            fields = [f.strip() for f in line.split("\t")]
            if len(fields) < 2 or not fields[0] or not fields[1]:
                raise InputError(f"regulatory.table={path}: line {lineno} is {line[:60]!r}; a TRRUST table has "
                                 "tab-separated TF, target, mode (Activation|Repression|Unknown), PMIDs per line "
                                 "(no header). Fix the line, or pass a GMT with regulatory.format=gmt.")
            mode = fields[2] if len(fields) > 2 and fields[2] else "Unknown"
            if mode not in TRRUST_MODES:
                raise InputError(f"regulatory.table={path}: line {lineno} has mode {mode!r}; use one of "
                                 f"{', '.join(TRRUST_MODES)} in the third column.")
            rows.append((fields[0], fields[1], mode))
    if not rows:
        raise InputError(f"regulatory.table={path} has no TF-target rows; give a TRRUST TSV (TF<TAB>target<TAB>mode) "
                         "or a GMT of TF target sets.")
    return pd.DataFrame(rows, columns=["tf", "target", "mode"])


def read_tf_table(source: str, fmt: str = "auto") -> pd.DataFrame:
    """TF → target rows (tf, target, mode) of ``source``: a TRRUST TSV, or GMT target sets (a ``.gmt`` path or
    any ``load_gene_sets`` collection such as ``msigdb:c3.tft``; sets mapped by :func:`gmt_tf`, targets of the
    sets of one TF pooled). ``fmt`` auto: gmt for ``msigdb:``, ``.gmt`` or a built-in collection name, else trrust."""
    from sae4scfm.analysis.enrichment import available_gene_sets, load_gene_sets

    if source is None:
        raise InputError("regulatory.table is not set; give a TRRUST TSV path, a GMT path or msigdb:c3.tft.")
    source = str(source)
    if fmt not in ("auto", "trrust", "gmt"):
        raise InputError(f"regulatory.format={fmt!r} is unknown; use auto, trrust or gmt.")
    named = source.lower().startswith("msigdb:") or source in available_gene_sets()
    if fmt == "auto":
        fmt = "gmt" if named or source.lower().endswith(".gmt") else "trrust"
    if not named and not Path(source).is_file():
        raise InputError(f"regulatory.table={source}: no such file; give a TRRUST TSV (TF<TAB>target<TAB>mode), a GMT "
                         "of TF target sets, or msigdb:c3.tft.")
    if fmt == "trrust":
        table = read_trrust(source)
    else:
        rows = [(tf, g, "Unknown") for name, genes in load_gene_sets(source).items()
                if (tf := gmt_tf(name)) is not None for g in genes]
        table = pd.DataFrame(rows, columns=["tf", "target", "mode"])
    # one row per (tf, target), self-edges dropped; conflicting modes of one pair become Unknown
    table = table[table["tf"] != table["target"]].drop_duplicates()
    table.loc[table.duplicated(["tf", "target"], keep=False), "mode"] = "Unknown"
    return table.drop_duplicates(["tf", "target"]).reset_index(drop=True)


def restrict_to_vocab(table: pd.DataFrame, vocab: set[str], source: str) -> pd.DataFrame:
    """The rows whose TF and target are both vocabulary genes; InputError when no TF is one."""
    tfs = table["tf"].unique()
    in_vocab = [tf for tf in tfs if tf in vocab]
    if not in_vocab:
        raise InputError(f"regulatory.table={source}: read {len(tfs)} TFs (e.g. {', '.join(map(str, tfs[:4]))}) but none "
                         f"is a gene of the model's vocabulary ({len(vocab)} genes, e.g. {', '.join(sorted(vocab)[:4])}); "
                         "use a table in the model's gene namespace and species (human symbols for these models) "
                         "or map its TF names to the vocabulary first.")
    return table[table["tf"].isin(in_vocab) & table["target"].isin(vocab)].reset_index(drop=True)


# --------------------------------------------------------------------------- choosing each TF's feature


@torch.no_grad()
def tf_token_stats(adapter: ScFMAdapter, sae: SAE, layer: int, tokens: TokenizedCells, tf_ids: np.ndarray,
                   batch_size: int = 8) -> dict[str, np.ndarray]:
    """Per TF (vocabulary ids ``tf_ids``) and feature, over the gene tokens of ``tokens``: on_mean [n_tf, d_sae]
    mean f on the TF's own tokens, on_firing [n_tf, d_sae] fraction of them where f > 0, n_tf_tokens [n_tf];
    all_mean, all_sd [d_sae] over every gene token."""
    n_tf = len(tf_ids)
    on_sum, on_fire = np.zeros((n_tf, sae.d_sae)), np.zeros((n_tf, sae.d_sae))
    n_on, total, squares, n_all = np.zeros(n_tf), np.zeros(sae.d_sae), np.zeros(sae.d_sae), 0
    lookup = np.full(len(adapter.vocab), -1)
    lookup[tf_ids] = np.arange(n_tf)
    for batch in tokens.batches(adapter.cells_per_batch(batch_size)):
        h = adapter.capture(batch, [layer])[layer]
        mask = batch.gene_mask.to(h.device)
        f = sae.encode(h[mask].float()).double()
        row = lookup[batch.gene_ids.to(h.device)[mask].cpu().numpy()]
        total += f.sum(0).cpu().numpy()
        squares += (f ** 2).sum(0).cpu().numpy()
        n_all += f.shape[0]
        hit = row >= 0
        if hit.any():
            on = f[torch.from_numpy(np.flatnonzero(hit)).to(f.device)].cpu().numpy()
            np.add.at(on_sum, row[hit], on)
            np.add.at(on_fire, row[hit], on > 0)
            np.add.at(n_on, row[hit], 1)
    all_mean = total / max(n_all, 1)
    all_sd = np.sqrt(np.maximum(squares / max(n_all, 1) - all_mean ** 2, 0))
    safe = np.maximum(n_on, 1)[:, None]
    return {"on_mean": on_sum / safe, "on_firing": on_fire / safe, "n_tf_tokens": n_on, "all_mean": all_mean,
            "all_sd": all_sd}


def tf_features(st: dict[str, np.ndarray], min_firing: float) -> tuple[np.ndarray, np.ndarray]:
    """(feature [n_tf] (−1 where none qualifies), score [n_tf] (NaN there)) from :func:`tf_token_stats`: per TF the feature
    with the largest standardised mean difference (on_mean − all_mean) / all_sd among features with
    on_firing >= ``min_firing`` and all_sd > 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        d = (st["on_mean"] - st["all_mean"]) / st["all_sd"]
    d = np.where((st["on_firing"] >= min_firing) & (st["all_sd"] > 0), d, -np.inf)
    best = d.argmax(1)
    score = d[np.arange(len(d)), best]
    ok = np.isfinite(score)
    return np.where(ok, best, -1), np.where(ok, score, np.nan)


def tf_expression_features(features_X, expression) -> tuple[np.ndarray, np.ndarray]:
    """(feature [n_tf] (−1 where none qualifies), score [n_tf]): per TF (column of ``expression`` [cells, n_tf],
    log1p CP10k) the feature whose cell activation (``features_X`` [cells, F]) has the largest Pearson r with the
    TF's expression across the cells (``analysis.gene_scoring.cell_gene_correlation``, the ``correlation`` gene
    score of the analyze stage); r must be > 0."""
    from sae4scfm.analysis.gene_scoring import cell_gene_correlation

    r = np.nan_to_num(cell_gene_correlation(features_X, expression), nan=-np.inf)
    best = r.argmax(0)
    score = r[best, np.arange(r.shape[1])]
    ok = score > 0
    return np.where(ok, best, -1), np.where(ok, score, np.nan)


# --------------------------------------------------------------------------- targets vs matched non-targets


@torch.no_grad()
def clean_levels(adapter: ScFMAdapter, tokens: TokenizedCells, output: str, batch_size: int = 8) -> np.ndarray:
    """Mean clean readout ``output`` [V] of each vocabulary gene over the cells of ``tokens`` its readout covers
    (``steering.paired_readout``; NaN where none does)."""
    V = len(adapter.vocab)
    total, n = np.zeros(V), np.zeros(V)
    for batch in tokens.batches(adapter.cells_per_batch(batch_size), sort_by_length=False):
        batch = batch.to(adapter.device)
        values, ids = paired_readout(adapter, adapter.run(batch), output, batch)
        ids = ids.cpu().numpy()
        total += np.bincount(ids, values.double().cpu().numpy(), minlength=V)
        n += np.bincount(ids, minlength=V)
    return np.divide(total, n, out=np.full_like(total, np.nan), where=n > 0)


def match_non_targets(coords: np.ndarray, targets: np.ndarray, candidates: np.ndarray, k: int) -> np.ndarray:
    """Sorted union over ``targets`` (row indices of ``coords`` [G, 2]) of the ``k`` ``candidates`` nearest to
    each in Euclidean distance (ties by candidate order)."""
    if len(targets) == 0 or len(candidates) == 0:
        return np.zeros(0, dtype=int)
    dist = np.linalg.norm(coords[targets][:, None, :] - coords[candidates][None, :, :], axis=-1)
    nearest = np.argsort(dist, axis=1, kind="stable")[:, :k]
    return np.unique(candidates[nearest])


def target_test(moved: np.ndarray, is_target: np.ndarray, is_matched: np.ndarray) -> dict[str, float]:
    """Targets vs matched non-targets on ``moved`` (|Δ| per gene): auc = U / (n_t·n_m), one-sided (greater)
    Mann–Whitney p, the mean of each group and their counts."""
    a, b = moved[is_target], moved[is_matched]
    if len(a) == 0 or len(b) == 0:
        return {"n_targets": len(a), "n_matched": len(b), "auc": np.nan, "mw_p": np.nan,
                "target_shift": np.nan, "matched_shift": np.nan}
    res = stats.mannwhitneyu(a, b, alternative="greater", method="asymptotic")
    return {"n_targets": len(a), "n_matched": len(b), "auc": float(res.statistic) / (len(a) * len(b)),
            "mw_p": float(res.pvalue), "target_shift": float(a.mean()), "matched_shift": float(b.mean())}


def sign_test(delta: np.ndarray, modes: np.ndarray, alpha: float) -> dict[str, float]:
    """Activation vs Repression targets (``modes`` per gene of ``delta``): with s = sign(α)·Δ, sign_agreement =
    fraction of signed targets with s > 0 (Activation) or s < 0 (Repression); mode_auc / mode_p = one-sided
    Mann–Whitney of s, Activation > Repression (NaN unless >= 3 of each)."""
    s = np.sign(alpha) * delta
    act, rep = s[modes == "Activation"], s[modes == "Repression"]
    out = {"n_activation": len(act), "n_repression": len(rep),
           "sign_agreement": float(np.r_[act > 0, rep < 0].mean()) if len(act) + len(rep) else np.nan,
           "mode_auc": np.nan, "mode_p": np.nan}
    if len(act) >= 3 and len(rep) >= 3:
        res = stats.mannwhitneyu(act, rep, alternative="greater", method="asymptotic")
        out["mode_auc"], out["mode_p"] = float(res.statistic) / (len(act) * len(rep)), float(res.pvalue)
    return out


def _percentile(x: np.ndarray) -> np.ndarray:
    return stats.rankdata(x) / len(x)


# --------------------------------------------------------------------------- the stage


def regulatory_probe(cfg) -> pd.DataFrame:
    """``scripts/regulatory_probe.py``: per TF of ``regulatory.table`` in the model's vocabulary, steer its
    feature (chosen on train cells) by each α in ``regulatory.n_cells`` eval cells and test whether its targets
    move more than matched non-targets, against density-matched random features. Writes
    ``<run>/causal/regulatory/{regulatory.csv (TF rows with null columns), null.csv, features.csv (the choice),
    genes.csv (per-gene Δ of the TF features with target/matched flags)}`` and returns the summary."""
    from sae4scfm.atomic import atomic_write
    from sae4scfm.causal.run import open_causal_run
    from sae4scfm.scfm.loading import split_tokens

    r = cfg.regulatory
    table = read_tf_table(r.table, str(r.format))
    if r.positions not in ("all", "firing", "tf"):
        raise InputError(f"regulatory.positions={r.positions!r} is unknown; use all, firing or tf.")
    if r.select not in ("token", "expression"):
        raise InputError(f"regulatory.select={r.select!r} is unknown; use token or expression.")
    ctx = open_causal_run(cfg, "the regulatory probe")
    adapter, sae, layer = ctx.adapter, ctx.sae, ctx.layer
    names = _vocab_names(adapter)
    gene_id = {str(g): i for i, g in enumerate(names)}
    table = restrict_to_vocab(table, set(gene_id), str(r.table))
    if r.get("tfs"):
        missing = sorted(set(r.tfs) - set(table["tf"]))
        if missing:
            raise InputError(f"regulatory.tfs: {missing} have no targets in the model's vocabulary in {r.table}; "
                             f"TFs there: {', '.join(sorted(table['tf'].unique())[:30])}.")
        table = table[table["tf"].isin(list(r.tfs))]
    rng = np.random.default_rng(int(r.seed))

    # 1. each TF's feature, on train cells
    train = split_tokens(ctx.tokens, ctx.adata, "train")
    train = train.subset(np.sort(rng.choice(len(train), min(int(r.select_cells), len(train)), replace=False)))
    tfs = sorted(table["tf"].unique())
    st = tf_token_stats(adapter, sae, layer, train, np.array([gene_id[t] for t in tfs]), int(r.batch_size))
    if r.select == "token":
        feature, score = tf_features(st, float(r.min_firing))
    else:  # expression: correlation of the cell representation with the TF's expression, same train cells
        ctx.run.cache.setdefault("adata", ctx.adata)
        expression, genes = ctx.run.expression()
        column = {g: i for i, g in enumerate(genes)}
        cols = [column.get(t, -1) for t in tfs]
        rows = train.cell_index
        E = expression[rows][:, [max(c, 0) for c in cols]]
        feature, score = tf_expression_features(ctx.run.features.X[rows], E)
        missing = np.array(cols) < 0  # a vocabulary TF the dataset does not hold
        feature[missing], score[missing] = -1, np.nan
    choice = pd.DataFrame({"tf": tfs, "feature_id": feature, "score": score, "n_tf_tokens": st["n_tf_tokens"],
                           "n_targets_in_vocab": table.groupby("tf").size().reindex(tfs).to_numpy()})
    ok = (choice["n_tf_tokens"] >= int(r.min_tf_tokens)) & (choice["feature_id"] >= 0)
    ok &= choice["n_targets_in_vocab"] >= int(r.min_targets)
    chosen = choice[ok]
    if not r.get("tfs"):
        chosen = chosen.nlargest(int(r.max_tfs), "n_targets_in_vocab").sort_values("tf")
    if chosen.empty:
        raise InputError(f"regulatory.table={r.table}: of its {len(tfs)} TFs in the vocabulary none has >= "
                         f"{r.min_tf_tokens} tokens in {len(train)} train cells, a feature firing on >= {r.min_firing} "
                         f"of them and >= {r.min_targets} targets in the vocabulary; lower regulatory.min_tf_tokens / "
                         "min_targets / min_firing or raise select_cells.")

    print(f"regulatory: {len(tfs)} TFs of {r.table} considered (vocabulary genes with targets there"
          f"{', in regulatory.tfs' if r.get('tfs') else ''}), {int(ok.sum())} with enough tokens, targets and a "
          f"qualifying feature (features.csv); probed: {', '.join(chosen['tf'])}")

    # 2. steer each TF's feature and its density-matched null in eval cells
    cells = ctx.eval_tokens(int(r.n_cells), rng)
    density, scale = firing_stats(adapter, sae, layer, cells, int(r.batch_size))
    silent = chosen["feature_id"].map(lambda j: density[j] == 0)
    if silent.any():
        print(f"regulatory: skipping TFs whose feature never fires on the {len(cells)} eval cells: "
              f"{', '.join(chosen.loc[silent, 'tf'])}")
        chosen = chosen[~silent]
    if chosen.empty:
        raise InputError(f"regulatory: no chosen TF feature fires on the {len(cells)} steered eval cells; "
                         "raise regulatory.n_cells.")
    features = sorted(set(chosen["feature_id"].astype(int)))
    nulls = matched_null(density, features, int(r.null_features), rng)
    alphas = [float(a) for a in r.alphas]
    if r.positions == "tf":  # (TF whose gene tokens are edited, feature, α)
        plan = [(tf, f, a) for tf, j in zip(chosen["tf"], chosen["feature_id"]) for f in [j, *nulls[j]] for a in alphas]
    else:  # the edit does not depend on the TF: each feature once
        plan = [(None, f, a) for f in sorted({f for j in features for f in [j, *nulls[j]]}) for a in alphas]
    ivs = [Intervention((f,), r.op, a * float(scale[f]) if r.op == "add" else a,
                        r.positions if tf is None else (gene_id[tf],)) for tf, f, a in plan]
    shifts, output = gene_shifts(adapter, sae, layer, cells, ivs, output=r.output, mode=r.mode,
                                 batch_size=int(r.batch_size), per_forward=int(r.per_forward), desc="regulatory")
    check_moved(shifts, output, layer)
    index = {key: e for e, key in enumerate(plan)}

    # 3. match and test, per TF, α and steered feature (the TF's own or a null)
    tests = [shifts.paired_test(e, int(r.min_cells)) for e in range(len(plan))]  # same genes for every e
    tested = tests[0]["gene_id"].to_numpy()
    level = clean_levels(adapter, cells, output, int(r.batch_size))[tested]
    coords = np.c_[_percentile(shifts.n[0][tested]), _percentile(level)]
    pos = {int(g): i for i, g in enumerate(tested)}
    rows, gene_rows = [], []
    for _, c in chosen.iterrows():
        tf, j = c["tf"], int(c["feature_id"])
        t = table[table["tf"] == tf]
        t = t[t["target"].map(lambda g: gene_id[g] in pos)]
        targets = np.array([pos[gene_id[g]] for g in t["target"]], dtype=int)
        modes = t["mode"].to_numpy()
        if len(targets) < int(r.min_targets):
            continue
        candidates = np.setdiff1d(np.arange(len(tested)), np.r_[targets, pos.get(gene_id[tf], -1)])
        matched = match_non_targets(coords, targets, candidates, int(r.n_matched))
        is_t, is_m = np.zeros(len(tested), bool), np.zeros(len(tested), bool)
        is_t[targets], is_m[matched] = True, True
        for a in alphas:
            for f in [j, *nulls[j]]:
                test = tests[index[(tf if r.positions == "tf" else None, f, a)]]
                delta = test["mean_delta"].to_numpy()
                row = {"tf": tf, "feature_id": f, "role": "target" if f == j else "null", "alpha": a,
                       "feature": j, "score": float(c["score"]), "output": output,
                       **target_test(np.abs(delta), is_t, is_m), **sign_test(delta[targets], modes, a)}
                rows.append(row)
                if f == j:
                    gene_rows.append(test.assign(tf=tf, feature=j, alpha=a, gene=names[tested], clean_level=level,
                                                 target=is_t, matched=is_m)[is_t | is_m])
    if not rows:
        raise InputError(f"regulatory: no TF has >= {r.min_targets} targets held by >= {r.min_cells} of the "
                         f"{len(cells)} steered cells; raise regulatory.n_cells or lower min_targets.")
    full = pd.DataFrame(rows)
    summary = against_null(full, ["auc", "target_shift"], ["tf", "alpha"])
    finite = summary["mw_p"].notna().to_numpy()
    q = np.full(len(summary), np.nan)
    q[finite] = bh_fdr(summary.loc[finite, "mw_p"])
    summary.insert(summary.columns.get_loc("mw_p") + 1, "mw_q", q)
    out_dir = ctx.run.run_dir / "causal" / "regulatory"
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "regulatory.csv", lambda p: summary.to_csv(p, index=False))
    atomic_write(out_dir / "null.csv", lambda p: full[full["role"] == "null"].to_csv(p, index=False))
    atomic_write(out_dir / "features.csv", lambda p: choice.to_csv(p, index=False))
    genes = pd.concat(gene_rows, ignore_index=True)
    atomic_write(out_dir / "genes.csv", lambda p: genes.to_csv(p, index=False))
    cols = ["tf", "alpha", "feature", "n_targets", "n_matched", "target_shift", "matched_shift", "auc", "mw_q",
            "auc_null_mean", "auc_p", "sign_agreement"]
    print(summary[cols].to_string(index=False))
    print(f"wrote {out_dir}/regulatory.csv (TFs: targets vs matched non-targets, vs density-matched null), "
          "null.csv, features.csv, genes.csv")
    return summary
