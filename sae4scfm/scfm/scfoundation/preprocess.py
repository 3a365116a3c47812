"""scFoundation preprocessing: the 19,264-gene order, log1p(CP10k), the T and S tokens.

The official single-cell steps (``get_embedding.py``, ``input_type=singlecell``):

1. align the cells to the 19,264 genes of ``OS_scRNA_gene_index.19264.tsv``
   (``main_gene_selection``: other genes are dropped, missing ones are zero);
2. ``pre_normalized='F'`` (raw counts): value = log1p(x / total · 10⁴) with
   ``total`` = the cell's count summed over the aligned genes;
   ``pre_normalized='T'`` (already log-normalised): values as given and ``total`` =
   the sum of those values; ``'A'``: values as given and ``total`` given per cell;
3. append S = log10(total) (the source read depth) and T, set by ``tgthighres``:
   ``t<x>``: T = x; ``f<x>``: T = log10(total · x); ``a<x>``: T = S + x;
4. the encoder sees the positions whose value is > 0 (``gatherData``): the expressed
   genes in gene order, then T (position 19,264) and S (position 19,265).

A cell is one token per expressed gene (value = its log1p(CP10k)) plus T and S,
flagged special. Token ids are positions: gene index, 19,264 for T, 19,265 for S.
"""

from __future__ import annotations

import re
from functools import lru_cache
from importlib import resources

import anndata as ad
import numpy as np
import scipy.sparse as sp

from sae4scfm.data import check_expression, select_vocab_genes
from sae4scfm.errors import InputError
from sae4scfm.scfm.tokens import TokenizedCells

GENE_LIST_RESOURCE = "scfoundation_genes_19264.txt"
TOTAL_TOKENS = ("<T>", "<S>")  # target and source read-depth tokens, after the genes
CP10K = 1e4


@lru_cache(maxsize=1)
def scfoundation_genes() -> tuple[str, ...]:
    """The 19,264 gene symbols in model order (from the official ``OS_scRNA_gene_index.19264.tsv``)."""
    text = resources.files("sae4scfm").joinpath("resources", GENE_LIST_RESOURCE).read_text()
    return tuple(text.split())


def gene_positions() -> dict[str, int]:
    """Token id of every gene symbol and of T and S (19,264 and 19,265)."""
    genes = scfoundation_genes()
    return {**{g: i for i, g in enumerate(genes)}, **{t: len(genes) + i for i, t in enumerate(TOTAL_TOKENS)}}


def parse_tgthighres(spec: str) -> tuple[str, float]:
    """``"t4"`` -> ("t", 4.0): T = 4; ``"f2"``: T = log10(2 · total); ``"a5"``: T = S + 5."""
    match = re.fullmatch(r"([tfa])(\d+(?:\.\d*)?|\.\d+)", str(spec))
    if not match:
        raise InputError(f"scfm.tgthighres={spec!r}: use t<number> (T = number), f<number> "
                         "(T = log10(number · total count)) or a<number> (T = S + number), e.g. t4 or a5.")
    return match.group(1), float(match.group(2))


def total_tokens(total: np.ndarray, tgthighres: str) -> tuple[np.ndarray, np.ndarray]:
    """(T, S) values [cells] for per-cell totals [cells] (float64)."""
    kind, number = parse_tgthighres(tgthighres)
    with np.errstate(divide="ignore", invalid="ignore"):
        source = np.log10(total)
        if kind == "t":
            target = np.full_like(source, number)
        elif kind == "f":
            target = np.log10(total * number)
        else:
            target = source + number
    return target, source


def aligned_expression(adata: ad.AnnData, gene_key: str | None, source: str) -> sp.csr_matrix:
    """X [cells, 19,264] float64 in model gene order (genes outside the list dropped, missing ones 0)."""
    genes = {g: i for i, g in enumerate(scfoundation_genes())}
    X, names = select_vocab_genes(adata, genes, gene_key, source)
    unique, counts = np.unique(names, return_counts=True)
    if (counts > 1).any():
        raise InputError(f"{source}: gene symbols {list(unique[counts > 1][:5])} occur more than once; make "
                         "them unique (sum or drop the duplicates) before running scFoundation.")
    columns = np.array([genes[g] for g in names], dtype=np.int64)
    X = sp.csr_matrix((X.data.astype(np.float64), columns[X.indices], X.indptr), shape=(X.shape[0], len(genes)))
    X.sort_indices()
    X.eliminate_zeros()
    return X


