"""SAE, activation store and trainer pieces against independent computations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.optimize
import torch

from sae4scfm.saes import TopKSAE
from sae4scfm.store.buffer import ShufflingBuffer
from sae4scfm.store.shards import ActivationStore, _ShardWriter
from sae4scfm.training.schedules import geometric_median, input_scale, lr_factor

CONFIG = Path(__file__).resolve().parents[1] / "sae4scfm" / "config"


def make_store(tmp_path, n=1000, d=8, shard_tokens=128):
    w = _ShardWriter(tmp_path / "store", layer=1, d_model=d, dtype="float32", shard_tokens=shard_tokens,
                     include_special=False)
    x = torch.arange(n, dtype=torch.float32)[:, None].repeat(1, d)  # row i is all i: identifiable
    for chunk in x.split(37):
        w.add(chunk, torch.zeros(len(chunk), dtype=torch.long), torch.zeros(len(chunk), dtype=torch.long),
              torch.zeros(len(chunk), dtype=torch.bool))
    w.close(n_cells=1)
    return ActivationStore(tmp_path / "store")


def test_buffer_covers_each_token_once_deterministically(tmp_path):
    store = make_store(tmp_path)
    assert store.n_tokens == 1000 and store.n_shards == 7  # 27 chunks of 37 flushed at >= 128 tokens
    buffer = ShufflingBuffer(store, 64, seed=3, buffer_tokens=300, chunk_tokens=20)
    batches = list(buffer.epoch(0))
    assert len(batches) == len(buffer) == 1000 // 64
    ids = torch.cat(batches)[:, 0].long()
    assert len(ids) == len(set(ids.tolist()))  # no token twice
    assert len(ids) == 1000 // 64 * 64  # only the last remainder dropped
    again = torch.cat(list(ShufflingBuffer(store, 64, seed=3, buffer_tokens=300, chunk_tokens=20).epoch(0)))
    assert torch.equal(torch.cat(batches), again)
    other = torch.cat(list(buffer.epoch(1)))
    assert not torch.equal(torch.cat(batches)[:64], other[:64])
    # shuffled across shards: a batch mixes tokens from several shards
    assert len(set((batches[0][:, 0] // 148).long().tolist())) > 1  # shards hold 4 chunks = 148 tokens


def test_store_sample_is_uniform_without_replacement(tmp_path):
    store = make_store(tmp_path)
    s = store.sample(500, seed=0)[:, 0]
    assert len(set(s.tolist())) == 500 and 350 < float(s.mean()) < 650


def test_topk_sparse_decode_equals_dense():
    torch.manual_seed(0)
    sae = TopKSAE(16, 64, k=5)
    x = torch.randn(32, 16)
    f = sae.encode(x)
    assert ((f > 0).sum(1) <= 5).all()
    values, indices = sae.topk(x)
    torch.testing.assert_close(sae.decode_sparse(values, indices), sae.decode(f))
    out = sae.loss(x)
    torch.testing.assert_close(out["mse"], (x - sae.decode(f)).pow(2).sum(-1).mean())


def test_fold_input_scale_keeps_latents():
    torch.manual_seed(0)
    sae = TopKSAE(16, 64, k=5)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_()
    x = torch.randn(32, 16) * 7
    scale = 0.37
    f_scaled = sae.encode(x * scale)
    x_hat = sae.decode(f_scaled) / scale
    sae.fold_input_scale(scale)
    torch.testing.assert_close(sae.encode(x), f_scaled)
    torch.testing.assert_close(sae.decode(sae.encode(x)), x_hat, rtol=1e-5, atol=1e-5)


def test_auxk_gradient_reaches_dead_encoder_rows():
    torch.manual_seed(0)
    sae = TopKSAE(16, 64, k=4, aux_k=8)
    x = torch.randn(128, 16)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[:32] = True
    out = sae.loss(x, dead=dead)
    assert out["auxk"] > 0
    (out["loss"] - out["mse"]).backward()  # the AuxK term alone
    assert sae.W_enc.grad[:, :32].abs().sum() > 0  # dead latents get encoder gradient
    assert sae.W_enc.grad[:, 32:].abs().sum() == 0  # live ones get none from AuxK


def test_parallel_decoder_grad_removed():
    torch.manual_seed(0)
    sae = TopKSAE(16, 64, k=4)
    sae.loss(torch.randn(64, 16))["loss"].backward()
    sae.remove_parallel_decoder_grad()
    assert (sae.W_dec.grad * sae.W_dec).sum(1).abs().max() < 1e-6


def test_geometric_median_matches_scipy():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(size=(200, 5)), rng.normal(50, 1, size=(20, 5))])
    ref = scipy.optimize.minimize(lambda m: np.linalg.norm(x - m, axis=1).sum(), x.mean(0), method="Nelder-Mead",
                                  options={"xatol": 1e-8, "fatol": 1e-10, "maxiter": 20000}).x
    got = geometric_median(torch.tensor(x, dtype=torch.float64), n_iter=500, eps=1e-10).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-3)
    assert np.linalg.norm(got - x.mean(0)) > 1  # robust: not pulled to the outliers like the mean


def test_lr_schedule_warmup_and_decay():
    total, warmup = 100, 10
    lrs = [lr_factor(s, total, warmup, 0.2) for s in range(total)]
    assert lrs[0] == 0.1 and lrs[9] == 1.0 and lrs[50] == 1.0
    assert lrs[80] == 1.0 and lrs[99] == 0.05 and all(np.diff(lrs[80:]) < 0)


def test_lr_constant_after_warmup_by_default():
    from omegaconf import OmegaConf

    decay = float(OmegaConf.load(CONFIG / "train.yaml").train.lr_decay_frac)
    lrs = [lr_factor(s, 100, 10, decay) for s in range(100)]
    assert decay == 0.0 and lrs[:10] == [(s + 1) / 10 for s in range(10)] and set(lrs[10:]) == {1.0}


def test_input_scale_is_centred_and_offset_free():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4000, 6)) * np.array([1.0, 2.0, 0.5, 3.0, 1.0, 0.1])
    expected = np.sqrt(6 / ((x - x.mean(0)) ** 2).sum(1).mean())
    got = input_scale(torch.tensor(x, dtype=torch.float32))
    assert np.isclose(got, expected, rtol=1e-5)
    assert np.isclose(input_scale(torch.tensor(x + 50.0, dtype=torch.float32)), expected, rtol=1e-4)  # offset-free
    scaled = torch.tensor(x) * got
    assert np.isclose(float((scaled - scaled.mean(0)).pow(2).sum(1).mean()), 6, rtol=1e-5)  # unit variance per dim


def test_sparsity_coefficient_warms_up_linearly(tmp_path):
    from omegaconf import OmegaConf

    from sae4scfm.saes import StandardSAE
    from sae4scfm.training.trainer import Member, train_step

    torch.manual_seed(0)
    sae = StandardSAE(8, 32, l1_coeff=0.5)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    cfg = OmegaConf.create({"train": {"lr_decay_frac": 0.0, "sparsity_warmup_frac": 0.1, "grad_clip": 1.0,
                                      "autocast": "none", "dead_after_tokens": 10**6, "log_every": 10**9,
                                      "checkpoint_every": 10**9}, "sae": {"hyperparams": {"lr": 1e-3}}})
    m = Member(cfg, tmp_path, sae, opt, torch.zeros(32, dtype=torch.long), 0, 1.0, None)
    x = torch.randn(16, 8)
    seen = []
    for step in range(1, 21):  # 50 steps in all: the coefficient reaches its value at step 5
        train_step(m, x, step, 50, 1, 0)
        seen.append(sae.sparsity_scale)
        if step == 3:  # the loss of that step used the scaled coefficient
            out = sae.loss(x)
            torch.testing.assert_close(out["loss"], out["mse"] + 0.6 * 0.5 * out["l1"])
    assert seen[:5] == [0.2, 0.4, 0.6, 0.8, 1.0] and set(seen[5:]) == {1.0}


@pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter")
def test_checkpoint_state_lands_on_each_parameters_device(tmp_path):
    """Adam state saved from CPU is restored on the device of each parameter, ``step`` as fused Adam
    wants it (float32 on that device). CPU cannot show CUDA; ``meta`` parameters stand in for a
    device other than the checkpoint's (the old loader left every tensor on the CPU)."""
    from sae4scfm.saes import GatedSAE
    from sae4scfm.training.checkpoint import load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    sae = GatedSAE(8, 32, l1_coeff=1.0)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3, fused=True)
    sae.loss(torch.randn(16, 8))["loss"].backward()
    opt.step()
    save_checkpoint(tmp_path, sae, opt, torch.arange(32), step=7, scale=0.5)

    target = GatedSAE(8, 32, l1_coeff=1.0).to("meta")
    target_opt = torch.optim.Adam(target.parameters(), lr=1e-3, fused=True)
    step, scale, since_fired = load_checkpoint(tmp_path, target, target_opt)
    assert (step, scale) == (7, 0.5) and torch.equal(since_fired, torch.arange(32))
    assert len(target_opt.state) == len(list(target.parameters()))
    for p in target.parameters():
        state = target_opt.state[p]
        assert {k: v.device for k, v in state.items()} == {k: p.device for k in ("step", "exp_avg", "exp_avg_sq")}
        assert state["step"].dtype == torch.float32 and state["exp_avg"].dtype == p.dtype

    # on the checkpoint's own device the state comes back exactly, and training continues identically
    again = GatedSAE(8, 32, l1_coeff=1.0)
    again_opt = torch.optim.Adam(again.parameters(), lr=1e-3, fused=True)
    load_checkpoint(tmp_path, again, again_opt)
    names = dict(sae.named_parameters())
    for name, p in again.named_parameters():
        for key, value in opt.state[names[name]].items():
            assert torch.equal(again_opt.state[p][key], value)


