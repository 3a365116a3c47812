"""Gene-level scores of SAE features: token firing per gene, cell correlations, gene families, density.

All functions are pure (AnnData / scipy.sparse in, numpy / pandas out) and vectorised with
sparse matrix products; none loops over features, tokens or cells in Python.

"Fires" always means activation ``> 0`` (``sae4scfm.analysis.primitives``).

* :func:`token_gene_scores` – per (feature, gene) from ``token_features.h5ad`` (tokens x
  features, ``obs["gene"]``), long table of the pairs where the feature fires on the gene at
  least once. With ``N`` tokens (those with a gene), ``n_g`` tokens of gene g, ``c_f`` firing
  tokens of feature f and ``c_fg`` firing tokens of f on g:

  - ``freq = c_fg / n_g`` – firing frequency on that gene's tokens;
  - ``mean_act`` – mean activation over those ``c_fg`` firing tokens;
  - ``log2_enrichment = log2( (c_fg / c_f) / (n_g / N) )`` – specificity: how much more likely
    the gene is among the feature's firing tokens than among all tokens (its base rate).
    0 = no preference; no pseudocount (rows only exist where ``c_fg > 0``, so it is finite).
    Equivalently ``log2(freq / (c_f / N))``: the gene's firing rate over the feature's
    overall firing rate.

  :func:`gene_score_matrix` pivots a column of that table to a dense ``[features, genes]`` array.
* :func:`cell_gene_correlation` – Pearson r between every feature (cells x features) and
  every gene (cells x genes) from sparse moments; NaN where either side is constant.
* At scale, no dense ``[features, genes]`` is held: :func:`correlation_chunks` /
  :func:`table_score_chunks` yield blocks of features, and :func:`feature_gene_summary` reduces
  them to each feature's top genes, participation ratio, tail threshold and best score.
* :func:`top_genes` – top genes per feature, fixed N or adaptive (participation ratio of the
  positive tail, :func:`tail_participation_ratio`); :func:`top_genes_k_summary` – the k chosen.
* :func:`gene_family_scores` – fraction of each feature's firing mass on gene families
  (ribosomal, mitochondrial, MHC, histone, immunoglobulin, TCR, metallothionein by default).
* :func:`density_scores` / :func:`expression_where_firing` – how often features fire, and the
  library size of the cells where they fire vs the rest.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from sae4scfm.analysis.primitives import (
    ROW_CHUNK,
    as_matrix,
    fire_counts,
    firing,
    n_rows,
    on_disk,
    positive,
    row_blocks,
    row_bounds,
)
from sae4scfm.errors import InputError

TOKEN_GENE_COLUMNS = ("feature_id", "gene", "n_tokens", "n_fire", "freq", "mean_act", "log2_enrichment")

# Human HGNC symbols, case-sensitive (mouse symbols such as "Rpl13a", "mt-Co1" do not match;
# pass your own ``families`` for other species). Tested on real symbols in tests/test_gene_scoring.py.
DEFAULT_FAMILIES: dict[str, str] = {
    # RPL13A, RPS27A, RPLP0; not MRPL* (anchored), RPE65, RPN1
    "ribosomal": r"^RP[SL]\d|^RPLP\d",
    # MT-CO1, MT-ND4; not MTOR, MT2A
    "mitochondrial": r"^MT-",
    # HLA-DRA, HLA-A; not HLAB (no dash)
    "MHC": r"^HLA-",
    # HIST1H4C, H2AFZ, H3F3A, H1-2, H4C3, H2BC12; not H19 (lncRNA: a digit after H[1-4])
    "histone": r"^HIST|^H[1-4](?!\d)",
    # V/D/J/C segments (IGHV3-23, IGKC, IGLC2) and heavy constant genes IGHM, IGHD, IGHE,
    # IGHG1-4, IGHA1/2; not IGHMBP2, IGF1, IGLON5, IGLL1
    "immunoglobulin": r"^IG[HKL][VDJC]|^IGH(M|E)$|^IGHG[1-4P]|^IGHA[12]$",
    # TRAV/TRAJ/TRAC, TRBC1, TRBD1, TRDC, TRGV9; not TRADD, TRAF1, TRDN (D segments need a digit)
    "T-cell receptor": r"^TR[ABGD][VJC]|^TR[ABGD]D\d",
    # MT1X, MT2A, MT1G, MT3, MT4; not MT-CO1, MTOR
    "metallothionein": r"^MT[12][A-Z]|^MT[34]$",
}


# --------------------------------------------------------------------------- helpers


def _gene_codes(obs: pd.DataFrame, gene_key: str):
    if gene_key not in obs.columns:
        raise InputError(
            f"token features obs has no column {gene_key!r} (columns: {list(obs.columns)}); "
            "use the run's features/token_features.h5ad or pass gene_key="
        )
    col = obs[gene_key]
    if isinstance(col.dtype, pd.CategoricalDtype):
        return col.cat.codes.to_numpy(np.int64), np.asarray(col.cat.categories, dtype=object)
    codes, uniques = pd.factorize(col, sort=True)
    return codes.astype(np.int64), np.asarray(uniques, dtype=object)


# --------------------------------------------------------------------------- token scores


def token_gene_scores(token_features, *, gene_key: str = "gene", chunk: int = ROW_CHUNK) -> pd.DataFrame:
    """Per (feature, gene) firing frequency, mean activation when firing and log2 enrichment.

    ``token_features``: AnnData tokens x features (``obs[gene_key]`` = the token's gene), in memory
    or backed (``read_h5ad(..., backed="r")``: X is streamed ``chunk`` tokens at a time, never read
    whole). Tokens with a missing gene are ignored (they count neither in ``N`` nor anywhere else).
    Returns a long DataFrame with :data:`TOKEN_GENE_COLUMNS` (see the module docstring), one
    row per pair with ``n_fire > 0``, sorted by ``feature_id`` then ``gene`` order
    (categories order for a categorical column, else sorted). Computed as the sums over token
    blocks of ``G.T @ (X > 0)`` and ``G.T @ max(X, 0)`` with the one-hot gene matrix
    ``G [tokens, genes]``; memory is one block plus the ``[genes, features]`` pairs that fire.
    Counts do not depend on ``chunk``; ``mean_act`` only up to float64 summation order (~1e-15).
    """
    obs = getattr(token_features, "obs", None)
    if obs is None:
        raise InputError("token_features must be an AnnData with obs[gene_key] (features/token_features.h5ad)")
    codes, genes = _gene_codes(obs, gene_key)
    n_tok = n_rows(token_features)
    if codes.shape[0] != n_tok:
        raise InputError(f"token_features obs has {codes.shape[0]} rows but X has {n_tok}")
    keep = codes >= 0
    n_g = np.bincount(codes[keep], minlength=len(genes)).astype(np.float64)  # tokens per gene
    N = float(keep.sum())
    GB = S = None
    for rows, X in row_blocks(token_features, "token_features", chunk=chunk, dtype=np.float64):
        code = codes[rows]
        hit = np.flatnonzero(code >= 0)
        G = sp.csr_matrix((np.ones(hit.size), (hit, code[hit])), shape=(X.shape[0], len(genes)))
        gb = sp.csr_matrix(G.T @ firing(X))  # [genes, features] firing counts
        s = sp.csr_matrix(G.T @ positive(X))  # [genes, features] summed positive activations
        GB, S = (gb, s) if GB is None else (GB + gb, S + s)
    if GB is None:  # an on-disk file without tokens
        GB = S = sp.csr_matrix((len(genes), getattr(token_features, "X", token_features).shape[1]))
    c_f = np.asarray(GB.sum(axis=0)).ravel()  # firing tokens per feature (tokens with a gene)
    C = GB.tocoo()
    g, f, c = C.row, C.col, C.data
    nz = c > 0
    g, f, c = g[nz], f[nz], c[nz]
    s = np.asarray(S[g, f]).ravel()
    order = np.lexsort((g, f))
    g, f, c, s = g[order], f[order], c[order], s[order]
    with np.errstate(divide="ignore", invalid="ignore"):
        enrich = np.log2((c / c_f[f]) / (n_g[g] / N))
    return pd.DataFrame(
        {
            "feature_id": f.astype(np.int64),
            "gene": genes[g],
            "n_tokens": n_g[g].astype(np.int64),
            "n_fire": c.astype(np.int64),
            "freq": c / n_g[g],
            "mean_act": s / c,
            "log2_enrichment": enrich,
        },
        columns=list(TOKEN_GENE_COLUMNS),
    )


def gene_score_matrix(
    table: pd.DataFrame, value: str, *, n_features: int | None = None, genes: Sequence[str] | None = None,
    fill: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Dense ``[features, genes]`` array of one column of :func:`token_gene_scores`.

    ``genes`` fixes the column order (default: genes of the table, sorted); pairs absent from
    the table get ``fill``. ``n_features`` defaults to max ``feature_id`` + 1. Returns
    ``(array, genes)``.
    """
    for col in ("feature_id", "gene", value):
        if col not in table.columns:
            raise InputError(f"gene table has no column {col!r}; pass a token_gene_scores table")
    genes = np.asarray(sorted(pd.unique(table["gene"])) if genes is None else list(genes), dtype=object)
    gi = pd.Index(genes).get_indexer(table["gene"])
    if (gi < 0).any():
        raise InputError("gene table has genes that are not in `genes`; pass all of them or genes=None")
    fid = table["feature_id"].to_numpy(np.int64)
    m = int(fid.max()) + 1 if n_features is None and fid.size else int(n_features or 0)
    out = np.full((m, len(genes)), fill, dtype=np.float64)
    out[fid, gi] = table[value].to_numpy(np.float64)
    return out, genes


# --------------------------------------------------------------------------- correlation


def cell_gene_correlation(features_X, expression) -> np.ndarray:
    """Pearson r ``[features, genes]`` between feature activations and gene expression over cells.

    From sparse moments: ``cov = X.T @ E / n - mean_x mean_e``, ``var = mean(x^2) - mean_x^2``
    (float64); neither input is densified. NaN where the feature or the gene is constant over
    the cells (max == min, implicit zeros included). Clipped to [-1, 1]. The blocks of
    :func:`correlation_chunks`, stacked (for many features use those blocks instead).
    """
    if not on_disk(features_X):
        features_X = as_matrix(features_X, "features_X")
    blocks = [r for _, r in correlation_chunks(features_X, expression, chunk=max(features_X.shape[1], 1))]
    return np.vstack(blocks) if blocks else np.zeros((0, getattr(expression, "X", expression).shape[1]))


def correlation_chunks(features_X, expression, *, chunk: int = 1024,
                       cells: int = ROW_CHUNK) -> Iterator[tuple[slice, np.ndarray]]:
    """:func:`cell_gene_correlation` ``chunk`` features at a time: yields (feature slice, r [chunk, genes]
    float64), so that no dense [features, genes] array is ever held whole. The moments are summed over
    blocks of at most ``cells`` cells (``primitives.row_bounds``): neither matrix is copied whole."""
    # one canonical CSR each (no copy when it already is one), sliced into row blocks below
    X = getattr(features_X, "X", features_X) if on_disk(features_X) else as_matrix(features_X, "features_X")
    E = getattr(expression, "X", expression) if on_disk(expression) else as_matrix(expression, "expression")
    n = n_rows(X)
    if n_rows(E) != n:
        raise InputError(f"features_X has {n} cells but expression has {n_rows(E)}; pass the same cells in order")

    def moments(M) -> tuple:
        """Sum, sum of squares, max, min of every column of a block [rows, width] (implicit zeros count)."""
        return (np.asarray(M.sum(axis=0)).ravel(), np.asarray(M.multiply(M).sum(axis=0)).ravel(),
                M.max(axis=0).toarray().ravel(), M.min(axis=0).toarray().ravel())

    def merge(acc, part) -> tuple:
        return part if acc is None else (acc[0] + part[0], acc[1] + part[1], np.maximum(acc[2], part[2]),
                                         np.minimum(acc[3], part[3]))

    def finish(acc, width):
        if acc is None:  # no cells
            return np.zeros(width), np.zeros(width), np.ones(width, bool)
        s, sq, hi, lo = acc
        mean = s / n
        return mean, np.sqrt(np.maximum(sq / n - mean**2, 0.0)), hi == lo

    bounds = row_bounds(X, E, chunk=cells)  # the same cell blocks of both

    def blocks(M, name, cols=None):
        for _, B in row_blocks(M, name, bounds=bounds, dtype=np.float64):
            if B.shape[0] == 0:  # no cells: the moments stay empty (``finish``)
                continue
            yield B if cols is None or (cols.start, cols.stop) == (0, B.shape[1]) else B[:, cols]

    acc = None
    for B in blocks(E, "expression"):
        acc = merge(acc, moments(B))
    me, se, ce = finish(acc, E.shape[1])
    for start in range(0, X.shape[1], chunk):
        cols = slice(start, min(start + chunk, X.shape[1]))
        acc, cross = None, np.zeros((cols.stop - cols.start, E.shape[1]))
        for Xc, Eb in zip(blocks(X, "features_X", cols), blocks(E, "expression")):
            acc = merge(acc, moments(Xc))
            product = Xc.T @ Eb
            cross += product.toarray() if sp.issparse(product) else np.asarray(product)
        mx, sx, cx = finish(acc, cols.stop - cols.start)
        cov = cross / max(n, 1) - np.outer(mx, me)
        with np.errstate(divide="ignore", invalid="ignore"):
            r = cov / np.outer(sx, se)
        r = np.clip(r, -1.0, 1.0)
        r[cx, :] = np.nan
        r[:, ce] = np.nan
        yield cols, r


def table_score_chunks(table: pd.DataFrame, value: str, *, n_features: int, genes: Sequence[str],
                       fill: float = 0.0, chunk: int = 1024) -> Iterator[tuple[slice, np.ndarray]]:
    """:func:`gene_score_matrix` ``chunk`` features at a time: yields (feature slice, [chunk, genes])."""
    order = table.sort_values("feature_id", kind="stable")
    fid = order["feature_id"].to_numpy(np.int64)
    for start in range(0, n_features, chunk):
        stop = min(start + chunk, n_features)
        lo, hi = np.searchsorted(fid, [start, stop])
        part = order.iloc[lo:hi].assign(feature_id=fid[lo:hi] - start)
        yield slice(start, stop), gene_score_matrix(part, value, n_features=stop - start, genes=genes, fill=fill)[0]


def feature_gene_summary(chunks: Iterable[tuple[slice, np.ndarray]], genes: Sequence[str], n_features: int, *,
                         n: int = 20, tail_z: float = 3.0) -> dict:
    """Every per-feature summary of a ``[features, genes]`` score, from its blocks (``correlation_chunks``,
    ``table_score_chunks``), holding one block at a time. Returns ``top`` {feature: genes} (adaptive cut),
    ``top_fixed`` {feature: the n best}, and arrays [features]: ``participation_ratio``
    (:func:`tail_participation_ratio`), ``tail_threshold`` and ``max_score`` (NaN for an all-NaN row)."""
    out = {"top": {}, "top_fixed": {}, "participation_ratio": np.zeros(n_features),
           "tail_threshold": np.full(n_features, np.inf), "max_score": np.full(n_features, np.nan)}
    for rows, s in chunks:
        ids = range(rows.start, rows.stop)
        for key, adaptive in (("top", True), ("top_fixed", False)):
            block = top_genes(s, genes, n=n, adaptive=adaptive, tail_z=tail_z)
            out[key].update({f: block[i] for i, f in enumerate(ids)})
        out["participation_ratio"][rows] = tail_participation_ratio(s, tail_z)
        out["tail_threshold"][rows] = tail_threshold(s, tail_z)
        with np.errstate(invalid="ignore"):
            out["max_score"][rows] = np.where(np.isnan(s).all(1), np.nan, np.nanmax(np.nan_to_num(s, nan=-np.inf), 1))
    return out


# --------------------------------------------------------------------------- top genes


def participation_ratio(scores: np.ndarray) -> np.ndarray:
    """PR = (sum s)^2 / sum s^2 over the positive scores of each row (NaN/<=0 ignored); 0 if none.

    A row spread evenly over m genes gives m; one dominant gene gives ~1.
    """
    s = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    p = np.where(np.isfinite(s) & (s > 0), s, 0.0)
    num = p.sum(axis=1) ** 2
    den = (p**2).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / den, 0.0)


