"""scGPT: model, official checkpoint loading, preprocessing and tokenizer.

The module tree mirrors ``scgpt.model.TransformerModel`` so that the official
``best_model.pt`` state dict loads without key surgery (the flash-attention
``Wqkv`` names of the published whole-human checkpoint are renamed to the torch
``in_proj_`` names, the one documented mapping). Checkpoint folder layout, as
published: ``best_model.pt`` (raw state dict), ``args.json``, ``vocab.json``.

Residual-stream layers are numbered like Hugging Face hidden states: layer 0 is
the embedding output (gene + value embedding), layer ``l`` (1..n_layers) is the
output of transformer block ``l - 1``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

from sae4scfm.data import highly_variable, normalise_expression, select_vocab_genes
from sae4scfm.errors import InputError
from sae4scfm.scfm.adapter import ScFMAdapter
from sae4scfm.scfm.tokens import Batch, TokenizedCells

log = logging.getLogger(__name__)

CHECKPOINT_FILES = ("best_model.pt", "args.json", "vocab.json")


@dataclass
class ScGPTConfig:
    """The subset of the official ``args.json`` that defines the architecture and tokens."""

    n_tokens: int
    d_model: int = 512  # args.json "embsize"
    n_heads: int = 8  # "nheads"
    d_hid: int = 512  # "d_hid"
    n_layers: int = 12  # "nlayers"
    dropout: float = 0.2
    n_bins: int = 51
    pad_token: str = "<pad>"
    cls_token: str = "<cls>"
    pad_value: float = -2.0
    mask_value: float = -1.0
    max_seq_len: int = 1200
    input_emb_style: str = "continuous"
    do_mvc: bool = True  # "GEPC" in args.json
    explicit_zero_prob: bool = False

    @classmethod
    def from_args(cls, args: dict, n_tokens: int) -> "ScGPTConfig":
        style = args.get("input_emb_style", "continuous")
        if style != "continuous":
            raise InputError(
                f"args.json: input_emb_style={style!r} is not supported yet; "
                "only 'continuous' (the whole-human pretraining style) is."
            )
        return cls(
            n_tokens=n_tokens,
            d_model=int(args.get("embsize", args.get("layer_size", 512))),
            n_heads=int(args.get("nheads", args.get("nhead", 8))),
            d_hid=int(args.get("d_hid", args.get("layer_size", 512))),
            n_layers=int(args.get("nlayers", 12)),
            dropout=float(args.get("dropout", 0.2)),
            n_bins=int(args.get("n_bins", 51)),
            pad_token=args.get("pad_token", "<pad>"),
            pad_value=float(args.get("pad_value", -2)),
            mask_value=float(args.get("mask_value", -1)),
            max_seq_len=int(args.get("max_seq_len", 1200)),
            do_mvc=bool(args.get("GEPC", args.get("MVC", True))),
            explicit_zero_prob=bool(args.get("explicit_zero_prob", False)),
        )

    def to_args(self) -> dict:
        """The official ``args.json`` keys for this config."""
        return {
            "embsize": self.d_model, "nheads": self.n_heads, "d_hid": self.d_hid,
            "nlayers": self.n_layers, "dropout": self.dropout, "n_bins": self.n_bins,
            "pad_token": self.pad_token, "pad_value": self.pad_value,
            "mask_value": self.mask_value, "max_seq_len": self.max_seq_len,
            "input_emb_style": self.input_emb_style, "GEPC": self.do_mvc,
            "explicit_zero_prob": self.explicit_zero_prob, "fast_transformer": False,
        }


class GeneEncoder(nn.Module):
    def __init__(self, n_tokens: int, d_model: int, padding_idx: int):
        super().__init__()
        self.embedding = nn.Embedding(n_tokens, d_model, padding_idx=padding_idx)
        self.enc_norm = nn.LayerNorm(d_model)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.enc_norm(self.embedding(ids))


class ContinuousValueEncoder(nn.Module):
    """Scalar value [B, T] -> [B, T, d]; values are clamped at ``max_value``."""

    def __init__(self, d_model: int, dropout: float, max_value: float = 512.0):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.linear1 = nn.Linear(1, d_model)
        self.activation = nn.ReLU()
        self.linear2 = nn.Linear(d_model, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.max_value = max_value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.clamp(x.unsqueeze(-1), max=self.max_value)
        return self.dropout(self.norm(self.linear2(self.activation(self.linear1(x)))))


class EncoderLayer(nn.Module):
    """Post-norm transformer block with the parameter names of ``nn.TransformerEncoderLayer``."""

    def __init__(self, d_model: int, n_heads: int, d_hid: int, dropout: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, d_hid)
        self.linear2 = nn.Linear(d_hid, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        attn = self.self_attn(x, x, x, key_padding_mask=padding_mask, need_weights=False)[0]
        x = self.norm1(x + self.dropout(attn))
        ff = self.linear2(self.dropout(F.relu(self.linear1(x))))
        return self.norm2(x + self.dropout(ff))


class TransformerEncoder(nn.Module):
    """Holds the blocks under the official key prefix ``transformer_encoder.layers``."""

    def __init__(self, n_layers: int, **layer_kwargs):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(**layer_kwargs) for _ in range(n_layers))


class ExprDecoder(nn.Module):
    """Per-token expression value: [B, T, d] -> [B, T]."""

    def __init__(self, d_model: int):
        super().__init__()
        self.fc = nn.Sequential(
            nn.Linear(d_model, d_model), nn.LeakyReLU(),
            nn.Linear(d_model, d_model), nn.LeakyReLU(),
            nn.Linear(d_model, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x).squeeze(-1)


class MVCDecoder(nn.Module):
    """GEPC ("inner product" style): value of gene g = <sigmoid(Q gene_emb_g), cell_emb>."""

    def __init__(self, d_model: int):
        super().__init__()
        self.gene2query = nn.Linear(d_model, d_model)
        self.query_activation = nn.Sigmoid()
        self.W = nn.Linear(d_model, d_model, bias=False)

    def forward(self, cell_emb: torch.Tensor, gene_embs: torch.Tensor) -> torch.Tensor:
        query = self.query_activation(self.gene2query(gene_embs))  # [B, T, d]
        return torch.bmm(self.W(query), cell_emb.unsqueeze(2)).squeeze(2)  # [B, T]


class ScGPTModel(nn.Module):
    """scGPT ``TransformerModel`` (continuous value style, ``<cls>`` cell embedding)."""

    def __init__(self, cfg: ScGPTConfig, pad_id: int):
        super().__init__()
        self.cfg = cfg
        self.encoder = GeneEncoder(cfg.n_tokens, cfg.d_model, padding_idx=pad_id)
        self.value_encoder = ContinuousValueEncoder(cfg.d_model, cfg.dropout)
        self.transformer_encoder = TransformerEncoder(
            cfg.n_layers, d_model=cfg.d_model, n_heads=cfg.n_heads, d_hid=cfg.d_hid, dropout=cfg.dropout
        )
        self.decoder = ExprDecoder(cfg.d_model)
        if cfg.do_mvc:
            self.mvc_decoder = MVCDecoder(cfg.d_model)
        # Parameter-free hook points on the residual stream: hook_resid[l] sees layer l.
        self.hook_resid = nn.ModuleList(nn.Identity() for _ in range(cfg.n_layers + 1))

    @property
    def layers(self) -> nn.ModuleList:
        return self.transformer_encoder.layers

    def embed(self, gene_ids: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (residual stream at layer 0 [B, T, d], gene embeddings [B, T, d])."""
        gene_embs = self.encoder(gene_ids)
        return gene_embs + self.value_encoder(values), gene_embs

    def forward(self, gene_ids: torch.Tensor, values: torch.Tensor, padding_mask: torch.Tensor) -> dict:
        """gene_ids [B, T] long, values [B, T] float, padding_mask [B, T] bool (True = pad).

        Returns ``mlm`` [B, T] predicted values, ``mvc`` [B, T] (if GEPC),
        ``cell_emb`` [B, d] (the ``<cls>`` position of the last layer).
        """
        x, gene_embs = self.embed(gene_ids, values)
        x = self.hook_resid[0](x)
        for layer, hook in zip(self.transformer_encoder.layers, self.hook_resid[1:]):
            x = hook(layer(x, padding_mask))
        cell_emb = x[:, 0, :]
        out = {"mlm": self.decoder(x), "cell_emb": cell_emb}
        if self.cfg.do_mvc:
            out["mvc"] = self.mvc_decoder(cell_emb, gene_embs)
        return out


