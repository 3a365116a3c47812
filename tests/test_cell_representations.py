"""Cell-level representations: the SAE of the mean-pooled residual vector beside max/mean of token
latents (``features.pooling``), and cell-level SAEs (``sae.hook_point=cell_mean|cls``) trained end to
end on data=pbmc through the real Hydra configs."""

from __future__ import annotations

import json
import math
import shutil

import anndata as ad
import numpy as np
import pytest
import torch

import sae4scfm
from sae4scfm.errors import InputError
from sae4scfm.features.generate import cell_representation
from sae4scfm.saes import load_sae
from sae4scfm.scfm.tokens import TokenizedCells
from sae4scfm.store.extract import cell_vectors, cls_token_id, sae_hook_point
from sae4scfm.store.shards import ActivationStore

N_CELLS = 200
RUN = ["scfm=demo", "data=pbmc", "sae=topk", "sae.target_layer=4", "sae.hyperparams.k=8", "seed=0",
       f"data.n_cells={N_CELLS}", "data.preprocess.split=0.25", "wandb.mode=disabled", "train.log_every=5",
       "train.checkpoint_every=1000"]
TOKEN_RUN = [*RUN, "train.n_epochs=1", "train.batch_size=512"]
CELL_RUN = [*RUN, "train.n_epochs=10", "train.batch_size=32", "train.calibration_batches=2"]