def tail_threshold(scores: np.ndarray, z: float = 3.0) -> np.ndarray:
    """Per row of ``scores [features, genes]``: where the positive tail starts,
    ``max(0, median + z * 1.4826 * MAD)`` over the row's finite scores (the robust outlier rule:
    most genes are unrelated to any one feature, so the median and MAD describe that bulk;
    1.4826 * MAD = sigma for a normal bulk). ``inf`` for a row without finite scores.
    """
    s = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    s = np.where(np.isfinite(s), s, np.nan)
    out = np.full(s.shape[0], np.inf)
    ok = ~np.isnan(s).all(axis=1)
    if ok.any():
        med = np.nanmedian(s[ok], axis=1)
        mad = np.nanmedian(np.abs(s[ok] - med[:, None]), axis=1)
        out[ok] = np.maximum(med + float(z) * 1.4826 * mad, 0.0)
    return out


def tail_participation_ratio(scores: np.ndarray, z: float = 3.0) -> np.ndarray:
    """PR of each row's positive tail: :func:`participation_ratio` of the excess ``s - t`` over the
    genes with ``s > t``, ``t`` = :func:`tail_threshold`. ~m for a row with m dominant genes of
    similar score above a bulk of unrelated genes of any size (the PR of all positive scores instead
    grows with the number of genes: ~half of an unrelated bulk is positive)."""
    s = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    t = tail_threshold(s, z)[:, None]
    with np.errstate(invalid="ignore"):
        return participation_ratio(np.where(s > t, s - t, 0.0))


