"""Geneformer's network: a BERT encoder with a masked-language-model head, in plain torch.

Geneformer checkpoints are Hugging Face ``BertForMaskedLM`` folders: ``config.json``
(``BertConfig`` fields) and ``model.safetensors`` or ``pytorch_model.bin``. The
module tree below reproduces that model's parameter names exactly
(``bert.embeddings.*``, ``bert.encoder.layer.{i}.attention.self.query``, …,
``cls.predictions.*``), so the published state dict loads without renaming, and
computes the same function in eval mode (post-norm blocks, absolute positions,
token type 0, padded keys masked out of attention).

Tied weights, as in Hugging Face: the decoder bias *is* ``cls.predictions.bias``,
and with ``tie_word_embeddings`` (the default) the decoder weight *is* the input
embedding. Files written by ``save_pretrained`` omit the tied copies.

Residual-stream layers are numbered like Hugging Face ``hidden_states``:
``hook_resid[0]`` sees the embedding output, ``hook_resid[l]`` the output of
``bert.encoder.layer[l - 1]``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from sae4scfm.errors import InputError
from sae4scfm.scfm.adapter import load_official_state
from sae4scfm.scfm.attention import attend
from sae4scfm.scfm.hooks import HookPoint, resume_point

log = logging.getLogger(__name__)

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
ACTIVATIONS = {  # Hugging Face ACT2FN names
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "swish": F.silu,
}


@dataclass
class BertConfig:
    """The ``config.json`` fields that define the network (Hugging Face ``BertConfig`` names and defaults)."""

    vocab_size: int
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    pad_token_id: int = 0
    tie_word_embeddings: bool = True

    @property
    def d_model(self) -> int:
        return self.hidden_size

    @property
    def n_layers(self) -> int:
        return self.num_hidden_layers

    @classmethod
    def from_json(cls, path: Path) -> "BertConfig":
        """Read ``config.json``; unknown fields are ignored, unsupported values are an InputError."""
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise InputError(f"{path}: not a readable JSON file ({e}).") from e
        if raw.get("model_type", "bert") != "bert":
            raise InputError(f"{path}: model_type={raw['model_type']!r}; a Geneformer checkpoint is a "
                             "BERT model (model_type 'bert').")
        if raw.get("position_embedding_type", "absolute") != "absolute":
            raise InputError(f"{path}: position_embedding_type={raw['position_embedding_type']!r} is not "
                             "supported; Geneformer uses 'absolute'.")
        if raw.get("hidden_act", "gelu") not in ACTIVATIONS:
            raise InputError(f"{path}: hidden_act={raw['hidden_act']!r} is not supported; "
                             f"use one of {', '.join(ACTIVATIONS)}.")
        if "vocab_size" not in raw:
            raise InputError(f"{path}: vocab_size is missing.")
        fields = {k: raw[k] for k in cls.__dataclass_fields__ if k in raw and raw[k] is not None}
        cfg = cls(**fields)
        if cfg.hidden_size % cfg.num_attention_heads:
            raise InputError(f"{path}: hidden_size={cfg.hidden_size} is not a multiple of "
                             f"num_attention_heads={cfg.num_attention_heads}.")
        return cfg


class Embeddings(nn.Module):
    """``bert.embeddings``: word + token-type-0 + absolute position embeddings -> LayerNorm -> dropout."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        d = cfg.hidden_size
        self.word_embeddings = nn.Embedding(cfg.vocab_size, d, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, d)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, d)
        self.LayerNorm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        """token_ids [B, T] -> [B, T, d]."""
        x = self.word_embeddings(token_ids) + self.token_type_embeddings.weight[0]
        x = x + self.position_embeddings.weight[: token_ids.shape[1]]
        return self.dropout(self.LayerNorm(x))


