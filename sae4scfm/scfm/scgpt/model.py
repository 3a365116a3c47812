"""scGPT's ``TransformerModel`` (inference path) and the loader for official checkpoint folders.

The module tree mirrors ``scgpt.model.TransformerModel`` (scgpt 0.2.4) so that the
official ``best_model.pt`` state dict loads without key surgery; the one mapping is
the flash-attention layout of the published checkpoints (``self_attn.Wqkv.*``, or
``self_attn._impl.{Wqkv,out_proj}.*`` from newer code), which holds the same packed
q/k/v projection as torch's ``self_attn.in_proj_*``.

Folder layout, as published: ``best_model.pt`` (raw state dict), ``args.json``
(training arguments), ``vocab.json`` (flat ``{token: id}``). The architecture is
read from ``args.json`` (sizes, value style) and from the weights themselves (which
heads exist), because fine-tuned folders set their extras in code, not in args.json.

Residual stream: layer 0 is the embedding output (gene + value embedding), layer
``l`` (1..n_layers) the output of transformer block ``l - 1``. There is no
positional encoding. The blocks are plain modules (not ``nn.TransformerEncoder``),
so hooks always see dense ``[B, T, d]`` tensors, also in eval mode with padding.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from sae4scfm.errors import InputError
from sae4scfm.scfm.adapter import load_official_state
from sae4scfm.scfm.attention import PackedSelfAttention
from sae4scfm.scfm.hooks import HookPoint, resume_point
from sae4scfm.scfm.tokens import Batch

log = logging.getLogger(__name__)

CHECKPOINT_FILES = ("best_model.pt", "args.json", "vocab.json")
SPECIAL_TOKENS = ("<pad>", "<cls>", "<eoc>")  # appended to vocab.json when absent, as the official loader does

# Official fine-tuning options that change the forward pass and that this adapter does not implement:
# weight-key prefix -> (option, why).
UNSUPPORTED_HEADS = {
    "batch_encoder.": ("use_batch_labels=True", "the value and GEPC heads then need a batch label per cell"),
    "dsbn.": ("domain_spec_batchnorm (DSBN)", "the embeddings are then normalised per batch label"),
    "bn.": ("domain_spec_batchnorm='batchnorm'", "the embeddings then pass a BatchNorm with batch statistics"),
    "value_encoder.embedding.": ("input_emb_style='category'", "only the continuous value encoder is implemented"),
    "transformer_encoder.fast_transformer_encoder.": ("fast_transformer_backend='linear'",
                                                     "only softmax attention is implemented"),
    "mvc_decoder.fc1.": ("mvc_decoder_style 'concat query' / 'sum query'",
                         "only the 'inner product' GEPC head is implemented"),
}
# args.json fields whose non-default value changes the forward pass: field -> accepted values.
SUPPORTED_ARGS = {
    "input_style": ("binned",),
    "input_emb_style": ("continuous",),
    "cell_emb_style": ("cls",),
    "mvc_decoder_style": ("inner product", "inner product, detach"),
    "pre_norm": (False,),
}


@dataclass
class ScGPTConfig:
    """Architecture and token settings (names of the official ``args.json`` in comments)."""

    n_tokens: int  # rows of encoder.embedding (= len(vocab))
    d_model: int = 512  # "embsize"
    n_heads: int = 8  # "nheads"
    d_hid: int = 512  # "d_hid"
    n_layers: int = 12  # "nlayers"
    dropout: float = 0.2  # "dropout"
    n_bins: int = 51  # "n_bins": values are binned per cell into 1..n_bins-1 (0 = not expressed)
    pad_token: str = "<pad>"  # "pad_token"
    cls_token: str = "<cls>"
    pad_value: float = -2.0  # "pad_value": input value of padding (and of <cls> by default)
    mask_value: float = -1.0  # "mask_value": input value of a masked gene
    max_seq_len: int = 1200  # "max_seq_len": tokens per cell, <cls> included
    input_emb_style: str = "continuous"  # "input_emb_style"
    do_mvc: bool = True  # GEPC / MVC head present (mvc_decoder.*)
    explicit_zero_prob: bool = False  # zero-probability heads present (decoder.zero_logit.*)
    n_cls: int = 0  # classes of a fine-tuned cell-type head (cls_decoder.*); 0 = no head
    n_layers_cls: int = 3  # "n_layers_cls": linear layers of that head

    @classmethod
    def from_checkpoint(cls, args: dict, state: dict[str, torch.Tensor], n_tokens: int) -> "ScGPTConfig":
        """Sizes and token settings from ``args.json``; which heads exist from the weights."""
        def arg(*names: str, default):  # the first of ``names`` that args.json sets (not null)
            return next((args[n] for n in names if args.get(n) is not None), default)

        has_cls = "cls_decoder.out_layer.weight" in state
        n_linear_cls = sum(1 for k in state if re.fullmatch(r"cls_decoder\._decoder\.\d+\.weight", k)
                           and state[k].dim() == 2)
        return cls(
            n_tokens=n_tokens,
            d_model=int(arg("embsize", "layer_size", default=512)),
            n_heads=int(arg("nheads", "nhead", default=8)),
            d_hid=int(arg("d_hid", "layer_size", default=512)),
            n_layers=int(arg("nlayers", default=12)),
            dropout=float(arg("dropout", default=0.2)),
            n_bins=int(arg("n_bins", default=51)),
            pad_token=str(arg("pad_token", default="<pad>")),
            pad_value=float(arg("pad_value", default=-2)),
            mask_value=float(arg("mask_value", default=-1)),
            max_seq_len=int(arg("max_seq_len", default=1200)),
            do_mvc="mvc_decoder.W.weight" in state,
            explicit_zero_prob="decoder.zero_logit.0.weight" in state,
            n_cls=int(state["cls_decoder.out_layer.weight"].shape[0]) if has_cls else 0,
            n_layers_cls=n_linear_cls + 1 if has_cls else int(arg("n_layers_cls", default=3)),
        )

    def to_args(self) -> dict:
        """The official ``args.json`` keys for this config."""
        return {
            "embsize": self.d_model, "nheads": self.n_heads, "d_hid": self.d_hid,
            "nlayers": self.n_layers, "n_layers_cls": self.n_layers_cls, "dropout": self.dropout,
            "n_bins": self.n_bins, "pad_token": self.pad_token, "pad_value": self.pad_value,
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
    """Scalar value [B, T] -> [B, T, d]; values are clamped at ``max_value`` (mask/pad values pass)."""

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
    """Post-norm transformer block with the parameter names of ``nn.TransformerEncoderLayer``
    (fused attention: ``scfm.attention.PackedSelfAttention``)."""

    def __init__(self, d_model: int, n_heads: int, d_hid: int, dropout: float):
        super().__init__()
        self.self_attn = PackedSelfAttention(d_model, n_heads, dropout=dropout)
        self.linear1 = nn.Linear(d_model, d_hid)
        self.linear2 = nn.Linear(d_hid, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.hook_attn_out = HookPoint()
        self.hook_mlp_out = HookPoint()

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor, gene_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, d], padding_mask [B, T] (True = pad, never attended to) -> [B, T, d].

        ``hook_attn_out`` sees the attention output, ``hook_mlp_out`` the feed-forward output,
        each before its dropout, residual add and LayerNorm (``gene_mask`` is passed to them).
        """
        attn = self.self_attn(x, padding_mask)
        x = self.norm1(x + self.dropout(self.hook_attn_out(attn, gene_mask)))
        ff = self.linear2(self.dropout(F.relu(self.linear1(x))))
        return self.norm2(x + self.dropout(self.hook_mlp_out(ff, gene_mask)))