def top_genes(scores: np.ndarray, genes: Sequence[str], *, n: int = 20, adaptive: bool = True,
              tail_z: float = 3.0) -> dict[int, list[str]]:
    """Top genes of each feature (row of ``scores [features, genes]``), best first.

    Only positive, finite scores count (a gene scoring <= 0 or NaN is never a top gene).
    ``adaptive=False``: the n best. ``adaptive=True``: the k best of the row's positive tail
    (scores above :func:`tail_threshold`, ``median + tail_z * 1.4826 * MAD`` of the row) with
    ``k = min(n, max(1, round(PR)))``, PR the :func:`tail_participation_ratio` – the
    "effective number" of genes standing out of the bulk (m dominant genes -> ~m; PR <= |tail|);
    a feature with positive scores but no tail keeps its best gene. Ties keep gene order. A
    feature without positive scores gets ``[]``.
    """
    s = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    genes = np.asarray(list(genes), dtype=object)
    if s.shape[1] != genes.size:
        raise InputError(f"scores have {s.shape[1]} gene columns but {genes.size} genes were given")
    if n < 1:
        raise InputError(f"n must be >= 1, got {n}")
    pos = np.isfinite(s) & (s > 0)
    k = np.minimum(n, pos.sum(axis=1))
    if adaptive:
        pr = np.floor(tail_participation_ratio(s, tail_z) + 0.5).astype(np.int64)
        k = np.minimum(k, np.maximum(1, pr))
    order = np.argsort(np.where(pos, -s, np.inf), axis=1, kind="stable")[:, :n]
    return {i: genes[order[i, : k[i]]].tolist() for i in range(s.shape[0])}


