"""AIDO.Cell preprocessing: the 19,264-gene order, the official input values, compact tokens.

The official steps (``modelgenerator`` 0.1.3: ``cell.utils.align_genes`` then
``GenBioCellFoundation.forward``), reproduced here without importing it:

1. align the cells to the 19,264 genes of ``OS_scRNA_gene_index.19264.tsv``: a gene
   name that occurs twice keeps its first column, genes outside the list are dropped,
   missing ones are 0, columns follow the list's order;
2. on float32 counts X [cells, 19,264]: total = X.sum over the aligned genes,
   depth = max(log10(total), 5), value = log1p(X / total · 10⁴);
3. append two read-depth tokens, ``rawcountsidx`` and ``inputcountidx`` (both = depth,
   as no down-sampling happens at inference), clip every value at 20 and round it to
   bfloat16 (the official input tensor's dtype).

Every cell is therefore the full sequence: 19,264 gene tokens (position = gene index)
then the two depth tokens (positions 19,264 and 19,265). Steps 2-3 run in torch with
the official operation order, so the values are bit-identical to the official ones.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

import anndata as ad
import numpy as np
import scipy.sparse as sp
import torch

from sae4scfm.data import check_expression
from sae4scfm.errors import InputError
from sae4scfm.scfm.tokens import Batch, TokenizedCells

GENE_LIST = ("resources", "scfoundation_genes_19264.txt")  # the TSV's gene_name column, one per line
DEPTH_TOKENS = ("<rawcountsidx>", "<inputcountidx>")  # names of positions 19,264 and 19,265
CP10K = 1e4  # official per-cell normalisation target
MIN_DEPTH = 5.0  # official floor of the depth tokens: max(log10(total), 5)
MAX_VALUE = 20.0  # official clip of every input value
CELLS_PER_CHUNK = 256  # cells densified at a time while computing the input values


@lru_cache(maxsize=1)
def model_genes() -> tuple[str, ...]:
    """The 19,264 gene symbols in model order (position i = gene i)."""
    text = resources.files("sae4scfm").joinpath(*GENE_LIST).read_text("utf-8")
    return tuple(line for line in text.splitlines() if line)


def align_counts(adata: ad.AnnData, genes: tuple[str, ...], gene_key: str | None, source: str) -> sp.csr_matrix:
    """Raw counts [cells, len(genes)] float32 in model gene order (official ``align_genes``)."""
    if gene_key is not None and gene_key not in adata.var.columns:
        raise InputError(f"data.gene_key={gene_key!r}: {source} has no var column {gene_key!r}; "
                         f"available: {', '.join(map(str, adata.var.columns)) or 'none'} (use null for var_names).")
    names = np.asarray(adata.var[gene_key] if gene_key else adata.var_names, dtype=str)
    position = {g: i for i, g in enumerate(genes)}
    _, first = np.unique(names, return_index=True)
    keep = np.sort(first[np.fromiter((names[i] in position for i in first), dtype=bool, count=len(first))])
    if len(keep) == 0:
        where = f"var[{gene_key!r}]" if gene_key else "var_names"
        raise InputError(f"{source}: none of its {len(names)} genes ({where}, e.g. {', '.join(names[:3])}) is one "
                         f"of AIDO.Cell's 19,264 gene symbols (e.g. {', '.join(genes[:3])}); set data.gene_key to "
                         "the var column that holds HGNC gene symbols.")
    X = sp.csr_matrix(adata.X[:, keep], dtype=np.float32)
    check_expression(X, "counts", source)
    columns = np.array([position[g] for g in names[keep]], dtype=np.int32)
    X = sp.csr_matrix((X.data, columns[X.indices], X.indptr), shape=(X.shape[0], len(genes)))
    X.sort_indices()
    X.eliminate_zeros()
    return X


def input_values(counts: sp.csr_matrix, source: str) -> tuple[sp.csr_matrix, np.ndarray]:
    """Official model input values of aligned counts [cells, genes].

    Returns (gene values [cells, genes] float32 with the sparsity of ``counts``,
    depth tokens [cells, 2] float32); all bfloat16-rounded as the official input.
    """
    totals = np.asarray(counts.sum(axis=1)).ravel()
    empty = np.flatnonzero(totals <= 0)
    if len(empty):
        raise InputError(f"{source}: {len(empty)} cells (e.g. rows {empty[:5].tolist()}) have no counts in any of "
                         "AIDO.Cell's 19,264 genes, so their normalised values are undefined; remove them "
                         "(e.g. sc.pp.filter_cells(adata, min_counts=1)).")
    data = np.empty(counts.nnz, dtype=np.float32)
    depth = np.empty((counts.shape[0], 2), dtype=np.float32)
    for start in range(0, counts.shape[0], CELLS_PER_CHUNK):
        rows = counts[start:start + CELLS_PER_CHUNK]
        X = torch.from_numpy(rows.toarray())
        total = X.sum(dim=1, keepdim=True)
        d = torch.maximum(torch.log10(total), torch.tensor(MIN_DEPTH))
        x = torch.cat([torch.log1p(X / total * CP10K), d, d], dim=1).clamp(max=MAX_VALUE)
        x = x.to(torch.bfloat16).float().numpy()
        r = np.repeat(np.arange(rows.shape[0]), np.diff(rows.indptr))
        data[counts.indptr[start]:counts.indptr[start] + rows.nnz] = x[r, rows.indices]
        depth[start:start + rows.shape[0]] = x[:, -2:]
    values = sp.csr_matrix((data, counts.indices.copy(), counts.indptr.copy()), shape=counts.shape)
    return values, depth


class AIDOCellTokens(TokenizedCells):
    """Full-transcriptome token sequences stored compactly.

    Every cell has ``n_genes + 2`` tokens: the gene tokens in gene order (token id =
    position = gene index) and the two depth tokens (``special``). Only the expressed
    genes' input values are held (``values_csr`` [cells, n_genes] float32; unexpressed
    genes are 0) with the depth-token values (``depth`` [cells, 2] float32). Everything of
    the ``TokenizedCells`` contract is computed per cell or per batch (``cell``, ``collate``,
    ``batches``, ``subset``, ``lengths``, ``offsets``), never for all cells at once: the flat
    ``gene_ids`` / ``values`` / ``special`` arrays would be ``n_cells · 19,266`` entries and are
    not provided (an error says so).

    ``gene_mask`` of a batch is True at the expressed genes, or at every gene when
    ``store_all_genes``: these are the positions whose activations are stored and edited.
    """

    def __init__(self, values_csr: sp.csr_matrix, depth: np.ndarray, cell_index: np.ndarray, *,
                 store_all_genes: bool, pad_value: float):
        self.values_csr = values_csr
        self.depth = depth
        self.cell_index = cell_index
        self.store_all_genes = store_all_genes
        self.pad_id = 0  # never used: all cells have the same length
        self.pad_value = pad_value

    @property
    def n_genes(self) -> int:
        return self.values_csr.shape[1]

    @property
    def seq_len(self) -> int:
        return self.n_genes + 2

    def __len__(self) -> int:
        return self.values_csr.shape[0]

    def __repr__(self) -> str:
        return (f"AIDOCellTokens({len(self)} cells x {self.seq_len} tokens, {self.n_gene_tokens} stored gene "
                f"tokens, store_all_genes={self.store_all_genes})")

    @property
    def lengths(self) -> np.ndarray:
        return np.full(len(self), self.seq_len, dtype=np.int64)

    @property
    def offsets(self) -> np.ndarray:
        return np.arange(len(self) + 1, dtype=np.int64) * self.seq_len

    def _flat(self, name: str):
        raise NotImplementedError(f"AIDOCellTokens.{name}: the flat array of all cells' tokens would hold "
                                  f"{len(self)} x {self.seq_len:,} entries; use cell(i), collate(cells) or batches().")

    gene_ids = property(lambda self: self._flat("gene_ids"))
    values = property(lambda self: self._flat("values"))
    special = property(lambda self: self._flat("special"))

    @property
    def n_gene_tokens(self) -> int:
        """Gene tokens in ``gene_mask`` (stored per cell): expressed genes, or all genes."""
        return len(self) * self.n_genes if self.store_all_genes else int(self.values_csr.nnz)

    def cell(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(gene_ids [19,266], values [19,266], special [19,266]) of the cell at position ``i``."""
        values = np.concatenate([self.values_csr[i].toarray().ravel(), self.depth[i]])
        return np.arange(self.seq_len, dtype=np.int64), values, np.arange(self.seq_len) >= self.n_genes

    def subset(self, cells: np.ndarray) -> "AIDOCellTokens":
        cells = np.asarray(cells, dtype=np.int64)
        return AIDOCellTokens(self.values_csr[cells], self.depth[cells], self.cell_index[cells],
                              store_all_genes=self.store_all_genes, pad_value=self.pad_value)

    def truncate(self, max_len: int, rng: np.random.Generator) -> "AIDOCellTokens":
        raise InputError("AIDO.Cell reads every cell's full 19,264-gene sequence; token truncation is not supported.")

    def collate(self, cells: np.ndarray) -> Batch:
        """A batch [B, n_genes + 2] of the cells at positions ``cells`` (never padded)."""
        cells = np.asarray(cells, dtype=np.int64)
        rows = self.values_csr[cells]
        values = np.concatenate([rows.toarray(), self.depth[cells]], axis=1)
        gene_mask = np.zeros(values.shape, dtype=bool)
        if self.store_all_genes:
            gene_mask[:, :self.n_genes] = True
        else:
            gene_mask[np.repeat(np.arange(len(cells)), np.diff(rows.indptr)), rows.indices] = True
        gene_ids = np.tile(np.arange(self.seq_len, dtype=np.int64), (len(cells), 1))
        return Batch(torch.from_numpy(gene_ids), torch.from_numpy(values), torch.zeros(values.shape, dtype=torch.bool),
                     torch.from_numpy(gene_mask), torch.from_numpy(self.cell_index[cells].astype(np.int64)))