class TransformerEncoder(nn.Module):
    """Holds the blocks under the official key prefix ``transformer_encoder.layers``."""

    def __init__(self, n_layers: int, **layer_kwargs):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(**layer_kwargs) for _ in range(n_layers))


def _value_mlp(d_model: int) -> nn.Sequential:
    """[.., d] -> [.., 1]: the official decoder MLP (keys fc.0, fc.2, fc.4)."""
    return nn.Sequential(
        nn.Linear(d_model, d_model), nn.LeakyReLU(),
        nn.Linear(d_model, d_model), nn.LeakyReLU(),
        nn.Linear(d_model, 1),
    )


class ExprDecoder(nn.Module):
    """Per-token expression value [B, T, d] -> [B, T]; optionally the probability that it is non-zero."""

    def __init__(self, d_model: int, explicit_zero_prob: bool = False):
        super().__init__()
        self.fc = _value_mlp(d_model)
        if explicit_zero_prob:
            self.zero_logit = _value_mlp(d_model)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {"pred": self.fc(x).squeeze(-1)}
        if hasattr(self, "zero_logit"):
            out["zero_probs"] = torch.sigmoid(self.zero_logit(x).squeeze(-1))
        return out


class MVCDecoder(nn.Module):
    """GEPC ("inner product" style): value of gene g = <W sigmoid(Q gene_emb_g), cell_emb>."""

    def __init__(self, d_model: int, explicit_zero_prob: bool = False):
        super().__init__()
        self.gene2query = nn.Linear(d_model, d_model)
        self.query_activation = nn.Sigmoid()
        self.W = nn.Linear(d_model, d_model, bias=False)
        if explicit_zero_prob:
            self.W_zero_logit = nn.Linear(d_model, d_model)

    def forward(self, cell_emb: torch.Tensor, gene_embs: torch.Tensor) -> dict[str, torch.Tensor]:
        """cell_emb [B, d], gene_embs [B, T, d] -> {"pred": [B, T], "zero_probs": [B, T]}."""
        query = self.query_activation(self.gene2query(gene_embs))  # [B, T, d]
        cell = cell_emb.unsqueeze(2)  # [B, d, 1]
        out = {"pred": torch.bmm(self.W(query), cell).squeeze(2)}
        if hasattr(self, "W_zero_logit"):
            out["zero_probs"] = torch.sigmoid(torch.bmm(self.W_zero_logit(query), cell).squeeze(2))
        return out

    def every_gene(self, cell_emb: torch.Tensor, gene_table: torch.Tensor) -> torch.Tensor:
        """The same values for every gene of ``gene_table`` [G, d] (gene embeddings), whatever the cell's input:
        cell_emb [B, d] -> [B, G]."""
        return cell_emb @ self.W(self.query_activation(self.gene2query(gene_table))).T


