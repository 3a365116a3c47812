"""SAE features of every cell and token of a run's dataset, as AnnData.

``<run>/features/features.h5ad``: obs = the input cells (all original obs columns,
plus ``split``), var = SAE features (``feature_id``), X and ``layers`` = cell representations
[cells, d_sae] (CSR float32), named in ``uns["sae4scfm"]["representations"]`` (``TOKEN_POOLINGS``):
for a token SAE the max over the cell's gene tokens, their mean, and the SAE applied to the mean
of the cell's gene-token residual vectors (``sae_of_mean``); ``features.pooling`` (default max)
goes in X (``uns["sae4scfm"]["pooling"]``), the others in ``layers[name]``. For a cell-level SAE
(``sae.hook_point=cell_mean|cls``) X is its code of each cell and there is no token file. Read a
representation by name with ``cell_representation``.
``<run>/features/token_features.h5ad`` (token SAEs): obs = gene tokens (``cell``, ``cell_index``,
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
from sae4scfm.store.extract import cell_vectors, cls_token_id


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


# Cell representations of a token-level SAE: name -> what it is (features.pooling puts one in X,
# the others in layers[name]). A cell-level SAE (sae.hook_point=cell_mean|cls) has one: its code.
TOKEN_POOLINGS = {
    "max": "max over the cell's gene tokens of the token latents",
    "mean": "mean over the cell's gene tokens of the token latents",
    "sae_of_mean": "the SAE applied to the mean of the cell's gene-token residual vectors",
}
CELL_CODES = {
    "cell_mean": "code of the cell-level SAE trained on the mean of each cell's gene-token residual vectors",
    "cls": "code of the cell-level SAE trained on each cell's <cls> token state",
}


def representation_names(features: ad.AnnData) -> list[str]:
    """The cell representations of a features.h5ad, the one in X first."""
    return [x_representation(features), *features.layers.keys()]


def x_representation(features: ad.AnnData) -> str:
    """The name of the representation in X (files written before ``features.pooling`` hold max)."""
    pooling = features.uns.get("sae4scfm", {}).get("pooling")
    return pooling if isinstance(pooling, str) else "max"


def cell_representation(features: ad.AnnData, name: str, source: str = "features.h5ad"):
    """[cells, d_sae] the representation ``name`` of a features.h5ad (X or ``layers[name]``);
    an InputError naming the available ones otherwise."""
    if name == x_representation(features):
        return features.X
    if name in features.layers:
        return features.layers[name]
    raise InputError(f"{source} has no cell representation {name!r}; it has {', '.join(representation_names(features))} "
                     "(token SAEs: max, mean, sae_of_mean; cell-level SAEs: their hook point); regenerate it with "
                     "scripts/generate_features.py or pick one of those.")


@torch.no_grad()
def generate_features(cfg: DictConfig) -> Path:
    """Encode the run's dataset (train and eval cells) with its SAE; returns the features dir.

    Token SAE: every representation of ``TOKEN_POOLINGS``, ``features.pooling`` in X, the others
    in ``layers``; plus the token file. Cell-level SAE: X = its code of each cell, no token file."""
    run_dir = resolve_run_dir(cfg.runs_dir, cfg.sae_checkpoint.experiment, cfg.sae_checkpoint.timestamp)
    run_cfg = load_run_config(run_dir)
    device = pick_device(cfg.device)
    sae, sae_cfg = load_sae(run_dir, device)
    hook = sae_cfg.get("sae_hook_point", "tokens")
    pooling = str(cfg.features.get("pooling") or "max")
    if hook == "tokens" and pooling not in TOKEN_POOLINGS:
        raise InputError(f"features.pooling={pooling!r}: use one of {', '.join(TOKEN_POOLINGS)} (which cell "
                         "representation goes in X; the others go in layers).")
    adapter, adata, tokens = load_model_and_data(run_cfg, device)
    cls_id = cls_token_id(adapter, tokens) if hook == "cls" else None
    layer = int(sae_cfg["layer"])
    if adapter.d_model != sae.d_in:
        raise InputError(f"{run_dir}/cfg.json: the SAE expects d_in={sae.d_in} but the model has "
                         f"d_model={adapter.d_model}; the run's scfm config no longer matches its SAE.")
    n_cells, d_sae = adata.n_obs, sae.d_sae
    names = list(TOKEN_POOLINGS) if hook == "tokens" else [hook]
    cell_parts = {name: ([], [], []) for name in names}
    write_tokens = bool(cfg.features.token_features) and hook == "tokens"
    tok = ([], [], [])
    tok_cell, tok_gene = [], []
    seen_ids: set[int] = set()  # vocabulary ids of every gene token the model read
    n_tok = 0
    batch_size = adapter.cells_per_batch(int(cfg.features.batch_size))
    for batch in tqdm(tokens.batches(batch_size), total=-(-len(tokens) // batch_size),
                      desc="encoding cells", unit="batch"):
        h = adapter.capture(batch, [layer])[layer]
        cells = batch.cell_index.numpy()
        seen_ids.update(np.unique(batch.gene_ids[batch.gene_mask].numpy()).tolist())
        if hook != "tokens":
            pooled = {hook: sae.encode(cell_vectors(h, batch, hook, cls_id))}
        else:
            mask = batch.gene_mask.to(device)
            f = sae.encode(h[mask].float())  # [n_gene_tokens, d_sae]
            row_of_token = torch.arange(len(mask), device=device)[:, None].expand_as(mask)[mask]
            counts = mask.sum(1, keepdim=True).clamp(min=1).float()
            pooled = {
                "max": torch.zeros(len(mask), d_sae, device=device).scatter_reduce_(
                    0, row_of_token[:, None].expand_as(f), f, "amax"),  # latents are >= 0
                "mean": torch.zeros(len(mask), d_sae, device=device).index_add_(0, row_of_token, f) / counts,
                "sae_of_mean": sae.encode(cell_vectors(h, batch, "cell_mean")),
            }
        for name, values in pooled.items():
            r, c = values.nonzero(as_tuple=True)
            cell_parts[name][0].append(cells[r.cpu().numpy()])
            cell_parts[name][1].append(c.cpu().numpy())
            cell_parts[name][2].append(values[r, c].cpu().numpy())
        if write_tokens:
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
    x_name = pooling if hook == "tokens" else hook
    gene_key = run_cfg.data.get("gene_key")
    gene_names = vocab_gene_names(adapter, np.asarray(adata.var[gene_key] if gene_key else adata.var_names, dtype=str))
    seen = sorted({gene_names.get(g, g) for g in (adapter.id_to_gene[i] for i in seen_ids)})
    info = {"genes_seen": seen, "run_dir": str(run_dir), "layer": layer, "architecture": sae_cfg["architecture"], "sae_hook_point": hook,
            "pooling": x_name, "representations": {n: (TOKEN_POOLINGS | CELL_CODES)[n] for n in names}}
    features = ad.AnnData(X=_csr(*cell_parts[x_name], shape=(n_cells, d_sae)), obs=adata.obs.copy(), var=var,
                          uns={"sae4scfm": info})
    for name in names:
        if name != x_name:
            features.layers[name] = _csr(*cell_parts[name], shape=(n_cells, d_sae))
    write_h5ad(features, out_dir / "features.h5ad")
    print(f"wrote {out_dir / 'features.h5ad'}: {n_cells} cells x {d_sae} features (X: {x_name}"
          f"{'; layers: ' + ', '.join(features.layers.keys()) if len(features.layers) else ''})")
    if hook != "tokens" and cfg.features.token_features:
        print(f"no token_features.h5ad: the SAE of {run_dir.name} encodes one vector per cell (sae.hook_point={hook})")
    if write_tokens:
        cell_of = np.concatenate(tok_cell)
        gene_ids = np.concatenate(tok_gene)
        vocab_genes = [adapter.id_to_gene[int(g)] for g in gene_ids]
        obs = pd.DataFrame({
            "cell": pd.Categorical(adata.obs_names.to_numpy()[cell_of], categories=adata.obs_names), "cell_index": cell_of,
            "gene": pd.Categorical(vocab_genes), "gene_name": pd.Categorical([gene_names.get(g, g) for g in vocab_genes]),
            "gene_id": gene_ids,
            "split": pd.Categorical(adata.obs["split"].to_numpy()[cell_of], categories=["train", "eval"]),
        }, index=[str(i) for i in range(n_tok)])
        tokens_ad = ad.AnnData(X=_csr(*tok, shape=(n_tok, d_sae)), obs=obs, var=var.copy(), uns={"sae4scfm": info})
        write_h5ad(tokens_ad, out_dir / "token_features.h5ad")
        print(f"wrote {out_dir / 'token_features.h5ad'}: {n_tok} tokens x {d_sae} features")
    return out_dir
