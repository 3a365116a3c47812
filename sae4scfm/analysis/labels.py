"""Exact sparse label scores of SAE features.

Label scores, per feature x label column (an ``obs`` column) x value (one-vs-rest), all exact:

- AUROC: the Mann-Whitney U statistic with average ranks for ties, ``U / (n_pos * n_neg)``,
  i.e. exactly ``sklearn.metrics.roc_auc_score(labels == value, activation)``.
- F1 of the best threshold: ``max_t f1_score(labels == value, activation > t)`` over all
  thresholds t (the empty prediction scores 0; t below the minimum predicts every cell).
- AMI (per feature x label column): ``sklearn.metrics.adjusted_mutual_info_score(labels,
  activation > 0)``, the adjusted mutual information between the label and the binarised
  feature (active vs not), over all non-missing cells and all values of the column.

All are computed for all features at once from one sort of the explicit (nonzero) entries
per block of feature columns, so memory stays within a small multiple of the sparse input
(a CSC copy of it when it is not CSC, plus fixed-size per-block buffers).

The results table they go into is ``sae4scfm.analysis.results``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.special import gammaln

from sae4scfm.analysis.primitives import as_matrix
from sae4scfm.errors import InputError

INDEX_NAME = "feature_id"
LABEL_METRICS = ("auroc", "f1", "ami")

# Explicit entries sorted at a time: nnz / 8 within these bounds. The per-block buffers take
# about 80 bytes per entry, so they stay near the size of the input (8-12 bytes per entry).
_BLOCK_NNZ = (1 << 16, 1 << 18)  # entries per column block of the scan (its memory: ~60 bytes an entry)
_MAX_BLOCK_COLS = 65535  # column ids of a block fit in uint16


# --------------------------------------------------------------------------- sparse scan


def _as_csc(X) -> sp.csc_matrix:
    """CSC [n_cells, n_features], float32/float64, canonical; canonical CSC input is used as is
    (never modified). Explicit zeros may remain; the scan skips them."""
    return as_matrix(X, "feature matrix", fmt="csc")


def _column_blocks(indptr: np.ndarray):
    """(c0, c1) column ranges with at most ``block`` entries each (a single larger column alone)."""
    m = len(indptr) - 1
    block = int(np.clip(indptr[-1] // 8, *_BLOCK_NNZ))
    c0 = 0
    while c0 < m:
        c1 = int(np.searchsorted(indptr, indptr[c0] + block, side="right")) - 1
        c1 = min(max(c1, c0 + 1), c0 + _MAX_BLOCK_COLS, m)
        yield c0, c1
        c0 = c1


def _sort_within_columns(col: np.ndarray, vals: np.ndarray) -> np.ndarray:
    """Permutation sorting entries by (col, value); ``col`` is non-decreasing uint16."""
    with np.errstate(over="ignore"):
        as32 = vals.dtype == np.float32 or (vals.astype(np.float32) == vals).all()
    if as32:
        # one sort of a 64-bit key: column in the high word, order-preserving float32 bits below
        bits = vals.astype(np.float32).view(np.uint32)
        bits = np.where(bits >> np.uint32(31), ~bits, bits | np.uint32(1 << 31))
        key = (col.astype(np.uint64) << np.uint64(32)) | bits
        return np.argsort(key)
    order = np.argsort(vals)  # float64 values: value sort, then a stable (radix) sort by column
    return order[np.argsort(col[order], kind="stable")]


def _scan(X: sp.csc_matrix, valid, codes: list, n_codes: list, f1_codes: list) -> list[dict]:
    """Label statistics of every feature for one or several integer labellings of the cells.

    X: canonical CSC [n_cells, m]; valid: bool [n_cells] or None (cells to use; the others
    are dropped from both sides); codes[i]: int [n_cells], value index 0..n_codes[i]-1 of
    every valid cell; f1_codes[i]: value indices whose best-threshold F1 is wanted.
    Returns per labelling a dict of float64 arrays [n_codes, m]: ``auroc``, ``active``
    (cells of the value with activation > 0) and ``f1`` [len(f1_codes), m].
    """
    n_cells, m = X.shape
    n = n_cells if valid is None else int(valid.sum())
    out = []
    for c, V, fc in zip(codes, n_codes, f1_codes):
        n_pos = np.bincount(c if valid is None else c[valid], minlength=V).astype(np.float64)
        out.append(dict(n_pos=n_pos, auroc=np.empty((V, m)), active=np.empty((V, m)), f1=np.empty((len(fc), m))))
    codes_small = [c.astype(np.uint16 if V <= 65535 else np.int64) for c, V in zip(codes, n_codes)]

    for c0, c1 in _column_blocks(X.indptr):
        nb = c1 - c0
        p0, p1 = X.indptr[c0], X.indptr[c1]
        rows, vals = X.indices[p0:p1], X.data[p0:p1]
        col = np.repeat(np.arange(nb, dtype=np.uint16), np.diff(X.indptr[c0 : c1 + 1]))
        keep = vals != 0
        if valid is not None:
            keep &= valid[rows]
        if not keep.all():
            rows, vals, col = rows[keep], vals[keep], col[keep]
        del keep
        cnt = np.bincount(col, minlength=nb)  # explicit nonzero entries per column
        ends = np.cumsum(cnt)
        n_zero = n - cnt
        order = _sort_within_columns(col, vals)
        vals, rows = vals[order], rows[order]  # col is unchanged by the sort: already grouped
        del order
        k = vals.size
        start = np.ones(k, dtype=bool)  # first entry of each run of tied values within a column
        if k:
            start[1:] = (col[1:] != col[:-1]) | (vals[1:] != vals[:-1])
        gs = np.flatnonzero(start)
        group = np.cumsum(start, dtype=np.int64) - 1
        del start
        size = np.diff(np.append(gs, k))
        # average rank among the column's explicit entries (1-based), then shift positives past the zeros
        avg = (gs - (ends - cnt)[col[gs]]) + (size - 1) / 2.0 + 1.0
        positive = vals > 0
        rank = avg[group] + np.where(positive, n_zero[col], 0)
        del avg
        n_neg = cnt - np.bincount(col[positive], minlength=nb)
        zero_rank = n_neg + (n_zero + 1) / 2.0

        for cs, V, fc, res in zip(codes_small, n_codes, f1_codes, out):
            ce = cs[rows]
            key = ce.astype(np.int64) * nb + col
            rank_sum = np.bincount(key, weights=rank, minlength=V * nb).reshape(V, nb)
            count = np.bincount(key, minlength=V * nb).reshape(V, nb)
            active = np.bincount(key[positive], minlength=V * nb).reshape(V, nb)
            del key
            n_pos = res["n_pos"][:, None]
            u = rank_sum + (n_pos - count) * zero_rank - n_pos * (n_pos + 1) / 2.0
            with np.errstate(divide="ignore", invalid="ignore"):
                res["auroc"][:, c0:c1] = u / (n_pos * (n - n_pos))
            res["active"][:, c0:c1] = active
            if len(fc):
                res["f1"][:, c0:c1] = _best_f1_block(
                    ce, V, fc, col, vals, group, gs, ends, n_zero, count, active, cnt - n_neg, res["n_pos"]
                )
    return out


def _best_f1_block(ce, V, fc, col, vals, group, gs, ends, n_zero, count, active, n_positive, n_pos):
    """Best-threshold F1 [len(fc), nb] of one block of sorted entries (see ``_scan``).

    The predicted sets ``activation > t`` are the column's value groups from the top down to
    some group. The best set ends at a group holding a cell of the value (ending at a group
    without one only adds false positives), so the candidates are: for each value cell that is
    the first of its value in its tie group, everything >= its activation; and everything >= 0
    (all positives plus the zeros). F1 = 2 TP / (n_predicted + n_value).
    """
    nb = len(ends)
    by_code = np.argsort(ce, kind="stable")  # entries of each value, in (column, activation) order
    offsets = np.concatenate([[0], np.cumsum(np.bincount(ce, minlength=V))])
    best = np.zeros((len(fc), nb))
    for r, v in enumerate(fc):
        P = n_pos[v]
        nv_col = count[v]
        zero_tp = P - nv_col  # cells of the value among the zeros of each column
        k0 = n_positive + n_zero
        best[r] = 2.0 * (active[v] + zero_tp) / (k0 + P)
        idx = by_code[offsets[v] : offsets[v + 1]]
        if idx.size == 0:
            continue
        cc, gg = col[idx], group[idx]
        first = np.ones(idx.size, dtype=bool)
        first[1:] = gg[1:] != gg[:-1]  # group ids are unique across columns
        sel = np.flatnonzero(first)
        q = sel - (np.cumsum(nv_col) - nv_col)[cc[sel]]  # index among the column's value entries
        cs = cc[sel]
        tp = (nv_col[cs] - q).astype(np.float64)
        npred = (ends[cs] - gs[gg[sel]]).astype(np.float64)
        neg = vals[idx[sel]] < 0
        if neg.any():  # the set also takes all zeros
            npred[neg] += n_zero[cs[neg]]
            tp[neg] += zero_tp[cs[neg]]
        f1 = 2.0 * tp / (npred + P)
        seg = np.flatnonzero(np.concatenate([[True], cs[1:] != cs[:-1]]))
        colmax = np.maximum.reduceat(f1, seg)
        b = best[r]
        b[cs[seg]] = np.maximum(b[cs[seg]], colmax)
    return best


def _ami_active(active: np.ndarray, n_value: np.ndarray, n: int) -> np.ndarray:
    """``adjusted_mutual_info_score(labels, activation > 0)`` per feature, as sklearn computes it.

    active: [V, m] cells of each value with activation > 0; n_value: [V] cells per value (all
    observed values, >= 2 of them); n: cells. The expected MI sums the hypergeometric law of each
    (active, value) cell over n_ij within mean +- (12 sd + 30) (binomial sd, which bounds the
    hypergeometric tails): the mass left out is below 1e-19, so values agree with sklearn
    to rounding.
    """
    V, m = active.shape
    b = n_value.astype(np.int64)
    a = active.sum(axis=0).astype(np.int64)  # active cells per feature
    N = float(n)
    eps = np.finfo(np.float64).eps
    two = (a > 0) & (a < n)  # features with two clusters; else sklearn returns 0

    # MI, sklearn's mutual_info_score formula over the nonzero contingency cells
    mi = np.zeros(m)
    for cell, cluster in ((active, a), (b[:, None] - active, n - a)):
        nz = cell > 0
        val = np.where(nz, cell, 1).astype(np.float64)
        outer = (b[:, None] * np.where(nz, cluster[None, :], 1)).astype(np.float64)
        term = (val / N) * (np.log(val) - np.log(N)) + (val / N) * (-np.log(outer) + np.log(N) + np.log(N))
        term = np.where(nz & (np.abs(term) >= eps), term, 0.0)
        mi += term.sum(axis=0)
    mi = np.clip(mi, 0.0, None)

    def entropy(counts):  # counts [k, ...] > 0
        s = counts.sum(axis=0)
        return -np.sum((counts / s) * (np.log(counts) - np.log(s)), axis=0)

    h_true = float(entropy(b.astype(np.float64)))
    pa = np.stack([np.where(two, a, 1), np.where(two, n - a, 1)]).astype(np.float64)
    h_pred = np.where(two, entropy(pa), 0.0)

    # EMI depends on a feature only through a: compute it once per distinct a
    ua, inverse = np.unique(np.where(two, a, 0), return_inverse=True)
    emi_u = np.zeros(ua.size)
    todo = np.flatnonzero(ua > 0)
    if todo.size:
        lg = gammaln(np.arange(n + 1, dtype=np.float64) + 1.0)  # lg[k] = log k!
        lk = np.log(np.maximum(np.arange(n + 1, dtype=np.float64), 1.0))  # log k (0 for k = 0)
        pa_, pb_ = np.repeat(ua[todo], V), np.tile(b, todo.size)  # (a, b_j) pairs
        lo_n, hi_n = np.maximum(0, pa_ + pb_ - n), np.minimum(pa_, pb_)
        small, big = np.minimum(pa_, pb_), np.maximum(pa_, pb_)
        sd = np.sqrt(small * (big / N) * (1.0 - big / N))
        w = np.ceil(12.0 * sd + 30.0).astype(np.int64)
        mu = pa_ * pb_ / N
        lo = np.maximum(lo_n, np.floor(mu).astype(np.int64) - w)
        hi = np.minimum(hi_n, np.ceil(mu).astype(np.int64) + w)
        length = np.maximum(hi - lo + 1, 0)
        pair_emi = np.zeros(pa_.size)
        const = lg[pa_] + lg[pb_] + lg[n - pa_] + lg[n - pb_] - lg[n]
        la, lb, lna = np.log(pa_.astype(np.float64)), np.log(pb_.astype(np.float64)), np.log(N - pa_)
        csum = np.cumsum(length)
        p = 0
        while p < pa_.size:  # chunks of about 512k terms (~10 MiB): the window grows with sqrt(cells)
            q = max(int(np.searchsorted(csum, (csum[p - 1] if p else 0) + (1 << 19), side="right")), p + 1)
            q = min(q, pa_.size)
            L = length[p:q]
            pid = np.repeat(np.arange(p, q), L)
            first = np.cumsum(L) - L
            n1 = lo[pid] + (np.arange(pid.size) - np.repeat(first, L))
            ai, bj = pa_[pid], pb_[pid]
            n2 = bj - n1  # the same draw seen from the inactive row
            logp = const[pid] - lg[n1] - lg[ai - n1] - lg[bj - n1] - lg[n - ai - bj + n1]
            g = (n1 / N) * (np.log(N) + lk[n1] - la[pid] - lb[pid]) + (n2 / N) * (
                np.log(N) + lk[n2] - lna[pid] - lb[pid]
            )
            pair_emi[p:q] = np.bincount(pid - p, weights=g * np.exp(logp), minlength=q - p)
            p = q
        emi_u[todo] = pair_emi.reshape(todo.size, V).sum(axis=1)
    emi = emi_u[inverse]

    denom = (h_true + h_pred) / 2.0 - emi
    denom = np.where(denom < 0, np.minimum(denom, -eps), np.maximum(denom, eps))
    num = mi - emi
    num = np.where(num < 0, np.minimum(num, -eps), np.maximum(num, eps))
    return np.where(two, num / denom, 0.0)


# --------------------------------------------------------------------------- label scores


def _encode(labels, n_cells: int):
    """(valid bool [n], codes int [n] (0 for invalid cells), uniques) of a label vector."""
    lab = labels.reset_index(drop=True) if isinstance(labels, pd.Series) else pd.Series(np.asarray(labels))
    if len(lab) != n_cells:
        raise InputError(f"labels have {len(lab)} entries but the feature matrix has {n_cells} cells")
    valid = lab.notna().to_numpy()
    try:  # categorical: observed categories in category order
        codes, uniques = pd.factorize(lab[valid], sort=True)
    except TypeError:  # unorderable values
        codes, uniques = pd.factorize(lab[valid], sort=False)
    full = np.zeros(n_cells, dtype=np.int64)
    full[valid] = codes
    return valid, full, list(uniques)


def _scan_labels(X, labels_list, min_cells: int, want_f1: bool):
    """Encode each label vector, check it, and scan X once per distinct missing-cell pattern.

    Returns per label vector (uniques, keep [value indices with >= min_cells cells], stats, n).
    """
    encoded = [_encode(lab, X.shape[0]) for lab in labels_list]
    keeps = []
    for valid, codes, uniques in encoded:
        if len(uniques) < 2:
            raise InputError(
                f"one-vs-rest scores need at least 2 distinct label values, found {len(uniques)} "
                "among non-missing cells; choose a label with several values"
            )
        counts = np.bincount(codes[valid], minlength=len(uniques))
        keeps.append(np.flatnonzero(counts >= min_cells))
    results = [None] * len(encoded)
    groups: dict[bytes, list[int]] = {}
    for i, (valid, _, _) in enumerate(encoded):
        groups.setdefault(np.packbits(valid).tobytes(), []).append(i)
    for idx in groups.values():
        valid = encoded[idx[0]][0]
        stats = _scan(
            X,
            None if valid.all() else valid,
            [encoded[i][1] for i in idx],
            [len(encoded[i][2]) for i in idx],
            [keeps[i] if want_f1 else np.array([], dtype=np.int64) for i in idx],
        )
        for i, st in zip(idx, stats):
            results[i] = (encoded[i][2], keeps[i], st, int(valid.sum()))
    return results


def auroc_sparse(X, y) -> np.ndarray:
    """AUROC of each feature for a binary label.

    X: sparse (any format) or dense [n_cells, n_features]; y: bool (or 0/1) [n_cells].
    Returns float64 [n_features], equal to ``roc_auc_score(y, X[:, j])`` per column.
    """
    X = _as_csc(X)
    y = np.asarray(y).ravel()
    if y.shape[0] != X.shape[0]:
        raise InputError(f"label vector has {y.shape[0]} entries but the feature matrix has {X.shape[0]} cells")
    if y.dtype != bool:
        if not np.isin(y, [0, 1]).all():
            raise InputError("binary labels must be boolean or 0/1; map the label to True/False first")
        y = y.astype(bool)
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.shape[0]:
        raise InputError(
            f"AUROC needs both classes but the label has only one ({n_pos} positive of {y.shape[0]} cells); "
            "choose a label with positive and negative cells"
        )
    (st,) = _scan(X, None, [y.astype(np.int64)], [2], [np.array([], dtype=np.int64)])
    return st["auroc"][1]


def _value_frame(arr: np.ndarray, uniques, keep, m: int) -> pd.DataFrame:
    index = pd.RangeIndex(m, name=INDEX_NAME)
    return pd.DataFrame(arr.T, index=index, columns=pd.Index([uniques[k] for k in keep], dtype=object))


def label_auroc(X, labels, *, min_cells: int = 1) -> pd.DataFrame:
    """One-vs-rest AUROC of every feature for every label value.

    X: sparse or dense [n_cells, n_features]; labels: Series/array [n_cells]
    (NaN cells are dropped from both sides). Values with fewer than
    ``min_cells`` cells are skipped (their cells still count as "rest").
    Returns DataFrame [n_features, n_kept_values], index ``feature_id``,
    columns = label values (categorical order if categorical, else sorted).
    """
    X = _as_csc(X)
    ((uniques, keep, st, _),) = _scan_labels(X, [labels], min_cells, want_f1=False)
    return _value_frame(st["auroc"][keep], uniques, keep, X.shape[1])


def label_f1(X, labels, *, min_cells: int = 1) -> pd.DataFrame:
    """One-vs-rest F1 of the best threshold, ``max_t F1(labels == value, X[:, j] > t)``.

    Same inputs, cells and columns as ``label_auroc``; values in [0, 1].
    """
    X = _as_csc(X)
    ((uniques, keep, st, _),) = _scan_labels(X, [labels], min_cells, want_f1=True)
    return _value_frame(st["f1"], uniques, keep, X.shape[1])


def label_ami(X, labels) -> pd.Series:
    """``adjusted_mutual_info_score(labels, X[:, j] > 0)`` per feature [n_features].

    All non-missing cells and all values of the label count (no min_cells). A feature
    active in all or none of the cells scores 0.
    """
    X = _as_csc(X)
    ((uniques, _, st, n),) = _scan_labels(X, [labels], 1, want_f1=False)
    ami = _ami_active(st["active"], st["n_pos"], n)
    return pd.Series(ami, index=pd.RangeIndex(X.shape[1], name=INDEX_NAME), name="ami")


# --------------------------------------------------------------------------- held-out selection


def train_mask(obs: pd.DataFrame, where: str = "features.h5ad") -> np.ndarray:
    """bool [n_cells]: the train cells of ``obs["split"]`` (train/eval, written by the data stage).

    InputError unless the column exists and holds both train and eval cells."""
    if "split" not in obs:
        raise InputError(f"{where} obs has no 'split' column (train/eval); regenerate the features with "
                         "scripts/generate_features.py, which copies the run's split.")
    split = obs["split"].astype(str).to_numpy()
    is_train = split == "train"
    if is_train.all() or not (is_train | (split == "eval")).all() or not is_train.any():
        raise InputError(f"{where} obs 'split' must hold train and eval cells (found {sorted(set(split))}); "
                         "held-out selection needs data.preprocess.split > 0 when the run is trained.")
    return is_train


def held_out_auroc(X, labels, is_train, *, min_cells: int = 1) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, eval) one-vs-rest AUROC [n_features, values]: ``label_auroc`` on the train cells
    and on the eval cells alone, for the values with >= ``min_cells`` cells in both (same columns)."""
    lab = labels.reset_index(drop=True) if isinstance(labels, pd.Series) else pd.Series(np.asarray(labels))
    is_train = np.asarray(is_train, dtype=bool)
    X = _as_csc(X)
    frames = []
    for name, cells in (("train", is_train), ("eval", ~is_train)):
        try:
            frames.append(label_auroc(X, lab.where(cells), min_cells=min_cells))
        except InputError as err:
            raise InputError(f"held-out selection (choose on train cells, report on eval cells): the {name} cells "
                             f"give no one-vs-rest AUROC ({err}); use more cells or a larger data.preprocess.split."
                             ) from None
    train, held = frames
    both = [v for v in train.columns if v in set(held.columns)]
    return train[both], held[both]