def top_genes_k_summary(n_top_genes) -> dict:
    """Distribution of the adaptive cut's k over features (e.g. results ``gene_scoring/n_top_genes``):
    ``n_features``, ``n_empty`` (k = 0), ``mean`` and the quantiles ``min, q10, q25, median, q75, q90,
    max`` (numpy linear interpolation), for printing and summary.md."""
    k = np.asarray(n_top_genes, dtype=np.float64).ravel()
    if k.size == 0:
        raise InputError("top_genes_k_summary: no features (empty n_top_genes)")
    q = np.quantile(k, [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0])
    out = {"n_features": int(k.size), "n_empty": int((k == 0).sum()), "mean": float(k.mean())}
    out.update({name: float(v) for name, v in zip(("min", "q10", "q25", "median", "q75", "q90", "max"), q)})
    return out


# --------------------------------------------------------------------------- families


def family_membership(genes: Sequence[str], families: Mapping[str, str] | None = None) -> pd.DataFrame:
    """Bool DataFrame [genes, families]: ``re.search(pattern, gene)`` (case-sensitive)."""
    families = DEFAULT_FAMILIES if families is None else families
    g = [str(x) for x in genes]
    out = {}
    for name, pat in families.items():
        try:
            rx = re.compile(pat)
        except re.error as e:
            raise InputError(f"gene family {name!r} has an invalid regex {pat!r}: {e}") from e
        out[name] = np.fromiter((rx.search(x) is not None for x in g), dtype=bool, count=len(g))
    return pd.DataFrame(out, index=pd.Index(g, dtype=object))


