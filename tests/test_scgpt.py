"""The scGPT adapter: official key layouts, loading errors, tokenization, hooks, options, and the
whole pipeline (extract -> SAE -> features -> analysis -> steering) on an official-layout folder.
Equality with the official implementation itself is in test_scgpt_fidelity.py."""

from __future__ import annotations

import json
import logging

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from torch import nn

import sae4scfm
from sae4scfm.data import load_pbmc
from sae4scfm.errors import InputError
from sae4scfm.scfm import load_scfm
from sae4scfm.scfm.scgpt import ScGPTAdapter, ScGPTConfig, ScGPTModel, bin_values

OFFICIAL_KEYS = [  # names in the published whole-human best_model.pt (torch attention path)
    "encoder.embedding.weight", "encoder.enc_norm.weight", "value_encoder.linear1.weight",
    "value_encoder.linear2.weight", "value_encoder.norm.bias",
    "transformer_encoder.layers.0.self_attn.in_proj_weight", "transformer_encoder.layers.0.self_attn.out_proj.bias",
    "transformer_encoder.layers.1.linear1.weight", "transformer_encoder.layers.1.norm2.weight",
    "decoder.fc.0.weight", "decoder.fc.2.weight", "decoder.fc.4.bias",
    "mvc_decoder.gene2query.weight", "mvc_decoder.W.weight",
]
FLASH_LAYOUTS = {  # torch name -> published flash-attention names (scgpt 0.2.4 FlashMHA; newer _impl wrapper)
    "torch": {},
    "flash": {"self_attn.in_proj_": "self_attn.Wqkv."},
    "flash_impl": {"self_attn.in_proj_": "self_attn._impl.Wqkv.", "self_attn.out_proj.": "self_attn._impl.out_proj."},
}


@pytest.fixture(scope="module")
def pbmc():
    return load_pbmc()


def tiny_checkpoint(root, genes, *, layout="torch", drop=None, extra=None, vocab_extra=(), seed=0, max_seq_len=64):
    """A random-weight scGPT folder in the official layout (d_model 32, 2 blocks)."""
    torch.manual_seed(seed)
    root.mkdir(parents=True, exist_ok=True)
    vocab = {t: i for i, t in enumerate(["<pad>", "<cls>", "<eoc>", *genes])}
    cfg = ScGPTConfig(n_tokens=len(vocab), d_model=32, n_heads=4, d_hid=48, n_layers=2, dropout=0.0,
                      max_seq_len=max_seq_len)
    state = ScGPTModel(cfg, pad_id=0).state_dict()
    for torch_name, flash_name in FLASH_LAYOUTS[layout].items():
        state = {k.replace(torch_name, flash_name): v for k, v in state.items()}
    if drop:
        state.pop(drop)
    state.update(extra or {})
    torch.save(state, root / "best_model.pt")
    (root / "vocab.json").write_text(json.dumps({**vocab, **{t: len(vocab) + i for i, t in enumerate(vocab_extra)}}))
    (root / "args.json").write_text(json.dumps(cfg.to_args()))
    return root


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


def test_flash_attention_layouts_load_identically(tmp_path, pbmc):
    genes = list(pbmc.var_names[:50])
    loaded = {layout: ScGPTAdapter.from_pretrained(tiny_checkpoint(tmp_path / layout, genes, layout=layout))
              for layout in FLASH_LAYOUTS}
    reference = loaded["torch"].model.state_dict()
    for layout, adapter in loaded.items():
        state = adapter.model.state_dict()
        assert list(state) == list(reference), layout
        assert all(torch.equal(state[k], reference[k]) for k in reference), layout


def test_missing_key_is_an_error(tmp_path, pbmc):
    path = tiny_checkpoint(tmp_path, list(pbmc.var_names[:50]), drop="decoder.fc.2.weight")
    with pytest.raises(InputError, match=r"missing state-dict keys \['decoder.fc.2.weight'\]"):
        ScGPTAdapter.from_pretrained(path)


