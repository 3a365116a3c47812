"""The scFoundation adapter against the official implementation (the ``modelgenerator`` wheel's copy).

Official references used here: ``load_scfoundation.py`` (``convertconfig``, ``gatherData``,
``getEncoerDecoderData``, ``main_gene_selection``), ``pretrainmodels`` (``select_model`` ->
``MaeAutobin`` with the torch transformer encoder and the Performer decoder) and the
19,264-gene TSV. The per-cell preprocessing and the cell-embedding pooling are the steps of
the official ``get_embedding.py``, which the wheel does not ship, written out below.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import sae4scfm
from sae4scfm.data import load_pbmc
from sae4scfm.errors import InputError
from sae4scfm.scfm import load_scfm
from sae4scfm.scfm.scfoundation import ScFoundationAdapter
from sae4scfm.scfm.scfoundation.preprocess import scfoundation_genes

SEQ_LEN = 19266
PAD, MASK = 103, 102
ARCH = {  # tiny, but the real 19,264 genes + T + S, the published module types
    "model": "mae_autobin", "n_class": 104, "bin_num": 16, "bin_alpha": 1.0,
    "pad_token_id": PAD, "mask_token_id": MASK,
    "encoder": {"module_type": "transformer", "hidden_dim": 32, "depth": 2, "heads": 4, "dim_head": 8},
    "decoder": {"module_type": "performer", "hidden_dim": 16, "depth": 2, "heads": 2, "dim_head": 8},
}
PERFORMER_ENCODER = {**ARCH, "encoder": {"module_type": "performer", "hidden_dim": 32, "depth": 2, "heads": 4,
                                         "dim_head": 8}}
ENTRY_SEEDS = {"gene": 0, "cell": 1, "rde": 2}


def official():
    """The official ``load_scfoundation`` module (its Performer imports ``local_attention``); its
    ``main_gene_selection`` uses ``pd``, which the module does not import, so that one name is supplied."""
    from modelgenerator.huggingface_models.scfoundation import load_scfoundation

    load_scfoundation.pd = pd
    return load_scfoundation


def official_gene_list() -> list[str]:
    import modelgenerator

    tsv = Path(modelgenerator.__file__).parent / "cell" / "gene_lists" / "OS_scRNA_gene_index.19264.tsv"
    table = pd.read_csv(tsv, header=0, delimiter="\t")
    assert table["index"].tolist() == list(range(len(table)))
    return list(table["gene_name"])


def official_model(arch: dict, seed: int):
    torch.manual_seed(seed)
    return official().select_model({**arch, "seq_len": SEQ_LEN}).eval()


def write_models_ckpt(folder: Path, arch: dict = ARCH) -> dict:
    """``models.ckpt`` in the published layout; returns the official models by entry."""
    folder.mkdir(parents=True, exist_ok=True)
    models = {key: official_model(arch, seed) for key, seed in ENTRY_SEEDS.items()}
    ckpt = {key: {"config": {"model": "mae_autobin", "model_config": {"mae_autobin": arch},
                             "dataset_config": {"rnaseq": {"seq_len": SEQ_LEN}}},
                  "state_dict": {"model." + k: v for k, v in model.state_dict().items()}}
            for key, model in models.items()}
    torch.save(ckpt, folder / "models.ckpt")
    return models


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scfoundation")
    return folder, write_models_ckpt(folder)


@pytest.fixture(scope="module")
def pbmc():
    return load_pbmc()


def cells_with_different_lengths(pbmc, n: int = 5) -> ad.AnnData:
    order = np.argsort(np.diff(pbmc.X.indptr))
    return pbmc[order[np.linspace(0, len(order) - 1, n).astype(int)]].copy()


def dense_inputs(batch) -> torch.Tensor:
    """[B, 19266] official model input (log1p CP10k genes, then T, S) from our batch."""
    x = torch.zeros(len(batch.gene_ids), SEQ_LEN)
    rows, cols = (~batch.padding_mask).nonzero(as_tuple=True)
    x[rows, batch.gene_ids[rows, cols]] = batch.values[rows, cols]
    return x


def official_forward(model, x: torch.Tensor, encoder_labels: torch.Tensor | None = None):
    """(pred [B, 19266], encoder hidden states [layer 0..depth] each [B, T, d], encoder padding [B, T])
    of the official MaeAutobin on dense input x; ``encoder_labels`` = positions the encoder sees
    (default x > 0, as ``getEncoerDecoderData``)."""
    L = official()
    labels = x > 0 if encoder_labels is None else encoder_labels
    enc, enc_pos, enc_pad, _, dec, dec_pad, _, _, dec_pos = L.getEncoerDecoderData(x, x, {"pad_token_id": PAD,
                                                                                         "seq_len": SEQ_LEN})
    if encoder_labels is not None:  # the masked-value objective: masked genes leave the encoder
        enc, enc_pad = L.gatherData(x, labels, PAD)
        enc_pos, _ = L.gatherData(torch.arange(SEQ_LEN).repeat(len(x), 1), labels, PAD)
        enc_pos[enc_pad] = SEQ_LEN
    hidden, handles = [], [model.encoder.register_forward_pre_hook(lambda m, args: hidden.append(args[0].clone()))]
    if hasattr(model.encoder, "transformer_encoder"):
        for block in model.encoder.transformer_encoder:
            handles.append(block.register_forward_hook(lambda m, args, out: hidden.append(out.clone())))
    else:  # Performer: the block output is the feed-forward input plus its output
        for _, ff in model.encoder.performer.net.layers:
            handles.append(ff.register_forward_hook(lambda m, args, out: hidden.append(args[0] + out)))
    with torch.no_grad():
        pred = model(x=enc, padding_label=enc_pad, encoder_position_gene_ids=enc_pos, encoder_labels=labels,
                     decoder_data=dec, mask_gene_name=False, mask_labels=None,
                     decoder_position_gene_ids=dec_pos, decoder_data_padding_labels=dec_pad)
    for h in handles:
        h.remove()
    return pred, hidden, enc_pad


def official_cell_embedding(model, x_row: torch.Tensor) -> torch.Tensor:
    """get_embedding.py, output_type='cell', pool_type='all', one cell [1, 19266] -> [1, 4d]. The script
    passes the padding positionally (``encoder(x, x_padding)``), which only the torch encoder accepts;
    it goes by keyword here, as MaeAutobin.forward passes it, so a Performer encoder runs too."""
    L = official()
    labels = x_row > 0
    x, x_pad = L.gatherData(x_row, labels, PAD)
    positions, _ = L.gatherData(torch.arange(SEQ_LEN).repeat(1, 1), labels, PAD)
    with torch.no_grad():
        h = model.token_emb(torch.unsqueeze(x, 2).float(), output_weight=0) + model.pos_emb(positions)
        g = model.encoder(h, padding_mask=x_pad)
    return torch.cat([g[:, -1, :], g[:, -2, :], g[:, :-2, :].max(dim=1)[0], g[:, :-2, :].mean(dim=1)], dim=1)


# ---------------------------------------------------------------- gene order, checkpoint


def test_gene_list_equals_official_tsv():
    assert list(scfoundation_genes()) == official_gene_list() and len(scfoundation_genes()) == 19264


def test_checkpoint_round_trip_with_official_names(ckpt, tmp_path):
    folder, models = ckpt
    # the file is what the official loader reads (load_model_frommmf minus its .cuda())
    L = official()
    raw = torch.load(folder / "models.ckpt", weights_only=True)
    for key in ENTRY_SEEDS:
        converted = L.convertconfig(raw[key])
        L.select_model(converted["config"]).load_state_dict(converted["model_state_dict"])  # strict
    for key in ("gene", "cell"):
        adapter = ScFoundationAdapter.from_pretrained(folder, ckpt_key=key)
        ours, theirs = adapter.model.state_dict(), models[key].state_dict()
        assert set(ours) == set(theirs)
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
        assert adapter.n_layers == 2 and adapter.d_model == 32
    assert not torch.equal(ScFoundationAdapter.from_pretrained(folder / "models.ckpt").model.pos_emb.weight,
                           models["gene"].pos_emb.weight)  # default entry: cell
    # the flat form (official convertconfig output: config + un-prefixed model_state_dict) loads the same
    flat = {"cell": L.convertconfig(raw["cell"])}
    torch.save(flat, tmp_path / "models.ckpt")
    again = ScFoundationAdapter.from_pretrained(tmp_path).model.state_dict()
    assert all(torch.equal(again[k], v) for k, v in models["cell"].state_dict().items())


def test_checkpoint_errors(ckpt, tmp_path, caplog):
    folder, _ = ckpt
    with pytest.raises(InputError, match=r"scfm.ckpt_key='ce'.*found 'gene', 'cell', 'rde'"):
        ScFoundationAdapter.from_pretrained(folder, ckpt_key="ce")
    with pytest.raises(InputError, match="tgthighres='x4'"):
        ScFoundationAdapter.from_pretrained(folder, tgthighres="x4")
    with pytest.raises(InputError, match="decoder_batch_size=0"):
        ScFoundationAdapter.from_pretrained(folder, decoder_batch_size=0)
    with pytest.raises(InputError, match="not a models.ckpt file"):
        ScFoundationAdapter.from_pretrained(tmp_path)
    raw = torch.load(folder / "models.ckpt", weights_only=True)
    entry = raw["cell"]
    entry["state_dict"].pop("model.decoder.performer.net.layers.1.0.fn.to_k.weight")
    entry["state_dict"]["model.cls_head.weight"] = torch.zeros(2)
    torch.save({"cell": entry}, tmp_path / "models.ckpt")
    with pytest.raises(InputError, match=r"missing state-dict keys \['decoder.performer.net.layers.1.0.fn.to_k"):
        ScFoundationAdapter.from_pretrained(tmp_path)
    entry["state_dict"]["model.decoder.performer.net.layers.1.0.fn.to_k.weight"] = torch.zeros(16, 16)
    torch.save({"cell": entry}, tmp_path / "models.ckpt")
    with caplog.at_level(logging.WARNING):
        ScFoundationAdapter.from_pretrained(tmp_path)
    assert "cls_head.weight" in caplog.text


# ------------------------------------------------------------------- model fidelity


@pytest.mark.parametrize("arch", [ARCH, PERFORMER_ENCODER], ids=["transformer_encoder", "performer_encoder"])
def test_forward_and_hidden_states_equal_official(arch, pbmc, tmp_path):
    """Our batched forward (padding!) vs the official MaeAutobin: encoder hidden states at every
    layer, per-gene predictions and the get_embedding cell embedding, to 1e-5 (fp32)."""
    models = write_models_ckpt(tmp_path, arch)
    theirs = models["cell"]
    adapter = ScFoundationAdapter.from_pretrained(tmp_path)
    cells = cells_with_different_lengths(pbmc)
    batch = adapter.tokenize(cells).collate(np.arange(cells.n_obs))
    assert batch.padding_mask.any() and len(set(batch.padding_mask.sum(1).tolist())) == cells.n_obs
    x = dense_inputs(batch)
    hidden = adapter.capture(batch, [0, 1, 2])
    out = adapter.run(batch)
    keep = ~batch.padding_mask
    if arch is ARCH:  # the torch encoder masks padding, so the official batched run is a reference too
        _, their_hidden, enc_pad = official_forward(theirs, x)
        assert torch.equal(enc_pad, batch.padding_mask)
        for layer in range(3):
            torch.testing.assert_close(hidden[layer][keep], their_hidden[layer][keep], atol=1e-5, rtol=1e-5)
    for i in range(cells.n_obs):  # the official scripts run one cell at a time
        pred, their_hidden, _ = official_forward(theirs, x[i:i + 1])
        n = int(keep[i].sum())
        for layer in range(3):
            torch.testing.assert_close(hidden[layer][i, :n], their_hidden[layer][0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out["pred"][i], pred[0, :19264], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out["cell_emb"][i:i + 1], official_cell_embedding(theirs, x[i:i + 1]),
                                   atol=1e-5, rtol=1e-5)
    assert out["pred"].shape == (cells.n_obs, 19264) and out["cell_emb"].shape == (cells.n_obs, 4 * 32)


def test_batched_equals_one_cell_at_a_time(ckpt, pbmc):
    adapter = ScFoundationAdapter.from_pretrained(ckpt[0], decoder_batch_size=3)  # decoder: cells 0-2, then 3
    tokens = adapter.tokenize(cells_with_different_lengths(pbmc, 4))
    batch = tokens.collate(np.arange(4))
    hidden, out = adapter.capture(batch, [1, 2]), adapter.run(batch)
    for i in range(4):
        one = tokens.collate(np.array([i]))
        n = one.gene_ids.shape[1]
        one_hidden, one_out = adapter.capture(one, [1, 2]), adapter.run(one)
        for layer in (1, 2):
            torch.testing.assert_close(hidden[layer][i, :n], one_hidden[layer][0], atol=1e-5, rtol=1e-5)
        for key in ("pred", "cell_emb"):
            torch.testing.assert_close(out[key][i], one_out[key][0], atol=1e-5, rtol=1e-5)


def test_output_loss_is_official_masked_value_mse(ckpt, pbmc):
    """Masked genes leave the encoder and enter the decoder as the mask value; the loss is the
    squared error of the official forward's prediction at those genes."""
    folder, models = ckpt
    adapter = ScFoundationAdapter.from_pretrained(folder)
    batch = adapter.tokenize(cells_with_different_lengths(pbmc, 3)).collate(np.arange(3))
    sse, n = adapter.output_loss(batch, torch.Generator().manual_seed(7))
    mask = (torch.rand(batch.gene_mask.shape, generator=torch.Generator().manual_seed(7)) < 0.3) & batch.gene_mask
    assert n == int(mask.sum()) > 0
    x = dense_inputs(batch)
    expected = 0.0
    for i in range(3):
        masked_genes = batch.gene_ids[i][mask[i]]
        x_masked = x[i:i + 1].clone()
        x_masked[0, masked_genes] = MASK
        labels = (x[i:i + 1] > 0)
        labels[0, masked_genes] = False
        pred, _, _ = official_forward(models["cell"], x_masked, encoder_labels=labels)
        expected += float(((pred[0, masked_genes] - x[i, masked_genes]) ** 2).sum())
    assert sse == pytest.approx(expected, rel=1e-5)
    assert adapter.output_loss(batch, torch.Generator().manual_seed(7)) == (sse, n)


