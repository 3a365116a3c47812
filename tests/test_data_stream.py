"""Streaming statistics and lazy (per-chunk) tokenization: the same numbers as the in-memory path."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

import sae4scfm
from sae4scfm.data import highly_variable, load_pbmc, normalise_expression
from sae4scfm.data.stream import (
    InMemoryCells,
    chunk_rows,
    gene_statistics,
    highly_variable_from_moments,
    nonzero_medians,
    sample_gene_medians,
)
from sae4scfm.scfm.loading import chunk_seed, load_model_and_data
from tests.test_soma import write_soma

BATCH_FIELDS = ("gene_ids", "values", "padding_mask", "gene_mask", "cell_index")


@pytest.fixture(scope="module")
def pbmc():
    return load_pbmc()


@pytest.fixture(scope="module")
def soma_uri(pbmc, tmp_path_factory) -> str:
    return write_soma(pbmc, tmp_path_factory.mktemp("soma"))


def assert_same_batch(a, b):
    for f in BATCH_FIELDS:
        assert torch.equal(getattr(a, f), getattr(b, f)), f


@pytest.mark.parametrize("n_top", [100, 512])
def test_streamed_hvgs_equal_scanpy_seurat(pbmc, n_top):
    X = normalise_expression(pbmc.X, "counts", 1e4, True, "pbmc")
    lib = np.asarray(pbmc.X.sum(axis=1)).ravel()
    stats = gene_statistics((lib[r], X[r]) for r in chunk_rows(pbmc.n_obs, 97))  # 8 chunks, last one short
    mask = highly_variable_from_moments(stats, n_top)
    assert mask.sum() == n_top
    assert np.array_equal(mask, highly_variable(X, n_top))
    np.testing.assert_array_equal(stats.library_size, lib)
    np.testing.assert_array_equal(stats.n_detected, np.diff(X.tocsc().indptr))
    dense = np.expm1(X.toarray()).astype(np.float64)  # expm1 in float32, as scanpy's seurat flavour
    np.testing.assert_allclose(stats.var, dense.var(axis=0, ddof=1), rtol=1e-7, atol=1e-9)


def test_sample_gene_medians(pbmc):
    reader = InMemoryCells(pbmc)
    full = sample_gene_medians(reader, 10_000, seed=0)  # more than the cells: all of them
    col = pbmc.X.tocsc()[:, 0].toarray().ravel()
    assert full[0] == np.median(col[col > 0])
    rows = np.sort(np.random.default_rng(3).choice(pbmc.n_obs, 200, replace=False))
    np.testing.assert_array_equal(sample_gene_medians(reader, 200, seed=3), nonzero_medians(pbmc.X[rows]))


def base(*extra):
    return sae4scfm.compose("train", ["scfm=demo", "sae.target_layer=2", "data.preprocess.subset_hvg=true",
                                      "data.preprocess.n_hvg=512", "data.n_cells=300", *extra])


def test_one_chunk_of_lazy_soma_tokens_equals_todays_eager_tokens(soma_uri):
    """Streamed HVGs + per-chunk tokens through data=soma give exactly data=pbmc's in-memory tokens."""
    adapter, adata, eager = load_model_and_data(base("data=pbmc"), "cpu")
    _, cells, lazy = load_model_and_data(
        base("data=soma", f"data.uri={soma_uri}", "data.stream=true", "data.chunk_cells=300"), "cpu")
    assert cells.X is None and list(cells.obs_names) == list(adata.obs_names)
    assert (cells.obs["split"] == adata.obs["split"]).all()
    assert np.array_equal(lazy.lengths, eager.lengths) and lazy.n_gene_tokens == eager.n_gene_tokens
    for i in (0, 17, 299):
        assert all(np.array_equal(x, y) for x, y in zip(lazy.cell(i), eager.cell(i)))
    picks = np.array([5, 250, 0, 120])
    assert_same_batch(lazy.collate(picks), eager.collate(picks))
    ev = np.flatnonzero(adata.obs["split"] == "eval")  # one chunk: batches sorted by length as the eager ones
    assert_same_batch(next(lazy.subset(ev).batches(32)), next(eager.subset(ev).batches(32)))