def test_shape_mismatch_is_an_error(tmp_path, pbmc):
    """The official loader silently skips a weight whose shape differs; we refuse."""
    path = tiny_checkpoint(tmp_path, list(pbmc.var_names[:50]), vocab_extra=["EXTRA_GENE"])
    with pytest.raises(InputError, match=r"encoder\.embedding\.weight \(53, 32\) \(expected \(54, 32\)\)"):
        ScGPTAdapter.from_pretrained(path)


def test_unused_keys_are_reported_and_missing_specials_appended(tmp_path, pbmc, caplog):
    genes = list(pbmc.var_names[:50])
    path = tiny_checkpoint(tmp_path, genes, extra={"flag_encoder.weight": torch.zeros(2, 32)})
    vocab = json.loads((path / "vocab.json").read_text())
    del vocab["<eoc>"]  # the official loader appends missing specials at the end
    vocab = {t: i for i, t in enumerate(sorted(vocab, key=vocab.get))}
    (path / "vocab.json").write_text(json.dumps(vocab))
    with caplog.at_level(logging.WARNING):
        adapter = ScGPTAdapter.from_pretrained(path)
    assert "flag_encoder.weight" in caplog.text and "<eoc> is missing" in caplog.text
    assert adapter.vocab["<eoc>"] == len(vocab) and adapter.vocab["<cls>"] == 1


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


def test_tokenize_cls_first_nonzero_genes(tmp_path, pbmc):
    cells = pbmc[:30]
    adapter = ScGPTAdapter.from_pretrained(tiny_checkpoint(tmp_path, list(cells.var_names), max_seq_len=1200))
    tokens = adapter.tokenize(cells)
    cls_id = adapter.vocab["<cls>"]
    for i in range(len(tokens)):
        sl = slice(tokens.offsets[i], tokens.offsets[i + 1])
        ids, vals, special = tokens.gene_ids[sl], tokens.values[sl], tokens.special[sl]
        assert ids[0] == cls_id and special[0] and vals[0] == adapter.cfg.pad_value and not special[1:].any()
        expressed = np.asarray(cells.var_names)[np.flatnonzero(cells.X[i].toarray())]
        assert [adapter.id_to_gene[int(g)] for g in ids[1:]] == list(expressed)  # column order, all of them


def test_long_cells_keep_a_random_gene_subset(tmp_path, pbmc):
    """max_seq_len (option, default args.json) caps the tokens; the genes kept are drawn at random."""
    cells = pbmc[:20]
    path = tiny_checkpoint(tmp_path, list(cells.var_names))
    adapter = ScGPTAdapter.from_pretrained(path, max_seq_len=100, cls_value=0)
    tokens = adapter.tokenize(cells, seed=1)
    assert np.all(tokens.lengths == 100) and adapter.cfg.max_seq_len == 100
    first = tokens.offsets[:-1]
    assert np.all(tokens.values[first] == 0)  # cls_value option
    for i in range(len(tokens)):
        genes = tokens.gene_ids[tokens.offsets[i] + 1:tokens.offsets[i + 1]]
        expressed = {adapter.vocab[g] for g in np.asarray(cells.var_names)[cells.X[i].indices]}
        assert len(set(genes)) == 99 and set(genes) <= expressed
    again = adapter.tokenize(cells, seed=1)
    other = adapter.tokenize(cells, seed=2)
    assert np.array_equal(again.gene_ids, tokens.gene_ids) and not np.array_equal(other.gene_ids, tokens.gene_ids)


def test_capture_and_intervene_hooks(tmp_path, pbmc):
    cells = pbmc[:8]
    adapter = ScGPTAdapter.from_pretrained(tiny_checkpoint(tmp_path, list(cells.var_names)))
    batch = adapter.tokenize(cells).collate(np.arange(8))
    hidden = adapter.capture(batch, [0, 2])
    assert hidden[2].shape == (*batch.gene_ids.shape, 32)
    out = adapter.run(batch)
    torch.testing.assert_close(hidden[2][:, 0], out["cell_emb"])  # capture equals the cls output of the last layer
    with adapter.intervene(1, lambda h, mask: h):  # identity intervention leaves outputs unchanged
        torch.testing.assert_close(adapter.run(batch)["mlm"], out["mlm"])
    with adapter.intervene(1, lambda h, mask: h * 0):
        assert not torch.allclose(adapter.run(batch)["mlm"], out["mlm"])
    with pytest.raises(InputError, match="out of range"):
        adapter.capture(batch, [3])