def test_random_init_keeps_architecture(ckpt, pbmc):
    folder, _ = ckpt
    trained = ScFoundationAdapter.from_pretrained(folder)
    torch.manual_seed(3)
    a = ScFoundationAdapter.from_pretrained(folder, random_init=True)
    torch.manual_seed(3)
    b = ScFoundationAdapter.from_pretrained(folder, random_init=True)
    shapes = {k: v.shape for k, v in trained.model.state_dict().items()}
    assert {k: v.shape for k, v in a.model.state_dict().items()} == shapes
    assert all(torch.equal(v, b.model.state_dict()[k]) for k, v in a.model.state_dict().items())
    assert not torch.equal(a.model.token_emb.emb.weight, trained.model.token_emb.emb.weight)
    projection = a.model.decoder.performer.net.layers[0][0].fn.fast_attention.projection_matrix
    assert projection.shape == (16, 8) and torch.allclose(projection[:8] @ projection[:8].T / (projection[:8].norm(
        dim=1)[:, None] * projection[:8].norm(dim=1)[None]), torch.eye(8), atol=1e-5)  # orthogonal block
    batch = a.tokenize(pbmc[:3]).collate(np.arange(3))
    assert not torch.allclose(a.run(batch)["pred"], trained.run(batch)["pred"])


