"""The AIDO.Cell adapter against the official modelgenerator 0.1.3 code (wheel installed --no-deps).

The official model and preprocessing are loaded from the wheel's files by path; what
they import but this environment lacks is stubbed where unavoidable (named below).
Checkpoints are tiny seeded random-weight ``CellFoundationForMaskedLM`` models written
in the official Hugging Face layout; cells always have the real 19,264 genes.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import sys
import types
from functools import lru_cache
from pathlib import Path
from typing import Optional, Union

import anndata as ad
import celltypist  # noqa: E402  test-only, installed with --no-deps (.ci/run)
import modelgenerator  # noqa: E402
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from safetensors.torch import save_file

import sae4scfm
from sae4scfm.data import load_pbmc
from sae4scfm.errors import InputError
from sae4scfm.scfm.aido_cell import AIDOCellAdapter
from sae4scfm.scfm.aido_cell.model import AIDOCellConfig, AIDOCellModel, SelfAttention
from sae4scfm.scfm.aido_cell.preprocess import AIDOCellTokens, model_genes

MG = Path(modelgenerator.__file__).parent
GENE_TSV = MG / "cell" / "gene_lists" / "OS_scRNA_gene_index.19264.tsv"
CELLTYPIST_SAMPLE = Path(celltypist.__file__).parent / "data" / "samples" / "sample_cell_by_gene.csv"
N_GENES = 19264
SEQ = N_GENES + 2
TINY = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24)


# ------------------------------------------------------------------ the official code


@lru_cache(maxsize=1)
def official():
    """modeling_cellfoundation.py, imported by path as a private package. transformers 5 dropped
    two helpers it imports for head pruning (never called here): they are stubbed during import."""
    folder = MG / "huggingface_models" / "cellfoundation"
    package = types.ModuleType("_official_cellfoundation")
    package.__path__ = [str(folder)]
    sys.modules[package.__name__] = package
    spec = importlib.util.spec_from_file_location(f"{package.__name__}.modeling_cellfoundation",
                                                  folder / "modeling_cellfoundation.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    import transformers.pytorch_utils as pytorch_utils

    with pytest.MonkeyPatch.context() as mp:
        for name in ("find_pruneable_heads_and_indices", "prune_linear_layer"):
            mp.setattr(pytorch_utils, name, None, raising=False)
        spec.loader.exec_module(module)
    return module


def official_config(**sizes):
    """The official config; the last four fields are defaults transformers 5 no longer provides."""
    cfg_module = sys.modules[f"{official().__name__.rsplit('.', 1)[0]}.configuration_cellfoundation"]
    return cfg_module.CellFoundationConfig(
        **{**TINY, **sizes}, max_position_embeddings=N_GENES, _use_flash_attention_2=True,
        is_decoder=False, add_cross_attention=False, chunk_size_feed_forward=0, pruned_heads={})


def official_model(seed: int = 0, **sizes):
    """A seeded official CellFoundationForMaskedLM with every parameter random (N(0, 0.3)), so
    biases and norm weights are exercised too."""
    torch.manual_seed(seed)
    model = official().CellFoundationForMaskedLM(official_config(**sizes)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


def write_checkpoint(folder: Path, model) -> Path:
    """The official Hugging Face layout: config.json + pytorch_model.bin (raw state dict)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(model.config.to_json_string())
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return folder


def correct_attention(self, hidden_states, *args, **kwargs):
    """Per-head softmax(q kᵀ/√d) v over tokens, with the official module's own projections."""
    B, T, _ = hidden_states.shape
    q, k, v = (proj(hidden_states).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
               for proj in (self.query, self.key, self.value))
    return (torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, -1),)


def official_forward(model, values: torch.Tensor, positions=None) -> dict:
    """The official CellFoundationForMaskedLM forward with correct attention. Two stand-ins: the
    3-D attention mask it builds is never read by its attention (so a placeholder avoids a
    [B, 1, T, T] float tensor of 3 GB), and get_head_mask is gone from transformers 5."""
    module = official()
    for layer in model.bert.encoder.layer:
        layer.attention.self.forward = types.MethodType(correct_attention, layer.attention.self)
    model.bert.get_head_mask = lambda head_mask, n_layers: [None] * n_layers
    last_block = []
    handle = model.bert.encoder.layer[-1].register_forward_hook(lambda m, i, out: last_block.append(out[0]))
    with pytest.MonkeyPatch.context() as mp, torch.no_grad():
        mp.setattr(module, "bert_extended_attention_mask", lambda mask: torch.zeros((), dtype=torch.bool))
        out = model(input_ids=values, position_ids=positions, output_hidden_states=True)
    handle.remove()
    resid = [*out.hidden_states[:-1], last_block[0]]  # embeddings, block outputs before the final norm
    return {"pred": out.logits[..., 0], "hidden": out.hidden_states[-1], "resid": resid}