class SelfAttention(nn.Module):
    """``attention.self``: multi-head scaled dot-product attention over the non-padding keys."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        d = cfg.hidden_size
        self.n_heads = cfg.num_attention_heads
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(d, d)
        self.value = nn.Linear(d, d)
        self.dropout_p = cfg.attention_probs_dropout_prob

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        """x [B, T, d], padding_mask [B, T] bool (True = pad, never attended to) -> [B, T, d]."""
        return attend(self.query(x), self.key(x), self.value(x), self.n_heads, padding_mask,
                      self.dropout_p if self.training else 0.0)


class ResidualNorm(nn.Module):
    """``attention.output`` and ``output``: LayerNorm(x + dropout(hook(dense(h)))), where ``hook``
    is the block's hook point of this sublayer's output (before the residual add)."""

    def __init__(self, d_in: int, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(d_in, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, h: torch.Tensor, x: torch.Tensor, hook: HookPoint, gene_mask: torch.Tensor | None) -> torch.Tensor:
        return self.LayerNorm(self.dropout(hook(self.dense(h), gene_mask)) + x)


class Block(nn.Module):
    """``bert.encoder.layer[i]``: post-norm attention, then post-norm feed-forward."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.attention = nn.Module()
        self.attention.self = SelfAttention(cfg)
        self.attention.output = ResidualNorm(cfg.hidden_size, cfg)
        self.intermediate = nn.Module()
        self.intermediate.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.output = ResidualNorm(cfg.intermediate_size, cfg)
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.hook_attn_out = HookPoint()  # attention.output.dense output
        self.hook_mlp_out = HookPoint()  # output.dense output

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor, gene_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, d], padding_mask [B, T] bool (True = pad), gene_mask [B, T] bool (for the hook points)
        -> [B, T, d]."""
        x = self.attention.output(self.attention.self(x, padding_mask), x, self.hook_attn_out, gene_mask)
        return self.output(self.act(self.intermediate.dense(x)), x, self.hook_mlp_out, gene_mask)


class MLMHead(nn.Module):
    """``cls.predictions``: dense -> activation -> LayerNorm -> decoder to gene logits."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.transform = nn.Module()
        self.transform.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.transform.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.decoder.bias = self.bias  # tied, as in Hugging Face
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h [..., d] -> logits [..., vocab_size]."""
        return self.decoder(self.transform.LayerNorm(self.act(self.transform.dense(h))))


class GeneformerModel(nn.Module):
    """Hugging Face ``BertForMaskedLM`` (no pooler) with residual-stream hook points."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.cfg = cfg
        self.bert = nn.Module()
        self.bert.embeddings = Embeddings(cfg)
        self.bert.encoder = nn.Module()
        self.bert.encoder.layer = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.cls = nn.Module()
        self.cls.predictions = MLMHead(cfg)
        self.apply(self._init_weights)
        if cfg.tie_word_embeddings:
            self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight
        # Parameter-free hook points on the residual stream: hook_resid[l] sees layer l.
        self.hook_resid = nn.ModuleList(HookPoint() for _ in range(cfg.num_hidden_layers + 1))

    def _init_weights(self, module: nn.Module) -> None:
        """Hugging Face's BERT initialisation (used for ``random_init``)."""
        std = self.cfg.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.bert.encoder.layer

    def forward(self, token_ids: torch.Tensor, padding_mask: torch.Tensor, *, keep: Iterable[int] = (),
                predict: torch.Tensor | None = None, gene_mask: torch.Tensor | None = None) -> dict:
        """token_ids [B, T] long, padding_mask [B, T] bool (True = pad), gene_mask [B, T] bool
        (gene tokens, passed to the hook points; None when unused).

        Returns ``logits`` [B, T, vocab] (or [n, vocab] at the n True positions of
        ``predict`` [B, T] bool) and ``hidden`` {l: [B, T, d]} for the layers in ``keep``
        (as seen after the hook at that layer, i.e. after any intervention).
        """
        if token_ids.shape[1] > self.cfg.max_position_embeddings:
            raise InputError(f"{token_ids.shape[1]} tokens exceed max_position_embeddings="
                             f"{self.cfg.max_position_embeddings}; lower scfm.model_input_size.")
        keep, hidden = set(keep), {}
        start, cached = resume_point(self.hook_resid)
        x = self.hook_resid[start](self.bert.embeddings(token_ids) if cached is None else cached, gene_mask)
        if start in keep:
            hidden[start] = x
        for layer, (block, hook) in enumerate(zip(self.blocks, self.hook_resid[1:]), start=1):
            if layer > start:
                x = hook(block(x, padding_mask, gene_mask), gene_mask)
                if layer in keep:
                    hidden[layer] = x
        logits = self.cls.predictions(x if predict is None else x[predict])
        return {"logits": logits, "hidden": hidden}


def load_state(root: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """The state dict of ``model.safetensors`` (preferred) or ``pytorch_model.bin`` (weights only)."""
    for name in WEIGHT_FILES:
        path = root / name
        if not path.is_file():
            continue
        try:
            if name.endswith(".safetensors"):
                from safetensors.torch import load_file

                return load_file(path), path
            return torch.load(path, map_location="cpu", weights_only=True), path
        except Exception as e:  # noqa: BLE001 - any reader failure is a bad file for the user
            raise InputError(f"{path} could not be read as a weights-only state dict "
                             f"({type(e).__name__}: {e}).") from e
    raise InputError(f"scfm.checkpoint_dir: {root} has neither {' nor '.join(WEIGHT_FILES)}; a Geneformer "
                     "checkpoint folder holds config.json and one of them.")


def read_config(checkpoint_dir: str | Path) -> BertConfig:
    """The ``config.json`` of a Geneformer folder."""
    root = Path(checkpoint_dir).expanduser()
    if not (root / "config.json").is_file():
        raise InputError(f"scfm.checkpoint_dir: {root} has no config.json; point it at the downloaded "
                         f"Geneformer folder (config.json + {' or '.join(WEIGHT_FILES)}).")
    return BertConfig.from_json(root / "config.json")


def load_geneformer(checkpoint_dir: str | Path) -> GeneformerModel:
    """The model of an official Geneformer folder, in eval mode.

    Missing keys are an InputError; unexpected keys (e.g. ``bert.embeddings.position_ids``
    of older files, or a pooler) are listed in a log warning. Tied copies may be absent; a
    stored copy that differs from its source is kept untied, with a warning.
    """
    cfg = read_config(checkpoint_dir)
    model = GeneformerModel(cfg)
    state, path = load_state(Path(checkpoint_dir).expanduser())
    tied = {"cls.predictions.decoder.bias": "cls.predictions.bias"}
    if cfg.tie_word_embeddings:
        tied["cls.predictions.decoder.weight"] = "bert.embeddings.word_embeddings.weight"
    for copy, source in tied.items():
        if copy in state and source in state and not torch.equal(state[copy], state[source]):
            log.warning("%s: %s differs from %s, to which it is tied; both are used as stored, untied "
                        "(as Hugging Face transformers 5 does).", path, copy, source)
            module_name, name = copy.rsplit(".", 1)
            module = model.get_submodule(module_name)
            setattr(module, name, nn.Parameter(getattr(module, name).detach().clone()))
            continue
        if copy in state:
            state.setdefault(source, state[copy])
            del state[copy]
    load_official_state(model, state, path, f"the file does not match config.json (hidden_size={cfg.hidden_size}, "
                        f"num_hidden_layers={cfg.num_hidden_layers}) or is not a BertForMaskedLM",
                        may_be_missing=tuple(tied))
    return model.eval()
