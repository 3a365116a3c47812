"""The scGPT adapter against the official implementation (the ``scgpt`` 0.2.4 wheel, installed --no-deps).

The wheel's ``scgpt/__init__`` imports torchtext, which does not work with current torch,
so its modules are loaded by file path under stub parent packages; only
``torchtext.vocab.Vocab`` is stubbed (the tokenizer module subclasses it at import; the
functions used here only index the vocabulary, a dict). flash-attn is absent, so the
official model takes its torch attention path, as on any CPU machine.

Model: the same tiny random-weight checkpoint, written in the official folder layout,
is loaded into ``TransformerModel`` (via the official ``load_pretrained``) and through
our ``from_pretrained``; outputs and every layer's hidden state agree to 1e-5 (fp32).
Tokens: the official ``Preprocessor`` + ``tokenize_and_pad_batch`` (and the
``embed_data`` collator) on scanpy's PBMC cells give exactly our token ids, values and
lengths when our random draws come from ``np.random.RandomState(s)`` and theirs from
``np.random.seed(s)``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from sae4scfm.data import load_pbmc
from sae4scfm.errors import InputError
from sae4scfm.scfm.scgpt import ScGPTAdapter, ScGPTConfig, masked_value_loss, random_value_mask, tokenize_cells
from sae4scfm.scfm.tokens import Batch

SCGPT_DIR = Path(importlib.util.find_spec("scgpt").origin).parent  # find_spec does not run scgpt/__init__
OFFICIAL_MODULES = {"model": "model/model.py", "util": "utils/util.py", "preprocess": "preprocess.py",
                    "data_collator": "data_collator.py", "loss": "loss.py",
                    "gene_tokenizer": "tokenizer/gene_tokenizer.py"}
SPECIALS = ["<pad>", "<cls>", "<eoc>"]
pytestmark = pytest.mark.filterwarnings("ignore:flash-attn is not installed", "ignore:The PyTorch API of nested tensors")


@pytest.fixture(scope="module")
def official():
    """The official modules; sys.modules is left as it was."""
    before = set(sys.modules)
    loaded = {}
    with pytest.MonkeyPatch.context() as mp:
        root = types.ModuleType("scgpt")
        root.__path__ = [str(SCGPT_DIR)]
        root.logger = logging.getLogger("scGPT")
        mp.setitem(sys.modules, "scgpt", root)
        for sub in ("model", "utils", "tokenizer"):  # parent packages without their __init__
            package = types.ModuleType(f"scgpt.{sub}")
            package.__path__ = [str(SCGPT_DIR / sub)]
            mp.setitem(sys.modules, f"scgpt.{sub}", package)
        torchtext, torchtext_vocab = types.ModuleType("torchtext"), types.ModuleType("torchtext.vocab")
        torchtext_vocab.Vocab = type("Vocab", (), {})
        torchtext.vocab = torchtext_vocab
        mp.setitem(sys.modules, "torchtext", torchtext)
        mp.setitem(sys.modules, "torchtext.vocab", torchtext_vocab)
        for name, rel in OFFICIAL_MODULES.items():
            full = "scgpt." + rel[:-3].replace("/", ".")
            spec = importlib.util.spec_from_file_location(full, SCGPT_DIR / rel)
            module = importlib.util.module_from_spec(spec)
            mp.setitem(sys.modules, full, module)
            with warnings.catch_warnings():  # model.py warns "flash_attn is not installed"
                warnings.simplefilter("ignore")
                spec.loader.exec_module(module)
            loaded[name] = module
    for name in set(sys.modules) - before:  # siblings imported through the stubs (dsbn, grad_reverse)
        if name.startswith("scgpt"):
            del sys.modules[name]
    return types.SimpleNamespace(**loaded)


@pytest.fixture(scope="module")
def pbmc():
    return load_pbmc()


def pbmc_vocab(adata) -> dict[str, int]:
    return {t: i for i, t in enumerate([*SPECIALS, *adata.var_names])}


# ------------------------------------------------------------------------------- model

WHOLE_HUMAN_ARGS = {  # the field set of the published whole-human args.json, with tiny sizes
    "data_source": "/scratch/cellxgene/scb_strict/human", "save_dir": "/scratch/save", "load_model": None,
    "n_hvg": None, "valid_size_or_ratio": 0.003, "dist_backend": "nccl", "grad_accu_steps": 1,
    "pad_token": "<pad>", "input_style": "binned", "input_emb_style": "continuous", "n_bins": 51,
    "max_seq_len": 300, "training_tasks": "both", "mask_ratio": [0.25, 0.5, 0.75], "trunc_by_sample": True,
    "vocab_path": "default_census_vocab.json", "rank": 0, "batch_size": 32, "eval_batch_size": 64, "epochs": 6,
    "lr": 0.0001, "scheduler_interval": 100, "scheduler_factor": 0.99, "warmup_ratio_or_step": 10000.0,
    "no_cls": True, "no_cce": True, "fp16": True, "fast_transformer": True, "nlayers": 3, "nheads": 4,
    "embsize": 32, "d_hid": 48, "dropout": 0.2, "n_layers_cls": 3, "log_interval": 9000,
    "save_interval": 27000, "mask_value": -1, "pad_value": -2, "USE_CLS": False, "USE_CCE": False, "MVC": True,
    "USE_GENERATIVE_TRAINING": True, "world_size": 16, "distributed": True, "local_rank": 0, "gpu": 0,
}

# name: (TransformerModel kwargs, attention key layout, drop cls_decoder, extra keys)
VARIANTS = {
    # published whole-human / organ models: flash-attention names, no cell-type head, one key the
    # 0.2.4 model does not have (flag_encoder, from the generative pretraining)
    "whole_human": (dict(do_mvc=True, use_fast_transformer=True), "self_attn.Wqkv.", True,
                    {"flag_encoder.weight": (3, 32)}),
    # a cell-type annotation fine-tune (tutorial): no GEPC head, a 4-class cls_decoder, torch names
    "annotation": (dict(do_mvc=False, n_cls=4, nlayers_cls=3), "self_attn.in_proj_", False, {}),
    # an integration fine-tune without batch labels: zero-probability heads and the batch discriminator
    # (a head on cell_emb that changes no output)
    "zero_prob": (dict(do_mvc=True, explicit_zero_prob=True, do_dab=True, num_batch_labels=3), "self_attn.Wqkv.",
                  False, {}),
}


def official_checkpoint(official, root: Path, vocab: dict, *, args: dict | None = None, seed: int = 0,
                        **model_kwargs):
    """Write a random-weight checkpoint in the official layout; returns the official model's kwargs.

    Weights: the official model's init plus noise on every tensor (LayerNorms away from 1/0).
    """
    kwargs = dict(ntoken=len(vocab), d_model=32, nhead=4, d_hid=48, nlayers=3, vocab=vocab, dropout=0.2,
                  pad_token="<pad>", pad_value=-2)
    kwargs.update(model_kwargs)
    torch.manual_seed(seed)
    state = {k: v + 0.05 * torch.randn(v.shape) if v.is_floating_point() else v
             for k, v in official.model.TransformerModel(**kwargs).state_dict().items()}
    root.mkdir(parents=True, exist_ok=True)
    torch.save(state, root / "best_model.pt")
    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "args.json").write_text(json.dumps(args or {
        "embsize": 32, "nheads": 4, "d_hid": 48, "nlayers": 3, "n_layers_cls": 3, "dropout": 0.2,
        "pad_token": "<pad>", "pad_value": -2, "mask_value": -1, "n_bins": 51, "max_seq_len": 300}))
    return kwargs


def official_layout(root: Path, attention: str, drop_cls: bool, extra: dict) -> None:
    """Rewrite best_model.pt with the published key layout of a variant."""
    state = torch.load(root / "best_model.pt", weights_only=True)
    renamed = {}
    for k, v in state.items():
        if not (drop_cls and k.startswith("cls_decoder.")):
            renamed[k.replace("self_attn.in_proj_", attention)] = v
    torch.manual_seed(1)
    renamed.update({k: torch.randn(shape) for k, shape in extra.items()})
    torch.save(renamed, root / "best_model.pt")


def run_official(model, batch: Batch, pad_id: int, *, nested: bool, cls: bool) -> tuple[dict, dict]:
    """Official forward (eval, no grad) with every layer's hidden state hooked: (outputs, {layer: [B, T, d]})."""
    model.transformer_encoder.use_nested_tensor = nested
    hidden = {}
    layers = model.transformer_encoder.layers
    handles = [layers[0].register_forward_pre_hook(lambda m, args: hidden.__setitem__(0, args[0]))]
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_hook(lambda m, a, out, i=i: hidden.__setitem__(i + 1, out)))
    try:
        with torch.no_grad():
            out = model(batch.gene_ids, batch.values, batch.gene_ids.eq(pad_id), CLS=cls,
                        MVC=hasattr(model, "mvc_decoder"))
    finally:
        for h in handles:
            h.remove()
    return out, hidden


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_forward_and_hidden_states_match_official(official, pbmc, tmp_path, caplog, variant):
    model_kwargs, attention, drop_cls, extra = VARIANTS[variant]
    cells = pbmc[:10, :200]  # ~40-100 expressed genes per cell: short, unequal lengths
    vocab = pbmc_vocab(cells)
    args = WHOLE_HUMAN_ARGS if variant == "whole_human" else None
    kwargs = official_checkpoint(official, tmp_path, vocab, args=args, **model_kwargs)
    official_layout(tmp_path, attention, drop_cls, extra)

    reference = official.model.TransformerModel(**kwargs)  # flash-attn absent: torch path, as on CPU
    official.util.load_pretrained(reference, torch.load(tmp_path / "best_model.pt", weights_only=True), verbose=False)
    reference.eval()
    with caplog.at_level(logging.WARNING):
        ours = ScGPTAdapter.from_pretrained(tmp_path)
    unused = {"whole_human": "flag_encoder.weight", "annotation": None,
              "zero_prob": "grad_reverse_discriminator"}[variant]
    if unused:
        assert unused in caplog.text  # reported, not silently dropped
    assert ours.cfg.do_mvc == model_kwargs["do_mvc"]
    assert ours.cfg.n_cls == (0 if drop_cls else model_kwargs.get("n_cls", 1))

    tokens = ours.tokenize(cells)
    clean = tokens.collate(np.arange(len(tokens)))
    assert clean.padding_mask.any() and torch.equal(clean.padding_mask, clean.gene_ids.eq(vocab["<pad>"]))
    masked = torch.rand(clean.gene_ids.shape, generator=torch.Generator().manual_seed(0)) < 0.3
    batch = Batch(clean.gene_ids, clean.values.masked_fill(masked & clean.gene_mask, -1.0), clean.padding_mask,
                  clean.gene_mask, clean.cell_index)  # some inputs at mask_value, as in training
    has_cls = not drop_cls

    hidden = ours.capture(batch, list(range(4)))
    with torch.no_grad():
        out = ours.run(batch)
    ref_out, ref_hidden = run_official(reference, batch, vocab["<pad>"], nested=False, cls=has_cls)
    close = dict(atol=1e-5, rtol=0)
    for layer in range(4):  # every position, padding included
        torch.testing.assert_close(hidden[layer], ref_hidden[layer], **close)
    torch.testing.assert_close(out["mlm"], ref_out["mlm_output"], **close)
    torch.testing.assert_close(out["cell_emb"], ref_out["cell_emb"], **close)
    pairs = {"mvc": "mvc_output", "mlm_zero_probs": "mlm_zero_probs", "mvc_zero_probs": "mvc_zero_probs",
             "cls_output": "cls_output"}
    for ours_key, ref_key in pairs.items():
        assert (ours_key in out) == (ref_key in ref_out), ours_key
        if ours_key in out:
            torch.testing.assert_close(out[ours_key], ref_out[ref_key], **close)

    # the official default: nn.TransformerEncoder packs padded batches into nested tensors in eval mode,
    # so layer hooks see NestedTensors; outputs at real tokens are unchanged
    ref_out, ref_hidden = run_official(reference, batch, vocab["<pad>"], nested=True, cls=has_cls)
    assert ref_hidden[1].is_nested
    real = ~batch.padding_mask
    torch.testing.assert_close(out["mlm"][real], ref_out["mlm_output"][real], **close)
    torch.testing.assert_close(out["cell_emb"], ref_out["cell_emb"], **close)

    # the masked-value loss: official fine-tuning criterion, summed over masked positions
    mask = random_value_mask(clean, 0.4, torch.Generator().manual_seed(2))
    with torch.no_grad():
        loss, n = masked_value_loss(ours.model, clean, mask)
        ref = reference(clean.gene_ids, clean.values.masked_fill(mask, -1.0), clean.padding_mask,
                        MVC=hasattr(reference, "mvc_decoder"))
    expected = official.loss.masked_mse_loss(ref["mlm_output"], clean.values, mask)
    if "mvc_output" in ref:
        expected = expected + official.loss.masked_mse_loss(ref["mvc_output"], clean.values, mask)
    for key in ("mlm_zero_probs", "mvc_zero_probs"):
        if key in ref:
            expected = expected + official.loss.criterion_neg_log_bernoulli(ref[key], clean.values, mask)
    assert abs(float(loss) / int(n) - float(expected)) < 1e-5 * max(1.0, float(expected))