def test_padding_never_reaches_real_tokens(tmp_path, pbmc):
    """A cell's hidden states are the same alone and padded in a batch with longer cells, at every
    layer; hooks see dense tensors in eval mode (no nested-tensor fast path)."""
    cells = pbmc[:6, :300]
    adapter = ScGPTAdapter.from_pretrained(tiny_checkpoint(tmp_path, list(cells.var_names), max_seq_len=1200))
    tokens = adapter.tokenize(cells)
    shortest = int(np.argmin(tokens.lengths))
    batch = tokens.collate(np.arange(len(tokens)))
    assert batch.padding_mask[shortest].any()
    together = adapter.capture(batch, [0, 1, 2])
    alone = adapter.capture(tokens.collate(np.array([shortest])), [0, 1, 2])
    n = int(tokens.lengths[shortest])
    for layer in (0, 1, 2):
        assert not together[layer].is_nested
        torch.testing.assert_close(together[layer][shortest, :n], alone[layer][0], atol=1e-5, rtol=1e-5)


def test_extract_several_layers_in_one_pass(tmp_path, pbmc):
    """One pass writes a store per layer; stored rows are exactly the gene tokens' hidden states."""
    from sae4scfm.store.extract import extract_activations

    cells = pbmc[:20]
    adapter = ScGPTAdapter.from_pretrained(tiny_checkpoint(tmp_path, list(cells.var_names)))
    tokens = adapter.tokenize(cells)
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


def test_random_init_keeps_architecture_and_redraws_weights(tmp_path, pbmc):
    path = tiny_checkpoint(tmp_path, list(pbmc.var_names[:50]))
    trained = ScGPTAdapter.from_pretrained(path).model.state_dict()
    torch.manual_seed(5)
    control = ScGPTAdapter.from_pretrained(path, random_init=True).model.state_dict()
    torch.manual_seed(5)
    again = ScGPTAdapter.from_pretrained(path, random_init=True).model.state_dict()
    assert {k: v.shape for k, v in control.items()} == {k: v.shape for k, v in trained.items()}
    assert not torch.equal(control["transformer_encoder.layers.0.linear1.weight"],
                           trained["transformer_encoder.layers.0.linear1.weight"])
    emb = control["encoder.embedding.weight"]
    assert emb.abs().max() <= 0.1 and emb[0].abs().sum() > 0  # official init: uniform ±0.1, pad row too
    assert all(torch.equal(control[k], again[k]) for k in control)  # reproducible under a seed


def test_options_are_checked(tmp_path, pbmc):
    path = tiny_checkpoint(tmp_path, list(pbmc.var_names[:50]))
    with pytest.raises(InputError, match="scfm.max_len is not an option"):
        ScGPTAdapter.from_pretrained(path, max_len=10)
    with pytest.raises(InputError, match="scfm.mask_ratio=1.5"):
        ScGPTAdapter.from_pretrained(path, mask_ratio=1.5)
    cfg = sae4scfm.compose("train", ["scfm=scgpt_human", f"scfm.checkpoint_dir={path}"]).scfm
    with pytest.raises(InputError, match=r"d_model=32 \(expected 512\), n_layers=2 \(expected 12\)"):
        load_scfm(cfg)
    cfg = sae4scfm.compose("train", ["scfm=scgpt", f"scfm.checkpoint_dir={path}", "scfm.mask_ratio=0.25",
                                     "scfm.architecture={n_layers:2}"]).scfm
    adapter = load_scfm(cfg)
    assert adapter.n_layers == 2 and adapter.mask_ratio == 0.25