@lru_cache(maxsize=1)
def official_preprocessing():
    """(align_genes, backbone forward) of the wheel. cell/utils.py imports bionty (symbol -> Ensembl
    mapping, not used with ensembl_field=None) and lightning (a logger): both stubbed for the import.
    The backbone's forward is compiled from backbones.py's source (the module needs lightning, peft
    and the task stack); it runs with a stand-in encoder that records its input."""
    stubs = {name: types.ModuleType(name) for name in
             ("bionty", "lightning", "lightning.pytorch", "lightning.pytorch.utilities")}
    stubs["lightning.pytorch.utilities"].rank_zero_info = lambda *args, **kwargs: None
    spec = importlib.util.spec_from_file_location("_official_cell_utils", MG / "cell" / "utils.py")
    cell_utils = importlib.util.module_from_spec(spec)
    with pytest.MonkeyPatch.context() as mp:
        for name, stub in stubs.items():
            mp.setitem(sys.modules, name, stub)
        spec.loader.exec_module(cell_utils)
    source = MG / "backbones" / "backbones.py"
    tree = ast.parse(source.read_text())
    backbone = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "GenBioCellFoundation")
    forward = next(n for n in backbone.body if isinstance(n, ast.FunctionDef) and n.name == "forward")
    namespace = {"torch": torch, "Tensor": torch.Tensor, "Optional": Optional, "Union": Union,
                 "SequenceBackboneOutput": lambda **kwargs: kwargs}
    exec(compile(ast.Module(body=[forward], type_ignores=[]), str(source), "exec"), namespace)
    return cell_utils.align_genes, namespace["forward"]


