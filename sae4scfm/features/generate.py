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
from anndata.io import sparse_dataset, write_elem
from omegaconf import DictConfig
from tqdm.auto import tqdm

from sae4scfm.atomic import atomic_write
from sae4scfm.errors import InputError
from sae4scfm.memory import release_freed_memory
from sae4scfm.runs import load_run_config, resolve_run_dir
from sae4scfm.saes import load_sae
from sae4scfm.saes.topk import TopKSAE
from sae4scfm.scfm.loading import load_model_and_data, pick_device
from sae4scfm.store.extract import cell_vectors, cls_token_id


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
    raise missing_representation(name, representation_names(features), source)


def missing_representation(name: str, available: list[str], source: str) -> InputError:
    return InputError(f"{source} has no cell representation {name!r}; it has {', '.join(available)} (token SAEs: "
                      "max, mean, sae_of_mean; cell-level SAEs: their hook point); regenerate it with "
                      "scripts/generate_features.py or pick one of those.")


CHUNK_CELLS = 512  # cells per chunk of rows written to the CSR files (``features.chunk_cells``); memory ~ one chunk
MAX_DENSE_ELEMENTS = 1 << 24  # non-TopK SAEs encode at most this many [rows x d_sae] entries at once


def sparse_codes(sae, x: torch.Tensor, max_elements: int = MAX_DENSE_ELEMENTS):
    """The non-zero entries of ``sae.encode(x)`` [N, d_sae] without the dense matrix: (rows [nnz],
    cols [nnz], values [nnz] float32), rows ascending. TopK SAEs: straight from their top-k
    (values, indices); other SAEs: ``encode`` of at most ``max_elements / d_sae`` rows at a time."""
    if isinstance(sae, TopKSAE) and type(sae).encode is TopKSAE.encode:
        values, indices = sae.topk(x)  # [N, k]
        rows = torch.arange(len(x), device=x.device).repeat_interleave(values.shape[1])
        values, indices = values.flatten(), indices.flatten()
        fired = values != 0
        return rows[fired], indices[fired], values[fired].float()
    step = max(1, max_elements // max(sae.d_sae, 1))
    parts = []
    for start in range(0, len(x), step):
        f = sae.encode(x[start:start + step])
        r, c = f.nonzero(as_tuple=True)
        parts.append((r + start, c, f[r, c].float()))
    if not parts:
        empty = torch.zeros(0, dtype=torch.long, device=x.device)
        return empty, empty, torch.zeros(0, device=x.device)
    return tuple(torch.cat(t) for t in zip(*parts))


def pool_codes(rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, group: torch.Tensor,
               n_groups: int, d_sae: int) -> dict[str, tuple[torch.Tensor, ...]]:
    """Max and mean over the tokens of each group (a cell) of a sparse code, never dense: token
    ``rows``/``cols``/``values`` [nnz] (``sparse_codes``), ``group`` [tokens] the cell row of each token
    -> {"max"|"mean": (cell rows, cols, values)}; the mean divides by the cell's token count."""
    key = group[rows] * d_sae + cols
    uniq, inv = torch.unique(key, return_inverse=True)
    counts = torch.bincount(group, minlength=n_groups).clamp(min=1).float()
    cell, col = uniq // d_sae, uniq % d_sae
    mx = torch.zeros(len(uniq), device=values.device).scatter_reduce_(0, inv, values, "amax")  # latents >= 0
    total = torch.zeros(len(uniq), device=values.device).index_add_(0, inv, values)
    return {"max": (cell, col, mx), "mean": (cell, col, total / counts[cell])}


def _chunk_csr(parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]], start: int, n_rows: int,
               d_sae: int) -> sp.csr_matrix:
    """Rows ``start .. start + n_rows`` of a CSR from COO parts (global rows)."""
    if not parts:
        return sp.csr_matrix((n_rows, d_sae), dtype=np.float32)
    r, c, v = (np.concatenate(t) for t in zip(*parts))
    return sp.csr_matrix((v.astype(np.float32), (r - start, c)), shape=(n_rows, d_sae), dtype=np.float32)