UNSUPPORTED = {  # official option -> (TransformerModel kwargs, args.json changes, error text)
    "batch_labels": (dict(use_batch_labels=True, num_batch_labels=2), {}, "use_batch_labels"),
    "dsbn": (dict(domain_spec_batchnorm=True, num_batch_labels=2), {}, "DSBN"),
    "batchnorm": (dict(domain_spec_batchnorm="batchnorm"), {}, "batchnorm"),
    "category": (dict(input_emb_style="category", n_input_bins=53, pad_value=51), {}, "category"),
    "concat_query": (dict(do_mvc=True, mvc_decoder_style="concat query"), {}, "concat query"),
    "avg_pool": ({}, {"cell_emb_style": "avg-pool"}, "cell_emb_style"),
    "pre_norm": ({}, {"pre_norm": True}, "pre_norm"),
    "log1p_input": ({}, {"input_style": "log1p"}, "input_style"),
}


@pytest.mark.parametrize("option", list(UNSUPPORTED))
def test_unsupported_official_options_are_clear_errors(official, pbmc, tmp_path, option):
    model_kwargs, args_changes, message = UNSUPPORTED[option]
    official_checkpoint(official, tmp_path, pbmc_vocab(pbmc[:, :40]), **model_kwargs)
    args = json.loads((tmp_path / "args.json").read_text())
    (tmp_path / "args.json").write_text(json.dumps({**args, **args_changes}))
    with pytest.raises(InputError, match=message):
        ScGPTAdapter.from_pretrained(tmp_path)


