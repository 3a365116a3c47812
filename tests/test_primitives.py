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
