"""scFoundation behind the adapter contract: official ``models.ckpt``, preprocessing, hooks.

Residual-stream layers are the encoder's: layer 0 is the encoder input (value +
position embedding of the expressed genes and the T and S tokens), layer ``l`` the
output of encoder block ``l - 1``. T and S are special tokens (never stored as gene
activations). Outputs: ``pred`` [B, 19264], the decoder's predicted log1p(CP10k) of
every gene, and ``cell_emb`` [B, 4·d] = [S, T, max, mean over gene tokens] of the
encoder output (the official ``get_embedding.py`` ``pool_type='all'``, 3,072-d for the
published 768-d model).
"""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import torch

from sae4scfm.errors import InputError
from sae4scfm.scfm.adapter import ScFMAdapter
from sae4scfm.scfm.scfoundation.model import ScFoundationConfig, ScFoundationModel, load_scfoundation_checkpoint
from sae4scfm.scfm.scfoundation.preprocess import gene_positions, parse_tgthighres, scfoundation_genes, tokenize_cells
from sae4scfm.scfm.tokens import Batch, TokenizedCells

MASK_RATIO = 0.3  # official pretraining value_mask_prob: fraction of expressed genes masked


class ScFoundationAdapter(ScFMAdapter):
    """scFoundation (MAE-autobin) with the official single-cell preprocessing."""

    family = "scfoundation"
    published = ("the biomap-research/scFoundation GitHub repository (model/README: models.ckpt through "
                 "its download link, placed in model/models/)")

    def __init__(self, model: ScFoundationModel, cfg: ScFoundationConfig, *, tgthighres: str = "t4",
                 total_count_key: str | None = None, decoder_batch_size: int | None = 8, device: str = "cpu"):
        super().__init__(model, gene_positions(), device)
        self.cfg = cfg
        self.tgthighres = tgthighres
        self.total_count_key = total_count_key
        self.decoder_batch_size = decoder_batch_size

    @classmethod
    def from_pretrained(cls, checkpoint_dir: str | Path | None, device: str = "cpu", random_init: bool = False,
                        ckpt_key: str = "cell", tgthighres: str = "t4", total_count_key: str | None = None,
                        decoder_batch_size: int | None = 8, architecture: dict | None = None) -> "ScFoundationAdapter":
        """Load ``models.ckpt`` (or its folder), entry ``ckpt_key``; ``random_init`` keeps the
        architecture and re-draws the weights. ``architecture`` ({encoder, decoder} stack sizes in
        the official config's names): the published size, checked against the checkpoint (None =
        accept it); with ``checkpoint_dir=None`` and ``random_init`` the model is built from it.
        The other options: see ``config/scfm/scfoundation.yaml``."""
        parse_tgthighres(tgthighres)
        if decoder_batch_size is not None and int(decoder_batch_size) < 1:
            raise InputError(f"scfm.decoder_batch_size={decoder_batch_size}: use a positive number of cells "
                             "(or null for the whole batch).")
        if checkpoint_dir is None:
            if not (random_init and architecture):
                raise InputError("scfm.random_init=true without scfm.checkpoint_dir builds the published size "
                                 "given in scfm.architecture, which is not set (config/scfm/scfoundation.yaml has the "
                                 "published one).")
            cfg = published_config(architecture)
            model = None
        else:
            model, cfg = load_scfoundation_checkpoint(checkpoint_dir, ckpt_key)
            check_architecture(cfg, architecture, checkpoint_dir)
        if cfg.n_genes != len(scfoundation_genes()):
            raise InputError(f"{checkpoint_dir}: seq_len={cfg.seq_len} does not fit the 19,264-gene order "
                             f"(19,266 positions = genes + T + S); this adapter reads that order only.")
        if random_init:
            model = ScFoundationModel(cfg).eval()
        return cls(model, cfg, tgthighres=tgthighres, total_count_key=total_count_key,
                   decoder_batch_size=decoder_batch_size, device=device)

    def tokenize(self, adata: ad.AnnData, *, gene_key: str | None = None, input_kind: str = "counts",
                 normalize_total: float | None = 1e4, log1p: bool = True, subset_hvg: bool = False,
                 n_hvg: int = 0, seed: int = 0, source: str = "data") -> TokenizedCells:
        """Official preprocessing of ``adata`` [cells, genes] (``preprocess.py``); deterministic,
        so ``n_hvg`` and ``seed`` are unused. ``source`` names the data in errors."""
        return tokenize_cells(adata, gene_key=gene_key, input_kind=input_kind, normalize_total=normalize_total,
                              log1p=log1p, subset_hvg=subset_hvg, tgthighres=self.tgthighres,
                              total_count_key=self.total_count_key, source=source,
                              pad_id=self.cfg.seq_len, pad_value=float(self.cfg.pad_token_id))

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        return self.model(batch.gene_ids, batch.values, batch.padding_mask, self.decoder_batch_size,
                          gene_mask=batch.gene_mask)

    @torch.no_grad()
    def output_loss(self, batch: Batch, generator: torch.Generator,
                    mask_ratio: float = MASK_RATIO) -> tuple[float, int]:
        """Masked-value MSE, as in pretraining: each expressed gene is masked with probability
        ``mask_ratio`` (mask drawn from ``generator``); masked genes leave the encoder input and
        enter the decoder as the mask embedding; the loss is the squared error of ``pred`` against
        the true log1p(CP10k) at the masked genes: (sum, number of masked genes)."""
        mask = (torch.rand(batch.gene_mask.shape, generator=generator) < mask_ratio) & batch.gene_mask
        masked = Batch(batch.gene_ids, batch.values.masked_fill(mask, float(self.cfg.mask_token_id)),
                       batch.padding_mask, batch.gene_mask & ~mask, batch.cell_index)
        pred = self.run(masked)["pred"]
        rows, cols = mask.to(self.device).nonzero(as_tuple=True)
        gene_ids, values = batch.gene_ids.to(self.device), batch.values.to(self.device)
        sse = ((pred[rows, gene_ids[rows, cols]] - values[rows, cols]) ** 2).sum()
        return float(sse), int(mask.sum())