# ------------------------------------------------------------------------------- tokens


def official_tokens(official, adata, vocab, *, seed: int, max_len: int, n_bins: int = 51):
    """Official Preprocessor (normalize_total 1e4, log1p, binning) + tokenize_and_pad_batch, seeded globally."""
    adata = adata.copy()
    np.random.seed(seed)
    official.preprocess.Preprocessor(
        use_key="X", normalize_total=1e4, result_normed_key="X_normed", log1p=True, result_log1p_key="X_log1p",
        subset_hvg=False, binning=n_bins, result_binned_key="X_binned")(adata)
    gene_ids = np.array([vocab[g] for g in adata.var_names])
    padded = official.gene_tokenizer.tokenize_and_pad_batch(
        adata.layers["X_binned"], gene_ids, max_len=max_len, vocab=vocab, pad_token="<pad>", pad_value=-2,
        append_cls=True, include_zero_gene=False, cls_token="<cls>", return_pt=True)
    return padded, adata


def celltypist_sample(n_cells: int = 80):
    """The first cells of celltypist's bundled raw-count sample (the package is located, not imported)."""
    import importlib.util
    from pathlib import Path

    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    path = Path(importlib.util.find_spec("celltypist").origin).parent / "data" / "samples" / "sample_cell_by_gene.csv"
    df = pd.read_csv(path, index_col=0, nrows=n_cells)
    return ad.AnnData(X=sp.csr_matrix(df.to_numpy(np.float32)), obs=pd.DataFrame(index=df.index),
                      var=pd.DataFrame(index=df.columns))


