"""scfm.random_init=true without a checkpoint builds each family at its published size; without either,
the error says where the official weights are published."""

from __future__ import annotations

import pytest
import torch

import sae4scfm
from sae4scfm.errors import InputError
from sae4scfm.scfm import load_scfm

# config -> (blocks, residual width, published weights named in the error)
PUBLISHED = {
    "scgpt_human": (12, 512, "bowang-lab/scGPT"),
    "geneformer_v1": (6, 256, "huggingface.co/ctheodoris/Geneformer"),
    "geneformer_v2_104m": (12, 768, "huggingface.co/ctheodoris/Geneformer"),
    "geneformer_v2_316m": (18, 1152, "huggingface.co/ctheodoris/Geneformer"),
    "scfoundation": (12, 768, "biomap-research/scFoundation"),
    "aido_cell_3m": (6, 128, "huggingface.co/genbio-ai/AIDO.Cell-3M"),
    "aido_cell_10m": (8, 256, "huggingface.co/genbio-ai/AIDO.Cell-3M, AIDO.Cell-10M"),
    "aido_cell_100m": (18, 640, "AIDO.Cell-100M"),
}


@pytest.mark.parametrize("name", PUBLISHED)
def test_random_init_without_checkpoint_has_the_published_size(name):
    """Today's defect: 'checkpoint_dir is not set' with or without random_init."""
    n_layers, d_model, _ = PUBLISHED[name]
    with torch.device("meta"):  # sizes only: no memory for the weights
        adapter = load_scfm(sae4scfm.compose("train", [f"scfm={name}", "scfm.random_init=true"]).scfm, "meta")
    assert (adapter.n_layers, adapter.d_model) == (n_layers, d_model)
    assert len(adapter.hook_points) == 3 * n_layers + 1


@pytest.mark.parametrize("name", PUBLISHED)
def test_missing_checkpoint_says_where_the_weights_are(name):
    with pytest.raises(InputError, match=rf"checkpoint_dir is not set.*published at .*{PUBLISHED[name][2]}"
                                         r".*scfm.random_init=true"):
        load_scfm(sae4scfm.compose("train", [f"scfm={name}"]).scfm)


def test_random_init_needs_sizes_where_the_config_has_none():
    with pytest.raises(InputError, match="scfm.architecture, which lacks d_model, n_layers.*scfm=scgpt_human"):
        load_scfm(sae4scfm.compose("train", ["scfm=scgpt", "scfm.random_init=true"]).scfm)
    with pytest.raises(InputError, match="scfm.d_model is null"):
        load_scfm(sae4scfm.compose("train", ["scfm=geneformer_v1", "scfm.random_init=true", "scfm.d_model=null"]).scfm)


def test_untrained_model_runs_the_pipeline_start():
    """A small random-init scFoundation built from overridden published keys tokenizes PBMC and captures."""
    from sae4scfm.scfm.loading import load_model_and_data

    cfg = sae4scfm.compose("train", [
        "scfm=scfoundation", "scfm.random_init=true", "data=pbmc", "data.n_cells=8", "sae.target_layer=2",
        "scfm.architecture.encoder.hidden_dim=16", "scfm.architecture.encoder.depth=2",
        "scfm.architecture.encoder.heads=2", "scfm.architecture.decoder.hidden_dim=8",
        "scfm.architecture.decoder.depth=1"])
    adapter, adata, tokens = load_model_and_data(cfg, "cpu")
    batch = tokens.collate(list(range(4)))
    h = adapter.capture(batch, [2, "mlp_out.1"])
    assert h[2].shape[-1] == 16 and torch.isfinite(h[2]).all() and h["mlp_out.1"].shape == h[2].shape
