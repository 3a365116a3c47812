"""scFoundation (xTrimoGene MAE-autobin): the model and the official ``models.ckpt`` loader.

The architecture, top to bottom (names = the official state-dict keys):

- ``token_emb``: auto-discretised value embedding. A scalar value v becomes a
  softmax over ``bin_num`` learned bins, ``w = softmax(alpha·h + mlp2(h))`` with
  ``h = LeakyReLU_0.1(mlp(v))``, and its embedding is ``w @ emb.weight``. Values equal
  to ``mask_token_id`` / ``pad_token_id`` get the ``emb_mask`` / ``emb_pad`` vectors.
- ``pos_emb``: one learned vector per gene position (19,264 genes, then T and S;
  row ``seq_len`` is used for padding).
- ``encoder``: a post-norm transformer (``transformer``) or a pre-norm Performer
  (``performer``) over a cell's non-zero genes plus its T and S tokens, then a
  final LayerNorm. The residual stream passes through ``hook_resid``.
- decoder input: every position of the 19,266: the value embedding of the cell's
  value there (0 for unexpressed genes, ``mask_token_id`` for masked ones), with the
  encoder outputs written over the positions the encoder saw, plus ``pos_emb``;
  ``decoder_embed`` projects it to the decoder width.
- ``decoder`` (a Performer in the published model) over all positions, final norm,
  then ``norm`` and ``to_final`` give one predicted value per position.

The published ``models.ckpt`` is a dict with keys ``gene``, ``cell`` and ``rde``,
each ``{"config": {"model": "mae_autobin", "model_config": {"mae_autobin": {...}},
"dataset_config": {"rnaseq": {...}}}, "state_dict": {"model." + key: tensor}}``;
the official loader merges ``model_config[model]`` and ``dataset_config["rnaseq"]``
into one config and strips the ``model.`` prefix. An entry already in that flat
form (``{"config": {...}, "model_state_dict": {key: tensor}}``) loads too.

Performer attention: the official kernel subtracts, for keys, the maximum over the whole
batch before ``exp`` (a stabiliser that cancels only up to its ``eps``), so an
official batched forward couples the cells of a batch. Here that maximum is taken
per cell and padded keys are dropped, so a batched forward equals the official
one-cell-at-a-time forward (which is how the official scripts run it).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sae4scfm.errors import InputError
from sae4scfm.scfm.adapter import load_official_state
from sae4scfm.scfm.attention import PackedSelfAttention
from sae4scfm.scfm.hooks import HookPoint, resume_point

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "models.ckpt"
CHECKPOINT_KEYS = ("gene", "cell", "rde")
MODULE_TYPES = ("transformer", "performer")
PERFORMER_EPS = 1e-4  # the official softmax-kernel epsilon


@dataclass
class StackConfig:
    """One encoder or decoder stack (the official ``encoder`` / ``decoder`` config dicts)."""

    module_type: str  # transformer | performer
    hidden_dim: int
    depth: int
    heads: int
    dim_head: int = 64  # performer only; the transformer uses hidden_dim // heads

    @classmethod
    def from_official(cls, config: dict, field: str, source: str) -> "StackConfig":
        missing = [k for k in ("module_type", "hidden_dim", "depth", "heads") if k not in config]
        if missing:
            raise InputError(f"{source}: config[{field!r}] lacks {', '.join(missing)}; the file is not an "
                             "official scFoundation checkpoint.")
        if config["module_type"] not in MODULE_TYPES:
            raise InputError(f"{source}: config[{field!r}]['module_type']={config['module_type']!r} is not "
                             f"supported; use one of {', '.join(MODULE_TYPES)}.")
        return cls(str(config["module_type"]), int(config["hidden_dim"]), int(config["depth"]),
                   int(config["heads"]), int(config.get("dim_head", 64)))


@dataclass
class ScFoundationConfig:
    """The architecture part of the official (merged) config."""

    encoder: StackConfig
    decoder: StackConfig
    seq_len: int = 19266  # 19,264 genes + T + S
    bin_num: int = 100
    bin_alpha: float = 1.0
    pad_token_id: int = 103  # a value equal to this is padding
    mask_token_id: int = 102  # a value equal to this is a masked value

    @property
    def d_model(self) -> int:
        return self.encoder.hidden_dim

    @property
    def n_genes(self) -> int:
        return self.seq_len - 2

    @classmethod
    def from_official(cls, config: dict, source: str) -> "ScFoundationConfig":
        """From the merged official config (``model``, ``encoder``, ``decoder``, ``seq_len``, ...)."""
        if config.get("model") != "mae_autobin":
            raise InputError(f"{source}: config['model']={config.get('model')!r}; only the 'mae_autobin' "
                             "scFoundation model is supported.")
        keys = ("encoder", "decoder", "seq_len", "bin_num", "bin_alpha", "pad_token_id", "mask_token_id")
        missing = [k for k in keys if k not in config]
        if missing:
            raise InputError(f"{source}: the config lacks {', '.join(missing)}; the file is not an official "
                             "scFoundation checkpoint.")
        return cls(
            encoder=StackConfig.from_official(config["encoder"], "encoder", source),
            decoder=StackConfig.from_official(config["decoder"], "decoder", source),
            seq_len=int(config["seq_len"]), bin_num=int(config["bin_num"]),
            bin_alpha=float(config["bin_alpha"]), pad_token_id=int(config["pad_token_id"]),
            mask_token_id=int(config["mask_token_id"]),
        )


# ------------------------------------------------------------------- embeddings


class AutoDiscretizationEmbedding(nn.Module):
    """Scalar values [B, N] -> [B, N, d]: a learned soft assignment to ``bin_num`` bin embeddings."""

    def __init__(self, dim: int, bin_num: int, bin_alpha: float, mask_token_id: int, pad_token_id: int):
        super().__init__()
        self.mlp = nn.Linear(1, bin_num)
        self.mlp2 = nn.Linear(bin_num, bin_num)
        self.emb = nn.Embedding(bin_num, dim)
        self.emb_mask = nn.Embedding(1, dim)
        self.emb_pad = nn.Embedding(1, dim)
        self.bin_alpha = bin_alpha
        self.mask_token_id = mask_token_id
        self.pad_token_id = pad_token_id

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.mlp(values.unsqueeze(-1)), 0.1)  # [B, N, bins]
        weight = torch.softmax(self.bin_alpha * h + self.mlp2(h), dim=-1)
        x = weight @ self.emb.weight  # [B, N, d]
        x = torch.where((values == self.mask_token_id).unsqueeze(-1), self.emb_mask.weight[0], x)
        return torch.where((values == self.pad_token_id).unsqueeze(-1), self.emb_pad.weight[0], x)


# ----------------------------------------------------------------- transformer


class TransformerBlock(nn.Module):
    """Post-norm block with the parameter names of ``nn.TransformerEncoderLayer`` (ReLU):
    x = norm1(x + attn(x)); x = norm2(x + linear2(relu(linear1(x)))); ``hook_attn_out`` /
    ``hook_mlp_out`` see attn(x) and the feed-forward output before their residual add."""

    def __init__(self, dim: int, heads: int, d_ff: int):
        super().__init__()
        self.self_attn = PackedSelfAttention(dim, heads)
        self.linear1 = nn.Linear(dim, d_ff)
        self.linear2 = nn.Linear(d_ff, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.hook_attn_out = HookPoint()
        self.hook_mlp_out = HookPoint()

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None,
                gene_mask: torch.Tensor | None = None) -> torch.Tensor:
        attn = self.self_attn(x, padding_mask)
        x = self.norm1(x + self.hook_attn_out(attn, gene_mask))
        return self.norm2(x + self.hook_mlp_out(self.linear2(F.relu(self.linear1(x))), gene_mask))


class TransformerStack(nn.Module):
    """Post-norm ``nn.TransformerEncoderLayer`` blocks (ReLU, 4x feed-forward), then a LayerNorm."""

    def __init__(self, cfg: StackConfig):
        super().__init__()
        self.transformer_encoder = nn.ModuleList(
            TransformerBlock(cfg.hidden_dim, cfg.heads, 4 * cfg.hidden_dim) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.hidden_dim)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.transformer_encoder


# ------------------------------------------------------------------- performer


def gaussian_orthogonal_random_matrix(n_rows: int, n_cols: int) -> torch.Tensor:
    """[n_rows, n_cols] random features: stacked orthogonal blocks (QR of Gaussian matrices),
    each row scaled to the norm of a Gaussian vector (FAVOR+, Choromanski et al. 2021)."""
    blocks = [torch.linalg.qr(torch.randn(n_cols, n_cols))[0].T for _ in range(-(-n_rows // n_cols))]
    norms = torch.randn(n_rows, n_cols).norm(dim=1)
    return norms[:, None] * torch.cat(blocks)[:n_rows]


class SoftmaxKernelFeatures(nn.Module):
    """Positive random features phi(x) [..., n_features] whose inner products approximate exp(q·k/sqrt(d))."""

    def __init__(self, dim_head: int):
        super().__init__()
        n_features = int(dim_head * math.log(dim_head))
        self.register_buffer("projection_matrix", gaussian_orthogonal_random_matrix(n_features, dim_head))

    def forward(self, x: torch.Tensor, is_query: bool, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, H, N, d_head] -> [B, H, N, n_features]; keys: per-cell stabiliser, padded keys zero."""
        scale = x.shape[-1] ** -0.25
        projected = (scale * x) @ self.projection_matrix.T
        sq_norm = (x ** 2).sum(-1, keepdim=True) / 2 * scale ** 2
        if is_query:
            stabiliser = projected.amax(dim=-1, keepdim=True)
        else:
            pad = padding_mask[:, None, :, None] if padding_mask is not None else None
            candidates = projected if pad is None else projected.masked_fill(pad, float("-inf"))
            stabiliser = candidates.amax(dim=(1, 2, 3), keepdim=True)
        ratio = self.projection_matrix.shape[0] ** -0.5
        features = ratio * (torch.exp(projected - sq_norm - stabiliser) + PERFORMER_EPS)
        if not is_query and padding_mask is not None:
            features = features.masked_fill(pad, 0.0)
        return features