def test_pipeline_and_steering_on_an_official_folder(tmp_path, pbmc):
    """scfm=scgpt on an official-layout folder: train an SAE, write features, score labels, steer."""
    from sae4scfm.causal.steering import steer
    from sae4scfm.saes.base import load_sae

    ckpt = tiny_checkpoint(tmp_path / "ckpt", list(pbmc.var_names), max_seq_len=128)
    runs, stores = tmp_path / "runs", tmp_path / "stores"
    cfg = sae4scfm.compose("train", [
        "scfm=scgpt", f"scfm.checkpoint_dir={ckpt}", "data=pbmc", "data.n_cells=60", "sae=topk",
        "sae.target_layer=1", "sae.dictionary_multiplier=2", "sae.hyperparams.k=8", "train.n_epochs=1",
        "train.batch_size=256", "wandb.mode=disabled", f"runs_dir={runs}", f"buffer.store_dir={stores}",
        "experiment=x"])
    run_dir = sae4scfm.train(cfg)
    meta = json.loads((run_dir / "cfg.json").read_text())
    assert meta["d_in"] == 32 and meta["d_sae"] == 64 and meta["layer"] == 1
    ev = json.loads((run_dir / "eval.json").read_text())
    assert np.isfinite(ev["fvu"]) and 0 < ev["fvu"] < 1.5 and ev["l0"] <= 8 + 1e-6
    assert np.isfinite(ev["loss_clean"]) and ev["loss_clean"] > 0

    address = [f"runs_dir={runs}", "sae_checkpoint.experiment=x", f"sae_checkpoint.timestamp={run_dir.name}"]
    sae4scfm.generate_features(sae4scfm.compose("features", address))
    feats = ad.read_h5ad(run_dir / "features" / "features.h5ad")
    token_feats = ad.read_h5ad(run_dir / "features" / "token_features.h5ad")
    assert feats.shape == (60, 64) and sp.issparse(feats.X)
    assert token_feats.n_obs == 60 * 127 and not token_feats.obs["gene"].isin(["<cls>", "<pad>"]).any()
    table = sae4scfm.analyze_features(sae4scfm.compose("analyze", [*address, "analysis.run_label_scoring=true"]))
    assert table.index.name == "feature_id" and "label_scoring" in table.columns.get_level_values(0)

    adapter = load_scfm(cfg.scfm)
    sae, _ = load_sae(run_dir)
    batch = adapter.tokenize(pbmc[:8]).collate(np.arange(8))
    hidden = adapter.capture(batch, [1])[1][batch.gene_mask]
    feature = int(sae.encode(hidden).sum(0).argmax())
    clean, steered = steer(adapter, sae, 1, batch, {feature: 0.0})  # ablate the most active feature
    genes = batch.gene_mask
    assert not torch.allclose(clean["mlm"][genes], steered["mlm"][genes])
    assert not torch.allclose(clean["cell_emb"], steered["cell_emb"])
    same, unchanged = steer(adapter, sae, 1, batch, {})
    for key in clean:
        assert torch.equal(same[key], unchanged[key]) and torch.equal(same[key], clean[key]), key


def test_gene_count_log_reports_the_hvg_subset(tmp_path, pbmc, caplog):
    """With subset_hvg the log line names the highly variable genes the model reads, not only the vocabulary."""
    adapter = ScGPTAdapter.from_pretrained(tiny_checkpoint(tmp_path, list(pbmc.var_names)))
    with caplog.at_level(logging.INFO, logger="sae4scfm.data"):
        tokens = adapter.tokenize(pbmc, subset_hvg=True, n_hvg=500, source="data=pbmc")
    lines = [r.getMessage() for r in caplog.records if "genes are in the model vocabulary" in r.getMessage()]
    assert lines == ["data=pbmc: 765 of 765 genes are in the model vocabulary; 500 highly variable used"]
    assert len(np.unique(tokens.gene_ids[~tokens.special])) <= 500
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="sae4scfm.data"):
        adapter.tokenize(pbmc[:, :700], source="data=pbmc")
    assert [r.getMessage() for r in caplog.records] == ["data=pbmc: 700 of 700 genes are in the model vocabulary"]
