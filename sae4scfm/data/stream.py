"""Cells read in chunks, and the global statistics every chunk's tokenization needs, from one pass.

A *reader* is a picklable ``len(reader)`` cells with ``read(rows) -> AnnData`` [rows, genes] (X CSR
float32, the full var, the cells' obs); ``InMemoryCells`` wraps an AnnData, ``SomaReader`` a SOMA
selection, ``H5adReader`` rows of an .h5ad file opened backed (each opens its source when first read,
so no handle is pickled). ``gene_statistics`` makes one streaming
pass: library sizes [cells], per-gene moments of the normalised values (for the HVGs) and detection
counts; gene medians come from a seeded sample of at most ``median_cells`` cells (documented: exact
medians of millions of cells would need all their values at once).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from sae4scfm.data.soma import SomaCells


@dataclass(eq=False)
class InMemoryCells:
    """An in-memory AnnData as a reader (the rows of ``adata.X``)."""

    adata: ad.AnnData

    def __len__(self) -> int:
        return self.adata.n_obs

    def read(self, rows: np.ndarray) -> ad.AnnData:
        part = self.adata[np.asarray(rows)]
        return ad.AnnData(X=sp.csr_matrix(part.X, dtype=np.float32), obs=part.obs.copy(), var=self.adata.var)


@dataclass(eq=False)
class SomaReader:
    """The cells of a SOMA selection (``sae4scfm.data.soma.select_cells``), read on demand."""

    cells: SomaCells
    obs: pd.DataFrame  # [cells] the selected obs columns (tokenizers may read per-cell totals there)
    var: pd.DataFrame  # [genes] in the order of cells.var_joinids

    def __len__(self) -> int:
        return len(self.cells)

    def read(self, rows: np.ndarray) -> ad.AnnData:
        rows = np.asarray(rows, dtype=np.int64)
        return ad.AnnData(X=self.cells.read_X(rows), obs=self.obs.iloc[rows].copy(), var=self.var)


@dataclass(eq=False)
class H5adReader:
    """Rows ``file_rows`` [cells] of an .h5ad file, read from it (opened backed) on demand; the open
    file is never pickled."""

    path: str
    file_rows: np.ndarray
    obs: pd.DataFrame  # [cells]
    var: pd.DataFrame  # [genes]
    _file: object = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.file_rows)

    def __getstate__(self):
        return {**self.__dict__, "_file": None}

    def read(self, rows: np.ndarray) -> ad.AnnData:
        rows = np.asarray(rows, dtype=np.int64)
        if self._file is None:
            self._file = ad.read_h5ad(self.path, backed="r")
        wanted = self.file_rows[rows]
        unique = np.unique(wanted)  # backed files are read at sorted, distinct rows
        X = sp.csr_matrix(self._file.X[unique] if len(unique) else sp.csr_matrix((0, self.var.shape[0])),
                          dtype=np.float32)
        return ad.AnnData(X=X[np.searchsorted(unique, wanted)], obs=self.obs.iloc[rows].copy(), var=self.var)


def chunk_rows(n_cells: int, chunk_cells: int):
    """Row ranges [chunk] of ``chunk_cells`` consecutive cells (the last one shorter)."""
    return (np.arange(s, min(s + chunk_cells, n_cells)) for s in range(0, n_cells, chunk_cells))


@dataclass
class GeneStatistics:
    """One pass over the cells: ``library_size`` [cells] (sum of X per cell), per gene [genes] the
    number of cells detecting it and the float64 sum / sum of squares of ``expm1`` of the values given
    (log-normalised values give the normalised counts, as scanpy's seurat flavour uses them)."""

    n_cells: int
    library_size: np.ndarray
    n_detected: np.ndarray
    sum: np.ndarray
    sum_sq: np.ndarray

    @property
    def mean(self) -> np.ndarray:
        return self.sum / max(self.n_cells, 1)

    @property
    def var(self) -> np.ndarray:
        """Per-gene variance (ddof 1) of the expm1 values."""
        n = self.n_cells
        return (self.sum_sq / n - self.mean ** 2) * n / max(n - 1, 1)


def gene_statistics(chunks) -> GeneStatistics:
    """Statistics from ``chunks`` of ``(library [cells], values CSR [cells, genes])`` (one pass, one chunk
    in memory): e.g. the raw counts' row sums and the normalised, log1p values of the same cells."""
    libs, n, stats = [], 0, None
    for lib, values in chunks:
        values = sp.csr_matrix(values)
        e = np.expm1(values.data).astype(np.float64)  # expm1 in float32 like scanpy's copy, summed in float64
        part = (np.bincount(values.indices, minlength=values.shape[1]),
                np.bincount(values.indices, weights=e, minlength=values.shape[1]),
                np.bincount(values.indices, weights=e ** 2, minlength=values.shape[1]))
        stats = part if stats is None else tuple(a + b for a, b in zip(stats, part))
        libs.append(np.asarray(lib, dtype=np.float64))
        n += values.shape[0]
    if stats is None:
        raise ValueError("gene_statistics: no cells")
    return GeneStatistics(n, np.concatenate(libs), stats[0].astype(np.int64), stats[1], stats[2])


def highly_variable_from_moments(stats: GeneStatistics, n_top: int, n_bins: int = 20) -> np.ndarray:
    """Bool mask [genes] of the ``n_top`` most dispersed genes, scanpy's 'seurat' flavour
    (``highly_variable_genes(flavor='seurat', n_top_genes=n_top)`` on the log-normalised cells) from
    streamed moments: log dispersion of the normalised counts, z-scored within 20 bins of log1p(mean)."""
    n_genes = len(stats.sum)
    if n_top >= n_genes:
        return np.ones(n_genes, dtype=bool)
    mean, var = stats.mean.copy(), stats.var
    mean[mean == 0] = 1e-12
    dispersion = var / mean
    dispersion[dispersion == 0] = np.nan
    dispersion = np.log(dispersion)
    mean = np.log1p(mean)
    df = pd.DataFrame({"means": mean, "dispersions": dispersion})
    df["mean_bin"] = pd.cut(df["means"], bins=n_bins)
    disp = df.groupby("mean_bin", observed=True)["dispersions"].agg(avg="mean", dev="std")
    single = disp["dev"].isnull()  # a bin of one gene: normalised dispersion 1 (as scanpy)
    disp.loc[single, "dev"] = disp.loc[single, "avg"]
    disp.loc[single, "avg"] = 0
    disp = disp.loc[df["mean_bin"]].set_index(df.index)
    norm = ((df["dispersions"] - disp["avg"]) / disp["dev"]).to_numpy()
    finite = np.sort(norm[~np.isnan(norm)])[::-1]
    cut = finite[min(n_top, finite.size) - 1]
    return np.nan_to_num(norm, nan=-np.inf) >= cut


def nonzero_medians(X: sp.csr_matrix) -> np.ndarray:
    """Per-gene median [genes] of the non-zero values of ``X`` [cells, genes] (NaN where none)."""
    csc = sp.csc_matrix(X)
    out = np.full(csc.shape[1], np.nan)
    for j in range(csc.shape[1]):
        col = csc.data[csc.indptr[j]:csc.indptr[j + 1]]
        col = col[col != 0]
        if col.size:
            out[j] = np.median(col)
    return out


def sample_gene_medians(reader, median_cells: int, seed: int, transform=None) -> np.ndarray:
    """Non-zero gene medians [genes] of a seeded sample of ``median_cells`` cells of ``reader``
    (all cells if fewer), of ``transform(X)`` values when given (e.g. normalised counts)."""
    from sae4scfm.data import sample_cells

    X = reader.read(sample_cells(len(reader), median_cells, seed)).X
    return nonzero_medians(transform(X) if transform else X)
