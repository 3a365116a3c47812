"""Memory-flat paths give the numbers of the whole-in-memory ones: token statistics streamed from a
backed token_features.h5ad in many small row blocks (a real trained run's file), and the training
buffer's preads into a bounded set of reused fill tensors."""

from __future__ import annotations

import os

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from sae4scfm.analysis.coactivation import match_by_cofiring, significant_pairs
from sae4scfm.analysis.gene_scoring import density_scores, token_gene_scores
from sae4scfm.analysis.primitives import on_disk, row_blocks
from sae4scfm.analysis.run_data import GENE_NAME, load_run_data
from sae4scfm.store.buffer import ShufflingBuffer
from tests.test_training_parts import make_store

CHUNK = 97  # token rows per block: the small run's file has thousands, so dozens of blocks


@pytest.fixture(scope="module")
def token_files(small_run):
    _, run_dir = small_run
    path = run_dir / "features" / "token_features.h5ad"
    whole, backed = ad.read_h5ad(path), ad.read_h5ad(path, backed="r")
    assert on_disk(backed) and not on_disk(whole) and whole.n_obs > 20 * CHUNK
    return whole, backed


def test_row_blocks_of_a_backed_file_tile_the_matrix(token_files):
    whole, backed = token_files
    blocks = list(row_blocks(backed, chunk=CHUNK))
    assert len(blocks) == -(-whole.n_obs // CHUNK) and all(b.shape[0] <= CHUNK for _, b in blocks)
    assert [r.start for r, _ in blocks] == list(range(0, whole.n_obs, CHUNK))
    stacked = np.vstack([b.toarray() for _, b in blocks])
    np.testing.assert_array_equal(stacked, whole.X.toarray())


def test_token_gene_scores_streamed_equal_the_whole_file(token_files):
    whole, backed = token_files
    want = token_gene_scores(whole, gene_key=GENE_NAME)
    got = token_gene_scores(backed, gene_key=GENE_NAME, chunk=CHUNK)
    assert len(want) > 100 and want["n_fire"].sum() > 1000
    exact = ["feature_id", "gene", "n_tokens", "n_fire", "freq", "log2_enrichment"]  # from integer counts
    pd.testing.assert_frame_equal(got[exact], want[exact], check_exact=True)
    np.testing.assert_allclose(got["mean_act"], want["mean_act"], rtol=1e-12)  # float64 sums, another order


def test_density_and_cofiring_streamed_equal_the_whole_file(token_files, tmp_path):
    whole, backed = token_files
    pd.testing.assert_frame_equal(density_scores(None, backed.X, chunk=CHUNK), density_scores(None, whole.X),
                                  check_exact=True)
    part = whole[: 30 * CHUNK].copy()  # the pair counts are the slow part: 30 blocks of a smaller file
    part.write_h5ad(tmp_path / "part.h5ad")
    part_backed = ad.read_h5ad(tmp_path / "part.h5ad", backed="r")
    want = significant_pairs(part.X, min_count=1, max_fdr=1.0)
    got = significant_pairs(part_backed.X, min_count=1, max_fdr=1.0, chunk=CHUNK)
    assert len(want) > 50 and got.attrs["n_tests"] == want.attrs["n_tests"]
    pd.testing.assert_frame_equal(got, want, check_exact=True)
    shifted = part.X[:, ::-1]  # another "layer" on the same tokens: features in reverse order
    pd.testing.assert_frame_equal(match_by_cofiring(part_backed.X, shifted, chunk=CHUNK),
                                  match_by_cofiring(part.X, shifted), check_exact=True)


def test_the_analyze_stage_leaves_token_features_in_the_file(small_run):
    cfg, run_dir = small_run
    import sae4scfm

    address = [f"runs_dir={cfg.runs_dir}", "sae_checkpoint.experiment=small", f"sae_checkpoint.timestamp={run_dir.name}"]
    run = load_run_data(sae4scfm.compose("analyze", address))
    assert run.tokens.isbacked and on_disk(run.tokens.X)
    run = load_run_data(sae4scfm.compose("analyze", [*address, "analysis.pooling=token"]))
    assert not run.tokens.isbacked  # token rows are scored whole (label scoring on tokens)
    # the lean reader: anndata's obs columns (each read on first use, with a RangeIndex instead of the file's
    # row names) and X
    import anndata as ad
    import pandas as pd

    whole = ad.read_h5ad(run_dir / "features" / "token_features.h5ad")
    assert run.tokens.n_obs == whole.n_obs and len(run.tokens.obs) == whole.n_obs
    assert list(run.tokens.obs.columns) == list(whole.obs.columns) and "cell_index" in run.tokens.obs
    for column in whole.obs.columns:
        got = run.tokens.obs[column]
        assert isinstance(got.index, pd.RangeIndex) and got is run.tokens.obs[column]  # read once, then kept
        pd.testing.assert_series_equal(got, whole.obs[column].reset_index(drop=True))
    with pytest.raises(KeyError, match="no column 'nope'"):
        run.tokens.obs["nope"]
    run.tokens.obs["alias"] = run.tokens.obs["gene"]  # as open_run aliases gene_name in old files
    assert "alias" in run.tokens.obs and isinstance(run.tokens.obs["alias"].dtype, pd.CategoricalDtype)
    with pytest.raises(ValueError, match="needs"):
        run.tokens.obs["short"] = np.zeros(3)
    assert (run.tokens.X != whole.X).nnz == 0 and run.tokens.var.equals(whole.var)


@pytest.mark.parametrize("prefetch", [0, 1, 2])
def test_buffer_reuses_prefetch_plus_one_fill_tensors_and_keeps_the_batches(tmp_path, monkeypatch, prefetch):
    store = make_store(tmp_path, n=3000)
    reference = ShufflingBuffer(store, 64, 3, buffer_tokens=250, chunk_tokens=10, prefetch=0)
    fills = reference.fills(1)
    assert len(fills) >= 10
    # a fill is its chunks' rows (by shard, then chunk order) permuted by rng(seed, epoch, f)
    rows = {i: store.shard(i)["acts"] for i in range(store.n_shards)}
    first = fills[0][np.argsort(fills[0][:, 0], kind="stable")]
    concat = torch.cat([rows[s][a:b] for s, a, b in first])
    perm = np.random.default_rng([3, 1, 0]).permutation(len(concat))
    torch.testing.assert_close(reference._fill(1, 0, fills[0]), concat[torch.from_numpy(perm)], rtol=0, atol=0)
    storages = set()
    real = ShufflingBuffer._fill
    monkeypatch.setattr(ShufflingBuffer, "_fill",
                        lambda self, e, f, c, out=None: storages.add(out.untyped_storage().data_ptr()) or real(self, e, f, c, out))
    batches = list(ShufflingBuffer(store, 64, 3, 250, 10, prefetch).epoch(1))
    monkeypatch.undo()
    assert 1 <= len(storages) <= prefetch + 1  # memory: prefetch + 1 fills, whatever the number of fills
    plain = list(reference.epoch(1))
    assert len(batches) == len(plain) == store.n_tokens // 64
    assert all(torch.equal(a, b) for a, b in zip(batches, plain))  # batches stay valid after their fill is reused


def test_read_rows_gives_the_stored_rows_of_each_range(tmp_path):
    store = make_store(tmp_path, n=500)
    acts = store.shard(0)["acts"]
    ranges = np.array([[5, 9], [0, 1], [7, 7], [len(acts) - 3, len(acts)]])
    got = torch.from_numpy(store.read_rows(0, ranges))
    torch.testing.assert_close(got, torch.cat([acts[a:b] for a, b in ranges]), rtol=0, atol=0)


def test_release_freed_memory_hands_fragmented_heap_pages_back():
    """Freed blocks below glibc's mmap threshold stay resident in the heap until trimmed: release_freed_memory
    gives them back (what keeps a streaming stage's peak at one chunk's working memory)."""
    import platform

    from sae4scfm.memory import _libc, release_freed_memory

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        assert _libc() is None or hasattr(_libc(), "malloc_trim")
        release_freed_memory()  # a no-op elsewhere, never an error
        return

    def rss_mib() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    blocks = [np.ones(12_000) for _ in range(4_000)]  # 96 KB each (< the 128 KiB mmap threshold): ~370 MiB of heap
    keep = blocks[1::40]  # a few live blocks spread over the heap, so its top cannot simply shrink
    del blocks
    before = rss_mib()
    release_freed_memory()
    after = rss_mib()
    assert before - after > 200, (before, after)
    assert all(float(b[0]) == 1.0 for b in keep)
