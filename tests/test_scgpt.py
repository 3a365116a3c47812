"""The scGPT adapter: official key layout, torch-reference equivalence, tokenization, hooks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from torch import nn

from sae4scfm.data import load_pbmc
from sae4scfm.errors import InputError
from sae4scfm.scfm.scgpt import ScGPTAdapter, ScGPTConfig, ScGPTModel, bin_values

OFFICIAL_KEYS = [  # names in the published whole-human best_model.pt (torch attention path)
    "encoder.embedding.weight", "encoder.enc_norm.weight", "value_encoder.linear1.weight",
    "value_encoder.linear2.weight", "value_encoder.norm.bias",
    "transformer_encoder.layers.0.self_attn.in_proj_weight", "transformer_encoder.layers.0.self_attn.out_proj.bias",
    "transformer_encoder.layers.1.linear1.weight", "transformer_encoder.layers.1.norm2.weight",
    "decoder.fc.0.weight", "decoder.fc.2.weight", "decoder.fc.4.bias",
    "mvc_decoder.gene2query.weight", "mvc_decoder.W.weight",
]


def tiny_checkpoint(tmp_path, genes, *, flash=False, drop=None, seed=0):
    torch.manual_seed(seed)
    vocab = {t: i for i, t in enumerate(["<pad>", "<cls>", "<eoc>", *genes])}
    cfg = ScGPTConfig(n_tokens=len(vocab), d_model=32, n_heads=4, d_hid=48, n_layers=2, dropout=0.0, max_seq_len=64)
    state = ScGPTModel(cfg, pad_id=0).state_dict()
    if flash:
        state = {k.replace("self_attn.in_proj_", "self_attn.Wqkv."): v for k, v in state.items()}
    if drop:
        state.pop(drop)
    torch.save(state, tmp_path / "best_model.pt")
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "args.json").write_text(json.dumps(cfg.to_args()))
    return tmp_path


def test_state_dict_uses_official_names():
    cfg = ScGPTConfig(n_tokens=10, d_model=16, n_heads=2, d_hid=16, n_layers=2)
    keys = set(ScGPTModel(cfg, pad_id=0).state_dict())
    assert set(OFFICIAL_KEYS) <= keys
    assert not any("hook_resid" in k for k in keys)


def test_block_equals_torch_transformer_encoder_layer():
    """Our readable block computes what nn.TransformerEncoderLayer (official torch path) computes."""
    torch.manual_seed(0)
    cfg = ScGPTConfig(n_tokens=10, d_model=32, n_heads=4, d_hid=48, n_layers=1, dropout=0.0)
    ours = ScGPTModel(cfg, pad_id=0).transformer_encoder.layers[0].eval()
    ref = nn.TransformerEncoderLayer(32, 4, 48, dropout=0.0, batch_first=True).eval()
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(3, 7, 32)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[1, 5:] = True
    with torch.no_grad():
        torch.testing.assert_close(ours(x, pad)[~pad], ref(x, src_key_padding_mask=pad)[~pad], atol=1e-5, rtol=1e-5)


def test_flash_attention_names_load_identically(tmp_path):
    genes = list(load_pbmc().var_names[:50])
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    plain = ScGPTAdapter.from_pretrained(tiny_checkpoint(tmp_path / "a", genes))
    flash = ScGPTAdapter.from_pretrained(tiny_checkpoint(tmp_path / "b", genes, flash=True))
    for (k, v), (k2, v2) in zip(plain.model.state_dict().items(), flash.model.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)


def test_missing_key_is_an_error(tmp_path):
    genes = list(load_pbmc().var_names[:50])
    path = tiny_checkpoint(tmp_path, genes, drop="decoder.fc.2.weight")
    with pytest.raises(InputError, match=r"missing state-dict keys \['decoder.fc.2.weight'\]"):
        ScGPTAdapter.from_pretrained(path)


def test_binning_follows_official_rule():
    rng = np.random.default_rng(0)
    X = sp.random(50, 200, density=0.3, random_state=1, format="csr", data_rvs=lambda n: rng.poisson(3, n) + 1.0)
    X.data = np.log1p(X.data)
    B = bin_values(X, 51, np.random.default_rng(0))
    assert (B != 0).toarray().tolist() == (X != 0).toarray().tolist()  # zeros stay zero, non-zeros get a bin
    assert B.data.min() >= 1 and B.data.max() <= 50
    for i in range(50):
        x, b = X[i].toarray().ravel(), B[i].toarray().ravel()
        nz = x > 0
        order = np.argsort(x[nz], kind="stable")
        assert np.all(np.diff(b[nz][order][np.diff(x[nz][order], prepend=-1) > 0]) >= 0)  # monotone across values
        edges = np.quantile(x[nz], np.linspace(0, 1, 50))
        lo, hi = np.digitize(x[nz], edges), np.digitize(x[nz], edges, right=True)
        assert np.all((b[nz] >= np.minimum(lo, hi)) & (b[nz] <= np.maximum(lo, hi)))


def test_tokenize_cls_first_nonzero_genes(tmp_path):
    pbmc = load_pbmc()[:30]
    adapter = ScGPTAdapter.from_pretrained(tiny_checkpoint(tmp_path, list(pbmc.var_names)))
    tokens = adapter.tokenize(pbmc)
    cls_id = adapter.vocab["<cls>"]
    for i in range(len(tokens)):
        sl = slice(tokens.offsets[i], tokens.offsets[i + 1])
        ids, vals, special = tokens.gene_ids[sl], tokens.values[sl], tokens.special[sl]
        assert ids[0] == cls_id and special[0] and vals[0] == adapter.cfg.pad_value and not special[1:].any()
        expressed = set(np.asarray(pbmc.var_names)[pbmc.X[i].indices])
        n_keep = min(len(expressed), adapter.cfg.max_seq_len - 1)
        assert len(ids) == n_keep + 1
        assert {adapter.id_to_gene[int(g)] for g in ids[1:]} <= expressed


def test_capture_and_intervene_hooks(tmp_path):
    pbmc = load_pbmc()[:8]
    adapter = ScGPTAdapter.from_pretrained(tiny_checkpoint(tmp_path, list(pbmc.var_names)))
    batch = adapter.tokenize(pbmc).collate(np.arange(8))
    hidden = adapter.capture(batch, [0, 2])
    assert hidden[2].shape == (*batch.gene_ids.shape, 32)
    # capture equals the cls output of the last layer
    out = adapter.run(batch)
    torch.testing.assert_close(hidden[2][:, 0], out["cell_emb"])
    # identity intervention leaves outputs unchanged; zeroing a layer changes them
    with adapter.intervene(1, lambda h, mask: h):
        torch.testing.assert_close(adapter.run(batch)["mlm"], out["mlm"])
    with adapter.intervene(1, lambda h, mask: h * 0):
        assert not torch.allclose(adapter.run(batch)["mlm"], out["mlm"])
    with pytest.raises(InputError, match="out of range"):
        adapter.capture(batch, [3])


def test_extract_several_layers_in_one_pass(tmp_path):
    """One pass writes a store per layer; stored rows are exactly the gene tokens' hidden states."""
    from sae4scfm.activations import extract_activations

    pbmc = load_pbmc()[:20]
    adapter = ScGPTAdapter.from_pretrained(tiny_checkpoint(tmp_path, list(pbmc.var_names)))
    tokens = adapter.tokenize(pbmc)
    stores = extract_activations(adapter, tokens, [0, 2], tmp_path / "store", batch_size=7, shard_tokens=500)
    with_special = extract_activations(adapter, tokens, [2], tmp_path / "special", include_special=True)
    batch = tokens.collate(np.arange(len(tokens)))
    hidden = adapter.capture(batch, [0, 2])
    for layer, store in stores.items():
        assert store.n_tokens == tokens.n_gene_tokens and store.n_shards > 1
        got = {}
        for shard in store.iter_shards():
            for a, c, g in zip(shard["acts"], shard["cell"].tolist(), shard["gene"].tolist()):
                got[(c, g)] = a
        rows = batch.gene_mask.nonzero().tolist()
        assert len(got) == len(rows)
        for b, t in rows[::37]:
            key = (int(batch.cell_index[b]), int(batch.gene_ids[b, t]))
            torch.testing.assert_close(got[key], hidden[layer][b, t], rtol=1e-5, atol=1e-5)
    assert with_special[2].n_tokens == tokens.n_gene_tokens + len(tokens)  # + one <cls> per cell
    assert int(sum(s["special"].sum() for s in with_special[2].iter_shards())) == len(tokens)