class PerformerSelfAttention(nn.Module):
    """Linear (FAVOR+) self-attention: out = phi(q) (phi(k)^T v) / (phi(q) · sum_n phi(k_n))."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        self.heads = heads
        self.fast_attention = SoftmaxKernelFeatures(dim_head)
        self.to_q = nn.Linear(dim, heads * dim_head)
        self.to_k = nn.Linear(dim, heads * dim_head)
        self.to_v = nn.Linear(dim, heads * dim_head)
        self.to_out = nn.Linear(heads * dim_head, dim)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, N, _ = x.shape
        q, k, v = (proj(x).view(B, N, self.heads, -1).transpose(1, 2) for proj in (self.to_q, self.to_k, self.to_v))
        q = self.fast_attention(q, is_query=True)
        k = self.fast_attention(k, is_query=False, padding_mask=padding_mask)
        normaliser = q @ k.sum(dim=-2).unsqueeze(-1)  # [B, H, N, 1]
        out = (q @ (k.transpose(-1, -2) @ v)) / normaliser  # [B, H, N, d_head]
        return self.to_out(out.transpose(1, 2).reshape(B, N, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.w1 = nn.Linear(dim, dim * mult)
        self.w2 = nn.Linear(dim * mult, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.gelu(self.w1(x)))


class PreLayerNorm(nn.Module):
    def __init__(self, dim: int, fn: nn.Module):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = fn

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.fn(self.norm(x), **kwargs)


class Chunk(nn.Module):
    """The official feed-forward wrapper with one chunk: computes ``fn(x)``; kept for its key level."""

    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


class PerformerBlock(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then + ff(norm(x)); submodules ``0`` (attention) and ``1``
    (feed-forward) as in the official keys; ``hook_attn_out`` / ``hook_mlp_out`` see the two terms."""

    def __init__(self, cfg: StackConfig):
        super().__init__()
        dim = cfg.hidden_dim
        self.add_module("0", PreLayerNorm(dim, PerformerSelfAttention(dim, cfg.heads, cfg.dim_head)))
        self.add_module("1", PreLayerNorm(dim, Chunk(FeedForward(dim))))
        self.hook_attn_out = HookPoint()
        self.hook_mlp_out = HookPoint()

    def __getitem__(self, i: int) -> nn.Module:
        return self._modules[str(i)]

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None,
                gene_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.hook_attn_out(self[0](x, padding_mask=padding_mask), gene_mask)
        return x + self.hook_mlp_out(self[1](x), gene_mask)


