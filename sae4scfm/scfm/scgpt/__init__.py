"""scGPT: model and official checkpoint loading (``model``), preprocessing and tokenizer
(``tokenizer``), and the adapter (``adapter``). Reproduces ``scgpt`` 0.2.4; notes on the
official behaviour it follows are in ``docs/scgpt_official_notes.md``."""

from __future__ import annotations

from sae4scfm.scfm.scgpt.adapter import ScGPTAdapter, check_architecture
from sae4scfm.scfm.scgpt.model import (
                                       SPECIAL_TOKENS,
                                       ScGPTConfig,
                                       ScGPTModel,
                                       load_scgpt_checkpoint,
                                       masked_value_loss,
                                       rename_official_keys,
)
from sae4scfm.scfm.scgpt.tokenizer import bin_values, random_value_mask, tokenize_binned, tokenize_cells

__all__ = [
    "SPECIAL_TOKENS", "ScGPTAdapter", "ScGPTConfig", "ScGPTModel", "bin_values", "check_architecture", "load_scgpt_checkpoint",
    "masked_value_loss", "random_value_mask", "rename_official_keys", "tokenize_binned", "tokenize_cells",
]
