"""What every statistic of ``sae4scfm.analysis`` starts from: one coercion of an activation
matrix, its firing indicator, row blocks of a matrix that may stay on disk, and one
Benjamini–Hochberg FDR.

"Fires" always means activation ``> 0`` (explicit zeros and negative values do not fire).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import scipy.sparse as sp

from sae4scfm.errors import InputError

FLOATS = (np.float32, np.float64)
ROW_CHUNK = 1 << 17  # rows per block of ``row_blocks`` (token statistics stream the token file in these)
NNZ_BLOCK = 1 << 21  # stored entries per block of ``row_blocks`` (~24 MiB as float64 values + int32 indices)


def on_disk(x) -> bool:
    """Whether ``x`` is a matrix left in its file: a backed AnnData (``read_h5ad(..., backed="r")``)
    or the X of one (an anndata sparse dataset or an h5py dataset), read a block of rows at a time."""
    import h5py
    from anndata.abc import CSCDataset, CSRDataset

    return bool(getattr(x, "isbacked", False)) or isinstance(getattr(x, "X", x), (CSRDataset, CSCDataset, h5py.Dataset))


def n_rows(x) -> int:
    """Rows of a matrix, an AnnData (backed or not) or its on-disk X, without reading it."""
    return int(getattr(x, "X", x).shape[0]) if not hasattr(x, "n_obs") else int(x.n_obs)


def row_nnz(x) -> np.ndarray:
    """int64 [rows]: stored entries of each row of ``x`` (anything ``row_blocks`` takes), from its row
    pointers where it has them (CSR in memory or on disk: the values are never read); a dense matrix counts
    every entry; an on-disk CSC matrix (no row pointers) counts 0 (blocks are then bounded by rows only)."""
    ends = _entry_ends(x)
    return np.diff(ends, prepend=0)


def _entry_ends(x) -> np.ndarray:
    """int64 [rows]: stored entries up to and including each row (the row pointers, less the first)."""
    from anndata.abc import CSRDataset

    X = getattr(x, "X", x)
    if isinstance(X, CSRDataset) or (sp.issparse(X) and X.format == "csr"):
        indptr = X.group["indptr"][...] if isinstance(X, CSRDataset) else X.indptr
        return indptr[1:].astype(np.int64) - int(indptr[0])
    if sp.issparse(X):  # CSC / COO: row of every stored entry
        rows = X.indices if X.format == "csc" else sp.coo_matrix(X).row
        return np.cumsum(np.bincount(rows, minlength=X.shape[0]), dtype=np.int64)
    if on_disk(x):  # a dense h5py dataset: every entry; an on-disk CSC matrix: no row pointers, rows only
        width = 0 if hasattr(X, "format") else X.shape[1]
    else:  # dense in memory
        shape = np.shape(X)
        width = shape[1] if len(shape) > 1 else 1
    return np.arange(1, n_rows(x) + 1, dtype=np.int64) * width


def row_bounds(*xs, chunk: int = ROW_CHUNK, max_nnz: int = NNZ_BLOCK) -> list[slice]:
    """Consecutive row slices covering the rows of ``xs`` (matrices with the same rows), each of at most
    ``chunk`` rows and, where a row allows, at most ``max_nnz`` stored entries summed over ``xs``: a block's
    memory is bounded whatever the density (a cell row of max-pooled features holds ~d_sae entries, a
    token row k). Matrices read side by side (``row_blocks(..., bounds=...)``) share one list."""
    if chunk < 1:
        raise InputError(f"chunk must be >= 1 rows, got {chunk}")
    n = n_rows(xs[0])
    ends = _entry_ends(xs[0])  # entries up to each row, summed over the matrices
    for x in xs[1:]:
        ends += _entry_ends(x)
    out, start = [], 0
    while start < n:
        done = int(ends[start - 1]) if start else 0
        stop = int(np.searchsorted(ends, done + max_nnz, side="right"))  # rows fitting the entry budget
        stop = min(max(stop, start + 1), start + chunk, n)
        out.append(slice(start, stop))
        start = stop
    return out


def row_blocks(x, name: str = "X", *, chunk: int = ROW_CHUNK, fmt: str = "csr", dtype=None,
               bounds: list[slice] | None = None) -> Iterator[tuple[slice, sp.csr_matrix | sp.csc_matrix]]:
    """(row slice, ``as_matrix`` of those rows) for the consecutive blocks ``bounds`` (default
    ``row_bounds(x, chunk=chunk)``: at most ``chunk`` rows and ``NNZ_BLOCK`` entries) of ``x`` [rows, columns]
    (anything ``as_matrix`` takes, or an on-disk matrix: ``on_disk``). An in-memory matrix that is one block
    is ``as_matrix(x)`` itself (no copy); a larger one is converted (``fmt``, ``dtype``) a block at a time; an
    on-disk one is read block by block, so only one block is in memory at a time."""
    bounds = row_bounds(x, chunk=chunk) if bounds is None else bounds
    n = n_rows(x)
    if not on_disk(x) and len(bounds) <= 1:
        yield slice(0, n), as_matrix(x, name, fmt=fmt, dtype=dtype)
        return
    X = getattr(x, "X", x)
    if not on_disk(x):
        X = as_matrix(X, name, fmt="csr")  # no copy for a canonical float CSR; ``fmt`` and ``dtype`` per block
    for rows in bounds:
        yield rows, as_matrix(X[rows], f"{name} rows {rows.start}:{rows.stop}", fmt=fmt, dtype=dtype)


def as_matrix(x, name: str = "X", *, fmt: str = "csr", dtype=None) -> sp.csr_matrix | sp.csc_matrix:
    """``x`` [rows, columns] as a canonical (duplicates summed, sorted) CSR or CSC matrix.

    x: AnnData (its ``X``), scipy sparse of any format, dense array, torch tensor, or an on-disk
    matrix (``on_disk``; read whole: to stream it, use ``row_blocks``).
    fmt: "csr" | "csc". dtype: None keeps float32/float64 (other dtypes become float64).
    Canonical input already in ``fmt`` and dtype is returned as is (never copied or modified);
    anything else is converted with one copy. Raises InputError for a missing, non-2-D,
    non-numeric or non-finite matrix.
    """
    if on_disk(x):  # read whole; statistics that stream use ``row_blocks`` instead
        x = getattr(x, "X", x)
        x = x.to_memory() if hasattr(x, "to_memory") else x[()]
    x = getattr(x, "X", x)
    if x is None:
        raise InputError(f"{name} has no matrix (X is None); pass an AnnData with X or a matrix")
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().numpy()
    make = sp.csr_matrix if fmt == "csr" else sp.csc_matrix
    if sp.issparse(x):
        want = np.dtype(dtype) if dtype is not None else (x.dtype if x.dtype in FLOATS else np.dtype(np.float64))
        if not (x.format == fmt and x.dtype == want and x.has_canonical_format):
            x = make(x, dtype=want, copy=True)
            x.sum_duplicates()
        elif not isinstance(x, make):  # sparse array -> matrix, shares the data
            x = make(x)
    else:
        arr = np.asarray(x)
        if arr.ndim != 2:
            raise InputError(f"{name} must be 2-D [rows, columns], got shape {arr.shape}")
        if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
            raise InputError(f"{name}: expected a numeric matrix, got dtype {arr.dtype}")
        want = np.dtype(dtype) if dtype is not None else (arr.dtype if arr.dtype in FLOATS else np.dtype(np.float64))
        x = make(arr.astype(want, copy=False))
    if not np.isfinite(x.data).all():
        raise InputError(f"{name} contains NaN or infinite values; fix or drop those entries first")
    return x


def firing(x, name: str = "X", *, fmt: str = "csr", dtype=np.float64) -> sp.csr_matrix | sp.csc_matrix:
    """0/1 matrix (``dtype``; int32 keeps counting products small) of the entries of ``x``
    that are > 0, with no stored zeros."""
    B = as_matrix(x, name, fmt=fmt).copy()
    B.data = (B.data > 0).astype(dtype)
    B.eliminate_zeros()
    return B


def positive(x, name: str = "X") -> sp.csr_matrix:
    """CSR float64 ``max(x, 0)`` (no stored zeros)."""
    P = as_matrix(x, name, dtype=np.float64).copy()
    P.data = np.maximum(P.data, 0.0)
    P.eliminate_zeros()
    return P


def fire_counts(x, name: str = "X", *, chunk: int = ROW_CHUNK) -> np.ndarray:
    """float64 [columns]: the number of rows where each column is > 0 (``row_blocks`` of ``chunk`` rows)."""
    counts = None
    for _, X in row_blocks(x, name, chunk=chunk):
        c = np.bincount(X.indices[X.data > 0], minlength=X.shape[1])
        counts = c if counts is None else counts + c
    if counts is None:  # no rows
        counts = np.zeros(getattr(x, "X", x).shape[1], dtype=np.int64)
    return counts.astype(np.float64)


def as_dense(x, name: str = "W") -> np.ndarray:
    """float64 dense 2-D array of a matrix (numpy, scipy sparse or torch tensor), finite."""
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().double().numpy()
    arr = x.toarray().astype(np.float64) if sp.issparse(x) else np.asarray(x, dtype=np.float64)
    if arr.ndim != 2:
        raise InputError(f"{name} must be 2-D [rows, columns], got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise InputError(f"{name} contains NaN or infinite values; fix or drop those entries first")
    return arr


def bh_fdr(p, n_tests: int | None = None) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values, same order as ``p`` (= statsmodels
    ``multipletests(p, method="fdr_bh")[1]``). ``n_tests`` >= len(p) counts extra tests whose
    p-value is 1 and that are omitted from ``p``; the result equals BH over all of them."""
    p = np.asarray(p, dtype=np.float64).ravel()
    m = len(p) if n_tests is None else int(n_tests)
    if m < len(p):
        raise InputError(f"n_tests={m} must be >= the number of p-values ({len(p)})")
    if np.isnan(p).any():
        raise InputError("p-values contain NaN; BH needs a p-value for every test")
    if len(p) == 0:
        return p.copy()
    order = np.argsort(p, kind="stable")
    ranked = p[order] * m / np.arange(1, len(p) + 1)
    q = np.minimum.accumulate(ranked[::-1])[::-1]
    out = np.empty_like(q)
    out[order] = np.clip(q, 0.0, 1.0)
    return out
