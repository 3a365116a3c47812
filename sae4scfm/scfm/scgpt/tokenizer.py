"""scGPT preprocessing and tokenization, as the official pipeline does it (scgpt 0.2.4).

``Preprocessor``: normalise each cell to ``normalize_total`` counts, log1p, optional
HVG subset, then per-cell quantile binning of the non-zero values into
1..n_bins-1 (zeros stay 0). ``tokenize_and_pad_batch``: per cell ``<cls>`` first,
then its non-zero genes in column order; a cell with more than ``max_seq_len - 1``
genes keeps ``max_seq_len - 1`` of them drawn without replacement, in drawn order.

The official code draws its random numbers (bin tie-breaking, gene sampling) from
numpy's global state; here they come from ``rng``. With
``rng = np.random.RandomState(s)`` the tokens equal the official ones after
``np.random.seed(s)`` exactly; the adapter uses ``np.random.default_rng(seed)``,
the same rule with a different stream.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import scipy.sparse as sp
import torch

from sae4scfm.data import highly_variable, log_gene_usage, normalise_expression, select_vocab_genes
from sae4scfm.scfm.scgpt.model import ScGPTConfig
from sae4scfm.scfm.tokens import Batch, TokenizedCells

Rng = np.random.Generator | np.random.RandomState


def bin_values(X: sp.csr_matrix, n_bins: int, rng: Rng) -> sp.csr_matrix:
    """Per-cell quantile binning of the non-zero values of ``X`` [cells, genes].

    As the official ``_digitize``: bin edges are ``n_bins - 1`` quantiles of the
    cell's non-zero values; a value's bin is drawn uniformly between its left and
    right ``np.digitize`` positions (ties split at random; one uniform per non-zero
    value, in column order); zeros stay 0, so non-zero bins lie in 1..n_bins-1.
    """
    X = sp.csr_matrix(X, dtype=np.float32, copy=True)
    X.sort_indices()
    for i in range(X.shape[0]):
        row = X.data[X.indptr[i]:X.indptr[i + 1]]
        nz = row > 0
        if not nz.any():
            continue
        bins = np.quantile(row[nz], np.linspace(0, 1, n_bins - 1))
        left = np.digitize(row[nz], bins)
        right = np.digitize(row[nz], bins, right=True)
        digits = np.ceil(rng.random(left.size) * (right - left) + left)
        out = np.zeros_like(row)
        out[nz] = digits
        row[:] = out
    X.eliminate_zeros()
    return X


def tokenize_binned(binned: sp.csr_matrix, gene_ids: np.ndarray, *, cls_id: int, cls_value: float,
                    pad_id: int, pad_value: float, max_seq_len: int, rng: Rng) -> TokenizedCells:
    """Cells of ``binned`` [cells, genes] (vocab ids ``gene_ids`` [genes]) as ``<cls>`` + non-zero genes.

    A cell with more than ``max_seq_len - 1`` genes keeps ``rng.choice(n_genes,
    max_seq_len - 1, replace=False)`` of them, in that order (official ``pad_batch``).
    """
    ids, vals, lengths = [], [], []
    for i in range(binned.shape[0]):
        sl = slice(binned.indptr[i], binned.indptr[i + 1])
        cols, v = binned.indices[sl], binned.data[sl]
        if len(cols) > max_seq_len - 1:
            keep = rng.choice(len(cols), max_seq_len - 1, replace=False)
            cols, v = cols[keep], v[keep]
        ids.append(np.concatenate([[cls_id], gene_ids[cols]]))
        vals.append(np.concatenate([[cls_value], v]).astype(np.float32))
        lengths.append(len(cols) + 1)
    special = [np.arange(n) == 0 for n in lengths]
    empty = np.zeros(0)
    return TokenizedCells(
        np.concatenate(ids or [empty]).astype(np.int64), np.concatenate(vals or [empty]).astype(np.float32),
        np.concatenate(special or [empty]).astype(bool), np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        np.arange(binned.shape[0], dtype=np.int64), pad_id, pad_value,
    )


def tokenize_cells(adata: ad.AnnData, vocab: dict[str, int], cfg: ScGPTConfig, rng: Rng, *,
                   cls_value: float | None = None, gene_key: str | None = None, input_kind: str = "counts",
                   normalize_total: float | None = 1e4, log1p: bool = True, subset_hvg: bool = False,
                   n_hvg: int = 1200, source: str = "data") -> TokenizedCells:
    """Official scGPT preprocessing and tokenization of ``adata`` [cells, genes].

    Genes outside ``vocab`` are dropped; counts are normalised to ``normalize_total``
    per cell and log1p-transformed (skipped for ``input_kind='log_normalized'``);
    optional HVG subset (``n_hvg`` genes); binning into ``cfg.n_bins``; tokens as
    ``tokenize_binned`` with ``cfg.max_seq_len``. ``cls_value`` is the ``<cls>`` input
    value (None: ``cfg.pad_value``, as pretraining and ``embed_data``; the fine-tuning
    tutorials' ``tokenize_and_pad_batch`` uses 0). ``source`` names the data in errors.
    """
    selected = select_vocab_genes(adata, vocab, gene_key, source, log_usage=not subset_hvg)
    X, genes = normalise_expression(selected.matrix, input_kind, normalize_total, log1p, source), selected.genes
    if subset_hvg:
        keep = highly_variable(X, n_hvg)
        X, genes = X[:, keep], genes[keep]
        log_gene_usage(source, len(selected.genes), adata.n_vars, len(genes))
    binned = bin_values(X, cfg.n_bins, rng)
    return tokenize_binned(
        binned, np.array([vocab[g] for g in genes], dtype=np.int64), cls_id=vocab[cfg.cls_token],
        cls_value=cfg.pad_value if cls_value is None else float(cls_value), pad_id=vocab[cfg.pad_token],
        pad_value=cfg.pad_value, max_seq_len=cfg.max_seq_len, rng=rng,
    )


def random_value_mask(batch: Batch, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """[B, T] bool: each gene token masked with probability ``ratio``; ``<cls>`` and padding never
    (the pretraining ``DataCollator._mask`` rule)."""
    u = torch.rand(batch.gene_mask.shape, generator=generator)
    return (u < ratio).to(batch.gene_mask.device) & batch.gene_mask
