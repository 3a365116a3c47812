"""SAE features of every cell and token of a run's dataset, as AnnData.

``<run>/features/features.h5ad``: obs = the input cells (all original obs columns,
plus ``split``), var = SAE features (``feature_id``), X = per-cell max over the
cell's gene tokens (CSR float32), ``layers["mean"]`` = per-cell mean over them.
``<run>/features/token_features.h5ad``: obs = gene tokens (``cell``, ``cell_index``,
``gene`` = the model's vocabulary entry, e.g. an Ensembl ID for Geneformer, ``gene_name`` = the
dataset's name of that gene (``var[data.gene_key]`` or var_names: symbols on the built-in data;
what every gene-level analysis uses), ``gene_id`` = token id, ``split``), X = the token's SAE
latents (CSR float32).
Any scanpy user can plot a feature on a UMAP from these with no glue.
"""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from sae4scfm.atomic import atomic_write
from sae4scfm.errors import InputError
from sae4scfm.runs import load_run_config, resolve_run_dir
from sae4scfm.saes import load_sae
from sae4scfm.scfm.loading import load_model_and_data, pick_device


def _csr(rows: list[np.ndarray], cols: list[np.ndarray], vals: list[np.ndarray], shape: tuple[int, int]) -> sp.csr_matrix:
    return sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=shape,
                         dtype=np.float32)


def write_h5ad(adata: ad.AnnData, path: Path) -> None:
    """Write atomically: a killed run never leaves a half-written file under the final name."""
    atomic_write(path, lambda tmp: adata.write_h5ad(tmp))


def vocab_gene_names(adapter, identifiers: np.ndarray) -> dict[str, str]:
    """{vocabulary gene: its name for gene-level analyses}: the dataset's identifier of it (first in
    data order when several map to one, through ``adapter.vocab_genes``: Geneformer maps symbols to
    Ensembl IDs), or the model's symbol for it (``adapter.gene_symbols``) where the dataset's
    identifier is the vocabulary's own ID (Geneformer on Ensembl-keyed data)."""
    symbols = adapter.gene_symbols()
    names: dict[str, str] = {}
    for ident, gene in zip(identifiers, adapter.vocab_genes(identifiers)):
        if gene and ident == gene and gene in symbols:
            ident = symbols[gene]
        if gene and gene not in names:
            names[str(gene)] = str(ident)
    return names


@torch.no_grad()
def generate_features(cfg: DictConfig) -> Path:
    """Encode the run's dataset (train and eval cells) with its SAE; returns the features dir."""
    run_dir = resolve_run_dir(cfg.runs_dir, cfg.sae_checkpoint.experiment, cfg.sae_checkpoint.timestamp)
    run_cfg = load_run_config(run_dir)
    device = pick_device(cfg.device)
    sae, sae_cfg = load_sae(run_dir, device)
    adapter, adata, tokens = load_model_and_data(run_cfg, device)
    layer = int(sae_cfg["layer"])
    if adapter.d_model != sae.d_in:
        raise InputError(f"{run_dir}/cfg.json: the SAE expects d_in={sae.d_in} but the model has "
                         f"d_model={adapter.d_model}; the run's scfm config no longer matches its SAE.")
    n_cells, d_sae = adata.n_obs, sae.d_sae
    cell_max = ([], [], [])
    cell_mean = ([], [], [])
    tok = ([], [], [])
    tok_cell, tok_gene = [], []
    n_tok = 0
    batch_size = adapter.cells_per_batch(int(cfg.features.batch_size))
    for batch in tqdm(tokens.batches(batch_size), total=-(-len(tokens) // batch_size),
                      desc="encoding cells", unit="batch"):
        h = adapter.capture(batch, [layer])[layer]
        mask = batch.gene_mask.to(device)
        f = sae.encode(h[mask].float())  # [n_gene_tokens, d_sae]
        row_of_token = torch.arange(len(mask), device=device)[:, None].expand_as(mask)[mask]
        pooled_max = torch.zeros(len(mask), d_sae, device=device).scatter_reduce_(
            0, row_of_token[:, None].expand_as(f), f, "amax")  # latents are >= 0
        counts = mask.sum(1, keepdim=True).clamp(min=1).float()
        pooled_mean = torch.zeros(len(mask), d_sae, device=device).index_add_(0, row_of_token, f) / counts
        cells = batch.cell_index.numpy()
        for store, pooled in ((cell_max, pooled_max), (cell_mean, pooled_mean)):
            r, c = pooled.nonzero(as_tuple=True)
            store[0].append(cells[r.cpu().numpy()])
            store[1].append(c.cpu().numpy())
            store[2].append(pooled[r, c].cpu().numpy())
        if cfg.features.token_features:
            r, c = f.nonzero(as_tuple=True)
            tok[0].append(r.cpu().numpy() + n_tok)
            tok[1].append(c.cpu().numpy())
            tok[2].append(f[r, c].cpu().numpy())
            tok_cell.append(cells[row_of_token.cpu().numpy()])
            tok_gene.append(batch.gene_ids.to(device)[mask].cpu().numpy())
            n_tok += int(mask.sum())

    out_dir = run_dir / "features"
    out_dir.mkdir(exist_ok=True)
    var = pd.DataFrame({"feature_id": np.arange(d_sae)}, index=[str(i) for i in range(d_sae)])
    info = {"run_dir": str(run_dir), "layer": layer, "architecture": sae_cfg["architecture"],
            "pooling": {"X": "max over gene tokens", "mean": "mean over gene tokens"}}
    features = ad.AnnData(X=_csr(*cell_max, shape=(n_cells, d_sae)), obs=adata.obs.copy(), var=var,
                          uns={"sae4scfm": info})
    features.layers["mean"] = _csr(*cell_mean, shape=(n_cells, d_sae))
    write_h5ad(features, out_dir / "features.h5ad")
    print(f"wrote {out_dir / 'features.h5ad'}: {n_cells} cells x {d_sae} features")
    if cfg.features.token_features:
        cell_of = np.concatenate(tok_cell)
        gene_ids = np.concatenate(tok_gene)
        gene_key = run_cfg.data.get("gene_key")
        names = vocab_gene_names(adapter, np.asarray(adata.var[gene_key] if gene_key else adata.var_names, dtype=str))
        vocab_genes = [adapter.id_to_gene[int(g)] for g in gene_ids]
        obs = pd.DataFrame({
            "cell": pd.Categorical(adata.obs_names.to_numpy()[cell_of], categories=adata.obs_names), "cell_index": cell_of,
            "gene": pd.Categorical(vocab_genes), "gene_name": pd.Categorical([names.get(g, g) for g in vocab_genes]),
            "gene_id": gene_ids,
            "split": pd.Categorical(adata.obs["split"].to_numpy()[cell_of], categories=["train", "eval"]),
        }, index=[str(i) for i in range(n_tok)])
        tokens_ad = ad.AnnData(X=_csr(*tok, shape=(n_tok, d_sae)), obs=obs, var=var.copy(), uns={"sae4scfm": info})
        write_h5ad(tokens_ad, out_dir / "token_features.h5ad")
        print(f"wrote {out_dir / 'token_features.h5ad'}: {n_tok} tokens x {d_sae} features")
    return out_dir