# -------------------------------------------------------------------- preprocessing


def official_aligned(adata: ad.AnnData) -> pd.DataFrame:
    """Cells x the 19,264 genes by the official ``main_gene_selection`` (README step 1)."""
    X = adata.X.toarray() if sp.issparse(adata.X) else adata.X
    X_df, _ = official().main_gene_selection(pd.DataFrame(X, index=adata.obs_names, columns=adata.var_names),
                                             official_gene_list())
    return X_df


def official_encoder_inputs(X_df: pd.DataFrame, tgthighres: str, pre_normalized: str = "F",
                            totals: np.ndarray | None = None):
    """(values, position ids, padding) [cells, T] from aligned cells: get_embedding.py's per-cell
    single-cell branch, then gatherData."""
    L = official()
    if pre_normalized == "A":
        X_df = X_df.assign(total_count=totals)
    rows = []
    for i in range(X_df.shape[0]):
        if pre_normalized == "F":
            tmpdata = (np.log1p(X_df.iloc[i, :] / (X_df.iloc[i, :].sum()) * 1e4)).tolist()
        elif pre_normalized == "T":
            tmpdata = (X_df.iloc[i, :]).tolist()
        else:
            tmpdata = (X_df.iloc[i, :-1]).tolist()
        totalcount = X_df.iloc[i, -1] if pre_normalized == "A" else X_df.iloc[i, :].sum()
        number = float(tgthighres[1:])
        target = {"f": np.log10(totalcount * number), "a": np.log10(totalcount) + number, "t": number}[tgthighres[0]]
        rows.append(torch.tensor(tmpdata + [target, np.log10(totalcount)]))
    x = torch.stack(rows)  # float64: torch infers it from the numpy log10 scalars
    assert x.shape[1] == SEQ_LEN
    labels = x > 0
    values, padding = L.gatherData(x, labels, PAD)
    positions, _ = L.gatherData(torch.arange(SEQ_LEN).repeat(len(x), 1), labels, PAD)
    return values.float(), positions, padding  # the model casts its input to float32