def _address(runs_dir, experiment, run_dir):
    return [f"runs_dir={runs_dir}", f"sae_checkpoint.experiment={experiment}", f"sae_checkpoint.timestamp={run_dir.name}"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return tmp_path_factory.mktemp("runs"), tmp_path_factory.mktemp("stores")


@pytest.fixture(scope="module")
def token_run(dirs):
    runs_dir, store_dir = dirs
    run_dir = sae4scfm.train(sae4scfm.compose("train", [*TOKEN_RUN, f"runs_dir={runs_dir}",
                                                         f"buffer.store_dir={store_dir}", "experiment=tok"]))
    sae4scfm.generate_features(sae4scfm.compose("features", _address(runs_dir, "tok", run_dir)))
    return run_dir


def _store(store_dir, split: str, name: str) -> ActivationStore:
    (root,) = list(store_dir.glob("*"))  # one model + data: one key, whatever the hook point
    return ActivationStore(root / split / name)


def _token_means(store: ActivationStore) -> dict[int, torch.Tensor]:
    """{cell: mean of its token rows} computed from the token store shard by shard."""
    sums, counts = {}, {}
    for shard in store.iter_shards():
        for cell in shard["cell"].unique().tolist():
            rows = shard["acts"][shard["cell"] == cell].double()
            sums[cell] = sums.get(cell, 0) + rows.sum(0)
            counts[cell] = counts.get(cell, 0) + len(rows)
    return {cell: (sums[cell] / counts[cell]).float() for cell in sums}


def test_sae_of_mean_encodes_the_mean_of_the_cells_token_activations(token_run, dirs):
    """layers["sae_of_mean"] of cell i == sae.encode(mean of cell i's token rows in the store), for
    train and eval cells; X (max) and layers["mean"] are also there, named in uns."""
    _, store_dir = dirs
    feats = ad.read_h5ad(token_run / "features" / "features.h5ad")
    info = feats.uns["sae4scfm"]
    assert info["pooling"] == "max" and set(info["representations"]) == {"max", "mean", "sae_of_mean"}
    assert set(feats.layers.keys()) == {"mean", "sae_of_mean"}
    sae, _ = load_sae(token_run, "cpu")
    for split in ("train", "eval"):
        means = _token_means(_store(store_dir, split, "layer_4"))
        cells = sorted(means)
        with torch.no_grad():
            expected = sae.encode(torch.stack([means[c] for c in cells])).numpy()
        got = cell_representation(feats, "sae_of_mean")[cells].toarray()
        assert (got > 0).sum(1).mean() == pytest.approx(8, abs=0.5)  # TopK k=8 on one vector per cell
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    # sae_of_mean is not the mean of token latents (the SAE is not linear)
    assert not np.allclose(feats.layers["sae_of_mean"].toarray(), feats.layers["mean"].toarray(), atol=1e-3)


def test_pooling_picks_the_representation_in_x(token_run, dirs, tmp_path):
    """features.pooling=sae_of_mean puts it in X and max in layers["max"], the same numbers as the
    default file; a name it lacks and a bad pooling are InputErrors."""
    runs_dir, _ = dirs
    default = ad.read_h5ad(token_run / "features" / "features.h5ad")
    copy = tmp_path / "tok" / token_run.name
    shutil.copytree(token_run, copy, ignore=shutil.ignore_patterns("features"))
    address = _address(tmp_path, "tok", copy)
    sae4scfm.generate_features(sae4scfm.compose("features", [*address, "features.pooling=sae_of_mean",
                                                             "features.token_features=false"]))
    feats = ad.read_h5ad(copy / "features" / "features.h5ad")
    assert feats.uns["sae4scfm"]["pooling"] == "sae_of_mean" and set(feats.layers.keys()) == {"max", "mean"}
    for name in ("max", "mean", "sae_of_mean"):
        np.testing.assert_allclose(cell_representation(feats, name).toarray(),
                                   cell_representation(default, name).toarray(), rtol=1e-5, atol=1e-6)
    with pytest.raises(InputError, match="no cell representation 'cls'.*sae_of_mean, max, mean"):
        cell_representation(feats, "cls")
    with pytest.raises(InputError, match="features.pooling='median'"):
        sae4scfm.generate_features(sae4scfm.compose("features", [*address, "features.pooling=median"]))
    legacy = ad.AnnData(default.X, uns={"sae4scfm": {"pooling": {"X": "max over gene tokens"}}})
    assert cell_representation(legacy, "max") is legacy.X  # files written before features.pooling


@pytest.mark.parametrize("hook", ["cell_mean", "cls"])
def test_cell_level_sae_trains_end_to_end(token_run, dirs, hook):
    """sae.hook_point=cell_mean|cls on data=pbmc: the store holds one row per cell (split by cell;
    cell_mean rows = the mean of the cell's token rows), training and evaluation finish (no splice:
    NaN model losses), and features.h5ad X is the SAE's code of each cell's row, with no token file."""
    runs_dir, store_dir = dirs
    run_dir = sae4scfm.train(sae4scfm.compose("train", [*CELL_RUN, f"sae.hook_point={hook}", f"runs_dir={runs_dir}",
                                                        f"buffer.store_dir={store_dir}", f"experiment={hook}"]))
    stores = {split: _store(store_dir, split, f"{hook}_4") for split in ("train", "eval")}
    cells = {split: torch.cat([s["cell"] for s in st.iter_shards()]).numpy() for split, st in stores.items()}
    assert stores["train"].rows == hook and stores["train"].n_tokens == len(cells["train"]) == 150
    assert len(cells["eval"]) == 50 and len(np.intersect1d(cells["train"], cells["eval"])) == 0
    assert len(np.unique(np.concatenate(list(cells.values())))) == N_CELLS
    if hook == "cell_mean":
        means = _token_means(_store(store_dir, "eval", "layer_4"))
        rows = torch.cat([s["acts"] for s in stores["eval"].iter_shards()])
        torch.testing.assert_close(rows, torch.stack([means[c] for c in cells["eval"]]), rtol=1e-4, atol=1e-5)
    results = json.loads((run_dir / "eval.json").read_text())
    assert results["n_eval_tokens"] == 50 and 0 < results["fvu"] < 1 and math.isnan(results["loss_recovered"])
    cfg_json = json.loads((run_dir / "cfg.json").read_text())
    assert cfg_json["sae_hook_point"] == hook and cfg_json["hook_point"] == f"hook_resid.4.{hook}"

    sae4scfm.generate_features(sae4scfm.compose("features", _address(runs_dir, hook, run_dir)))
    assert not (run_dir / "features" / "token_features.h5ad").exists()
    feats = ad.read_h5ad(run_dir / "features" / "features.h5ad")
    assert feats.uns["sae4scfm"]["pooling"] == hook and len(feats.layers) == 0
    sae, _ = load_sae(run_dir, "cpu")
    rows = torch.cat([s["acts"] for s in stores["eval"].iter_shards()])
    with torch.no_grad():
        expected = sae.encode(rows).numpy()
    np.testing.assert_allclose(cell_representation(feats, hook)[cells["eval"]].toarray(), expected,
                               rtol=1e-4, atol=1e-4)


def test_batch_size_counts_cells_for_a_cell_level_sae(dirs):
    runs_dir, store_dir = dirs
    cfg = sae4scfm.compose("train", [*RUN, "sae.hook_point=cell_mean", "train.batch_size=512",
                                     f"runs_dir={runs_dir}", f"buffer.store_dir={store_dir}", "experiment=big"])
    with pytest.raises(InputError, match=r"train.batch_size=512 exceeds the 150 training cells \(sae.hook_point"):
        sae4scfm.train(cfg)
    assert not (runs_dir / "big").exists()


def test_unknown_hook_point_is_an_input_error():
    with pytest.raises(InputError, match="sae.hook_point='pooled': use tokens .*cell_mean .*cls"):
        sae_hook_point({"hook_point": "pooled"})
    assert sae_hook_point({}) == "tokens"  # configs saved before sae.hook_point


def _cells(ids: list[list[int]], special_first: bool) -> TokenizedCells:
    lengths = [len(c) for c in ids]
    flat = np.concatenate(ids).astype(np.int64)
    special = np.concatenate([np.arange(n) == 0 if special_first else np.zeros(n, bool) for n in lengths])
    return TokenizedCells(flat, np.ones(len(flat), np.float32), special, np.concatenate([[0], np.cumsum(lengths)]),
                          np.arange(len(ids)), pad_id=0, pad_value=0.0)


def test_cls_hook_point_needs_a_cls_token():
    """A family without <cls> (scFoundation: T/S depth tokens; AIDO.Cell) and cells without one
    (Geneformer V1) are a clear InputError; the demo scGPT's is found and read at position 0."""
    from sae4scfm.scfm.scfoundation import ScFoundationAdapter

    performer = {"module_type": "performer", "hidden_dim": 8, "depth": 1, "heads": 2, "dim_head": 4}
    scf = ScFoundationAdapter.from_pretrained(None, random_init=True, architecture={
        "encoder": {"module_type": "transformer", "hidden_dim": 16, "depth": 1, "heads": 2}, "decoder": performer})
    with pytest.raises(InputError, match="sae.hook_point=cls: this scfoundation model's input cells have no <cls> "
                                         "token; use sae.hook_point=cell_mean"):
        cls_token_id(scf, _cells([[19264, 5, 6]], special_first=True))

    demo = sae4scfm.scfm.load_scfm(sae4scfm.compose("train", ["scfm=demo"]).scfm)
    cls = demo.vocab["<cls>"]
    with pytest.raises(InputError, match="no <cls> token"):  # the vocabulary has one, the cells do not
        cls_token_id(demo, _cells([[5, 6, 7]], special_first=False))
    tokens = _cells([[cls, 5, 6, 7], [cls, 8]], special_first=True)
    assert cls_token_id(demo, tokens) == cls
    batch = tokens.collate(np.arange(2))
    h = torch.randn(2, 4, 3)
    torch.testing.assert_close(cell_vectors(h, batch, "cls", cls), h[:, 0])
    torch.testing.assert_close(cell_vectors(h, batch, "cell_mean"), torch.stack([h[0, 1:].mean(0), h[1, 1]]))
