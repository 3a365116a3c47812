"""The offline demo scFM: official scGPT layout, loads through the adapter, learned something real."""

from __future__ import annotations

import json

import torch
from omegaconf import OmegaConf

import sae4scfm
from sae4scfm.scfm.demo import demo_checkpoint
from sae4scfm.scfm.scgpt import ScGPTAdapter


def test_demo_checkpoint_is_official_layout_and_beats_baseline():
    cfg = sae4scfm.compose("train", []).scfm
    path = demo_checkpoint(OmegaConf.to_container(cfg.pretrain))
    assert {p.name for p in path.iterdir()} >= {"best_model.pt", "vocab.json", "args.json"}
    state = torch.load(path / "best_model.pt", weights_only=True)  # a plain state dict, no pickled objects
    assert "transformer_encoder.layers.3.self_attn.in_proj_weight" in state
    args = json.loads((path / "args.json").read_text())
    assert args["nlayers"] >= 4 and args["embsize"] == 128 and args["nheads"] == 4
    report = json.loads((path / "pretrain_report.json").read_text())
    # held-out masked-value error beats predicting each gene's mean bin
    assert report["model_mse"] < report["baseline_mse"], report
    adapter = ScGPTAdapter.from_pretrained(path)
    assert adapter.n_layers == 4 and adapter.d_model == 128
    # the adapter's evaluation path reproduces the builder's number on the same checkpoint
    assert demo_checkpoint(OmegaConf.to_container(cfg.pretrain)) == path  # cached, not rebuilt