class PerformerStack(nn.Module):
    """Official ``PerformerModule``: blocks under ``performer.net.layers``, then a LayerNorm."""

    def __init__(self, cfg: StackConfig):
        super().__init__()
        self.performer = nn.Module()  # key levels of the official Performer / SequentialSequence
        self.performer.net = nn.Module()
        self.performer.net.layers = nn.ModuleList(PerformerBlock(cfg) for _ in range(cfg.depth))
        self.performer.register_buffer("calls_since_last_redraw", torch.tensor(0))  # training-time counter
        self.norm = nn.LayerNorm(cfg.hidden_dim)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.performer.net.layers


def build_stack(cfg: StackConfig) -> nn.Module:
    return TransformerStack(cfg) if cfg.module_type == "transformer" else PerformerStack(cfg)


# ----------------------------------------------------------------------- model


class ScFoundationModel(nn.Module):
    """MAE-autobin: encoder over expressed genes + T/S, decoder over all gene positions."""

    def __init__(self, cfg: ScFoundationConfig):
        super().__init__()
        self.cfg = cfg
        d, d_dec = cfg.encoder.hidden_dim, cfg.decoder.hidden_dim
        self.token_emb = AutoDiscretizationEmbedding(d, cfg.bin_num, cfg.bin_alpha, cfg.mask_token_id,
                                                     cfg.pad_token_id)
        self.pos_emb = nn.Embedding(cfg.seq_len + 1, d)  # row seq_len: padding position
        self.encoder = build_stack(cfg.encoder)
        self.decoder_embed = nn.Linear(d, d_dec)
        self.decoder = build_stack(cfg.decoder)
        self.norm = nn.LayerNorm(d_dec)
        self.to_final = nn.Linear(d_dec, 1)
        # Parameter-free hook points on the encoder's residual stream: hook_resid[l] sees layer l.
        self.hook_resid = nn.ModuleList(HookPoint() for _ in range(cfg.encoder.depth + 1))

    @property
    def blocks(self) -> nn.ModuleList:
        """The encoder's blocks (the hook points' blocks; the decoder's are not hooked)."""
        return self.encoder.blocks

    def encode(self, gene_ids: torch.Tensor, values: torch.Tensor, padding_mask: torch.Tensor,
               gene_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder output [B, T, d] (after its final norm) and the encoder's padding [B, T]
        (padding plus masked tokens, i.e. tokens whose value is ``mask_token_id``); ``gene_mask``
        [B, T] goes to the hook points."""
        hidden_pad = padding_mask | (values == self.cfg.mask_token_id)
        start, cached = resume_point(self.hook_resid)
        x = self.hook_resid[start](self.token_emb(values) + self.pos_emb(gene_ids) if cached is None else cached,
                                   gene_mask)
        for layer, (block, hook) in enumerate(zip(self.blocks, self.hook_resid[1:]), start=1):
            if layer > start:
                x = hook(block(x, padding_mask=hidden_pad, gene_mask=gene_mask), gene_mask)
        return self.encoder.norm(x), hidden_pad

    def cell_embedding(self, x: torch.Tensor, gene_ids: torch.Tensor, hidden_pad: torch.Tensor) -> torch.Tensor:
        """Official ``pool_type='all'``: [S token, T token, max and mean over gene tokens] -> [B, 4d]."""
        rows = torch.arange(len(x), device=x.device)
        t_token = x[rows, (gene_ids == self.cfg.n_genes).int().argmax(1)]
        s_token = x[rows, (gene_ids == self.cfg.n_genes + 1).int().argmax(1)]
        genes = (~hidden_pad & (gene_ids < self.cfg.n_genes)).unsqueeze(-1)
        count = genes.sum(1)
        gene_max = x.masked_fill(~genes, float("-inf")).amax(1).masked_fill(count == 0, 0.0)
        gene_mean = (x * genes).sum(1) / count.clamp(min=1)
        return torch.cat([s_token, t_token, gene_max, gene_mean], dim=1)

    def decode(self, x: torch.Tensor, gene_ids: torch.Tensor, values: torch.Tensor, padding_mask: torch.Tensor,
               hidden_pad: torch.Tensor) -> torch.Tensor:
        """Predicted value at every position [B, seq_len] (the genes, then T and S) from the encoder
        output x [B, T, d]; cells are independent, so any split of the batch gives the same result."""
        B, L = len(x), self.cfg.seq_len
        b, t = (~padding_mask).nonzero(as_tuple=True)
        all_values = torch.zeros(B, L, dtype=values.dtype, device=values.device)
        all_values[b, gene_ids[b, t]] = values[b, t]
        h = self.token_emb(all_values)  # [B, L, d]
        b, t = (~hidden_pad).nonzero(as_tuple=True)
        h[b, gene_ids[b, t]] = x[b, t].to(h.dtype)
        h = self.decoder_embed(h + self.pos_emb.weight[:L])
        for block in self.decoder.blocks:
            h = block(h)
        return self.to_final(self.norm(self.decoder.norm(h))).squeeze(-1)

    def forward(self, gene_ids: torch.Tensor, values: torch.Tensor, padding_mask: torch.Tensor,
                decoder_batch_size: int | None = None, gene_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """gene_ids [B, T] positions (gene index, n_genes = T, n_genes + 1 = S), values [B, T]
        (``mask_token_id`` = masked), padding_mask [B, T] bool (True = pad). The decoder reads
        all ``seq_len`` positions per cell, so it runs on ``decoder_batch_size`` cells at a time
        (None: all at once). ``gene_mask`` [B, T]: gene tokens, for the encoder's hook points.

        Returns ``pred`` [B, n_genes] predicted log1p(CP10k) per gene and ``cell_emb`` [B, 4d].
        """
        x, hidden_pad = self.encode(gene_ids, values, padding_mask, gene_mask)
        step = decoder_batch_size or len(x)
        pred = torch.cat([self.decode(*(t[i:i + step] for t in (x, gene_ids, values, padding_mask, hidden_pad)))
                          for i in range(0, len(x), step)])
        return {"pred": pred[:, :self.cfg.n_genes], "cell_emb": self.cell_embedding(x, gene_ids, hidden_pad)}


# ------------------------------------------------------------------ checkpoint


def checkpoint_file(path: str | Path) -> Path:
    """``models.ckpt`` itself, or the folder that holds it."""
    path = Path(path).expanduser()
    file = path / CHECKPOINT_FILE if path.is_dir() else path
    if not file.is_file():
        raise InputError(f"scfm.checkpoint_dir: {path} is not a {CHECKPOINT_FILE} file nor a folder holding one; "
                         f"point it at the downloaded scFoundation folder (models/{CHECKPOINT_FILE}).")
    return file


def official_entry(entry: dict, source: str) -> tuple[dict, dict]:
    """(merged config, state dict without the ``model.`` prefix) of one ``models.ckpt`` entry."""
    if not isinstance(entry, dict) or "config" not in entry:
        raise InputError(f"{source}: the entry has no 'config'; the file is not an official scFoundation checkpoint.")
    config = dict(entry["config"])
    if "model_config" in config:  # the published layout, merged as the official convertconfig does
        model = config.get("model")
        merged = dict(config["model_config"].get(model, {}))
        merged.update(config.get("dataset_config", {}).get("rnaseq", {}))
        config = {"model": model, **merged}
    state = entry.get("state_dict", entry.get("model_state_dict"))
    if not isinstance(state, dict):
        raise InputError(f"{source}: the entry has neither 'state_dict' nor 'model_state_dict'.")
    state = {k[len("model."):] if k.startswith("model.") else k: v for k, v in state.items()}
    return config, state


def load_scfoundation_checkpoint(path: str | Path, key: str = "cell") -> tuple[ScFoundationModel, ScFoundationConfig]:
    """The model stored under ``key`` (``cell``, ``gene`` or ``rde``) of an official ``models.ckpt``,
    in eval mode. Missing state-dict keys are an error; unexpected ones are logged."""
    file = checkpoint_file(path)
    try:
        ckpt = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any reader failure is a bad file for the user
        raise InputError(f"{file} could not be read as a torch checkpoint with weights_only=True "
                         f"({type(e).__name__}: {e}).") from e
    if not isinstance(ckpt, dict) or key not in ckpt:
        found = ", ".join(map(repr, ckpt)) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise InputError(f"scfm.ckpt_key={key!r}: {file} has no entry {key!r} (found {found}); the official "
                         f"file has {', '.join(CHECKPOINT_KEYS)} (cell embeddings: 'cell').")
    source = f"{file}[{key!r}]"
    config, state = official_entry(ckpt[key], source)
    cfg = ScFoundationConfig.from_official(config, source)
    model = ScFoundationModel(cfg)
    load_official_state(model, state, source, f"the weights do not match the entry's config "
                                              f"(encoder {cfg.encoder}, decoder {cfg.decoder})")
    return model.eval(), cfg