def select_on_train(X, labels, is_train, *, min_cells: int = 1, top_n: int = 1,
                    min_train_auroc: float | None = None, prefer: dict | None = None) -> pd.DataFrame:
    """The one selection rule of every "best feature for a label": chosen on train cells, reported on eval.

    X: [n_cells, n_features] (SAE features or any candidate directions); labels [n_cells];
    is_train: bool [n_cells]. Per label value (>= min_cells cells in train and in eval) the
    ``top_n`` features ranked by train AUROC (ties: lower feature id). With ``prefer`` =
    {value: Series [n_features], lower = better} (e.g. a BH FDR, already corrected over all
    features), the features with train AUROC >= ``min_train_auroc`` come first, ordered by
    (prefer, -train AUROC), then the others by train AUROC. Returns rows ``label, rank (0 = best), feature_id, train_auroc,
    eval_auroc, n_train, n_eval``; eval_auroc is the held-out number to report.
    """
    lab = labels.reset_index(drop=True) if isinstance(labels, pd.Series) else pd.Series(np.asarray(labels))
    is_train = np.asarray(is_train, dtype=bool)
    train, held = held_out_auroc(X, lab, is_train, min_cells=min_cells)
    rows = []
    for value in train.columns:
        auc = train[value].to_numpy(dtype=np.float64)
        score = np.nan_to_num(auc, nan=-np.inf)
        order = np.argsort(-score, kind="stable")
        if prefer is not None and value in prefer:
            pref = np.nan_to_num(np.asarray(prefer[value], dtype=np.float64), nan=np.inf)
            ok = score >= (-np.inf if min_train_auroc is None else min_train_auroc)
            order = np.lexsort((-score, np.where(ok, pref, np.inf), ~ok))  # last key first: eligible, then prefer, then AUROC
        n_train, n_eval = int((lab[is_train] == value).sum()), int((lab[~is_train] == value).sum())
        for rank, f in enumerate(order[:top_n]):
            rows.append({"label": value, "rank": rank, "feature_id": int(f), "train_auroc": float(auc[f]),
                         "eval_auroc": float(held[value].iloc[f]), "n_train": n_train, "n_eval": n_eval})
    return pd.DataFrame(rows, columns=["label", "rank", "feature_id", "train_auroc", "eval_auroc", "n_train", "n_eval"])