class ClsDecoder(nn.Module):
    """Fine-tuned cell-type head: cell_emb [B, d] -> logits [B, n_cls] ((Linear, ReLU, LayerNorm) x (n-1), Linear)."""

    def __init__(self, d_model: int, n_cls: int, n_layers: int = 3):
        super().__init__()
        self._decoder = nn.ModuleList()
        for _ in range(n_layers - 1):
            self._decoder.extend([nn.Linear(d_model, d_model), nn.ReLU(), nn.LayerNorm(d_model)])
        self.out_layer = nn.Linear(d_model, n_cls)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self._decoder:
            x = layer(x)
        return self.out_layer(x)


class ScGPTModel(nn.Module):
    """scGPT ``TransformerModel``: continuous value style, ``<cls>`` cell embedding, post-norm blocks."""

    def __init__(self, cfg: ScGPTConfig, pad_id: int):
        super().__init__()
        self.cfg = cfg
        self.encoder = GeneEncoder(cfg.n_tokens, cfg.d_model, padding_idx=pad_id)
        self.value_encoder = ContinuousValueEncoder(cfg.d_model, cfg.dropout)
        self.transformer_encoder = TransformerEncoder(
            cfg.n_layers, d_model=cfg.d_model, n_heads=cfg.n_heads, d_hid=cfg.d_hid, dropout=cfg.dropout
        )
        self.decoder = ExprDecoder(cfg.d_model, cfg.explicit_zero_prob)
        if cfg.n_cls:
            self.cls_decoder = ClsDecoder(cfg.d_model, cfg.n_cls, cfg.n_layers_cls)
        if cfg.do_mvc:
            self.mvc_decoder = MVCDecoder(cfg.d_model, cfg.explicit_zero_prob)
        # Parameter-free hook points on the residual stream: hook_resid[l] sees layer l.
        self.hook_resid = nn.ModuleList(HookPoint() for _ in range(cfg.n_layers + 1))

    @property
    def blocks(self) -> nn.ModuleList:
        return self.transformer_encoder.layers

    def init_official_weights(self) -> None:
        """The gene embedding (pad row included) uniform in ±0.1, as ``TransformerModel.init_weights``;
        with the torch defaults of a fresh module this is the official untrained model."""
        nn.init.uniform_(self.encoder.embedding.weight, -0.1, 0.1)

    def embed(self, gene_ids: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (residual stream at layer 0 [B, T, d], gene embeddings [B, T, d])."""
        gene_embs = self.encoder(gene_ids)
        return gene_embs + self.value_encoder(values), gene_embs

    def vocab_expression(self, cell_emb: torch.Tensor, gene_ids: torch.Tensor) -> torch.Tensor:
        """GEPC values of the genes ``gene_ids`` [G] (any vocabulary ids, expressed in the cell or not) from
        cell_emb [B, d]: [B, G] (mvc_output for genes the cell did not read)."""
        return self.mvc_decoder.every_gene(cell_emb, self.encoder(gene_ids))

    def forward(self, gene_ids: torch.Tensor, values: torch.Tensor, padding_mask: torch.Tensor,
                gene_mask: torch.Tensor | None = None) -> dict:
        """gene_ids [B, T] long, values [B, T] float, padding_mask [B, T] bool (True = pad),
        gene_mask [B, T] bool (gene tokens; passed to the hook points, None when unused).

        Returns (official names in brackets): ``mlm`` [B, T] predicted values (mlm_output),
        ``cell_emb`` [B, d] the last layer at ``<cls>`` (position 0); when the checkpoint has
        the heads: ``mvc`` [B, T] GEPC values from cell_emb (mvc_output), ``mlm_zero_probs``
        and ``mvc_zero_probs`` [B, T], ``cls_output`` [B, n_cls] cell-type logits.
        """
        start, cached = resume_point(self.hook_resid)
        if cached is None:
            x, gene_embs = self.embed(gene_ids, values)
        else:  # resumed from a cached state: only GEPC needs the gene embeddings
            x, gene_embs = cached, (self.encoder(gene_ids) if self.cfg.do_mvc else None)
        x = self.hook_resid[start](x, gene_mask)
        for layer, (block, hook) in enumerate(zip(self.blocks, self.hook_resid[1:]), start=1):
            if layer > start:
                x = hook(block(x, padding_mask, gene_mask), gene_mask)
        cell_emb = x[:, 0, :]
        mlm = self.decoder(x)
        out = {"mlm": mlm["pred"], "cell_emb": cell_emb}
        if "zero_probs" in mlm:
            out["mlm_zero_probs"] = mlm["zero_probs"]
        if self.cfg.n_cls:
            out["cls_output"] = self.cls_decoder(cell_emb)
        if self.cfg.do_mvc:
            mvc = self.mvc_decoder(cell_emb, gene_embs)
            out["mvc"] = mvc["pred"]
            if "zero_probs" in mvc:
                out["mvc_zero_probs"] = mvc["zero_probs"]
        return out


def masked_value_loss(model: ScGPTModel, batch: Batch, mask: torch.Tensor,
                      forward: Callable[[Batch], dict] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """scGPT's masked-value objective on ``batch`` with ``mask`` [B, T] bool (gene tokens only).

    Masked positions get ``mask_value`` as input; returns (summed loss over masked
    positions, number of masked positions). The summed loss is the squared error of
    the value head, plus the GEPC head's when present, plus for zero-probability heads
    the Bernoulli negative log-likelihood of "value > 0" (the official fine-tuning
    loss ``masked_mse_loss`` + ``criterion_neg_log_bernoulli`` terms, times the count).
    ``forward`` (default: the model) maps a Batch to the model's outputs.
    """
    forward = forward or (lambda b: model(b.gene_ids, b.values, b.padding_mask, b.gene_mask))
    masked = Batch(batch.gene_ids, batch.values.masked_fill(mask, model.cfg.mask_value),
                   batch.padding_mask, batch.gene_mask, batch.cell_index)
    out = forward(masked)
    target = batch.values[mask]
    loss = ((out["mlm"][mask] - target) ** 2).sum()
    if "mvc" in out:
        loss = loss + ((out["mvc"][mask] - target) ** 2).sum()
    for key in ("mlm_zero_probs", "mvc_zero_probs"):
        if key in out:
            nonzero = torch.distributions.Bernoulli(probs=out[key][mask])
            loss = loss - nonzero.log_prob((target > 0).float()).sum()
    return loss, mask.sum()


# ------------------------------------------------------------------ official checkpoint folders

FLASH_KEY_NAMES = (  # flash-attention layouts -> torch's nn.MultiheadAttention names
    ("self_attn._impl.Wqkv.", "self_attn.in_proj_"),
    ("self_attn._impl.out_proj.", "self_attn.out_proj."),
    ("self_attn.Wqkv.", "self_attn.in_proj_"),
)


def rename_official_keys(state: dict) -> dict:
    """Map the flash-attention names of published checkpoints to the torch ones."""
    renamed = {}
    for key, value in state.items():
        for flash, torch_name in FLASH_KEY_NAMES:
            key = key.replace(flash, torch_name)
        renamed[key] = value
    return renamed


def check_supported(args: dict, state: dict, root: Path) -> None:
    """InputError naming the option when the checkpoint uses a forward-pass variant we do not implement."""
    for prefix, (option, why) in UNSUPPORTED_HEADS.items():
        if any(k.startswith(prefix) for k in state):
            raise InputError(f"{root / 'best_model.pt'}: has {prefix}* weights, i.e. it was trained with {option}; "
                             f"this adapter does not support that ({why}). Use a checkpoint without it, "
                             "e.g. the published whole-human or organ models.")
    for field, accepted in SUPPORTED_ARGS.items():
        if field in args and args[field] not in accepted:
            raise InputError(f"{root / 'args.json'}: {field}={args[field]!r} is not supported; this adapter "
                             f"implements {field} in {list(accepted)} (as the published scGPT checkpoints).")


def read_vocab(path: Path) -> dict[str, int]:
    """``vocab.json`` as {token: id}, with missing special tokens appended (official ``embed_data``)."""
    vocab = json.loads(path.read_text())
    if not isinstance(vocab, dict) or not all(isinstance(i, int) for i in vocab.values()):
        raise InputError(f"{path}: expected a flat JSON object {{token: integer id}} (scGPT's vocab.json).")
    for token in SPECIAL_TOKENS:
        if token not in vocab:
            log.warning("%s: special token %s is missing; appending it with id %d as scGPT's loader does.",
                        path, token, len(vocab))
            vocab[token] = len(vocab)
    return vocab


def load_scgpt_checkpoint(checkpoint_dir: str | Path) -> tuple[ScGPTModel, dict[str, int], ScGPTConfig]:
    """Load an official scGPT folder; returns (model in eval mode, vocab, config).

    Missing weights and shape mismatches are errors (the official ``load_pretrained``
    silently skips both); checkpoint keys we do not use (e.g. ``flag_encoder.weight``
    of whole-human, a fine-tuning discriminator) are listed in a warning.
    """
    root = Path(checkpoint_dir)
    if not root.is_dir():
        raise InputError(f"scfm.checkpoint_dir: {root} is not a directory; point it at the "
                         f"downloaded scGPT folder containing {', '.join(CHECKPOINT_FILES)}.")
    missing_files = [f for f in CHECKPOINT_FILES if not (root / f).is_file()]
    if missing_files:
        raise InputError(f"scfm.checkpoint_dir: {root} lacks {', '.join(missing_files)}; an scGPT "
                         f"checkpoint folder has {', '.join(CHECKPOINT_FILES)}.")
    vocab = read_vocab(root / "vocab.json")
    args = json.loads((root / "args.json").read_text())
    if not isinstance(args, dict):
        raise InputError(f"{root / 'args.json'}: expected a JSON object of training arguments "
                         "(embsize, nlayers, ...).")
    state = torch.load(root / "best_model.pt", map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"{root / 'best_model.pt'}: expected a raw state dict {{name: tensor}}, as the "
                         "published scGPT checkpoints are (torch.save(model.state_dict(), ...)).")
    state = rename_official_keys(state)
    check_supported(args, state, root)
    cfg = ScGPTConfig.from_checkpoint(args, state, n_tokens=len(vocab))
    if cfg.pad_token not in vocab:
        raise InputError(f"{root / 'args.json'}: pad_token {cfg.pad_token!r} is not in vocab.json.")
    model = ScGPTModel(cfg, pad_id=vocab[cfg.pad_token])
    load_official_state(model, state, root / "best_model.pt",
                        f"the file does not match args.json / vocab.json (embsize={cfg.d_model}, "
                        f"d_hid={cfg.d_hid}, nlayers={cfg.n_layers}, {len(vocab)} tokens)")
    return model.eval(), vocab, cfg