def gene_family_scores(
    scores, genes: Sequence[str] | None = None, families: Mapping[str, str] | None = None, *, value: str = "n_fire",
) -> pd.DataFrame:
    """Fraction of each feature's firing mass on each gene family, and the best family.

    ``scores``: a :func:`token_gene_scores` table (mass = its column ``value``, default the
    firing-token counts ``n_fire``; e.g. ``value="freq"`` for per-gene rates) or an array /
    sparse matrix ``[features, genes]`` with ``genes``. Negative/NaN scores count as 0.
    ``families``: name -> regex (default :data:`DEFAULT_FAMILIES`); a gene may be in several
    families, so fractions may sum to more than 1. Returns, indexed by ``feature_id``:
    ``frac:<family>`` per family, ``best_family`` (None where no family has mass) and
    ``best_fraction``.
    """
    if isinstance(scores, pd.DataFrame):
        mat, genes = gene_score_matrix(scores, value, genes=genes)
        mat = sp.csr_matrix(mat)
    else:
        if genes is None:
            raise InputError("pass `genes` (the gene of each score column) with a score array")
        mat = as_matrix(np.nan_to_num(scores, nan=0.0) if not sp.issparse(scores) else scores, "scores",
                        dtype=np.float64)
    mat = positive(mat)
    fam = family_membership(genes, families)
    if mat.shape[1] != len(fam):
        raise InputError(f"scores have {mat.shape[1]} gene columns but {len(fam)} genes were given")
    if len(fam.columns) and len(fam) and not fam.to_numpy().any():
        raise InputError(f"none of the {len(fam)} genes (e.g. {', '.join(list(fam.index[:3]))}) matches a gene family "
                         f"pattern ({', '.join(fam.columns)}); the patterns are regexes on gene symbols: give genes "
                         "as symbols (token_features.h5ad obs 'gene_name') or set analysis.gene_families.")
    M = sp.csr_matrix(fam.to_numpy(np.float64))
    total = np.asarray(mat.sum(axis=1)).ravel()
    mass = mat @ M
    mass = mass.toarray() if sp.issparse(mass) else np.asarray(mass)
    with np.errstate(divide="ignore", invalid="ignore"):
        frac = np.where(total[:, None] > 0, mass / total[:, None], 0.0)
    names = list(fam.columns)
    out = pd.DataFrame(frac, columns=[f"frac:{k}" for k in names])
    if names:
        best = frac.argmax(axis=1)
        bf = frac[np.arange(frac.shape[0]), best]
        out["best_family"] = np.where(bf > 0, np.asarray(names, dtype=object)[best], None)
        out["best_fraction"] = bf
    else:
        out["best_family"] = None
        out["best_fraction"] = 0.0
    out.index.name = "feature_id"
    out.attrs["tidy"] = {f"frac:{k}": ("gene_family", k, "frac") for k in names}  # sae4scfm.analysis.results
    return out