def tokenize_cells(adata: ad.AnnData, *, gene_key: str | None, input_kind: str, normalize_total: float | None,
                   log1p: bool, subset_hvg: bool, tgthighres: str, total_count_key: str | None, source: str,
                   pad_id: int, pad_value: float) -> TokenizedCells:
    """The official single-cell preprocessing (module docstring) as ragged tokens.

    ``input_kind='counts'``: official ``pre_normalized='F'`` (``normalize_total`` must be
    10⁴ and ``log1p`` true, as the model was trained). ``'log_normalized'``: ``'T'``, or
    ``'A'`` when ``total_count_key`` names an obs column of per-cell raw totals.
    """
    if subset_hvg:
        raise InputError("data.preprocess.subset_hvg=true: scFoundation reads all of its 19,264 genes; "
                         "set data.preprocess.subset_hvg=false.")
    if input_kind == "counts" and (normalize_total is None or float(normalize_total) != CP10K or not log1p):
        raise InputError(f"data.preprocess: scFoundation expects log1p(CP10k) of counts (normalize_total=10000, "
                         f"log1p=true), not normalize_total={normalize_total}, log1p={log1p}.")
    if input_kind not in ("counts", "log_normalized"):
        raise InputError(f"data.preprocess.input_kind={input_kind!r}: use counts or log_normalized.")
    if total_count_key is not None and input_kind != "log_normalized":
        raise InputError(f"scfm.total_count_key={total_count_key!r} is for log_normalized input (counts give "
                         "their own totals); set it to null or use data.preprocess.input_kind=log_normalized.")
    X = aligned_expression(adata, gene_key, source)
    check_expression(X, input_kind, source)
    total = np.asarray(X.sum(axis=1), dtype=np.float64).ravel()
    if input_kind == "counts":
        with np.errstate(divide="ignore", invalid="ignore"):
            X.data = np.log1p(X.data / np.repeat(total, np.diff(X.indptr)) * CP10K)
    elif total_count_key is not None:
        if total_count_key not in adata.obs.columns:
            raise InputError(f"scfm.total_count_key={total_count_key!r}: {source} has no obs column "
                             f"{total_count_key!r}; available: {', '.join(map(str, adata.obs.columns))}.")
        total = adata.obs[total_count_key].to_numpy(dtype=np.float64)
    target, depth = total_tokens(total, tgthighres)
    bad = np.flatnonzero(~((X.indptr[1:] > X.indptr[:-1]) & (depth > 0) & (target > 0)))
    if len(bad):
        raise InputError(f"{source}: {len(bad)} cells (e.g. rows {bad[:5].tolist()}) have no expressed gene of "
                         f"the 19,264, a total <= 1 or T <= 0 (tgthighres={tgthighres}); scFoundation needs "
                         "S = log10(total) > 0 and T > 0: filter such cells (sc.pp.filter_cells(min_counts=2)).")
    return _tokens(X, target, depth, pad_id, pad_value)


def _tokens(X: sp.csr_matrix, target: np.ndarray, depth: np.ndarray, pad_id: int, pad_value: float) -> TokenizedCells:
    """Each row's non-zero genes in gene order, then T and S."""
    n_cells, n_genes = X.shape
    nnz = np.diff(X.indptr)
    offsets = np.concatenate([[0], np.cumsum(nnz + 2)]).astype(np.int64)
    n_tokens = int(offsets[-1])
    gene_ids = np.empty(n_tokens, dtype=np.int64)
    values = np.empty(n_tokens, dtype=np.float32)
    special = np.zeros(n_tokens, dtype=bool)
    gene_slots = np.arange(X.nnz) + 2 * np.repeat(np.arange(n_cells), nnz)  # two extra tokens per earlier cell
    gene_ids[gene_slots], values[gene_slots] = X.indices, X.data
    for offset, token_id, value in ((2, n_genes, target), (1, n_genes + 1, depth)):
        slots = offsets[1:] - offset
        gene_ids[slots], values[slots], special[slots] = token_id, value, True
    return TokenizedCells(gene_ids, values, special, offsets, np.arange(n_cells, dtype=np.int64), pad_id, pad_value)