def rename_official_keys(state: dict) -> dict:
    """Map the flash-attention names of published checkpoints to the torch ones."""
    return {k.replace("self_attn.Wqkv.", "self_attn.in_proj_"): v for k, v in state.items()}


def load_scgpt_checkpoint(checkpoint_dir: str | Path) -> tuple[ScGPTModel, dict, ScGPTConfig]:
    """Load an official scGPT folder; returns (model in eval mode, vocab, config).

    Unexpected checkpoint keys (heads we do not model, e.g. ``cls_decoder``) are
    reported in the log; missing keys are an error.
    """
    root = Path(checkpoint_dir)
    if not root.is_dir():
        raise InputError(f"scfm.checkpoint_dir: {root} is not a directory; point it at the "
                         f"downloaded scGPT folder containing {', '.join(CHECKPOINT_FILES)}.")
    missing_files = [f for f in CHECKPOINT_FILES if not (root / f).is_file()]
    if missing_files:
        raise InputError(f"scfm.checkpoint_dir: {root} lacks {', '.join(missing_files)}; an scGPT "
                         f"checkpoint folder has {', '.join(CHECKPOINT_FILES)}.")
    vocab = json.loads((root / "vocab.json").read_text())
    args = json.loads((root / "args.json").read_text())
    cfg = ScGPTConfig.from_args(args, n_tokens=len(vocab))
    for tok in (cfg.pad_token, cfg.cls_token):
        if tok not in vocab:
            raise InputError(f"{root / 'vocab.json'}: special token {tok!r} is missing.")
    state = torch.load(root / "best_model.pt", map_location="cpu", weights_only=True)
    state = rename_official_keys(state)
    model = ScGPTModel(cfg, pad_id=vocab[cfg.pad_token])
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys:
        raise InputError(f"{root / 'best_model.pt'}: missing state-dict keys {result.missing_keys[:8]}"
                         f"{' …' if len(result.missing_keys) > 8 else ''}; the file does not match "
                         f"args.json (embsize={cfg.d_model}, nlayers={cfg.n_layers}).")
    if result.unexpected_keys:
        log.warning("%s: ignoring %d checkpoint keys this adapter does not use: %s",
                    root / "best_model.pt", len(result.unexpected_keys), result.unexpected_keys[:8])
    return model.eval(), vocab, cfg