# --------------------------------------------------------------------------- density


def density_scores(features_X=None, token_X=None, *, chunk: int = ROW_CHUNK) -> pd.DataFrame:
    """Per feature: fraction of tokens and of cells where it fires (> 0) and their log10.

    ``features_X`` cells x features (max-pooled), ``token_X`` tokens x features (AnnData or
    matrix, in memory or on disk: ``primitives.row_blocks``); either may be None (its columns are then left out). Columns
    ``token_fraction``, ``log10_token_density``, ``cell_fraction``, ``log10_cell_density``;
    log10 of 0 (a feature that never fires) is ``-inf``.
    """
    if features_X is None and token_X is None:
        raise InputError("density_scores needs features_X, token_X or both")
    cols = {}
    m = None
    for key, x in (("token", token_X), ("cell", features_X)):
        if x is None:
            continue
        counts = fire_counts(x, f"{key} matrix", chunk=chunk)  # row blocks of ``chunk`` rows
        if m is not None and len(counts) != m:
            raise InputError(f"features_X and token_X have different feature counts ({m} vs {len(counts)})")
        m, n = len(counts), n_rows(x)
        with np.errstate(divide="ignore", invalid="ignore"):
            frac = counts / n if n else np.full(m, np.nan)
            cols[f"{key}_fraction"] = frac
            cols[f"log10_{key}_density"] = np.log10(frac)
    out = pd.DataFrame(cols)
    out.index.name = "feature_id"
    return out