def tokenize_cells(adata: ad.AnnData, *, gene_key: str | None, input_kind: str, normalize_total: float | None,
                   log1p: bool, subset_hvg: bool, store_all_genes: bool, pad_value: float,
                   source: str) -> AIDOCellTokens:
    """The official preprocessing (module docstring) of ``adata`` [cells, genes] of raw counts.

    AIDO.Cell normalises counts itself, so ``input_kind`` must be ``counts`` with
    ``normalize_total=10000`` and ``log1p=true``, and it reads all genes, so
    ``subset_hvg`` must be false; other settings raise ``InputError``.
    """
    if input_kind != "counts":
        raise InputError(f"data.preprocess.input_kind={input_kind!r}: AIDO.Cell normalises raw counts itself "
                         "(log1p of counts per 10,000 plus read-depth tokens); point the data at raw counts "
                         "and set data.preprocess.input_kind=counts.")
    if normalize_total is None or float(normalize_total) != CP10K or not log1p:
        raise InputError(f"data.preprocess: AIDO.Cell was trained on log1p(counts per 10,000); set "
                         f"normalize_total=10000 and log1p=true (got normalize_total={normalize_total}, "
                         f"log1p={log1p}).")
    if subset_hvg:
        raise InputError("data.preprocess.subset_hvg=true: AIDO.Cell reads all of its 19,264 genes; "
                         "set data.preprocess.subset_hvg=false.")
    counts = align_counts(adata, model_genes(), gene_key, source)
    values, depth = input_values(counts, source)
    return AIDOCellTokens(values, depth, np.arange(adata.n_obs, dtype=np.int64),
                          store_all_genes=store_all_genes, pad_value=pad_value)