def official_inputs(adata: ad.AnnData) -> np.ndarray:
    """The official model input [cells, 19,266] of raw counts ``adata`` (bfloat16 -> float32)."""
    align_genes, backbone_forward = official_preprocessing()
    genes = pd.read_csv(GENE_TSV, sep="\t")["gene_name"].to_numpy(dtype=str)  # str, not object: numpy's isin
    aligned = align_genes(adata.copy(), genes, ensembl_field=None)            # is quadratic on object arrays
    X = aligned.X.toarray() if sp.issparse(aligned.X) else np.asarray(aligned.X)
    seen = {}

    def encoder(input_ids, attention_mask=None, output_hidden_states=True):
        seen["input"] = input_ids
        return types.SimpleNamespace(last_hidden_state=input_ids[..., None], hidden_states=())

    backbone_forward(types.SimpleNamespace(encoder=encoder), input_ids=torch.tensor(X, dtype=torch.float32))
    assert seen["input"].dtype == torch.bfloat16
    return seen["input"].float().numpy()


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(checkpoint folder, official model) of the 2-layer, 16-wide, 2-head LayerNorm checkpoint."""
    model = official_model(seed=0, normalization_type="LayerNorm")
    return write_checkpoint(tmp_path_factory.mktemp("aido_tiny"), model), model


def test_gene_list_is_the_official_order():
    assert model_genes() == tuple(pd.read_csv(GENE_TSV, sep="\t")["gene_name"])


def test_adapters_import_no_official_package():
    """No family's adapter (nor extraction, steering, analysis) imports the official code at run time."""
    import subprocess

    official = {"modelgenerator", "transformers", "lightning", "scgpt", "local_attention", "datasets", "celltypist",
                "torchtext", "flash_attn"}
    code = ("import sys, sae4scfm.scfm.aido_cell, sae4scfm.scfm.geneformer, sae4scfm.scfm.scfoundation, "
            "sae4scfm.scfm.scgpt, sae4scfm.causal, sae4scfm.store, sae4scfm.analysis.analyze; "
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {official!r}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("norm", ["LayerNorm", "RMSNorm"])
def test_state_dict_keys_and_forward_match_official(norm):
    """Same keys; on short random sequences (mask values included) the same outputs and residual
    stream at every layer as the official model with correct attention."""
    reference = official_model(seed=1, normalization_type=norm)
    ours = AIDOCellModel(AIDOCellConfig.from_json(json.loads(reference.config.to_json_string()), "cfg")).eval()
    assert list(ours.state_dict()) == list(reference.state_dict())
    ours.load_state_dict(reference.state_dict())
    values = torch.rand(3, 40) * 6
    values[0, 3] = values[2, 11] = -1.0  # masked inputs
    positions = torch.arange(40).expand(3, 40)
    resid = []
    hooks = [h.register_forward_hook(lambda m, i, out: resid.append(out)) for h in ours.hook_resid]
    with torch.no_grad():
        out = ours(values, positions)
    for h in hooks:
        h.remove()
    ref = official_forward(reference, values)
    torch.testing.assert_close(out["pred"], ref["pred"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["hidden"], ref["hidden"], atol=1e-5, rtol=1e-5)
    assert len(resid) == len(ref["resid"]) == 3
    for got, want in zip(resid, ref["resid"]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_official_fallback_attends_across_heads_ours_across_tokens():
    """Without flash-attn the official attention calls SDPA on [B·T, heads, d_head]: it attends over
    the heads of one token. Ours equals the per-head softmax(QKᵀ/√d)V reference across tokens."""
    module = official()
    assert "flash_attn_varlen_func" not in vars(module)  # so the fallback is what runs
    torch.manual_seed(0)
    cfg = official_config()
    theirs = module.BertSelfFlashAttention(cfg).eval()
    ours = SelfAttention(AIDOCellConfig.from_json(json.loads(cfg.to_json_string()), "cfg")).eval()
    ours.load_state_dict(theirs.state_dict())
    n_heads, d_head = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads

    def reference(x):
        q, k, v = (proj(x).view(*x.shape[:2], n_heads, d_head).transpose(1, 2)
                   for proj in (theirs.query, theirs.key, theirs.value))
        weights = torch.softmax(q @ k.transpose(-1, -2) / d_head ** 0.5, dim=-1)
        return (weights @ v).transpose(1, 2).reshape(x.shape)

    x = torch.randn(2, 7, cfg.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), atol=1e-6, rtol=1e-5)
        official_out = theirs(x)[0]
        assert not torch.allclose(official_out, reference(x), atol=1e-2)
        # it mixes no tokens: changing token 3 leaves token 0's output exactly unchanged ...
        x2 = x.clone()
        x2[:, 3] += 1.0
        assert torch.equal(theirs(x2)[0][:, 0], official_out[:, 0])
        assert not torch.allclose(reference(x2)[:, 0], reference(x)[:, 0])
        # ... but mixes heads: changing head 1's values changes head 0's output
        theirs.value.weight[d_head:] += 1.0
        assert not torch.allclose(theirs(x)[0][..., :d_head], official_out[..., :d_head])


def test_full_cells_match_official_in_chunks(tiny):
    """Two PBMC cells (all 19,266 tokens), run one cell per chunk: outputs and every layer's
    residual stream equal the official batched forward; output_loss equals the official
    model's squared error on the same masked input."""
    path, reference = tiny
    adapter = AIDOCellAdapter.from_pretrained(path, max_tokens_per_batch=SEQ)  # one cell per chunk
    tokens = adapter.tokenize(load_pbmc()[:2])
    batch = tokens.collate(np.arange(2))
    assert [len(c.cell_index) for c in adapter.chunks(batch)] == [1, 1]
    resid = {}
    hooks = [h.register_forward_hook(lambda m, i, out, layer=layer: resid.setdefault(layer, []).append(out))
             for layer, h in enumerate(adapter.model.hook_resid)]
    with torch.no_grad():
        out = adapter.run(batch)
    for h in hooks:
        h.remove()
    ref = official_forward(reference, batch.values)
    assert out["pred"].shape == (2, N_GENES) and out["cell_emb"].shape == (2, 16)
    torch.testing.assert_close(out["pred"], ref["pred"][:, :N_GENES], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["cell_emb"], ref["hidden"][:, :N_GENES].mean(1), atol=1e-5, rtol=1e-5)
    for layer, want in enumerate(ref["resid"]):
        torch.testing.assert_close(torch.cat(resid[layer]), want, atol=1e-5, rtol=1e-5)

    one = tokens.collate(np.array([1]))
    sse, n = adapter.output_loss(one, torch.Generator().manual_seed(7))
    mask = (torch.rand(one.gene_mask.shape, generator=torch.Generator().manual_seed(7)) < 0.3) & one.gene_mask
    assert n == int(mask.sum()) > 0
    pred = official_forward(reference, one.values.masked_fill(mask, -1.0))["pred"]
    assert sse == pytest.approx(float((pred - one.values)[mask].pow(2).sum()), rel=1e-5)


@pytest.mark.parametrize("dataset", ["pbmc", "celltypist", "duplicated_genes"])
def test_tokens_equal_official_preprocessing(dataset):
    """Token ids, values and lengths equal the official align_genes + backbone preprocessing."""
    if dataset == "celltypist":  # the first 80 cells of celltypist's raw-count sample (32,786 genes)
        frame = pd.read_csv(CELLTYPIST_SAMPLE, index_col=0, nrows=80)
        adata = ad.AnnData(sp.csr_matrix(frame.to_numpy()), obs=pd.DataFrame(index=frame.index),
                           var=pd.DataFrame(index=frame.columns))
    else:
        adata = load_pbmc()
    if dataset == "duplicated_genes":  # two columns named like earlier ones: the first occurrence counts
        adata = adata[:50].copy()
        names = adata.var_names.to_numpy().copy()
        names[[10, 400]] = names[[3, 5]]
        adata.var_names = names
    cfg = AIDOCellConfig.from_json(json.loads(official_config().to_json_string()), "cfg")
    adapter = AIDOCellAdapter(AIDOCellModel(cfg), cfg)
    tokens = adapter.tokenize(adata)
    n = adata.n_obs
    assert (tokens.lengths == SEQ).all() and len(tokens) == n
    gene_ids, values, special = (np.stack(a) for a in zip(*(tokens.cell(i) for i in range(n))))
    assert np.array_equal(gene_ids, np.tile(np.arange(SEQ), (n, 1)))
    assert [adapter.id_to_gene[i] for i in range(N_GENES)] == list(pd.read_csv(GENE_TSV, sep="\t")["gene_name"])
    assert np.array_equal(special, np.tile(np.arange(SEQ) >= N_GENES, (n, 1)))
    np.testing.assert_array_equal(values, official_inputs(adata))
    np.testing.assert_array_equal(tokens.collate(np.arange(min(n, 8))).values.numpy(), values[:8])


def test_expressed_gene_subsetting(tiny, tmp_path):
    """store_genes=expressed: gene_mask and the activation store hold exactly the expressed genes
    (non-zero counts); all: every one of the 19,264 genes."""
    from sae4scfm.store.extract import extract_activations

    path, _ = tiny
    pbmc = load_pbmc()[:5]
    counts = {}
    for store_genes in ("expressed", "all"):
        adapter = AIDOCellAdapter.from_pretrained(path, store_genes=store_genes, max_tokens_per_batch=2 * SEQ)
        tokens = adapter.tokenize(pbmc)
        batch = tokens.collate(np.arange(5))
        genes = np.asarray(pbmc.var_names)
        for row in range(5):
            stored = {adapter.id_to_gene[int(i)] for i in batch.gene_ids[row][batch.gene_mask[row]]}
            expressed = set(genes[pbmc.X[row].indices]) & set(model_genes())
            assert stored == (expressed if store_genes == "expressed" else set(model_genes()))
        assert not batch.gene_mask[:, N_GENES:].any()  # depth tokens never
        store = extract_activations(adapter, tokens, [0], tmp_path / store_genes, batch_size=5)[0]
        assert store.n_tokens == tokens.n_gene_tokens == int(batch.gene_mask.sum())
        shards = list(store.iter_shards())
        acts = torch.cat([s["acts"] for s in shards])
        key = torch.cat([s["cell"] for s in shards]) * 100_000 + torch.cat([s["gene"] for s in shards])
        whole = adapter.capture(batch, [0])[0]  # three chunks of at most two cells
        want_key = (batch.cell_index[:, None] * 100_000 + batch.gene_ids)[batch.gene_mask]
        # the store's rows come in the extraction plan's order: compare row by (cell, gene)
        torch.testing.assert_close(acts[torch.argsort(key)], whole[batch.gene_mask][torch.argsort(want_key)],
                                   atol=0, rtol=0)
        counts[store_genes] = store.n_tokens
    assert counts["all"] == 5 * N_GENES > counts["expressed"]


def test_random_init_keeps_architecture(tiny):
    path, reference = tiny
    trained = AIDOCellAdapter.from_pretrained(path).model.state_dict()
    torch.manual_seed(3)
    fresh = AIDOCellAdapter.from_pretrained(path, random_init=True).model.state_dict()
    assert list(fresh) == list(trained) == list(reference.state_dict())
    assert all(fresh[k].shape == trained[k].shape for k in fresh)
    assert not torch.equal(fresh["bert.position_embedding.weight"], trained["bert.position_embedding.weight"])
    assert fresh["bert.encoder.layer.0.mlp.up_proj.weight"].std() == pytest.approx(0.02, rel=0.2)  # official init
    assert torch.equal(fresh["bert.encoder.ln.weight"], torch.ones(16))
    assert not fresh["bert.encoder.layer.1.attention.self.query.bias"].any()


def test_checkpoint_variants_and_errors(tiny, tmp_path):
    """model.safetensors with bare CellFoundationModel keys and one tied bias name loads the same
    weights; a missing head, a size mismatch and settings AIDO.Cell cannot honour are InputErrors."""
    path, reference = tiny
    state = reference.state_dict()
    bare = {(k[len("bert."):] if k.startswith("bert.") else k): v.clone() for k, v in state.items()
            if k != "cls.predictions.decoder.bias"}
    folder = tmp_path / "safetensors"
    folder.mkdir()
    (folder / "config.json").write_text((path / "config.json").read_text())
    save_file(bare, folder / "model.safetensors")
    loaded = AIDOCellAdapter.from_pretrained(folder).model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())

    headless = tmp_path / "headless"
    headless.mkdir()
    (headless / "config.json").write_text((path / "config.json").read_text())
    torch.save({k: v for k, v in state.items() if not k.startswith("cls.")}, headless / "pytorch_model.bin")
    with pytest.raises(InputError, match=r"missing state-dict keys .*cls\.predictions"):
        AIDOCellAdapter.from_pretrained(headless)
    with pytest.raises(InputError, match=r"scfm.d_model=128 but .*hidden_size=16"):
        AIDOCellAdapter.from_pretrained(path, d_model=128)
    with pytest.raises(InputError, match="store_genes"):
        AIDOCellAdapter.from_pretrained(path, store_genes="some")
    with pytest.raises(InputError, match="lacks config.json"):
        AIDOCellAdapter.from_pretrained(tmp_path)
    adapter = AIDOCellAdapter.from_pretrained(path)
    pbmc = load_pbmc()[:3]
    for bad, match in (({"input_kind": "log_normalized"}, "raw counts"), ({"normalize_total": 1e6}, "10,000"),
                       ({"subset_hvg": True}, "subset_hvg=false")):
        with pytest.raises(InputError, match=match):
            adapter.tokenize(pbmc, **bad)
    empty = pbmc.copy()
    empty.X = sp.csr_matrix(empty.X.toarray() * (np.arange(3) != 1)[:, None])
    with pytest.raises(InputError, match=r"1 cells \(e.g. rows \[1\]\) have no counts"):
        adapter.tokenize(empty)


def test_pipeline_and_steering(tmp_path):
    """train -> features -> label scoring on PBMC cells with a tiny AIDO.Cell, then steering."""
    from sae4scfm.causal.steering import feature_edit, steer
    from sae4scfm.saes.base import load_sae

    sizes = dict(hidden_size=8, num_hidden_layers=2, num_attention_heads=1, intermediate_size=16)
    ckpt = write_checkpoint(tmp_path / "ckpt", official_model(seed=2, **sizes))
    runs, stores = tmp_path / "runs", tmp_path / "stores"
    cfg = sae4scfm.compose("train", [
        "scfm=aido_cell_3m", f"scfm.checkpoint_dir={ckpt}", "scfm.n_layers=2", "scfm.d_model=8",
        "scfm.n_heads=1", "scfm.d_mlp=16", "data=pbmc", "data.n_cells=6", "data.preprocess.split=0.34",
        "sae=topk", "sae.target_layer=1", "sae.dictionary_multiplier=2", "sae.hyperparams.k=4",
        "train.n_epochs=1", "train.batch_size=256", "train.eval_max_cells=1", "wandb.mode=disabled",
        f"runs_dir={runs}", f"buffer.store_dir={stores}", "experiment=aido", "device=cpu"])
    run_dir = sae4scfm.train(cfg)
    meta = json.loads((run_dir / "cfg.json").read_text())
    assert meta["d_in"] == 8 and meta["d_sae"] == 16 and meta["layer"] == 1 and meta["model_family"] == "aido_cell"
    ev = json.loads((run_dir / "eval.json").read_text())
    assert np.isfinite(ev["fvu"]) and ev["n_eval_tokens"] > 0 and np.isfinite(ev["loss_clean"])
    assert ev["loss_clean"] != ev["loss_mean_ablated"]

    address = [f"runs_dir={runs}", "sae_checkpoint.experiment=aido", f"sae_checkpoint.timestamp={run_dir.name}"]
    sae4scfm.generate_features(sae4scfm.compose("features", address))
    feats = ad.read_h5ad(run_dir / "features" / "features.h5ad")
    token_feats = ad.read_h5ad(run_dir / "features" / "token_features.h5ad")
    pbmc = load_pbmc()
    cells = pbmc[feats.obs_names]
    genes = np.asarray(pbmc.var_names)
    expressed = sum(len(set(genes[cells.X[i].indices]) & set(model_genes())) for i in range(6))
    assert feats.shape == (6, 16) and token_feats.n_obs == expressed
    assert not token_feats.obs["gene"].isin(["<rawcountsidx>", "<inputcountidx>"]).any()
    analyze = [*address, "analysis.run_label_scoring=true", "analysis.min_cells=1"]  # 6 cells: tiny labels
    table = sae4scfm.analyze_features(sae4scfm.compose("analyze", analyze))
    assert "label_scoring" in table.columns.get_level_values(0) and len(table) == 16

    sae, _ = load_sae(run_dir)
    adapter = AIDOCellAdapter.from_pretrained(ckpt)
    batch = adapter.tokenize(pbmc[:1]).collate(np.arange(1))
    h = adapter.capture(batch, [1])[1]
    feature = int(sae.encode(h[batch.gene_mask]).sum(0).argmax())
    clean, steered = steer(adapter, sae, 1, batch, {feature: 0.0})
    assert not torch.allclose(clean["pred"], steered["pred"])
    assert not torch.allclose(clean["cell_emb"], steered["cell_emb"])
    with adapter.intervene(1, feature_edit(sae, {})), torch.no_grad():
        unchanged = adapter.run(batch)
    assert torch.equal(unchanged["pred"], clean["pred"]) and torch.equal(unchanged["cell_emb"], clean["cell_emb"])


def test_log_normalised_as_counts_and_foreign_gene_ids_are_errors(tiny):
    """Log-normalised values passed as counts, and Ensembl IDs where the 19,264 symbols are needed."""
    from tests.conftest import assert_rejects_log_values_and_foreign_ids

    assert_rejects_log_values_and_foreign_ids(AIDOCellAdapter.from_pretrained(tiny[0]), load_pbmc()[:20].copy())


def test_tokens_never_build_all_cells_dense():
    """The TokenizedCells contract on 2,000 cells (lengths, offsets, n_gene_tokens, subset, batches, cell)
    allocates far less than one n_cells x 19,266 float32 array; the flat arrays are refused, not built."""
    import tracemalloc

    rng = np.random.default_rng(0)
    n = 2000
    counts = sp.random(n, N_GENES, density=0.002, format="csr", random_state=1, dtype=np.float32)
    counts.data = rng.integers(1, 20, counts.nnz).astype(np.float32)
    counts = sp.hstack([sp.csr_matrix(np.ones((n, 1), np.float32)), counts[:, 1:]]).tocsr()  # every cell counts
    tokens = AIDOCellTokens(counts, np.full((n, 2), 5.0, np.float32), np.arange(n),
                            store_all_genes=False, pad_value=-2.0)
    dense_bytes = n * SEQ * 4
    tracemalloc.start()
    lengths, offsets, stored = tokens.lengths, tokens.offsets, tokens.n_gene_tokens
    part = tokens.subset(np.arange(0, n, 2))
    first = next(part.batches(4, sort_by_length=True))
    cells = [tokens.cell(i) for i in (0, 999, 1999)]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < dense_bytes / 20, (peak, dense_bytes)
    assert (lengths == SEQ).all() and offsets[-1] == n * SEQ and stored == counts.nnz and len(part) == n // 2
    assert first.values.shape == (4, SEQ)
    for i, (ids, values, special) in zip((0, 999, 1999), cells):  # the old dense layout, for these cells
        dense = np.concatenate([counts[i].toarray().ravel(), [5.0, 5.0]])
        np.testing.assert_array_equal(values, dense)
        assert np.array_equal(ids, np.arange(SEQ)) and special.sum() == 2 and special[-2:].all()
    with pytest.raises(NotImplementedError, match="cell\\(i\\), collate"):
        tokens.values