# ---------------------------------------------------------------- preprocessing


def bin_values(X: sp.csr_matrix, n_bins: int, rng: np.random.Generator) -> sp.csr_matrix:
    """Per-cell quantile binning of the non-zero values of ``X`` [cells, genes].

    As the official preprocessing: bin edges are ``n_bins - 1`` quantiles of the
    cell's non-zero values; a value's bin is drawn uniformly between its left and
    right ``np.digitize`` positions (ties split at random); zeros stay 0, so
    non-zero bins lie in 1..n_bins-1.
    """
    X = sp.csr_matrix(X, dtype=np.float32, copy=True)
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


def masked_value_loss(model: ScGPTModel, batch: Batch, mask: torch.Tensor, forward=None) -> tuple[torch.Tensor, torch.Tensor]:
    """scGPT's masked-value objective: masked positions get ``mask_value``; returns the
    summed squared error of the value prediction (plus GEPC when present) over masked
    positions, and the number of masked positions. ``mask`` [B, T] bool, gene tokens only.
    """
    forward = forward or (lambda b: model(b.gene_ids, b.values, b.padding_mask))
    masked = Batch(batch.gene_ids, batch.values.masked_fill(mask, model.cfg.mask_value),
                   batch.padding_mask, batch.gene_mask, batch.cell_index)
    out = forward(masked)
    sse = ((out["mlm"] - batch.values)[mask] ** 2).sum()
    if "mvc" in out:
        sse = sse + ((out["mvc"] - batch.values)[mask] ** 2).sum()
    return sse, mask.sum()