def celltypist_sample() -> ad.AnnData:
    import celltypist

    path = Path(celltypist.__file__).parent / "data" / "samples" / "sample_cell_by_gene.csv"
    df = pd.read_csv(path, index_col=0)
    return ad.AnnData(X=df.to_numpy(), obs=pd.DataFrame(index=df.index), var=pd.DataFrame(index=df.columns))


def log_normalized_pbmc() -> ad.AnnData:
    """scanpy's PBMC as distributed: log1p(CP10k) in .raw, total counts in obs['n_counts']."""
    import scanpy as sc

    bundled = sc.datasets.pbmc68k_reduced()
    return ad.AnnData(X=sp.csr_matrix(bundled.raw.X), obs=bundled.obs[["n_counts"]].copy(),
                      var=pd.DataFrame(index=bundled.raw.var_names))


@pytest.fixture(scope="module")
def real_data(pbmc):
    """{name: (AnnData, officially aligned DataFrame)}, aligned once per dataset."""
    cache = {}

    def get(name):
        if name not in cache:
            adata = {"pbmc": lambda: pbmc, "celltypist": celltypist_sample, "pbmc_log": log_normalized_pbmc}[name]()
            cache[name] = adata, official_aligned(adata)
        return cache[name]
    return get


@pytest.mark.parametrize("dataset, input_kind, tgthighres, pre_normalized, n_cells", [
    ("pbmc", "counts", "t4", "F", None),  # all 700 cells
    ("celltypist", "counts", "a5", "F", 200),  # the official reference runs cell by cell: subsets
    ("pbmc", "counts", "f1.5", "F", 100),
    ("pbmc_log", "log_normalized", "t4", "T", 100),
    ("pbmc_log", "log_normalized", "a5", "A", 200),
])
def test_tokens_equal_official_preprocessing(ckpt, real_data, dataset, input_kind, tgthighres, pre_normalized,
                                             n_cells):
    adata, aligned = real_data(dataset)
    adata, aligned = adata[:n_cells], aligned.iloc[:n_cells]
    total_key = "n_counts" if pre_normalized == "A" else None
    adapter = ScFoundationAdapter.from_pretrained(ckpt[0], tgthighres=tgthighres, total_count_key=total_key)
    tokens = adapter.tokenize(adata, input_kind=input_kind)
    values, positions, padding = official_encoder_inputs(
        aligned, tgthighres, pre_normalized, adata.obs["n_counts"].to_numpy() if total_key else None)
    batch = tokens.collate(np.arange(len(tokens)))
    assert np.array_equal(tokens.lengths, (~padding).sum(1).numpy())
    assert torch.equal(batch.padding_mask, padding)
    keep = ~padding
    assert torch.equal(batch.gene_ids[keep], positions[keep])
    torch.testing.assert_close(batch.values[keep], values[keep], rtol=1e-6, atol=1e-6)
    assert torch.equal(batch.gene_mask, keep & (positions < 19264))  # T and S are special
    assert [adapter.id_to_gene[i] for i in (19264, 19265)] == ["<T>", "<S>"]