@pytest.mark.parametrize(("data", "max_len"), [("pbmc", 200), ("pbmc", 1200), ("celltypist", 300),
                                               ("celltypist", 3000)])  # small max_len: cells are sampled down
def test_tokens_equal_official_preprocessing_seed_for_seed(official, pbmc, data, max_len):
    adata = pbmc if data == "pbmc" else celltypist_sample()
    vocab = pbmc_vocab(adata)
    cfg = ScGPTConfig(n_tokens=len(vocab), max_seq_len=max_len)
    padded, _ = official_tokens(official, adata, vocab, seed=7, max_len=max_len)
    # tokenize_and_pad_batch gives <cls> the value 0 (tutorials); pretraining and embed_data give it pad_value
    ours = tokenize_cells(adata, vocab, cfg, np.random.RandomState(7), cls_value=0)
    batch = ours.collate(np.arange(len(ours)))
    assert torch.equal(batch.gene_ids, padded["genes"])
    assert torch.equal(batch.values, padded["values"])
    np.testing.assert_array_equal(ours.lengths, (padded["genes"] != vocab["<pad>"]).sum(1).numpy())
    if max_len < 1000:
        assert (ours.lengths == max_len).mean() > 0.5


def test_tokens_equal_official_embed_data_collator(official, pbmc):
    """The cell-embedding path (``embed_data``): raw counts, <cls> = pad_value, binning in the collator."""
    vocab = pbmc_vocab(pbmc)
    X, gene_ids = pbmc.X.toarray(), np.array([vocab[g] for g in pbmc.var_names])
    examples = []
    for i, row in enumerate(X):  # as get_batch_cell_embeddings' Dataset.__getitem__
        nz = np.nonzero(row)[0]
        examples.append({"id": i, "genes": torch.from_numpy(np.insert(gene_ids[nz], 0, vocab["<cls>"])).long(),
                         "expressions": torch.from_numpy(np.insert(row[nz], 0, -2)).float()})
    collator = official.data_collator.DataCollator(
        do_padding=True, pad_token_id=vocab["<pad>"], pad_value=-2, do_mlm=False, do_binning=True,
        max_length=1200, sampling=True, keep_first_n_tokens=1)
    np.random.seed(3)
    padded = collator(examples)
    # binning is per-cell ranks: normalise + log1p (ours) and raw counts (embed_data) give the same bins
    ours = tokenize_cells(pbmc, vocab, ScGPTConfig(n_tokens=len(vocab)), np.random.RandomState(3))
    batch = ours.collate(np.arange(len(ours)))
    assert torch.equal(batch.gene_ids, padded["gene"]) and torch.equal(batch.values, padded["expr"])


