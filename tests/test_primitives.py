"""The shared building blocks of the analyses: one matrix coercion, one firing indicator, one BH FDR."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from statsmodels.stats.multitest import multipletests

from sae4scfm.analysis.primitives import as_dense, as_matrix, bh_fdr, fire_counts, firing, positive
from sae4scfm.errors import InputError


@pytest.mark.parametrize("n", [1, 7, 200])
def test_bh_fdr_equals_statsmodels(n):
    rng = np.random.default_rng(n)
    p = rng.uniform(size=n) ** 4
    p[: n // 3] = p[0]  # ties
    rng.shuffle(p)
    np.testing.assert_allclose(bh_fdr(p), multipletests(p, method="fdr_bh")[1], rtol=1e-12, atol=0)
    # n_tests: the omitted tests have p = 1
    np.testing.assert_allclose(bh_fdr(p, n_tests=n + 13), multipletests(np.r_[p, np.ones(13)], method="fdr_bh")[1][:n],
                               rtol=1e-12, atol=0)


def test_bh_fdr_edges():
    assert bh_fdr([]).shape == (0,)
    np.testing.assert_array_equal(bh_fdr([0.0, 1.0]), [0.0, 1.0])
    with pytest.raises(InputError, match="n_tests=1"):
        bh_fdr([0.1, 0.2], n_tests=1)
    with pytest.raises(InputError, match="NaN"):
        bh_fdr([0.1, np.nan])


def test_bh_fdr_is_the_one_every_analysis_uses():
    """enrichment and coactivation import the same function (no second BH left behind)."""
    from sae4scfm.analysis import coactivation, enrichment

    assert enrichment.bh_fdr is bh_fdr and coactivation.bh_fdr is bh_fdr
    assert not hasattr(coactivation, "benjamini_hochberg")


def test_as_matrix_inputs_formats_and_no_copy():
    dense = np.array([[0.0, 2.0, -1.0], [3.0, 0.0, 0.5]], dtype=np.float32)
    csc = sp.csc_matrix(dense)
    assert as_matrix(csc, fmt="csc") is csc  # canonical, right format and dtype: used as is
    for x in (dense, sp.coo_matrix(dense), sp.csr_array(dense), torch.from_numpy(dense), ad.AnnData(dense)):
        m = as_matrix(x)
        assert sp.isspmatrix_csr(m) and m.dtype == np.float32 and m.has_canonical_format
        np.testing.assert_array_equal(m.toarray(), dense)
    assert as_matrix(dense.astype(int)).dtype == np.float64
    dup = sp.coo_matrix(([1.0, 2.0], ([0, 0], [1, 1])), shape=(1, 2))
    np.testing.assert_array_equal(as_matrix(dup).toarray(), [[0.0, 3.0]])  # duplicates summed
    for bad, msg in ((np.zeros(3), "2-D"), (np.array([[np.nan]]), "NaN"), (np.array([["a"]]), "numeric"),
                     (ad.AnnData(obs={"a": [1]}), "no matrix")):
        with pytest.raises(InputError, match=msg):
            as_matrix(bad, "thing")


def test_firing_positive_counts():
    x = sp.csr_matrix(np.array([[0.0, 2.0, -1.0], [3.0, 0.0, 0.5], [0.0, 0.0, 0.0]]))
    x.data[0] = 0.0  # an explicit stored zero never fires
    np.testing.assert_array_equal(firing(x).toarray(), [[0, 0, 0], [1, 0, 1], [0, 0, 0]])
    assert firing(x).nnz == 2 and firing(x, dtype=np.int32).dtype == np.int32
    np.testing.assert_array_equal(positive(x).toarray(), [[0, 0, 0], [3, 0, 0.5], [0, 0, 0]])
    np.testing.assert_array_equal(fire_counts(x), [1, 0, 1])
    W = torch.randn(4, 3)
    np.testing.assert_allclose(as_dense(W), W.double().numpy())
    with pytest.raises(InputError, match="2-D"):
        as_dense(np.zeros(3))


def test_row_bounds_cap_rows_and_stored_entries_and_tile_the_matrix():
    from sae4scfm.analysis.primitives import row_blocks, row_bounds, row_nnz

    rng = np.random.default_rng(0)
    dense_rows = sp.random(40, 50, density=0.8, format="csr", random_state=1)  # ~40 entries per row
    sparse_rows = sp.random(40, 50, density=0.05, format="csr", random_state=2)  # ~2.5 per row
    np.testing.assert_array_equal(row_nnz(dense_rows), np.diff(dense_rows.indptr))
    np.testing.assert_array_equal(row_nnz(dense_rows.tocsc()), np.diff(dense_rows.indptr))
    np.testing.assert_array_equal(row_nnz(dense_rows.toarray()), np.full(40, 50))
    for xs, chunk, budget in (([dense_rows], 40, 100), ([sparse_rows], 7, 100), ([dense_rows, sparse_rows], 40, 90)):
        bounds = row_bounds(*xs, chunk=chunk, max_nnz=budget)
        assert bounds[0].start == 0 and bounds[-1].stop == 40
        assert all(a.stop == b.start for a, b in zip(bounds, bounds[1:]))  # consecutive, no gaps
        per_row = sum(row_nnz(x) for x in xs)
        for b in bounds:
            assert b.stop - b.start <= chunk
            assert per_row[b].sum() <= budget or b.stop - b.start == 1  # a row over budget is a block alone
            if b.stop < 40 and b.stop - b.start < chunk:  # cut early only where the next row would not fit
                assert per_row[b.start:b.stop + 1].sum() > budget
    bounds = row_bounds(dense_rows, chunk=40, max_nnz=100)
    assert len(bounds) > 10  # the entry budget, not the row cap, sets the blocks of dense rows
    blocks = list(row_blocks(dense_rows, bounds=bounds))
    assert [r for r, _ in blocks] == bounds
    np.testing.assert_array_equal(sp.vstack([b for _, b in blocks]).toarray(), dense_rows.toarray())
    single = sp.csr_matrix(rng.random((3, 4)))  # one block: the matrix itself, not a copy
    assert next(row_blocks(single))[1] is single
