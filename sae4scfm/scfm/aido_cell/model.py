"""AIDO.Cell (``CellFoundationForMaskedLM``): the model and the official checkpoint loader.

The architecture, top to bottom (names = the official state-dict keys):

- ``bert.gene_embedding``: auto-discretised value embedding. A scalar value v becomes a
  softmax over ``bin_num`` learned bins, ``w = softmax(alpha·h + linear2(h))`` with
  ``h = LeakyReLU_0.1(linear1(v))``, and its embedding is ``w @ lookup_table.weight``.
  Values equal to ``mask_token_id`` (-1) / ``pad_token_id`` (-2) get the
  ``mask_embedding`` / ``pad_embedding`` vectors instead.
- ``bert.position_embedding``: one learned vector per position; position i is gene i
  of the 19,264-gene order, then the two read-depth tokens.
- ``bert.encoder.layer``: pre-norm blocks ``h = x + dense(attn(ln(x)))``,
  ``x' = h + down(silu(gate(ln(h))) · up(ln(h)))`` (SwiGLU), then ``bert.encoder.ln``.
  Norms are LayerNorm or RMSNorm (``normalization_type``). Attention is ordinary
  multi-head attention over the tokens of each head (``scaled_dot_product_attention``);
  the official CPU fallback attends across heads instead of tokens, which is a bug.
- ``cls.predictions``: ``decoder(LayerNorm(gelu(dense(x))))``, one predicted
  log1p(CP10k) value per position.

The residual stream passes through ``hook_resid`` (0 = embeddings, ``l`` = output of
block ``l - 1``, before the final norm).

Checkpoint folder (Hugging Face layout): ``config.json`` and ``pytorch_model.bin``
(or ``model.safetensors``). Keys of a bare ``CellFoundationModel`` (no ``bert.``
prefix) get it added; the tied head bias may be saved as either
``cls.predictions.bias`` or ``cls.predictions.decoder.bias``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from sae4scfm.errors import InputError
from sae4scfm.scfm.adapter import load_official_state
from sae4scfm.scfm.attention import attend
from sae4scfm.scfm.hooks import HookPoint, resume_point

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # the first one present is read
TIED_BIAS = ("cls.predictions.bias", "cls.predictions.decoder.bias")


@dataclass
class AIDOCellConfig:
    """The architecture fields of the official ``config.json`` (official names in comments)."""

    d_model: int  # hidden_size
    n_layers: int  # num_hidden_layers
    n_heads: int  # num_attention_heads
    d_mlp: int  # intermediate_size
    n_positions: int  # max_position_embeddings + 2 (genes, then the two depth tokens)
    n_bins: int = 100  # bin_num
    bin_alpha: float = 1.0  # bin_alpha
    norm: str = "RMSNorm"  # normalization_type: RMSNorm | LayerNorm
    norm_eps: float = 1e-5  # layer_norm_eps
    linear_bias: bool = True  # add_linear_bias
    pad_value: float = -2.0  # pad_token_id (an input value, not a token id)
    mask_value: float = -1.0  # mask_token_id (an input value, not a token id)
    init_std: float = 0.02  # initializer_range

    @classmethod
    def from_json(cls, config: dict, source: str) -> "AIDOCellConfig":
        checks = {"hidden_act": "swiglu", "position_embedding_type": "absolute"}
        for key, want in checks.items():
            if config.get(key, want) != want:
                raise InputError(f"{source}: {key}={config[key]!r} is not AIDO.Cell's ({want!r}); "
                                 "this folder holds a different model.")
        norm = config.get("normalization_type", "RMSNorm")
        if norm not in ("RMSNorm", "LayerNorm"):
            raise InputError(f"{source}: normalization_type={norm!r}; AIDO.Cell uses RMSNorm or LayerNorm.")
        try:
            cfg = cls(
                d_model=int(config["hidden_size"]), n_layers=int(config["num_hidden_layers"]),
                n_heads=int(config["num_attention_heads"]), d_mlp=int(config["intermediate_size"]),
                n_positions=int(config["max_position_embeddings"]) + 2, n_bins=int(config.get("bin_num", 100)),
                bin_alpha=float(config.get("bin_alpha", 1.0)), norm=norm,
                norm_eps=float(config.get("layer_norm_eps", 1e-5)),
                linear_bias=bool(config.get("add_linear_bias", True)),
                pad_value=float(config.get("pad_token_id", -2)), mask_value=float(config.get("mask_token_id", -1)),
                init_std=float(config.get("initializer_range", 0.02)),
            )
        except KeyError as e:
            raise InputError(f"{source}: the field {e.args[0]!r} is missing; an AIDO.Cell config.json has "
                             "hidden_size, num_hidden_layers, num_attention_heads, intermediate_size and "
                             "max_position_embeddings.") from e
        if cfg.d_model % cfg.n_heads:
            raise InputError(f"{source}: hidden_size={cfg.d_model} is not a multiple of "
                             f"num_attention_heads={cfg.n_heads}.")
        return cfg


def make_norm(cfg: AIDOCellConfig) -> nn.Module:
    if cfg.norm == "RMSNorm":
        return nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)


class AutoBinEmbedding(nn.Module):
    """Scalar input value [B, T] -> [B, T, d] (official ``GeneEmbedding``)."""

    def __init__(self, cfg: AIDOCellConfig):
        super().__init__()
        self.linear1 = nn.Linear(1, cfg.n_bins)
        self.linear2 = nn.Linear(cfg.n_bins, cfg.n_bins)
        self.lookup_table = nn.Embedding(cfg.n_bins, cfg.d_model)
        self.mask_embedding = nn.Embedding(1, cfg.d_model)
        self.pad_embedding = nn.Embedding(1, cfg.d_model)
        self.bin_alpha, self.mask_value, self.pad_value = cfg.bin_alpha, cfg.mask_value, cfg.pad_value

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.linear1(values.unsqueeze(-1)), 0.1)
        weights = torch.softmax(self.bin_alpha * h + self.linear2(h), dim=-1)  # [B, T, n_bins]
        x = weights @ self.lookup_table.weight
        x = torch.where((values == self.mask_value).unsqueeze(-1), self.mask_embedding.weight[0], x)
        return torch.where((values == self.pad_value).unsqueeze(-1), self.pad_embedding.weight[0], x)


class SelfAttention(nn.Module):
    """Multi-head attention over tokens: each head softmax(q kᵀ / √d_head) v. [B, T, d] -> [B, T, d]."""

    def __init__(self, cfg: AIDOCellConfig):
        super().__init__()
        self.query = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.linear_bias)
        self.key = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.linear_bias)
        self.value = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.linear_bias)
        self.n_heads = cfg.n_heads

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``padding_mask`` [B, T] bool (True = pad, never attended to) or None."""
        return attend(self.query(x), self.key(x), self.value(x), self.n_heads, padding_mask)