STACKS = ("encoder", "decoder")


def published_config(architecture: dict) -> ScFoundationConfig:
    """The untrained model without a checkpoint: ``architecture`` {encoder, decoder} stacks
    (``StackConfig`` fields) and the published 19,266 positions, 100 bins, pad/mask values 103/102."""
    unknown = sorted(set(architecture) - set(STACKS))
    if unknown or not all(architecture.get(k) for k in STACKS):
        raise InputError(f"scfm.architecture: give exactly the keys {', '.join(STACKS)} (each module_type, hidden_dim, "
                         "depth, heads[, dim_head]), as config/scfm/scfoundation.yaml does.")
    return ScFoundationConfig.from_official(
        {"model": "mae_autobin", **{k: dict(architecture[k]) for k in STACKS}, "seq_len": len(scfoundation_genes()) + 2,
         "bin_num": 100, "bin_alpha": 1.0, "pad_token_id": 103, "mask_token_id": 102}, "scfm.architecture")


def check_architecture(cfg: ScFoundationConfig, architecture: dict | None, checkpoint_dir) -> None:
    """InputError when the checkpoint's stacks differ from the ``architecture`` given (None = any)."""
    for stack in STACKS:
        for key, want in dict((architecture or {}).get(stack) or {}).items():
            have = getattr(getattr(cfg, stack), key, None)
            if want is not None and have is not None and str(want) != str(have):
                raise InputError(f"scfm.architecture.{stack}.{key}={want} but {checkpoint_dir} has {have}: the "
                                 "checkpoint is another scFoundation size; set scfm.architecture=null to accept it.")


__all__ = ["ScFoundationAdapter", "ScFoundationConfig", "ScFoundationModel"]