def expression_where_firing(features_X, expression) -> pd.DataFrame:
    """Library size (total expression per cell) in cells where each feature fires vs not.

    ``expression``: cells x genes (row sums are taken) or a 1-D vector of per-cell totals.
    Columns ``n_firing``, ``mean_firing``, ``std_firing``, ``mean_not``, ``std_not``,
    ``log2_ratio`` (log2 mean_firing / mean_not). Population std (ddof=0); NaN for an empty
    group. From ``(X > 0).T @ t`` and ``@ t^2`` with t centred on its mean first.
    """
    e = getattr(expression, "X", expression)
    if sp.issparse(e) or np.ndim(e) == 2:
        t = np.asarray(e.sum(axis=1), dtype=np.float64).ravel()
    else:
        t = np.asarray(e, dtype=np.float64).ravel()
    if not on_disk(features_X):
        features_X = as_matrix(features_X, "features_X")  # no copy for a canonical float CSR
    n = n_rows(features_X)
    if t.size != n:
        raise InputError(f"features_X has {n} cells but expression has {t.size}; pass the same cells in order")
    c = t.mean() if n else 0.0
    u = t - c
    m = getattr(features_X, "X", features_X).shape[1]
    k, s1, s2 = np.zeros(m), np.zeros(m), np.zeros(m)
    for rows, X in row_blocks(features_X, "features_X"):
        B = firing(X)
        k += np.asarray(B.sum(axis=0)).ravel()
        s1 += B.T @ u[rows]
        s2 += B.T @ (u[rows] ** 2)
    k_not = n - k
    with np.errstate(divide="ignore", invalid="ignore"):
        mu_f = np.where(k > 0, s1 / k, np.nan)
        mu_n = np.where(k_not > 0, (u.sum() - s1) / k_not, np.nan)
        var_f = np.maximum(s2 / k - mu_f**2, 0.0)
        var_n = np.maximum(((u * u).sum() - s2) / k_not - mu_n**2, 0.0)
        mean_f, mean_n = mu_f + c, mu_n + c
        ratio = np.log2(mean_f / mean_n)
    out = pd.DataFrame(
        {
            "n_firing": k.astype(np.int64),
            "mean_firing": mean_f,
            "std_firing": np.sqrt(var_f),
            "mean_not": mean_n,
            "std_not": np.sqrt(var_n),
            "log2_ratio": ratio,
        }
    )
    out.index.name = "feature_id"
    return out
