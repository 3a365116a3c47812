"""Streaming ``generate_features``: pooled straight from the SAE's sparse code, CSR appended per chunk
of cells, never a dense [tokens x d_sae] or [cells x d_sae]. The files equal a reference computed
here independently, one cell per forward with the dense ``sae.encode`` (the numbers of the
implementation before streaming)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import torch

import sae4scfm
from sae4scfm.features.generate import pool_codes, sparse_codes
from sae4scfm.runs import load_run_config
from sae4scfm.saes import build_sae, load_sae
from sae4scfm.saes.topk import TopKSAE
from sae4scfm.scfm.loading import load_model_and_data

N_CELLS = 90
RUN = ["scfm=demo", "data=pbmc", "sae=topk", "sae.target_layer=2", "sae.hyperparams.k=8", "seed=0",
       f"data.n_cells={N_CELLS}", "data.preprocess.split=0.25", "wandb.mode=disabled", "train.n_epochs=1",
       "train.batch_size=512", "train.checkpoint_every=1000"]


@pytest.fixture(scope="module")
def streamed(tmp_path_factory):
    """A trained run whose features were written in chunks of 32 cells, with TopKSAE.encode disabled."""
    runs_dir, store_dir = tmp_path_factory.mktemp("runs"), tmp_path_factory.mktemp("stores")
    run_dir = sae4scfm.train(sae4scfm.compose("train", [*RUN, f"runs_dir={runs_dir}", f"buffer.store_dir={store_dir}",
                                                         "experiment=stream"]))
    address = [f"runs_dir={runs_dir}", "sae_checkpoint.experiment=stream", f"sae_checkpoint.timestamp={run_dir.name}",
               "++features.chunk_cells=32", "features.batch_size=8"]
    with pytest.MonkeyPatch.context() as mp:  # a dense [tokens, d_sae] encode is never built
        def dense(*_):
            raise AssertionError("generate_features called the dense TopKSAE.encode")
        mp.setattr(TopKSAE, "encode", dense)
        sae4scfm.generate_features(sae4scfm.compose("features", address))
    return run_dir


@torch.no_grad()
def reference(run_dir):
    """Dense per-cell max / mean / sae_of_mean [cells, d_sae] and token rows (cell, gene id, latents),
    cells in order, tokens in sequence order: one cell per forward, ``sae.encode`` on the dense code."""
    adapter, adata, tokens = load_model_and_data(load_run_config(run_dir), "cpu")
    sae, sae_cfg = load_sae(run_dir, "cpu")
    layer = int(sae_cfg["layer"])
    pooled = {name: np.zeros((adata.n_obs, sae.d_sae), np.float32) for name in ("max", "mean", "sae_of_mean")}
    tok_cell, tok_gene, tok_x = [], [], []
    for pos in np.argsort(tokens.cell_index, kind="stable"):
        batch = tokens.collate(np.array([pos]))
        h = adapter.capture(batch, [layer])[layer][0][batch.gene_mask[0]].float()  # [n, d]
        f = sae.encode(h)
        cell = int(batch.cell_index[0])
        pooled["max"][cell] = f.max(0).values.numpy()
        pooled["mean"][cell] = f.mean(0).numpy()
        pooled["sae_of_mean"][cell] = sae.encode(h.mean(0, keepdim=True))[0].numpy()
        tok_cell += [cell] * len(h)
        tok_gene += batch.gene_ids[0][batch.gene_mask[0]].tolist()
        tok_x.append(f.numpy())
    genes = [adapter.id_to_gene[g] for g in tok_gene]
    return adata, pooled, np.array(tok_cell), np.array(tok_gene), np.concatenate(tok_x), genes


def test_streamed_files_equal_the_dense_reference(streamed):
    adata, pooled, tok_cell, tok_gene, tok_x, genes = reference(streamed)
    feats = ad.read_h5ad(streamed / "features" / "features.h5ad")
    assert feats.shape == (N_CELLS, pooled["max"].shape[1]) and feats.uns["sae4scfm"]["pooling"] == "max"
    assert list(feats.obs_names) == list(adata.obs_names) and "split" in feats.obs
    assert feats.X.format == "csr" and feats.X.dtype == np.float32
    for name, want in pooled.items():
        got = feats.X if name == "max" else feats.layers[name]
        np.testing.assert_allclose(got.toarray(), want, rtol=1e-5, atol=1e-5, err_msg=name)
        assert got.nnz == np.count_nonzero(want), name  # no explicit zeros written
    backed = ad.read_h5ad(streamed / "features" / "features.h5ad", backed="r")  # the write_h5ad layout
    np.testing.assert_allclose(backed.X[40:70].toarray(), pooled["max"][40:70], rtol=1e-5, atol=1e-5)
    backed.file.close()
    toks = ad.read_h5ad(streamed / "features" / "token_features.h5ad")
    np.testing.assert_array_equal(toks.obs["cell_index"].to_numpy(), tok_cell)
    np.testing.assert_array_equal(toks.obs["gene_id"].to_numpy(), tok_gene)
    assert list(toks.obs["cell"].astype(str)) == list(adata.obs_names[tok_cell])
    assert list(toks.obs["gene"].astype(str)) == genes  # scGPT: the vocabulary entry is the symbol
    assert list(toks.obs["gene_name"].astype(str)) == genes
    assert list(toks.obs["gene"].cat.categories) == sorted(set(genes))  # the genes present, sorted
    assert list(toks.obs["split"].astype(str)) == list(adata.obs["split"].to_numpy()[tok_cell])
    assert list(toks.obs_names) == [str(i) for i in range(len(tok_cell))]
    assert feats.uns["sae4scfm"]["genes_seen"].tolist() == sorted(set(genes))
    np.testing.assert_allclose(toks.X.toarray(), tok_x, rtol=1e-5, atol=1e-5)
    assert toks.X.nnz == np.count_nonzero(tok_x)


def test_sparse_codes_match_the_dense_encode_for_every_kind_of_sae():
    torch.manual_seed(0)
    x = torch.randn(50, 16)
    for name, hp in (("topk", {"k": 4}), ("standard", {}), ("jumprelu", {})):
        sae = build_sae(name, 16, 64, hp)
        with torch.no_grad():
            sae.b_enc.normal_(0, 0.5)
            dense = sae.encode(x)
            r, c, v = sparse_codes(sae, x, max_elements=64 * 7)  # the non-TopK path in chunks of 7 rows
        rebuilt = torch.zeros_like(dense)
        rebuilt[r, c] = v
        torch.testing.assert_close(rebuilt, dense, rtol=1e-5, atol=1e-6)  # row chunks: other BLAS blocking
        assert (v != 0).all() and len(v) == int((dense != 0).sum()), name


def test_pool_codes_equal_dense_max_and_mean():
    torch.manual_seed(1)
    dense = torch.relu(torch.randn(30, 12) - 0.8)  # 30 tokens of 4 cells, some latents never fire
    group = torch.tensor([0] * 5 + [1] * 11 + [3] * 14)  # cell 2 has no tokens
    r, c = dense.nonzero(as_tuple=True)
    pooled = pool_codes(r, c, dense[r, c], group, 4, 12)
    for name, want in (("max", torch.stack([dense[group == g].max(0).values if (group == g).any()
                                            else torch.zeros(12) for g in range(4)])),
                       ("mean", torch.stack([dense[group == g].mean(0) if (group == g).any()
                                             else torch.zeros(12) for g in range(4)]))):
        cell, col, val = pooled[name]
        got = torch.zeros(4, 12)
        got[cell, col] = val
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