def test_adapter_tokens_match_official_rule_with_its_own_stream(official, pbmc, tmp_path):
    """adapter.tokenize draws from default_rng(seed): ids and lengths equal the official ones; values equal
    them wherever the official bin is determined, and tie-broken values follow the same distribution."""
    vocab = pbmc_vocab(pbmc)
    official_checkpoint(official, tmp_path, vocab, args={**WHOLE_HUMAN_ARGS, "max_seq_len": 1200})
    adapter = ScGPTAdapter.from_pretrained(tmp_path, cls_value=0)
    padded, binned = official_tokens(official, pbmc, vocab, seed=0, max_len=1200)
    batch = adapter.tokenize(pbmc, seed=0).collate(np.arange(pbmc.n_obs))
    assert torch.equal(batch.gene_ids, padded["genes"])
    log1p = binned.layers["X_log1p"]
    log1p = log1p.toarray() if sp.issparse(log1p) else np.asarray(log1p)
    lower, upper, ours_v, ref_v = [], [], [], []
    for i in range(pbmc.n_obs):  # bin range of every token from the official per-cell edges
        edges = binned.obsm["bin_edges"][i, 1:]
        n = int((~batch.padding_mask[i]).sum())
        x = log1p[i][np.nonzero(binned.layers["X_binned"][i])[0]]
        upper.append(np.digitize(x, edges))  # number of edges <= x
        lower.append(np.digitize(x, edges, right=True))  # number of edges < x
        ours_v.append(batch.values[i, 1:n].numpy())
        ref_v.append(padded["values"][i, 1:n].numpy())
    lower, upper, ours_v, ref_v = map(np.concatenate, (lower, upper, ours_v, ref_v))
    fixed = lower == upper
    np.testing.assert_array_equal(ours_v[fixed], ref_v[fixed])
    tied = ~fixed
    assert tied.sum() > 10_000
    for v in (ours_v, ref_v):  # ceil(upper - U (upper - lower)): uniform on lower+1..upper
        assert np.all((v[tied] >= lower[tied] + 1) & (v[tied] <= upper[tied]))
    position = lambda v: ((v[tied] - lower[tied] - 1) / np.maximum(upper[tied] - lower[tied] - 1, 1)).mean()
    assert abs(position(ours_v) - position(ref_v)) < 0.01  # ~165k tied tokens: sd of the gap ~0.001