def test_adam_reset_touches_only_per_latent_axes():
    """Resampled latents lose their Adam moments in W_enc columns, W_dec rows and b_enc; ``b_dec``
    keeps its own even when d_sae == d_in (dictionary_multiplier=1), where selecting parameters by
    ``shape[0] == d_sae`` also hit it."""
    from sae4scfm.saes import StandardSAE
    from sae4scfm.training.trainer import reset_adam_rows

    torch.manual_seed(0)
    sae = StandardSAE(16, 16, l1_coeff=1.0)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    sae.loss(torch.randn(32, 16))["loss"].backward()
    opt.step()
    before = {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in sae.named_parameters()}
    latents = torch.tensor([2, 5])
    reset_adam_rows(opt, sae, latents)
    keep = torch.ones(16, dtype=torch.bool)
    keep[latents] = False
    for key in ("exp_avg", "exp_avg_sq"):
        state = {n: opt.state[p][key] for n, p in sae.named_parameters()}
        assert torch.equal(state["b_dec"], before["b_dec"][key]) and state["b_dec"].abs().sum() > 0
        assert (state["W_enc"][:, latents] == 0).all() and (state["W_dec"][latents] == 0).all()
        assert (state["b_enc"][latents] == 0).all()
        assert torch.equal(state["W_enc"][:, keep], before["W_enc"][key][:, keep])
        assert torch.equal(state["W_dec"][keep], before["W_dec"][key][keep])
        assert torch.equal(state["b_enc"][keep], before["b_enc"][key][keep])


def test_every_per_latent_parameter_has_a_declared_latent_axis():
    """Each parameter of each architecture is b_dec or has a latent axis of size d_sae in
    ``latent_axes`` (so resampling resets its Adam state), with d_in != d_sae to tell axes apart."""
    from omegaconf import OmegaConf

    from sae4scfm.saes import ARCHITECTURES, build_sae
    from sae4scfm.training.trainer import latent_axes

    for name in ARCHITECTURES:
        hp = OmegaConf.to_container(OmegaConf.load(CONFIG / "sae" / f"{name}.yaml").hyperparams, resolve=True)
        sae = build_sae(name, 8, 24, hp)
        axes = latent_axes(sae)
        for pname, p in sae.named_parameters():
            if pname == "b_dec":
                assert pname not in axes
            else:
                assert pname in axes and p.shape[axes[pname]] == 24, (name, pname, tuple(p.shape))
