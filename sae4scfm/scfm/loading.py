"""What every stage does first: pick the device, load the model and the data, tokenize."""

from __future__ import annotations

import copy
import logging

import anndata as ad
import numpy as np
import torch
from omegaconf import DictConfig

from sae4scfm.data import describe, load_dataset, normalise_expression, open_dataset, select_vocab_genes
from sae4scfm.errors import InputError
from sae4scfm.scfm import load_scfm
from sae4scfm.scfm.adapter import ScFMAdapter
from sae4scfm.scfm.tokens import LazyTokenizedCells, TokenizedCells

log = logging.getLogger(__name__)


def pick_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"device={name}: CUDA is not available on this machine; use device=cpu or auto.")
    return name


def _preprocess(data_cfg: DictConfig) -> dict:
    pp = data_cfg.preprocess
    return dict(gene_key=data_cfg.get("gene_key"), input_kind=pp.input_kind, normalize_total=pp.normalize_total,
                log1p=pp.log1p, subset_hvg=pp.subset_hvg, n_hvg=pp.n_hvg, source=describe(data_cfg))


def tokenize_dataset(adapter: ScFMAdapter, adata: ad.AnnData, data_cfg: DictConfig) -> TokenizedCells:
    """The model's tokens for every cell of ``adata``, with the ``data.preprocess`` settings."""
    return adapter.tokenize(adata, **_preprocess(data_cfg), seed=int(data_cfg.seed))


def chunk_seed(seed: int, k: int) -> int:
    """The tokenization seed of chunk ``k``: ``seed`` itself for chunk 0 (so one chunk of all cells gets
    the eager path's tokens), an independent SeedSequence draw of (seed, k) for the others."""
    return int(seed) if k == 0 else int(np.random.SeedSequence([int(seed), int(k)]).generate_state(1)[0])


def tokenizer_only(adapter: ScFMAdapter) -> ScFMAdapter:
    """A shallow copy of ``adapter`` without its torch modules (``tokenize`` needs only the vocabulary
    and preprocessing settings), so it pickles small into DataLoader workers."""
    light = copy.copy(adapter)
    for name, value in vars(adapter).items():
        if isinstance(value, torch.nn.Module) or (
                isinstance(value, dict) and any(isinstance(v, torch.nn.Module) for v in value.values())):
            setattr(light, name, None)
    return light


class ChunkTokenizer:
    """Picklable ``(chunk AnnData, k) -> TokenizedCells``: the adapter's own tokenize with the
    ``data.preprocess`` settings and seed ``chunk_seed(seed, k)``. With ``hvg`` (the vocabulary genes'
    global HVG mask from ``streaming_hvg``) each chunk is normalised here over the vocabulary genes, cut
    to the HVGs and handed over as log-normalised values, exactly what the eager HVG subset gives."""

    def __init__(self, adapter: ScFMAdapter, preprocess: dict, seed: int, hvg: np.ndarray | None = None):
        self.adapter, self.preprocess, self.seed, self.hvg = tokenizer_only(adapter), dict(preprocess), seed, hvg

    def __call__(self, chunk: ad.AnnData, k: int) -> TokenizedCells:
        pp, seed = self.preprocess, chunk_seed(self.seed, k)
        if self.hvg is None:
            return self.adapter.tokenize(chunk, **pp, seed=seed)
        selected = select_vocab_genes(chunk, self.adapter.vocab, pp["gene_key"], pp["source"], log_usage=False)
        X = normalise_expression(selected.matrix, pp["input_kind"], pp["normalize_total"], pp["log1p"], pp["source"])
        cut = ad.AnnData(X=X[:, self.hvg], obs=chunk.obs, var={"gene": selected.genes[self.hvg]})
        cut.var_names = selected.genes[self.hvg]
        return self.adapter.tokenize(cut, **{**pp, "gene_key": None, "input_kind": "log_normalized",
                                             "normalize_total": None, "log1p": False, "subset_hvg": False},
                                     seed=seed)


def streaming_hvg(adapter: ScFMAdapter, reader, chunk_cells: int, preprocess: dict) -> np.ndarray:
    """Bool mask [vocabulary genes of the data] of the ``n_hvg`` most variable genes (scanpy's seurat
    flavour on the normalised, log1p cells), from one pass over ``reader`` in chunks."""
    from sae4scfm.data.stream import chunk_rows, gene_statistics, highly_variable_from_moments

    vocab = getattr(adapter, "vocab", None)
    if vocab is None:
        raise InputError(f"data.preprocess.subset_hvg=true: the {adapter.family} model reads no HVG subset; "
                         "set data.preprocess.subset_hvg=false.")
    pp = preprocess

    def chunk(rows: np.ndarray):  # (library [cells], normalised log1p values [cells, vocab genes])
        cells = reader.read(rows)
        sel = select_vocab_genes(cells, vocab, pp["gene_key"], pp["source"], log_usage=False)
        X = normalise_expression(sel.matrix, pp["input_kind"], pp["normalize_total"], pp["log1p"], pp["source"])
        return np.asarray(sel.matrix.sum(axis=1)).ravel(), X

    stats = gene_statistics(chunk(rows) for rows in chunk_rows(len(reader), chunk_cells))
    return highly_variable_from_moments(stats, int(pp["n_hvg"]))


def tokenize_lazily(adapter: ScFMAdapter, reader, data_cfg: DictConfig) -> LazyTokenizedCells:
    """Tokens read and computed per chunk of ``data.chunk_cells`` cells on demand (``LazyTokenizedCells``);
    with ``subset_hvg`` the HVGs come first, from one streaming pass."""
    from sae4scfm.data.soma import chunk_size

    step, pp = chunk_size(data_cfg), _preprocess(data_cfg)
    hvg = streaming_hvg(adapter, reader, step, pp) if pp["subset_hvg"] else None
    return LazyTokenizedCells(reader, ChunkTokenizer(adapter, pp, int(data_cfg.seed), hvg), step)


def split_tokens(tokens: TokenizedCells, adata: ad.AnnData, split: str) -> TokenizedCells:
    return tokens.subset(np.flatnonzero(adata.obs["split"].to_numpy() == split))


def load_model_and_data(cfg: DictConfig, device: str) -> tuple[ScFMAdapter, ad.AnnData, TokenizedCells]:
    """(adapter, cells, tokens). With ``data.stream=true`` the cells hold obs/var only (no X for SOMA
    sources) and the tokens are a ``LazyTokenizedCells`` reading ``data.chunk_cells`` cells at a time."""
    stream = bool(cfg.data.get("stream", False))
    # first: a bad data file is reported before a model is loaded (or built)
    adata, reader = open_dataset(cfg.data) if stream else (load_dataset(cfg.data), None)
    torch.manual_seed(int(cfg.seed))  # random_init models are reproducible
    adapter = load_scfm(cfg.scfm, device)
    adapter.check_layer(cfg.sae.target_layer)
    if stream:
        return adapter, adata, tokenize_lazily(adapter, reader, cfg.data)
    return adapter, adata, tokenize_dataset(adapter, adata, cfg.data)