class _CsrFile:
    """An .h5ad written in chunks of rows: obs/var/uns once, X and ``layers`` appended per chunk
    (anndata's ``write_elem`` / ``sparse_dataset.append``), with the groups and root attributes of
    ``write_h5ad``, so ``anndata.read_h5ad`` (also backed) reads it."""

    def __init__(self, path: str, var: pd.DataFrame, layers: list[str]):
        import h5py

        self.f = h5py.File(path, "w")
        self.f.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})  # as write_h5ad
        write_elem(self.f, "var", var)
        for group in ("layers", "obsm", "obsp", "varm", "varp"):
            write_elem(self.f, group, {})
        self.names, self.started = ["X", *layers], False

    def append(self, chunks: dict[str, sp.csr_matrix]) -> None:
        for name in self.names:
            group, key = (self.f, "X") if name == "X" else (self.f["layers"], name)
            if self.started:
                sparse_dataset(group[key]).append(chunks[name])
            else:
                write_elem(group, key, chunks[name])
        self.started = True

    def close(self, uns: dict, d_sae: int, obs: pd.DataFrame | None = None) -> None:
        """Finish the file: ``obs`` (None where it was written in chunks, ``_TokenObs``) and ``uns``."""
        if not self.started:
            self.append({name: sp.csr_matrix((0, d_sae), dtype=np.float32) for name in self.names})
        if obs is not None:
            write_elem(self.f, "obs", obs)
        write_elem(self.f, "uns", uns)
        self.f.close()


class _TokenObs:
    """The obs of token_features.h5ad written in chunks of tokens into anndata's on-disk dataframe
    encoding (resizable datasets), so no per-token Python list or frame of all tokens is held: ``cell``
    (categories: the dataset's cells), ``cell_index``, ``gene`` and ``gene_name`` (categories: the genes
    present, sorted; codes hold token ids until ``close`` maps them), ``gene_id``, ``split``."""

    COLUMNS = ("cell", "cell_index", "gene", "gene_name", "gene_id", "split")
    REMAP = 1 << 20  # codes rewritten this many at a time by close

    def __init__(self, f, cells: pd.Index, split: np.ndarray):
        import h5py

        self.obs = f.create_group("obs")
        self.obs.attrs.update({"_index": "_index", "column-order": np.array(self.COLUMNS, dtype=object),
                               "encoding-type": "dataframe", "encoding-version": "0.2.0"})
        self.split_code = pd.Categorical(split, categories=["train", "eval"]).codes.astype(np.int8)
        self.n = 0
        text = h5py.string_dtype("utf-8")

        def grow(where, name, dtype, kind):
            ds = where.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(1 << 16,))
            ds.attrs.update({"encoding-type": kind, "encoding-version": "0.2.0"})
            return ds

        self.data = {"_index": grow(self.obs, "_index", text, "string-array"),
                     "cell_index": grow(self.obs, "cell_index", np.int64, "array"),
                     "gene_id": grow(self.obs, "gene_id", np.int64, "array")}
        self.categories = {"cell": np.asarray(cells, dtype=object), "split": np.array(["train", "eval"], dtype=object)}
        for name in ("cell", "gene", "gene_name", "split"):
            group = self.obs.create_group(name)
            group.attrs.update({"encoding-type": "categorical", "encoding-version": "0.2.0", "ordered": False})
            self.data[name] = grow(group, "codes", np.int32, "array")

    def append(self, cell_of: np.ndarray, gene_ids: np.ndarray) -> None:
        columns = {"_index": np.arange(self.n, self.n + len(cell_of)).astype(str).astype(object),
                   "cell_index": cell_of, "gene_id": gene_ids, "cell": cell_of, "gene": gene_ids,
                   "gene_name": gene_ids, "split": self.split_code[cell_of]}
        for name, values in columns.items():
            ds = self.data[name]
            ds.resize((self.n + len(values),))
            ds[self.n:] = values
        self.n += len(cell_of)

    def close(self, gene_of_id: dict[int, str], name_of_gene: dict[str, str]) -> None:
        """Categories of ``gene`` / ``gene_name`` from the token ids seen ({id: vocabulary gene},
        {vocabulary gene: its name}); their codes rewritten from token ids to category positions."""
        import h5py

        ids = np.array(sorted(gene_of_id), dtype=np.int64)
        for name, label in (("gene", lambda i: gene_of_id[i]), ("gene_name", lambda i: name_of_gene.get(
                gene_of_id[i], gene_of_id[i]))):
            labels = [label(int(i)) for i in ids]
            self.categories[name] = np.array(sorted(set(labels)), dtype=object)
            position = {c: k for k, c in enumerate(self.categories[name])}
            lookup = np.full(int(ids.max()) + 1 if len(ids) else 1, -1, dtype=np.int32)
            lookup[ids] = [position[c] for c in labels]
            ds = self.data[name]
            for start in range(0, self.n, self.REMAP):
                ds[start:start + self.REMAP] = lookup[ds[start:start + self.REMAP]]
        for name, cats in self.categories.items():
            group = self.obs[name]
            group.create_dataset("categories", data=cats, dtype=h5py.string_dtype("utf-8")).attrs.update(
                {"encoding-type": "string-array", "encoding-version": "0.2.0"})