def test_tokenize_rejects_what_scfoundation_cannot_read(ckpt, pbmc):
    adapter = ScFoundationAdapter.from_pretrained(ckpt[0])
    with pytest.raises(InputError, match="subset_hvg=false"):
        adapter.tokenize(pbmc, subset_hvg=True)
    with pytest.raises(InputError, match="normalize_total=10000"):
        adapter.tokenize(pbmc, normalize_total=5000)
    twice = ad.AnnData(sp.hstack([pbmc.X, pbmc.X[:, :1]]).tocsr(), var=pd.DataFrame(
        index=[*pbmc.var_names, pbmc.var_names[0]]))
    with pytest.raises(InputError, match="occur more than once"):
        adapter.tokenize(twice)
    empty = pbmc[:3].copy()
    empty.X = sp.csr_matrix(empty.X.toarray() * np.array([[1], [0], [1]], dtype=np.float32))
    with pytest.raises(InputError, match=r"1 cells \(e.g. rows \[1\]\)"):
        adapter.tokenize(empty)
    with pytest.raises(InputError, match="total_count_key"):
        ScFoundationAdapter.from_pretrained(ckpt[0], total_count_key="n_counts").tokenize(pbmc)


# ------------------------------------------------------------------------- pipeline


def test_pipeline_and_steering(ckpt, pbmc, tmp_path):
    """train -> features -> label scoring -> steer, on a tiny random-weight scFoundation."""
    from sae4scfm.causal.steering import steer
    from sae4scfm.saes import load_sae

    runs, stores = tmp_path / "runs", tmp_path / "stores"
    cfg = sae4scfm.compose("train", [
        "scfm=scfoundation", f"scfm.checkpoint_dir={ckpt[0]}", "scfm.architecture=null", "data=pbmc",
        "data.n_cells=60", "sae=topk",
        "sae.target_layer=1", "sae.dictionary_multiplier=2", "sae.hyperparams.k=8", "train.n_epochs=1",
        "train.batch_size=256", "wandb.mode=disabled", f"runs_dir={runs}", f"buffer.store_dir={stores}",
        "experiment=sf"])
    run_dir = sae4scfm.train(cfg)
    meta = json.loads((run_dir / "cfg.json").read_text())
    assert meta["d_in"] == 32 and meta["d_sae"] == 64 and meta["layer"] == 1
    ev = json.loads((run_dir / "eval.json").read_text())
    assert np.isfinite(ev["fvu"]) and 0 <= ev["fvu"] < 1.5 and abs(ev["l0"] - 8) < 1e-6
    assert np.isfinite(ev["loss_clean"]) and ev["loss_clean"] > 0 and np.isfinite(ev["loss_spliced"])
    address = [f"runs_dir={runs}", "sae_checkpoint.experiment=sf", f"sae_checkpoint.timestamp={run_dir.name}"]
    sae4scfm.generate_features(sae4scfm.compose("features", address))
    feats = ad.read_h5ad(run_dir / "features" / "features.h5ad")
    tokens = ad.read_h5ad(run_dir / "features" / "token_features.h5ad")
    assert feats.shape == (60, 64) and feats.X.nnz > 0
    assert not tokens.obs["gene"].isin(["<T>", "<S>"]).any() and tokens.obs["gene"].isin(pbmc.var_names).all()
    sae4scfm.analyze_features(sae4scfm.compose("analyze", [*address, "analysis.run_label_scoring=true"]))
    table = pd.read_csv(run_dir / "analysis" / "results.csv", header=[0, 1], index_col=0)
    assert len(table) == 64 and any(c.startswith("auroc:bulk_labels=") for c in table["label_scoring"].columns)

    adapter = load_scfm(cfg.scfm)
    sae, _ = load_sae(run_dir)
    batch = adapter.tokenize(pbmc[:4]).collate(np.arange(4))
    clean, same = steer(adapter, sae, 1, batch, {})
    for key in ("pred", "cell_emb"):
        assert torch.equal(clean[key], same[key])
    _, steered = steer(adapter, sae, 1, batch, {0: 5.0, 1: 5.0})
    assert not torch.allclose(clean["pred"], steered["pred"]) and not torch.allclose(clean["cell_emb"],
                                                                                      steered["cell_emb"])


def test_log_normalised_as_counts_and_foreign_gene_ids_are_errors(ckpt, pbmc):
    """Log-normalised values passed as counts, and Ensembl IDs where the 19,264 symbols are needed."""
    from tests.conftest import assert_rejects_log_values_and_foreign_ids

    assert_rejects_log_values_and_foreign_ids(ScFoundationAdapter.from_pretrained(ckpt[0]), pbmc)