def random_value_mask(batch: Batch, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """[B, T] bool: each gene token masked with probability ``ratio`` (special/pad never)."""
    u = torch.rand(batch.gene_mask.shape, generator=generator)
    return (u < ratio).to(batch.gene_mask.device) & batch.gene_mask


class ScGPTAdapter(ScFMAdapter):
    """scGPT behind the adapter contract (``sae4scfm.scfm.adapter``)."""

    family = "scgpt"

    def __init__(self, model: ScGPTModel, vocab: dict[str, int], cfg: ScGPTConfig, device: str = "cpu"):
        super().__init__(model, vocab, device)
        self.cfg = cfg

    @classmethod
    def from_pretrained(cls, checkpoint_dir: str | Path, device: str = "cpu", random_init: bool = False) -> "ScGPTAdapter":
        """Load the official folder; ``random_init`` keeps the architecture, re-draws the weights."""
        model, vocab, cfg = load_scgpt_checkpoint(checkpoint_dir)
        if random_init:
            model = ScGPTModel(cfg, pad_id=vocab[cfg.pad_token]).eval()
        return cls(model, vocab, cfg, device)

    def tokenize(self, adata: ad.AnnData, *, gene_key: str | None = None, input_kind: str = "counts",
                 normalize_total: float | None = 1e4, log1p: bool = True, subset_hvg: bool = False,
                 n_hvg: int = 1200, seed: int = 0, source: str = "data") -> TokenizedCells:
        """Official scGPT preprocessing and tokenization of ``adata`` [cells, genes].

        Genes outside the vocabulary are dropped; counts are normalised to
        ``normalize_total`` per cell and log1p-transformed (skipped for
        ``input_kind='log_normalized'``); optional HVG subset; per-cell binning;
        each cell becomes ``<cls>`` (value ``pad_value``) + its non-zero genes,
        randomly subsampled to ``max_seq_len`` tokens. ``source`` names the data in errors.
        """
        X = select_vocab_genes(adata, self.vocab, gene_key, source)
        genes = X.genes
        X = normalise_expression(X.matrix, input_kind, normalize_total, log1p, source)
        if subset_hvg:
            keep = highly_variable(X, n_hvg)
            X, genes = X[:, keep], genes[keep]
        rng = np.random.default_rng(seed)
        binned = bin_values(X, self.cfg.n_bins, rng)
        gene_ids = np.array([self.vocab[g] for g in genes], dtype=np.int64)
        cls_id, max_len = self.vocab[self.cfg.cls_token], self.cfg.max_seq_len
        ids, vals, lengths = [], [], []
        for i in range(binned.shape[0]):
            sl = slice(binned.indptr[i], binned.indptr[i + 1])
            cols, v = binned.indices[sl], binned.data[sl]
            if len(cols) > max_len - 1:
                keep = np.sort(rng.choice(len(cols), max_len - 1, replace=False))
                cols, v = cols[keep], v[keep]
            ids.append(np.concatenate([[cls_id], gene_ids[cols]]))
            vals.append(np.concatenate([[self.cfg.pad_value], v]).astype(np.float32))
            lengths.append(len(cols) + 1)
        special = [np.arange(n) == 0 for n in lengths]
        return TokenizedCells(
            np.concatenate(ids), np.concatenate(vals), np.concatenate(special),
            np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            np.arange(binned.shape[0], dtype=np.int64), self.vocab[self.cfg.pad_token], self.cfg.pad_value,
        )

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        return self.model(batch.gene_ids, batch.values, batch.padding_mask)

    @torch.no_grad()
    def output_loss(self, batch: Batch, generator: torch.Generator, mask_ratio: float = 0.4) -> tuple[float, int]:
        """Masked-value MSE (value + GEPC heads) with a mask drawn from ``generator``."""
        mask = random_value_mask(batch, mask_ratio, generator)
        sse, n = masked_value_loss(self.model, batch.to(self.device), mask.to(self.device), forward=self.run)
        return float(sse), int(n)