def label_scoring(
    features_X,
    obs: pd.DataFrame,
    label_keys: list[str],
    *,
    min_cells: int = 10,
    metrics=("auroc",),
    batch_key: str | None = None,
    cell_type_key: str | None = None,
    batch_auroc_threshold: float = 0.7,
    is_train: np.ndarray | None = None,
) -> pd.DataFrame:
    """Label score table for several ``obs`` columns.

    features_X: [n_cells, n_features]; obs: [n_cells, ...] aligned by position.
    metrics: any of ``auroc``, ``f1``, ``ami``. Per key, in this order:
    ``auroc:{key}={value}`` (one-vs-rest, values with >= min_cells cells), ``best:{key}``
    (str, value of max AUROC) and ``best_auroc:{key}``; ``f1:{key}={value}`` (F1 of the
    best threshold, same values); ``ami:{key}`` (AMI of the label and activation > 0).
    All on every (non-missing) cell given: descriptive per-feature numbers.

    is_train: bool [n_cells] (the run's split): then ``best:{key}`` is the value of max AUROC on
    the train cells and ``best_eval_auroc:{key}`` (instead of ``best_auroc:{key}``) the feature's
    AUROC for that value on the eval cells (values with >= min_cells cells in both; NaN when none).

    batch_key: when given, adds ``batch_associated`` (bool): the feature's max AUROC over the
    batch values (>= min_cells cells) is > ``batch_auroc_threshold`` AND > its max AUROC over
    the values of ``cell_type_key`` (that second condition is dropped when cell_type_key is
    None). Both columns are scored for the flag even when not in label_keys or metrics.
    Returns DataFrame [n_features, ...] with index ``feature_id`` 0..n_features-1 and
    ``attrs["tidy"]`` = {column: (label_key, label, metric)} (``sae4scfm.analysis.results``).
    """
    metrics = list(metrics)
    bad = [x for x in metrics if x not in LABEL_METRICS]
    if bad:
        raise InputError(f"unknown label metric(s) {bad} (analysis.label_metrics); choose from {list(LABEL_METRICS)}")
    X = _as_csc(features_X)
    if len(obs) != X.shape[0]:
        raise InputError(
            f"obs has {len(obs)} rows but the feature matrix has {X.shape[0]} cells; "
            "use the obs of the same dataset the features were extracted from"
        )
    flag_keys = [k for k in (batch_key, cell_type_key) if k is not None] if batch_key is not None else []
    all_keys = list(dict.fromkeys([*label_keys, *flag_keys]))
    for key in all_keys:
        if key not in obs.columns:
            raise InputError(
                f"label column {key!r} not found in obs; available columns: "
                f"{', '.join(map(str, obs.columns)) or '(none)'}. Fix the label key in the config."
            )
        col = obs[key]
        if col.isna().all():
            raise InputError(f"label column {key!r} in obs is entirely missing (NaN); choose another label key")
        n_distinct = col.dropna().nunique()
        if n_distinct < 2:
            raise InputError(
                f"label column {key!r} in obs has {n_distinct} distinct value; "
                "scoring needs at least 2, choose another label key"
            )
    scanned = dict(zip(all_keys, _scan_labels(X, [obs[k] for k in all_keys], min_cells, "f1" in metrics)))
    m = X.shape[1]
    parts = []
    keys: dict[str, tuple[str, str | None, str]] = {}  # wide column -> (label_key, label, metric)
    max_auroc = {}
    for key in all_keys:
        uniques, keep, st, n = scanned[key]
        if keep.size == 0:
            raise InputError(
                f"no value of label column {key!r} has at least min_cells={min_cells} cells; "
                "lower min_cells or choose another label key"
            )
        values = [str(uniques[k]) for k in keep]
        auc = st["auroc"][keep].T  # [m, n_kept]
        max_auroc[key] = auc.max(axis=1)
        if key not in label_keys:
            continue
        part = {}
        if "auroc" in metrics:
            part.update({f"auroc:{key}={v}": auc[:, j] for j, v in enumerate(values)})
            keys.update({f"auroc:{key}={v}": (key, v, "auroc") for v in values})
            if is_train is None:
                best = np.argmax(auc, axis=1)
                part[f"best:{key}"] = np.asarray(values, dtype=object)[best]
                part[f"best_auroc:{key}"] = auc[np.arange(m), best]
                keys.update({f"best:{key}": (key, None, "best"), f"best_auroc:{key}": (key, None, "best_auroc")})
            else:
                part.update(_best_held_out(X, obs[key], is_train, min_cells, key))
                keys.update({f"best:{key}": (key, None, "best"),
                             f"best_eval_auroc:{key}": (key, None, "best_eval_auroc")})
        if "f1" in metrics:
            part.update({f"f1:{key}={v}": st["f1"][j] for j, v in enumerate(values)})
            keys.update({f"f1:{key}={v}": (key, v, "f1") for v in values})
        if "ami" in metrics:
            part[f"ami:{key}"] = _ami_active(st["active"], st["n_pos"], n)
            keys[f"ami:{key}"] = (key, None, "ami")
        parts.append(pd.DataFrame(part, index=pd.RangeIndex(m, name=INDEX_NAME)))
    if batch_key is not None:
        flag = max_auroc[batch_key] > batch_auroc_threshold
        if cell_type_key is not None:
            flag &= max_auroc[batch_key] > max_auroc[cell_type_key]
        parts.append(pd.DataFrame({"batch_associated": flag}, index=pd.RangeIndex(m, name=INDEX_NAME)))
    if not parts:
        return pd.DataFrame(index=pd.RangeIndex(m, name=INDEX_NAME))
    out = pd.concat(parts, axis=1)
    out.index = pd.RangeIndex(m, name=INDEX_NAME)
    out.attrs["tidy"] = keys  # the long results table's label_key / label / metric of each column
    return out