@torch.inference_mode()  # no autograd anywhere here: nothing is recorded for it
def generate_features(cfg: DictConfig) -> Path:
    """Encode the run's dataset (train and eval cells) with its SAE; returns the features dir.

    Token SAE: every representation of ``TOKEN_POOLINGS``, ``features.pooling`` in X, the others
    in ``layers``; plus the token file. Cell-level SAE: X = its code of each cell, no token file.
    Streams: cells go in chunks of ``features.chunk_cells`` (in cell order; length-sorted batches
    within a chunk), pooled straight from the sparse code (``sparse_codes``, ``pool_codes``) and
    appended to the CSR files, so memory holds one chunk's non-zeros, never a dense
    [tokens x d_sae] or [cells x d_sae]. Token rows are ordered by cell, then position."""
    run_dir = resolve_run_dir(cfg.runs_dir, cfg.sae_checkpoint.experiment, cfg.sae_checkpoint.timestamp)
    run_cfg = load_run_config(run_dir)
    device = pick_device(cfg.device)
    sae, sae_cfg = load_sae(run_dir, device)
    hook = sae_cfg.get("sae_hook_point", "tokens")
    pooling = str(cfg.features.get("pooling") or "max")
    if hook == "tokens" and pooling not in TOKEN_POOLINGS:
        raise InputError(f"features.pooling={pooling!r}: use one of {', '.join(TOKEN_POOLINGS)} (which cell "
                         "representation goes in X; the others go in layers).")
    chunk_cells = int(cfg.features.get("chunk_cells") or CHUNK_CELLS)
    if chunk_cells < 1:
        raise InputError(f"features.chunk_cells={chunk_cells}: use a positive number of cells per written chunk.")
    adapter, adata, tokens = load_model_and_data(run_cfg, device)
    cls_id = cls_token_id(adapter, tokens) if hook == "cls" else None
    layer = int(sae_cfg["layer"])
    if adapter.d_model != sae.d_in:
        raise InputError(f"{run_dir}/cfg.json: the SAE expects d_in={sae.d_in} but the model has "
                         f"d_model={adapter.d_model}; the run's scfm config no longer matches its SAE.")
    n_cells, d_sae = adata.n_obs, sae.d_sae
    names = list(TOKEN_POOLINGS) if hook == "tokens" else [hook]
    x_name = pooling if hook == "tokens" else hook
    write_tokens = bool(cfg.features.token_features) and hook == "tokens"
    out_dir = run_dir / "features"
    out_dir.mkdir(exist_ok=True)
    var = pd.DataFrame({"feature_id": np.arange(d_sae)}, index=[str(i) for i in range(d_sae)])
    gene_key = run_cfg.data.get("gene_key")
    gene_names = vocab_gene_names(adapter, np.asarray(adata.var[gene_key] if gene_key else adata.var_names, dtype=str))
    info = {"run_dir": str(run_dir), "layer": layer, "architecture": sae_cfg["architecture"], "sae_hook_point": hook,
            "pooling": x_name, "representations": {n: (TOKEN_POOLINGS | CELL_CODES)[n] for n in names}}
    batch_size = adapter.cells_per_batch(int(cfg.features.batch_size))
    # tokenized cells in cell order, cut into chunks of adata rows
    by_cell = np.argsort(tokens.cell_index, kind="stable")
    bounds = np.searchsorted(tokens.cell_index[by_cell], np.arange(0, n_cells + chunk_cells, chunk_cells).clip(max=n_cells))
    seen_ids: set[int] = set()  # vocabulary ids of every gene token the model read

    def encode_chunk(members: np.ndarray, start: int, n_rows: int):
        """Cell-row CSRs {name: [n_rows, d_sae]} of one chunk, and its token CSR (or None)."""
        cell_parts = {name: [] for name in names}
        tok_parts, tok_key, n_tok = [], [], 0
        order = members[np.argsort(tokens.lengths[members], kind="stable")]
        for b in range(0, len(order), batch_size):
            batch = tokens.collate(order[b:b + batch_size])
            h = adapter.capture(batch, [layer])[layer]
            cells = batch.cell_index.to(device)
            seen_ids.update(np.unique(batch.gene_ids[batch.gene_mask].numpy()).tolist())
            if hook != "tokens":
                r, c, v = sparse_codes(sae, cell_vectors(h, batch, hook, cls_id))
                pooled = {hook: (r, c, v)}
            else:
                mask = batch.gene_mask.to(device)
                row_of_token = torch.arange(len(mask), device=device)[:, None].expand_as(mask)[mask]
                r, c, v = sparse_codes(sae, h[mask].float())  # token rows, never [tokens, d_sae]
                pooled = pool_codes(r, c, v, row_of_token, len(mask), d_sae)
                pooled["sae_of_mean"] = sparse_codes(sae, cell_vectors(h, batch, "cell_mean"))
            for name, (pr, pc, pv) in pooled.items():
                cell_parts[name].append((cells[pr].cpu().numpy(), pc.cpu().numpy(), pv.cpu().numpy()))
            if write_tokens:
                position = torch.arange(mask.shape[1], device=device)[None, :].expand_as(mask)[mask]
                tok_parts.append(((r + n_tok).cpu().numpy(), c.cpu().numpy(), v.cpu().numpy()))
                tok_key.append((cells[row_of_token].cpu().numpy(), position.cpu().numpy(),
                                batch.gene_ids.to(device)[mask].cpu().numpy()))
                n_tok += int(mask.sum())
        csrs = {name: _chunk_csr(cell_parts[name], start, n_rows, d_sae) for name in names}
        if not write_tokens:
            return csrs, None
        cell, pos, gene = (np.concatenate(t) for t in zip(*tok_key)) if tok_key else (np.zeros(0, np.int64),) * 3
        new_row = np.empty(n_tok, dtype=np.int64)
        perm = np.lexsort((pos, cell))  # by cell, then position in the cell
        new_row[perm] = np.arange(n_tok)
        r, c, v = (np.concatenate(t) for t in zip(*tok_parts)) if tok_parts else (np.zeros(0, np.int64),) * 3
        return csrs, (cell[perm], gene[perm], sp.csr_matrix((np.asarray(v, np.float32), (new_row[r], c)),
                                                            shape=(n_tok, d_sae), dtype=np.float32))

    n_written = [0]  # tokens written (set by stream)

    def stream(feature_path: str, token_path: str | None) -> None:
        feats = _CsrFile(feature_path, var, [n for n in names if n != x_name])
        toks = _CsrFile(token_path, var.copy(), []) if token_path else None
        tok_obs = _TokenObs(toks.f, adata.obs_names, adata.obs["split"].to_numpy()) if toks is not None else None
        try:
            n_chunks = len(bounds) - 1
            for i in tqdm(range(n_chunks), desc="encoding cells", unit="chunk"):
                start, n_rows = i * chunk_cells, min(chunk_cells, n_cells - i * chunk_cells)
                csrs, tok_chunk = encode_chunk(by_cell[bounds[i]:bounds[i + 1]], start, n_rows)
                feats.append({"X" if name == x_name else name: m for name, m in csrs.items()})
                if toks is not None:
                    tok_obs.append(*tok_chunk[:2])
                    toks.append({"X": tok_chunk[2]})
                del csrs, tok_chunk
                release_freed_memory()  # the chunk's buffers: the resident set stays at one chunk's
            seen = sorted({gene_names.get(g, g) for g in (adapter.id_to_gene[i] for i in seen_ids)})
            uns = {"sae4scfm": {"genes_seen": seen, **info}}
            feats.close(uns, d_sae, obs=adata.obs.copy())
            if toks is not None:
                tok_obs.close({i: adapter.id_to_gene[i] for i in seen_ids}, gene_names)
                toks.close(uns, d_sae)
                n_written[0] = tok_obs.n
        finally:
            for f in (feats, toks):
                if f is not None and f.f.id.valid:
                    f.f.close()

    feature_file, token_file = out_dir / "features.h5ad", out_dir / "token_features.h5ad"
    if write_tokens:  # each file is renamed into place only once complete (tokens first)
        atomic_write(feature_file, lambda ft: atomic_write(token_file, lambda tt: stream(ft, tt)))
    else:
        atomic_write(feature_file, lambda ft: stream(ft, None))
    layers = [n for n in names if n != x_name]
    print(f"wrote {feature_file}: {n_cells} cells x {d_sae} features (X: {x_name}"
          f"{'; layers: ' + ', '.join(layers) if layers else ''})")
    if hook != "tokens" and cfg.features.token_features:
        print(f"no token_features.h5ad: the SAE of {run_dir.name} encodes one vector per cell (sae.hook_point={hook})")
    if write_tokens:
        print(f"wrote {token_file}: {n_written[0]} tokens x {d_sae} features")
    return out_dir