class Attention(nn.Module):
    """Pre-norm attention sublayer without its residual: dense(attn(ln(x)))."""

    def __init__(self, cfg: AIDOCellConfig):
        super().__init__()
        self.ln = make_norm(cfg)
        self.self = SelfAttention(cfg)
        self.output = nn.ModuleDict({"dense": nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.linear_bias)})

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
        return self.output["dense"](self.self(self.ln(x), padding_mask))


class SwiGLU(nn.Module):
    def __init__(self, cfg: AIDOCellConfig):
        super().__init__()
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_mlp, bias=cfg.linear_bias)
        self.down_proj = nn.Linear(cfg.d_mlp, cfg.d_model, bias=cfg.linear_bias)
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_mlp, bias=cfg.linear_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """One encoder layer (official ``CellFoundationLayer``): attention then SwiGLU, both pre-norm."""

    def __init__(self, cfg: AIDOCellConfig):
        super().__init__()
        self.attention = Attention(cfg)
        self.ln = make_norm(cfg)
        self.mlp = SwiGLU(cfg)
        self.hook_attn_out = HookPoint()
        self.hook_mlp_out = HookPoint()

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None,
                gene_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x + attn_out, then + mlp_out (the two hook points; ``gene_mask`` [B, T] goes to them)."""
        h = x + self.hook_attn_out(self.attention(x, padding_mask), gene_mask)
        return h + self.hook_mlp_out(self.mlp(self.ln(h)), gene_mask)


class Encoder(nn.Module):
    def __init__(self, cfg: AIDOCellConfig):
        super().__init__()
        self.layer = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln = make_norm(cfg)


class Backbone(nn.Module):
    """The official ``CellFoundationModel`` parameters (checkpoint prefix ``bert.``)."""

    def __init__(self, cfg: AIDOCellConfig):
        super().__init__()
        self.gene_embedding = AutoBinEmbedding(cfg)
        self.position_embedding = nn.Embedding(cfg.n_positions, cfg.d_model)
        self.encoder = Encoder(cfg)


class ExpressionHead(nn.Module):
    """Per-token predicted value: [B, T, d] -> [B, T] (official ``CellFoundationLMPredictionHead``;
    its ``transform.LayerNorm`` is an RMSNorm when ``normalization_type`` is RMSNorm)."""

    def __init__(self, cfg: AIDOCellConfig):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1))
        self.transform = nn.ModuleDict({"dense": nn.Linear(cfg.d_model, cfg.d_model), "LayerNorm": make_norm(cfg)})
        self.decoder = nn.Linear(cfg.d_model, 1, bias=False)
        self.decoder.bias = self.bias  # tied, as in the official head (both names in the state dict)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.transform["LayerNorm"](F.gelu(self.transform["dense"](x)))
        return self.decoder(x).squeeze(-1)


class AIDOCellModel(nn.Module):
    """AIDO.Cell encoder with its expression head and residual-stream hook points."""

    def __init__(self, cfg: AIDOCellConfig):
        super().__init__()
        self.cfg = cfg
        self.bert = Backbone(cfg)
        self.cls = nn.ModuleDict({"predictions": ExpressionHead(cfg)})
        # Parameter-free hook points on the residual stream: hook_resid[l] sees layer l.
        self.hook_resid = nn.ModuleList(HookPoint() for _ in range(cfg.n_layers + 1))
        self.init_weights()

    @property
    def blocks(self) -> nn.ModuleList:
        return self.bert.encoder.layer

    @torch.no_grad()
    def init_weights(self) -> None:
        """The official initialisation: N(0, initializer_range) weights, zero biases, unit norms."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, self.cfg.init_std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.zero_()
            if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                module.weight.fill_(1.0)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()

    def forward(self, values: torch.Tensor, positions: torch.Tensor, padding_mask: torch.Tensor | None = None,
                gene_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """values [B, T] float (model input values), positions [B, T] long (gene index, or
        19,264 / 19,265 for the depth tokens), padding_mask [B, T] bool (True = pad) or None,
        gene_mask [B, T] bool (the stored gene tokens, passed to the hook points) or None.

        Returns ``hidden`` [B, T, d] (final-normed encoder output) and ``pred`` [B, T]
        (the expression head's value at every position).
        """
        start, cached = resume_point(self.hook_resid)
        if cached is None:
            cached = self.bert.gene_embedding(values) + self.bert.position_embedding(positions)
        x = self.hook_resid[start](cached, gene_mask)
        for layer, (block, hook) in enumerate(zip(self.blocks, self.hook_resid[1:]), start=1):
            if layer > start:
                x = hook(block(x, padding_mask, gene_mask), gene_mask)
        hidden = self.bert.encoder.ln(x)
        return {"hidden": hidden, "pred": self.cls["predictions"](hidden)}


def official_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``CellFoundationForMaskedLM`` key layout: ``bert.`` prefix and both tied head-bias names."""
    state = {k if k.startswith(("bert.", "cls.")) else f"bert.{k}": v for k, v in state.items()}
    for name, twin in (TIED_BIAS, TIED_BIAS[::-1]):
        if name not in state and twin in state:
            state[name] = state[twin]
    return state


def load_aido_cell_checkpoint(checkpoint_dir: str | Path) -> tuple[AIDOCellModel, AIDOCellConfig]:
    """Load an official AIDO.Cell folder; returns (model in eval mode, config).

    Checkpoint keys the model does not use (e.g. a pooler) are reported in the log;
    missing keys (the expression head included) are an error.
    """
    root = Path(checkpoint_dir).expanduser()
    if not root.is_dir():
        raise InputError(f"scfm.checkpoint_dir: {root} is not a directory; point it at the downloaded "
                         f"AIDO.Cell folder containing {CONFIG_FILE} and {' or '.join(WEIGHT_FILES)}.")
    weights = next((root / f for f in WEIGHT_FILES if (root / f).is_file()), None)
    if not (root / CONFIG_FILE).is_file() or weights is None:
        raise InputError(f"scfm.checkpoint_dir: {root} lacks {CONFIG_FILE} or a weight file "
                         f"({' or '.join(WEIGHT_FILES)}); an AIDO.Cell folder from Hugging Face has both.")
    cfg = AIDOCellConfig.from_json(json.loads((root / CONFIG_FILE).read_text()), str(root / CONFIG_FILE))
    if weights.suffix == ".safetensors":
        state = load_file(weights)
    else:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    model = AIDOCellModel(cfg)
    load_official_state(model, official_keys(state), weights,
                        f"the file does not match {CONFIG_FILE} (num_hidden_layers={cfg.n_layers}, "
                        f"hidden_size={cfg.d_model}, intermediate_size={cfg.d_mlp}) or lacks the expression "
                        "head (cls.predictions)")
    return model.eval(), cfg