def _best_held_out(X, labels, is_train, min_cells: int, key: str) -> dict:
    """Per feature: the label value of max train AUROC and the feature's eval AUROC for it."""
    try:
        train, held = held_out_auroc(X, labels, is_train, min_cells=min_cells)
    except InputError:  # fewer than 2 values among the train or the eval cells
        train = held = pd.DataFrame(index=pd.RangeIndex(X.shape[1]))
    if train.shape[1] == 0:
        return {f"best:{key}": np.full(X.shape[1], "", dtype=object),
                f"best_eval_auroc:{key}": np.full(X.shape[1], np.nan)}
    best = np.argmax(np.nan_to_num(train.to_numpy(), nan=-np.inf), axis=1)
    return {f"best:{key}": np.asarray([str(v) for v in train.columns], dtype=object)[best],
            f"best_eval_auroc:{key}": held.to_numpy()[np.arange(X.shape[1]), best]}


# --------------------------------------------------------------------------- kNN

EXACT_KNN_MAX_CELLS = 50_000  # above this many cells, kNN is approximate (pynndescent)


def nearest_neighbors(X, k: int, *, exact_max_cells: int = EXACT_KNN_MAX_CELLS,
                      seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Euclidean kNN of every row of ``X`` [cells, d] among the rows, itself included as the first
    neighbour: (distances [cells, k] float, indices [cells, k] int64), nearest first. Never the brute
    [cells, cells] distance matrix: up to ``exact_max_cells`` cells an exact ball-tree search
    (sklearn ``NearestNeighbors``), above it pynndescent's approximate graph (recall ~0.99 at the
    defaults; seeded by ``seed``)."""
    X = np.asarray(X.toarray() if sp.issparse(X) else X, dtype=np.float32)
    n = X.shape[0]
    if not 1 <= k <= n:
        raise InputError(f"kNN with k={k} needs 1 <= k <= the number of cells ({n}).")
    if n <= exact_max_cells:
        from sklearn.neighbors import NearestNeighbors

        dist, idx = NearestNeighbors(n_neighbors=k, algorithm="ball_tree").fit(X).kneighbors(X)
    else:
        from pynndescent import NNDescent

        idx, dist = NNDescent(X, n_neighbors=k, metric="euclidean", random_state=seed).neighbor_graph
    return dist, idx.astype(np.int64)
