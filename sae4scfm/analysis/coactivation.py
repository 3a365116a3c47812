"""Co-activation of SAE features: co-firing PMI, significance, modules, cross-layer matching.

Pure functions on a ``[tokens or cells, features]`` activation matrix ``X`` (for
example ``features/token_features.h5ad``'s CSR ``X``) and on decoder matrices
``W_dec [d_sae, d_in]``. A feature *fires* on a row where its activation is ``> 0``.

Everything feature x feature is computed sparsely: with ``B = (X > 0)`` as a CSR
matrix, the co-firing counts are ``C = B^T B``, which only holds the pairs that
co-fire at least once, and of it only the upper triangle ``i < j``, in blocks of features
(``_upper_cooccurrence``); no dense ``features x features`` matrix is built (only
:func:`match_by_decoder` builds dense cosine blocks, ``chunk`` rows of A at a time). ``X`` may stay
on disk (a backed ``token_features.h5ad``): the counts are summed over blocks of rows
(``_cofiring``, ``primitives.row_blocks``), so memory is one block plus the co-firing pairs.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pandas as pd
import scipy.sparse as sp

from sae4scfm.analysis.enrichment import hypergeom_sf
from sae4scfm.analysis.primitives import ROW_CHUNK, as_dense, bh_fdr, firing, n_rows, row_blocks, row_bounds
from sae4scfm.errors import InputError

__all__ = [
    "CofiringPMI",
    "cofiring_pmi",
    "significant_pairs",
    "coactivation_modules",
    "match_by_decoder",
    "match_by_cofiring",
    "persistence",
    "guilt_by_association",
    "unannotated_summary",
]


class CofiringPMI(NamedTuple):
    """Result of :func:`cofiring_pmi`: two CSR ``[features, features]`` matrices with the same pattern."""

    pmi: sp.csr_matrix
    counts: sp.csr_matrix


# --------------------------------------------------------------------------- helpers


def _check_min_count(min_count) -> int:
    if isinstance(min_count, bool) or not isinstance(min_count, (int, np.integer)) or min_count < 1:
        raise InputError(f"min_count: expected an integer >= 1, got {min_count!r}.")
    return int(min_count)


class _Pairs(NamedTuple):
    row: np.ndarray
    col: np.ndarray
    data: np.ndarray


def _cooccurrence(B_a: sp.csr_matrix, B_b: sp.csr_matrix) -> _Pairs:
    """Sparse ``B_a^T B_b`` (int counts) as (row, col, count) arrays, only pairs that co-fire at least once."""
    C = B_a.T.tocsr() @ B_b  # CSR product: no duplicate entries
    row = np.repeat(np.arange(C.shape[0], dtype=C.indices.dtype), np.diff(C.indptr))
    return _Pairs(row, C.indices, C.data)


def _upper_cooccurrence(B: sp.csr_matrix, chunk: int = 1024) -> _Pairs:
    """The pairs ``i < j`` of ``B^T B`` (int counts) that co-fire at least once, computed ``chunk``
    features at a time against the features after them: never both triangles, never more than
    one block ``[chunk, features]`` of counts at once."""
    Bt = B.T.tocsr()  # [features, rows]
    n_feat = B.shape[1]
    parts = []
    for s in range(0, n_feat, chunk):
        C = (Bt[s:s + chunk] @ Bt[s:].T).tocsr()  # [chunk, features - s]: pairs (s + a, s + b)
        row = np.repeat(np.arange(C.shape[0], dtype=np.int64), np.diff(C.indptr)) + s
        col = C.indices.astype(np.int64) + s
        upper = row < col
        parts.append((row[upper], col[upper], C.data[upper]))
    if not parts:
        return _Pairs(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64))
    return _Pairs(*(np.concatenate(t) for t in zip(*parts)))


class _Cofiring(NamedTuple):
    n: int  # rows
    n_a: np.ndarray  # [features of A] int64 rows where each fires
    n_b: np.ndarray  # [features of B] (A's own for the upper triangle)
    pairs: _Pairs  # co-firing counts (int64) of the pairs that co-fire at least once


def _cofiring(X_a, X_b=None, *, chunk: int = ROW_CHUNK) -> _Cofiring:
    """Firing and co-firing counts of ``X_a`` [N, n_a] with ``X_b`` [N, n_b] (``B_a^T B_b``), or with
    itself (``X_b`` None: the upper triangle ``i < j``), summed over blocks of ``chunk`` rows
    (``row_blocks``: an on-disk matrix is never read whole). Integer counts: exact whatever ``chunk``."""
    if X_b is not None and n_rows(X_a) != n_rows(X_b):
        raise InputError(
            f"X_a has {n_rows(X_a)} rows but X_b has {n_rows(X_b)}; match_by_cofiring needs the same tokens/cells "
            "in the same order (encode the same dataset with both SAEs)."
        )
    bounds = row_bounds(X_a, *([] if X_b is None else [X_b]), chunk=chunk)  # the same row blocks of both
    blocks_b = row_blocks(X_b, "X_b", bounds=bounds) if X_b is not None else None
    n_a = n_b = acc = None
    for _, A in row_blocks(X_a, "X_a" if X_b is not None else "X", bounds=bounds):
        Ba = firing(A, dtype=np.int32)
        Bb = firing(next(blocks_b)[1], "X_b", dtype=np.int32) if blocks_b is not None else Ba
        pairs = _cooccurrence(Ba, Bb) if blocks_b is not None else _upper_cooccurrence(Ba)
        C = sp.csr_matrix((pairs.data.astype(np.int64), (pairs.row, pairs.col)), shape=(Ba.shape[1], Bb.shape[1]))
        ca = np.asarray(Ba.sum(axis=0)).ravel().astype(np.int64)
        cb = np.asarray(Bb.sum(axis=0)).ravel().astype(np.int64)
        n_a, n_b, acc = (ca, cb, C) if acc is None else (n_a + ca, n_b + cb, acc + C)
    if acc is None:  # an on-disk matrix without rows
        width_a = getattr(X_a, "X", X_a).shape[1]
        width_b = getattr(X_b, "X", X_b).shape[1] if X_b is not None else width_a
        n_a, n_b, acc = np.zeros(width_a, np.int64), np.zeros(width_b, np.int64), sp.csr_matrix((width_a, width_b))
    acc = acc.tocoo()
    return _Cofiring(n_rows(X_a), n_a, n_b, _Pairs(acc.row.astype(np.int64), acc.col.astype(np.int64),
                                                   acc.data.astype(np.int64)))


def _pmi_values(count, n_i, n_j, n_rows):
    """``log(P(i,j) / (P(i) P(j))) = log(count * N / (n_i * n_j))`` in float64."""
    return np.log(count.astype(np.float64)) + np.log(float(n_rows)) - np.log(n_i.astype(np.float64)) - np.log(
        n_j.astype(np.float64)
    )


# --------------------------------------------------------------------------- PMI


def cofiring_pmi(X, *, min_count: int = 5, chunk: int = ROW_CHUNK) -> CofiringPMI:
    """Pointwise mutual information of co-firing for every pair of features that co-fire.

    ``PMI(i, j) = log(P(i, j) / (P(i) P(j)))`` (natural log), with ``P(i) = n_i / N``
    the fraction of the ``N`` rows where feature ``i`` fires (``X > 0``) and
    ``P(i, j) = c_ij / N`` the fraction where both fire.

    Returns :class:`CofiringPMI` ``(pmi, counts)``: symmetric CSR ``[features, features]``
    matrices holding only the off-diagonal pairs with ``c_ij >= min_count``. ``counts``
    defines the pattern; ``pmi`` has the same pattern and may store explicit zeros
    (``PMI == 0`` means independence, not "not tested"). Rows are read ``chunk`` at a time
    (``_cofiring``; the result does not depend on it).
    """
    min_count = _check_min_count(min_count)
    n, n_fire, _, C = _cofiring(X, chunk=chunk)
    n_feat = len(n_fire)
    keep = C.data >= min_count
    row, col, cnt = C.row[keep], C.col[keep], C.data[keep]
    del C
    row, col, cnt = np.concatenate([row, col]), np.concatenate([col, row]), np.concatenate([cnt, cnt])  # symmetric
    pmi = _pmi_values(cnt, n_fire[row], n_fire[col], n)
    shape = (n_feat, n_feat)
    counts = sp.csr_matrix((cnt, (row, col)), shape=shape)
    pmi_m = sp.csr_matrix((pmi, (row, col)), shape=shape)
    return CofiringPMI(pmi=pmi_m, counts=counts)


def significant_pairs(X, *, min_count: int = 5, max_fdr: float = 0.05, chunk: int = ROW_CHUNK) -> pd.DataFrame:
    """Co-firing feature pairs with a one-sided hypergeometric test and BH FDR over all pairs.

    Every pair ``i < j`` of the ``F`` features is a test: ``F (F - 1) / 2`` tests. The p-value
    is ``P(K >= count)`` for ``K ~ Hypergeom(N, n_i, n_j)`` (``N`` rows, ``n_i`` rows where
    ``i`` fires), i.e. the one-sided Fisher exact test (``alternative='greater'``) on the 2x2
    firing table; a pair that never co-fires has p = 1 exactly and enters the correction
    without being computed. ``fdr`` is the Benjamini-Hochberg adjustment over all the pairs
    (= statsmodels ``multipletests(p_all_pairs, method="fdr_bh")``); the p-values are one
    vectorised ``scipy.stats.hypergeom.sf`` call, never a Python loop over pairs.

    ``min_count`` only filters the rows returned (a pair co-firing on fewer rows is still a
    test), as does ``max_fdr`` (rows with ``fdr <= max_fdr``; ``max_fdr=1.0, min_count=1``
    returns every pair that co-fires). Returns a DataFrame with columns
    ``i, j, count, pmi, p_value, fdr``, sorted by ``(i, j)``; ``attrs["n_tests"]`` = the number
    of pairs tested. Rows are read ``chunk`` at a time (``_cofiring``; the result does not depend on it).
    """
    min_count = _check_min_count(min_count)
    if not (0.0 <= float(max_fdr) <= 1.0):
        raise InputError(f"max_fdr: expected a number in [0, 1], got {max_fdr!r}.")
    n, n_fire, _, C = _cofiring(X, chunk=chunk)
    n_feat = len(n_fire)
    n_tests = n_feat * (n_feat - 1) // 2
    i, j, cnt = C.row, C.col, C.data
    del C
    order = np.lexsort((j, i))
    i, j, cnt = i[order], j[order], cnt[order]
    n_i, n_j = n_fire[i], n_fire[j]
    p = hypergeom_sf(cnt, n, n_i, n_j)
    fdr = bh_fdr(p, n_tests=n_tests)  # the pairs that never co-fire: p = 1, counted in n_tests
    report = (cnt >= min_count) & (fdr <= max_fdr)
    i, j, cnt, p, fdr = i[report], j[report], cnt[report], p[report], fdr[report]
    pmi = _pmi_values(cnt, n_fire[i], n_fire[j], n)
    df = pd.DataFrame({"i": i, "j": j, "count": cnt, "pmi": pmi, "p_value": p, "fdr": fdr})
    df.attrs["n_tests"] = n_tests
    return df


# --------------------------------------------------------------------------- modules


def coactivation_modules(pairs: pd.DataFrame, n_features: int, *, resolution: float = 1.0, seed: int = 0) -> np.ndarray:
    """Leiden communities of the co-firing graph.

    ``pairs`` has columns ``i, j, pmi`` (e.g. from :func:`significant_pairs`); each row
    is an undirected edge weighted by ``max(pmi, 0)`` (edges with weight 0 are dropped).
    Uses ``leidenalg.RBConfigurationVertexPartition`` with ``resolution_parameter=resolution``.

    Returns an int array of length ``n_features``: the module of each feature,
    numbered from 0 by decreasing size; features with no positive edge get ``-1``.
    """
    import igraph as ig
    import leidenalg

    if isinstance(n_features, bool) or not isinstance(n_features, (int, np.integer)) or n_features < 0:
        raise InputError(f"n_features: expected an integer >= 0, got {n_features!r}.")
    n_features = int(n_features)
    missing = {"i", "j", "pmi"} - set(pairs.columns)
    if missing:
        raise InputError(f"pairs: missing column(s) {sorted(missing)}; pass the DataFrame from significant_pairs().")
    i = pairs["i"].to_numpy(dtype=np.int64)
    j = pairs["j"].to_numpy(dtype=np.int64)
    w = np.clip(pairs["pmi"].to_numpy(dtype=np.float64), 0.0, None)
    if i.size and (min(i.min(), j.min()) < 0 or max(i.max(), j.max()) >= n_features):
        raise InputError(f"pairs: feature indices must lie in [0, {n_features}); raise n_features or fix the pairs.")
    keep = (w > 0) & np.isfinite(w) & (i != j)
    i, j, w = i[keep], j[keep], w[keep]
    labels = np.full(n_features, -1, dtype=np.int64)
    if i.size == 0:
        return labels
    g = ig.Graph(n=n_features, edges=list(zip(i.tolist(), j.tolist())), directed=False)
    g.es["weight"] = w.tolist()
    part = leidenalg.find_partition(
        g,
        leidenalg.RBConfigurationVertexPartition,
        weights="weight",
        resolution_parameter=float(resolution),
        seed=int(seed),
    )
    member = np.asarray(part.membership, dtype=np.int64)
    connected = np.asarray(g.degree()) > 0
    member = np.where(connected, member, -1)
    # renumber connected modules 0.. by decreasing size (ties: smallest old id first)
    ids, sizes = np.unique(member[connected], return_counts=True)
    order = ids[np.lexsort((ids, -sizes))]
    remap = {int(old): new for new, old in enumerate(order)}
    labels[connected] = [remap[int(m)] for m in member[connected]]
    return labels


# --------------------------------------------------------------------------- cross-layer matching


def match_by_decoder(W_dec_a, W_dec_b, *, chunk: int = 1024) -> pd.DataFrame:
    """For each feature of A, the feature of B whose decoder direction is closest.

    ``W_dec_a [n_a, d]``, ``W_dec_b [n_b, d]`` (rows are decoder directions, as in
    ``sae.safetensors``). Similarity is ``|cos|`` so a sign-flipped direction counts as
    the same feature. Returns columns ``feature_a, best_b, cosine`` (``cosine`` = the
    max ``|cos|``) and ``signed_cosine`` (the cosine at that match). Zero rows give
    cosine 0. Ties go to the smallest index of B.
    """
    A = as_dense(W_dec_a, "W_dec_a")
    Bm = as_dense(W_dec_b, "W_dec_b")
    if A.shape[1] != Bm.shape[1]:
        raise InputError(
            f"W_dec_a has d_in={A.shape[1]} but W_dec_b has d_in={Bm.shape[1]}; decoder matching needs the same "
            "residual width (compare SAEs of the same model, or use match_by_cofiring on aligned tokens)."
        )
    if Bm.shape[0] == 0:
        raise InputError("W_dec_b has no features (shape [0, d]); nothing to match against.")

    def _unit(M):
        norm = np.linalg.norm(M, axis=1, keepdims=True)
        return np.divide(M, norm, out=np.zeros_like(M), where=norm > 0)

    A, Bm = _unit(A), _unit(Bm)
    n_a = A.shape[0]
    best = np.empty(n_a, dtype=np.int64)
    signed = np.empty(n_a, dtype=np.float64)
    step = max(1, int(chunk))
    for s in range(0, n_a, step):
        cos = A[s : s + step] @ Bm.T
        k = np.argmax(np.abs(cos), axis=1)
        best[s : s + step] = k
        signed[s : s + step] = cos[np.arange(cos.shape[0]), k]
    signed = np.clip(signed, -1.0, 1.0)
    return pd.DataFrame({"feature_a": np.arange(n_a), "best_b": best, "cosine": np.abs(signed), "signed_cosine": signed})


def match_by_cofiring(X_a, X_b, *, metric: str = "jaccard", min_count: int = 1,
                      chunk: int = ROW_CHUNK) -> pd.DataFrame:
    """For each feature of A, the feature of B that fires on the most similar rows.

    ``X_a [N, n_a]`` and ``X_b [N, n_b]`` must be on the same rows (tokens/cells) in
    the same order, e.g. two layers' ``token_features.h5ad``. Computed sparsely from
    the co-firing counts ``B_a^T B_b``.

    ``metric="jaccard"`` (default): ``|F_a ∩ F_b| / |F_a ∪ F_b|`` of the firing sets,
    in [0, 1], so a fixed threshold is meaningful in :func:`persistence`.
    ``metric="pmi"``: ``log(P(a, b) / (P(a) P(b)))``; it favours rare features and is
    unbounded, so use it with ``min_count`` > 1.

    Returns columns ``feature_a, best_b, <metric>, count`` (``count`` = co-firing
    rows). Features of A that co-fire with no feature of B (at least ``min_count``
    times) get ``best_b = -1``, score 0 (jaccard) or NaN (pmi), count 0. Ties go to
    the smallest index of B. Rows are read ``chunk`` at a time (``_cofiring``).
    """
    if metric not in ("jaccard", "pmi"):
        raise InputError(f"metric: expected 'jaccard' or 'pmi', got {metric!r}.")
    min_count = _check_min_count(min_count)
    n, na, nb, C = _cofiring(X_a, X_b, chunk=chunk)
    n_a = len(na)
    keep = C.data >= min_count
    r, c, cnt = C.row[keep], C.col[keep], C.data[keep]
    del C
    if metric == "jaccard":
        score = cnt / (na[r] + nb[c] - cnt).astype(np.float64)
    else:
        score = _pmi_values(cnt, na[r], nb[c], n)
    best = np.full(n_a, -1, dtype=np.int64)
    out_score = np.full(n_a, 0.0 if metric == "jaccard" else np.nan)
    out_cnt = np.zeros(n_a, dtype=np.int64)
    if r.size:
        order = np.lexsort((c, -score, r))  # per row: highest score, then smallest column
        rows_sorted = r[order]
        first = order[np.r_[True, rows_sorted[1:] != rows_sorted[:-1]]]
        best[r[first]] = c[first]
        out_score[r[first]] = score[first]
        out_cnt[r[first]] = cnt[first]
    return pd.DataFrame({"feature_a": np.arange(n_a), "best_b": best, metric: out_score, "count": out_cnt})


_SCORE_COLUMNS = ("cosine", "jaccard", "pmi")


def persistence(match_df: pd.DataFrame, threshold: float, *, column: str | None = None) -> float:
    """Fraction of A's features (rows of ``match_df``) with a match scoring ``>= threshold``.

    ``column`` defaults to the first of ``cosine``, ``jaccard``, ``pmi`` present, so it
    works on the output of :func:`match_by_decoder` and :func:`match_by_cofiring`.
    Rows with ``best_b < 0`` (no match) or a NaN score never count as matched.
    """
    if column is None:
        column = next((c for c in _SCORE_COLUMNS if c in match_df.columns), None)
        if column is None:
            raise InputError(
                f"match_df: no score column ({', '.join(_SCORE_COLUMNS)}); pass the output of match_by_decoder / "
                "match_by_cofiring or name the column with column=."
            )
    elif column not in match_df.columns:
        raise InputError(f"column: {column!r} is not a column of match_df ({list(match_df.columns)}).")
    if len(match_df) == 0:
        raise InputError("match_df is empty: A has no features, so persistence is undefined.")
    score = match_df[column].to_numpy(dtype=np.float64)
    ok = score >= float(threshold)
    if "best_b" in match_df.columns:
        ok &= match_df["best_b"].to_numpy() >= 0
    return float(np.mean(ok))


# --------------------------------------------------------------------------- unannotated features

UNANNOTATED_COLUMNS = ["feature_id", "n_fire", "cofiring_partner", "cofiring_jaccard", "cofiring_pmi", "cofiring_count",
                       "cofiring_partner_term", "decoder_partner", "decoder_cosine", "decoder_partner_term"]


def guilt_by_association(X, W_dec, annotated, terms) -> pd.DataFrame:
    """Characterise the unannotated features by the annotated ones they resemble (guilt by association).

    ``X [rows, F]`` activations (cells or tokens; fires = ``> 0``), ``W_dec [F, d]`` decoder directions,
    ``annotated`` bool ``[F]`` (the feature has an enriched term), ``terms`` ``[F]`` the best term of
    each annotated feature. For every feature with ``annotated == False``, one row: ``n_fire`` (rows
    where it fires); its best co-firing annotated partner by Jaccard of the firing sets
    (:func:`match_by_cofiring`), that pair's ``cofiring_pmi`` (natural log) and ``cofiring_count``;
    the annotated feature with the closest decoder direction by ``|cos|`` (:func:`match_by_decoder`);
    and each partner's term. No partner: ``-1``, Jaccard 0, PMI NaN, term ``""`` (a feature that never
    fires has no co-firing partner; with no annotated feature at all there is no partner of either kind).
    Columns :data:`UNANNOTATED_COLUMNS`, sorted by decreasing ``cofiring_jaccard`` then ``feature_id``.
    """
    B = firing(X, dtype=np.int32).tocsc()
    W = as_dense(W_dec, "W_dec")
    annotated = np.asarray(annotated, dtype=bool).ravel()
    terms = np.asarray(terms, dtype=object).ravel()
    n_rows, n_feat = B.shape
    if not (W.shape[0] == annotated.size == terms.size == n_feat):
        raise InputError(f"guilt_by_association: X has {n_feat} features but W_dec has {W.shape[0]} rows, "
                         f"annotated {annotated.size} and terms {terms.size} entries; pass them for the same SAE.")
    un, ann = np.flatnonzero(~annotated), np.flatnonzero(annotated)
    n_fire = np.asarray(B.sum(axis=0)).ravel().astype(np.int64)
    out = pd.DataFrame({"feature_id": un, "n_fire": n_fire[un], "cofiring_partner": -1, "cofiring_jaccard": 0.0,
                        "cofiring_pmi": np.nan, "cofiring_count": 0, "cofiring_partner_term": "",
                        "decoder_partner": -1, "decoder_cosine": np.nan, "decoder_partner_term": ""},
                       columns=UNANNOTATED_COLUMNS)
    if un.size and ann.size:
        fire = match_by_cofiring(B[:, un], B[:, ann], metric="jaccard")
        best = fire["best_b"].to_numpy()
        hit = np.flatnonzero(best >= 0)
        partner = ann[best[hit]]
        cnt = fire["count"].to_numpy()
        out["cofiring_jaccard"] = fire["jaccard"].to_numpy()
        out["cofiring_count"] = cnt
        out.loc[hit, "cofiring_partner"] = partner
        out.loc[hit, "cofiring_pmi"] = _pmi_values(cnt[hit], n_fire[un[hit]], n_fire[partner], n_rows)
        out.loc[hit, "cofiring_partner_term"] = terms[partner]
        dec = match_by_decoder(W[un], W[ann])
        out["decoder_partner"] = ann[dec["best_b"].to_numpy()]
        out["decoder_cosine"] = dec["cosine"].to_numpy()
        out["decoder_partner_term"] = terms[out["decoder_partner"].to_numpy()]
    out = out.sort_values(["cofiring_jaccard", "feature_id"], ascending=[False, True], kind="stable")
    return out.reset_index(drop=True)


def unannotated_summary(table: pd.DataFrame, n_features: int, *, min_jaccard: float = 0.3,
                        min_cosine: float = 0.5, top: int = 10) -> dict:
    """Summary-ready numbers of a :func:`guilt_by_association` table: ``n_features``,
    ``n_unannotated``, ``fraction_unannotated``, ``n_never_fire``, ``n_cofiring_partner`` (best
    co-firing partner with Jaccard >= ``min_jaccard``), ``n_decoder_partner`` (|cos| >= ``min_cosine``),
    median Jaccard / |cos| over the unannotated features that fire, and ``top``: the ``top`` rows with the
    highest Jaccard as dicts (feature_id, partner, jaccard, pmi, term, decoder partner, cosine, term)."""
    if n_features < 1:
        raise InputError(f"unannotated_summary: n_features must be >= 1, got {n_features}")
    fires = table["n_fire"].to_numpy() > 0
    jac = table["cofiring_jaccard"].to_numpy(dtype=np.float64)
    cos = table["decoder_cosine"].to_numpy(dtype=np.float64)
    rows = table.sort_values(["cofiring_jaccard", "feature_id"], ascending=[False, True], kind="stable").head(int(top))
    return {
        "n_features": int(n_features),
        "n_unannotated": int(len(table)),
        "fraction_unannotated": len(table) / n_features,
        "n_never_fire": int((~fires).sum()),
        "n_cofiring_partner": int((jac >= min_jaccard).sum()),
        "n_decoder_partner": int((np.nan_to_num(cos, nan=0.0) >= min_cosine).sum()),
        "median_jaccard": float(np.median(jac[fires])) if fires.any() else float("nan"),
        "median_decoder_cosine": float(np.nanmedian(cos[fires])) if fires.any() and np.isfinite(cos[fires]).any()
        else float("nan"),
        "min_jaccard": float(min_jaccard), "min_cosine": float(min_cosine),
        "top": rows.to_dict("records"),
    }