def test_value_masks_follow_official_rules(official, pbmc):
    """random_value_mask = the pretraining collator's rule (Bernoulli over gene tokens; never <cls> or
    padding); the tutorials' random_mask_value draws exactly int(n_genes * ratio) from the same tokens."""
    vocab = pbmc_vocab(pbmc)
    tokens = tokenize_cells(pbmc[:200], vocab, ScGPTConfig(n_tokens=len(vocab)), np.random.default_rng(0))
    batch = tokens.collate(np.arange(len(tokens)))
    collator = official.data_collator.DataCollator(
        pad_token_id=vocab["<pad>"], pad_value=-2, mlm_probability=0.9, mask_value=-1, max_length=1200)
    torch.manual_seed(0)
    ever_masked = torch.zeros_like(batch.gene_mask)
    for _ in range(10):
        ever_masked |= collator._mask(batch.values).eq(-1)
    assert torch.equal(ever_masked, batch.gene_mask)  # eligible positions: exactly the gene tokens

    ratio, n_genes = 0.4, batch.gene_mask.sum(1)
    ours = random_value_mask(batch, ratio, torch.Generator().manual_seed(0))
    assert not (ours & ~batch.gene_mask).any()
    assert abs(float(ours.sum()) / float(n_genes.sum()) - ratio) < 0.01
    np.random.seed(0)
    tutorial = official.gene_tokenizer.random_mask_value(batch.values, mask_ratio=ratio, mask_value=-1, pad_value=-2)
    tutorial_mask = tutorial.eq(-1)
    assert not (tutorial_mask & ~batch.gene_mask).any()
    assert tutorial_mask.sum(1).tolist() == [int(n * ratio) for n in n_genes.tolist()]