def test_chunked_lazy_tokens_equal_eager_tokens_of_each_chunk(soma_uri, pbmc):
    """Several chunks: each equals the adapter's eager tokenization of that chunk's cells with its seed."""
    cfg = base("data=soma", f"data.uri={soma_uri}", "data.stream=true", "data.chunk_cells=64",
               "data.preprocess.subset_hvg=false", "seed=3")
    adapter, cells, lazy = load_model_and_data(cfg, "cpu")
    rows = np.sort(np.random.default_rng(3).choice(700, 300, replace=False))  # data.n_cells=300, seed 3
    adata = pbmc[rows].copy()
    for k in range(-(-300 // 64)):
        eager = adapter.tokenize(adata[k * 64:(k + 1) * 64], seed=3 if k == 0 else chunk_seed(3, k),
                                 normalize_total=1e4, log1p=True, subset_hvg=False)
        for local in (0, len(eager) - 1):
            assert all(np.array_equal(x, y) for x, y in zip(lazy.cell(k * 64 + local), eager.cell(local)))
    # a batch across chunks is the per-cell tokens, padded, in the order asked
    picks = np.array([299, 0, 64, 130, 1])
    batch = lazy.collate(picks)
    assert batch.cell_index.tolist() == picks.tolist()
    for row, i in enumerate(picks):
        ids, values, special = lazy.cell(i)
        n = len(ids)
        assert torch.equal(batch.gene_ids[row, :n], torch.from_numpy(ids))
        assert not batch.padding_mask[row, :n].any() and batch.padding_mask[row, n:].all()
        assert torch.equal(batch.gene_mask[row, :n], torch.from_numpy(~special))
    # batches go chunk after chunk, length-sorted within a chunk, each cell once, each chunk tokenized once
    calls = []
    tokenize = lazy.tokenize_chunk
    lazy.tokenize_chunk = lambda chunk, k: calls.append(k) or tokenize(chunk, k)
    lazy._cache.clear()
    batches = list(lazy.batches(48))
    assert calls == [0, 1, 2, 3, 4] and [len(b.cell_index) for b in batches] == [48] * 6 + [12]
    seen = np.concatenate([b.cell_index.numpy() for b in batches])
    assert sorted(seen) == list(range(300)) and (np.diff(seen[:48]) != 1).any()
    first_chunk = seen[:64]
    assert set(first_chunk) == set(range(64)) and (np.diff(lazy.lengths[first_chunk]) >= 0).all()
    assert chunk_seed(3, 0) == 3 and len({chunk_seed(3, k) for k in range(1, 50)}) == 49


class Batches(torch.utils.data.Dataset):
    """Batch j: ``tokens.collate`` of cells j*size .. (as store/extract.py's workers call it)."""

    def __init__(self, tokens, size: int):
        self.tokens, self.size = tokens, size

    def __len__(self) -> int:
        return -(-len(self.tokens) // self.size)

    def __getitem__(self, j: int):
        return self.tokens.collate(np.arange(j * self.size, min((j + 1) * self.size, len(self.tokens))))


def test_lazy_tokens_pickle_without_handles_and_work_in_dataloader_workers(soma_uri):
    _, _, lazy = load_model_and_data(base("data=soma", f"data.uri={soma_uri}", "data.stream=true",
                                          "data.chunk_cells=50"), "cpu")
    first = lazy.collate(np.arange(8))
    assert lazy._cache  # the chunk is cached in this process ...
    state = pickle.loads(pickle.dumps(lazy))
    assert not state._cache and state.reader.cells._exp is None  # ... but never pickled, nor the open experiment
    assert len(pickle.dumps(lazy)) < 2_000_000  # no model weights travel to the workers
    loader = torch.utils.data.DataLoader(Batches(lazy, 8), batch_size=None, num_workers=2,
                                         multiprocessing_context="spawn")  # spawn: the dataset is pickled
    batches = list(loader)
    assert len(batches) == 38
    assert_same_batch(batches[0], first)
    assert batches[-1].cell_index.tolist() == list(range(296, 300))


def test_h5ad_stream_reads_the_sampled_rows_from_the_file(pbmc, tmp_path):
    path = tmp_path / "cells.h5ad"
    pbmc.write_h5ad(path)
    args = ("data=h5ad", f"data.path={path}", "data.preprocess.n_hvg=256", "seed=2")
    adapter, adata, eager = load_model_and_data(base(*args), "cpu")
    _, cells, lazy = load_model_and_data(base(*args, "data.stream=true", "data.chunk_cells=1000"), "cpu")
    assert cells.X is None and list(cells.obs_names) == list(adata.obs_names)
    assert (cells.obs["split"] == adata.obs["split"]).all() and len(lazy) == 300
    picks = np.array([299, 3, 150, 3])
    assert_same_batch(lazy.collate(picks), eager.collate(picks))
    reader = pickle.loads(pickle.dumps(lazy.reader))
    assert reader._file is None and (reader.read(picks).X != adata.X[picks]).nnz == 0
