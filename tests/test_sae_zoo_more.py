"""The Matryoshka BatchTopK, Gated, p-annealed and gated p-annealed SAEs against hand
computations and their defining properties, a resume of the real training loop, and one short
end-to-end run of each through the real pipeline."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from sae4scfm.errors import InputError
from sae4scfm.saes import ARCHITECTURES, build_sae, load_sae
from sae4scfm.saes.gated import GatedSAE
from sae4scfm.saes.p_anneal import lp_penalty
from tests.test_sae_zoo import test_end_to_end as zoo_end_to_end

D_IN, D_SAE = 16, 64
NEW = ("matryoshka", "gated", "p_anneal", "gated_anneal")
HP = {"matryoshka": {"k": 5, "group_weights": [0.4, 0.3, 0.2, 0.1]},
      "gated": {"l1_coeff": 0.5, "unit_norm_decoder": False},
      "p_anneal": {"l1_coeff": 0.5, "p_end": 0.2, "anneal_frac": 0.6, "n_p_updates": 4, "resample_every": 5},
      "gated_anneal": {"l1_coeff": 0.5, "p_end": 0.3, "anneal_frac": 0.6, "n_p_updates": 4, "resample_every": 5}}
CONFIG = Path(__file__).resolve().parents[1] / "sae4scfm" / "config" / "sae"


def make(arch: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    sae = build_sae(arch, D_IN, D_SAE, {**HP[arch], **overrides})
    with torch.no_grad():  # off the symmetric init, so biases and the magnitude path matter
        sae.b_dec.normal_()
        sae.b_enc.normal_(0, 0.3)
        sae.W_enc.mul_(5.0)
        if arch == "matryoshka":
            sae.threshold.fill_(0.4)
        if isinstance(sae, GatedSAE):
            sae.r_mag.normal_(0, 0.5)
            sae.b_mag.normal_(0, 0.3)
            if not sae.unit_norm_decoder:
                sae.W_dec.mul_(torch.empty(D_SAE, 1).uniform_(0.2, 2.0))
    return sae


def batch(n: int = 48, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed)) * 2


# --- all four --------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", NEW)
def test_registered_with_commented_yaml(arch):
    assert ARCHITECTURES[arch].architecture == arch
    text = (CONFIG / f"{arch}.yaml").read_text()
    for line in text.splitlines():  # every key carries a comment
        if re.match(r"\s*[A-Za-z_]+:", line) and line.split(":")[0].strip() not in ("hyperparams", "architecture"):
            assert "#" in line, line
    cfg = OmegaConf.load(CONFIG / f"{arch}.yaml")
    assert cfg.architecture == arch
    hp = OmegaConf.to_container(cfg.hyperparams)
    sae = build_sae(arch, D_IN, D_SAE, hp)  # every documented hyperparameter is accepted
    assert {k: v for k, v in hp.items() if k != "lr"}.items() <= sae.hyperparams.items()


@pytest.mark.parametrize("arch", NEW)
def test_shapes_and_loss_keys(arch):
    sae = make(arch)
    x = batch(32)
    f = sae.encode(x)
    assert f.shape == (32, D_SAE) and sae(x).shape == (32, D_IN) and (f >= 0).all() and (f > 0).any()
    out = sae.loss(x, dead=torch.zeros(D_SAE, dtype=torch.bool))
    assert {"loss", "mse", "l0", "fired"} <= set(out)
    assert out["fired"].shape == (D_SAE,) and out["fired"].dtype == torch.bool
    assert out["loss"].ndim == 0 and out["loss"].requires_grad
    out["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in sae.parameters() if p.grad is not None)
    if arch != "matryoshka":  # training code == inference code
        torch.testing.assert_close(out["mse"], (x - sae.decode(f)).pow(2).sum(-1).mean())
        assert float(out["l0"]) == float((f > 0).sum(-1).float().mean())
        assert torch.equal(out["fired"], (f > 0).any(0))


@pytest.mark.parametrize("arch", NEW)
def test_fold_input_scale_keeps_latents(arch):
    sae = make(arch)
    x = batch(32) * 3.5
    scale = 0.37
    f_scaled = sae.encode(x * scale)
    x_hat = sae.decode(f_scaled) / scale
    extra = {k: v.clone() for k, v in sae.state_dict().items() if k not in ("W_enc", "W_dec", "b_dec")}
    sae.fold_input_scale(scale)
    assert (f_scaled > 0).sum() > 0
    torch.testing.assert_close(sae.encode(x), f_scaled, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae.decode(sae.encode(x)), x_hat, rtol=1e-5, atol=1e-5)
    for k, v in extra.items():  # r_mag, b_mag, b_enc, thresholds, p, coefficient: latent space, unchanged
        assert torch.equal(sae.state_dict()[k], v), k


# --- matryoshka -------------------------------------------------------------------------------

def test_matryoshka_groups_and_loss_by_hand():
    sae = make("matryoshka").train()
    assert sae.group_ends == [4, 12, 28, 64]
    x = batch(32)
    pre = sae.pre_acts(x).detach()
    f = sae.batch_topk(pre)
    assert int((f > 0).sum()) == 5 * 32
    W, b = sae.W_dec.detach(), sae.b_dec.detach()
    expected, mses = 0.0, []
    for w, end in zip([0.4, 0.3, 0.2, 0.1], [4, 12, 28, 64]):
        err = sum(float(((x[n] - b - sum(f[n, i] * W[i] for i in range(end) if f[n, i] > 0)) ** 2).sum())
                  for n in range(32)) / 32
        mses.append(err)
        expected += w * err
    with torch.no_grad():
        sae.threshold.fill_(-1.0)  # not estimated yet
    out = sae.loss(x)
    assert math.isclose(out["loss"].item(), expected, rel_tol=1e-5)
    assert math.isclose(out["mse"].item(), mses[-1], rel_tol=1e-5)
    torch.testing.assert_close(out["prefix_mse"], torch.tensor(mses), rtol=1e-5, atol=1e-5)
    assert float(sae.threshold) == float(f[f > 0].min())  # first batch sets the inference threshold...
    sae.eval()
    torch.testing.assert_close(sae.encode(x), pre * (pre > sae.threshold))  # ...used per sample


def test_matryoshka_inner_group_trained_alone_by_its_weight():
    sae = make("matryoshka", group_weights=[1.0, 0.0, 0.0, 0.0], auxk_alpha=0.0)
    sae.loss(batch(64))["loss"].backward()
    g = sae.W_dec.grad
    assert g[:4].abs().sum() > 0 and g[4:].abs().sum() == 0  # later groups do not serve the first prefix
    sae.zero_grad()
    sae.group_weights = [0.0, 0.0, 0.0, 1.0]  # last prefix only = plain BatchTopK
    sae.loss(batch(64))["loss"].backward()
    assert sae.W_dec.grad[28:].abs().sum() > 0


def test_matryoshka_auxk_reaches_only_dead_encoder_columns():
    sae = make("matryoshka")
    x = batch(128)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[40:] = True
    out = sae.loss(x, dead=dead)
    assert float(out["auxk"]) > 0
    (with_aux,) = torch.autograd.grad(out["loss"], sae.W_enc)
    (without,) = torch.autograd.grad(sae.loss(x)["loss"], sae.W_enc)
    diff = (with_aux - without).abs()
    assert diff[:, 40:].sum() > 0 and diff[:, :40].sum() == 0


@pytest.mark.parametrize("bad", [{"group_fractions": [0.5, 0.4]}, {"group_fractions": [0.5, 0.0, 0.5]},
                                 {"group_weights": [1.0, 1.0]}, {"group_fractions": [0.001, 0.999]}])
def test_matryoshka_rejects_bad_groups(bad):
    with pytest.raises(InputError):
        build_sae("matryoshka", D_IN, D_SAE, bad)


# --- gated ---------------------------------------------------------------------------------------

def test_gated_encode_and_loss_by_hand():
    sae = make("gated")
    x = batch(20)
    W, bg, rm, bm = (t.detach() for t in (sae.W_enc, sae.b_enc, sae.r_mag, sae.b_mag))
    Wd, bd = sae.W_dec.detach(), sae.b_dec.detach()
    mse = l1 = aux = 0.0
    f = torch.zeros(20, D_SAE)
    for n in range(20):
        for i in range(D_SAE):
            z = float((x[n] - bd) @ W[:, i])
            gate, mag = z + float(bg[i]), math.exp(float(rm[i])) * z + float(bm[i])
            f[n, i] = max(mag, 0.0) if gate > 0 else 0.0
            l1 += max(gate, 0.0) * float(Wd[i].norm()) / 20
        mse += float(((x[n] - f[n] @ Wd - bd) ** 2).sum()) / 20
        aux += float(((x[n] - torch.relu((x[n] - bd) @ W + bg) @ Wd - bd) ** 2).sum()) / 20
    torch.testing.assert_close(sae.encode(x), f, rtol=1e-5, atol=1e-5)
    assert ((f == 0) & (sae.gate_and_magnitude(x)[1] > 0)).any()  # the gate closes some positive magnitudes
    out = sae.loss(x)
    assert math.isclose(float(out["l1"]), l1, rel_tol=1e-5) and math.isclose(float(out["aux"]), aux, rel_tol=1e-5)
    assert math.isclose(out["loss"].item(), mse + 0.5 * l1 + aux, rel_tol=1e-5)


@pytest.mark.parametrize("arch", ["gated", "gated_anneal"])
@pytest.mark.parametrize("unit_norm", [True, False])
def test_gated_aux_term_trains_the_decoder_only_with_learned_norms(arch, unit_norm):
    sae = make(arch, unit_norm_decoder=unit_norm)
    x = batch(64)
    params = dict(sae.named_parameters())
    grads = dict(zip(params, torch.autograd.grad(sae.aux_loss(x), list(params.values()), allow_unused=True)))
    for name in ("W_dec", "b_dec", "r_mag", "b_mag") if unit_norm else ("r_mag", "b_mag"):  # no path at all
        assert grads[name] is None or (grads[name] == 0).all(), name
    assert grads["W_enc"].abs().sum() > 0 and grads["b_enc"].abs().sum() > 0
    if not unit_norm:  # the gate's own reconstruction through the live decoder, by hand
        W, b = sae.W_dec.detach().clone().requires_grad_(True), sae.b_dec.detach().clone().requires_grad_(True)
        pi_gate = (x - b) @ sae.W_enc.detach() + sae.b_enc.detach()
        by_hand = (x - torch.relu(pi_gate) @ W - b).pow(2).sum(-1).mean()
        for got, want in zip((grads["W_dec"], grads["b_dec"]), torch.autograd.grad(by_hand, (W, b))):
            torch.testing.assert_close(got, want)
        return
    # inside the full loss too: the decoder's gradient is that of reconstruction + sparsity alone
    out = sae.loss(x)
    pi_gate, _ = sae.gate_and_magnitude(x)
    rest = out["mse"] + sae.sparsity(sae.penalty_acts(x, pi_gate))[0]
    for name in ("W_dec", "b_dec"):
        (a,) = torch.autograd.grad(out["loss"], params[name], retain_graph=True)
        (b,) = torch.autograd.grad(rest, params[name], retain_graph=True)
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # the Heaviside gate passes nothing from the reconstruction to the gate bias; the magnitude path learns
    (g_gate, g_rmag) = torch.autograd.grad(out["mse"], [sae.b_enc, sae.r_mag], allow_unused=True)
    assert (g_gate is None or (g_gate == 0).all()) and g_rmag.abs().sum() > 0


def test_gated_free_norms_degenerate_direction_is_anchored_by_the_aux_term():
    """With learned decoder norms, W_dec,i -> a·W_dec,i and r_mag,i -> r_mag,i - log a keep x̂ and the
    gates and scale the penalty by a: the penalty alone would shrink the decoder toward 0. The
    auxiliary reconstruction through the (attached) decoder changes along it, which anchors it."""
    sae = make("gated", unit_norm_decoder=False)
    x = batch(64)
    out = sae.loss(x)
    a = 0.5
    with torch.no_grad():
        sae.W_dec.mul_(a)
        sae.r_mag.sub_(math.log(a))
        sae.b_mag.div_(a)  # π_mag = exp(r_mag) z + b_mag scales by 1/a as a whole
    moved = sae.loss(x)
    torch.testing.assert_close(moved["mse"], out["mse"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(moved["l1"], a * out["l1"], rtol=1e-5, atol=1e-6)
    assert abs(float(moved["aux"]) / float(out["aux"]) - 1) > 0.05


def test_gated_decoder_norm_policy():
    free, unit = make("gated"), make("gated", unit_norm_decoder=True)
    W = free.W_dec.detach().clone()
    free.normalize_decoder()
    assert torch.equal(free.W_dec.detach(), W)
    with torch.no_grad():
        unit.W_dec.mul_(3.0)
    unit.normalize_decoder()
    torch.testing.assert_close(unit.W_dec.norm(dim=1), torch.ones(D_SAE))


# --- p-annealing -------------------------------------------------------------------------------

def test_lp_penalty_by_hand_and_finite_at_zero():
    a = torch.tensor([[0.0, 0.5, 2.0], [1.0, 0.0, 0.0]], requires_grad=True)
    expected = (0.5 ** 0.3 + 2.0 ** 0.3 + 1.0) / 2
    val = lp_penalty(a, 0.3)
    assert math.isclose(val.item(), expected, rel_tol=1e-6)
    (g,) = torch.autograd.grad(val, a)
    assert torch.isfinite(g).all() and g[0, 0] == 0 and math.isclose(float(g[0, 1]), 0.3 * 0.5 ** -0.7 / 2, rel_tol=1e-5)
    assert math.isclose(lp_penalty(a, 1.0).item(), a.sum(1).mean().item(), rel_tol=1e-6)


def test_p_schedule():
    sae = make("p_anneal", anneal_start_frac=0.1, anneal_frac=0.6, n_p_updates=10, p_end=0.2)
    stages = [sae.stage_at(s, 100) for s in range(101)]
    assert stages[:16] == [0] * 16 and stages[16] == 1 and stages[69] == 9 and stages[70:] == [10] * 31
    assert stages == sorted(stages) and set(stages) == set(range(11))
    assert sae.p_of_stage(0) == 1.0 and math.isclose(sae.p_of_stage(10), 0.2) and math.isclose(sae.p_of_stage(5), 0.6)


@pytest.mark.parametrize("arch", ["p_anneal", "gated_anneal"])
def test_penalty_continuous_across_a_change_of_p(arch):
    sae = make(arch, resample_every=0)  # schedule: total 100 steps, stages at 10 + 15 s
    x = batch(64)
    no_dead = torch.zeros(D_SAE, dtype=torch.bool)
    before = sae.loss(x)
    assert sae.after_step(24, 100, no_dead, x) is None and float(sae.p) == 1.0  # not yet due
    assert float(sae.sparsity_coeff) == 0.5
    sae.after_step(25, 100, no_dead, x)
    after = sae.loss(x)
    assert int(sae.p_stage) == 1 and math.isclose(float(sae.p), sae.p_of_stage(1), rel_tol=1e-6) and float(sae.p) < 1
    assert float(sae.sparsity_coeff) != 0.5
    assert not math.isclose(float(after["l1"]), float(before["l1"]), rel_tol=1e-3)  # Lp itself jumps...
    assert math.isclose(float(after["loss"]), float(before["loss"]), rel_tol=1e-5)  # ...the penalty does not
    acts = sae.penalty_acts(x)
    assert math.isclose(0.5 * float(lp_penalty(acts, 1.0)), float(sae.sparsity_coeff * lp_penalty(acts, sae.p)),
                        rel_tol=1e-5)
    sae.after_step(100, 100, no_dead, x)  # jump to the last stage in one go, still continuous
    assert math.isclose(float(sae.p), HP[arch]["p_end"], rel_tol=1e-6)
    torch.testing.assert_close(sae.loss(x)["loss"], after["loss"], rtol=1e-5, atol=0)


@pytest.mark.parametrize("arch", ["p_anneal", "gated_anneal"])
def test_resampling_reinitialises_dead_latents_only(arch):
    sae = make(arch)
    x = batch(64)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[::3] = True
    with torch.no_grad():
        sae.W_enc[:, dead] *= 1e-3  # make the dead ones recognisable
    old = {k: v.clone() for k, v in sae.state_dict().items()}
    assert sae.after_step(4, 100, dead, x) is None  # not a resampling step
    assert sae.after_step(100, 100, dead, x) is None  # too close to the end
    assert sae.after_step(10, 100, torch.zeros_like(dead), x) is None  # nothing dead
    old = {k: v.clone() for k, v in sae.state_dict().items()}
    residual = (x - sae(x)).detach()
    got = sae.after_step(15, 100, dead, x)
    assert torch.equal(got, dead.nonzero().squeeze(1)) and int(sae.n_resampled) == int(dead.sum())
    new = sae.state_dict()
    for name in ("W_dec", "W_enc"):  # dead latents moved, live ones untouched bit for bit
        cols = (lambda t: t[:, dead], lambda t: t[:, ~dead]) if name == "W_enc" else (lambda t: t[dead], lambda t: t[~dead])
        assert (cols[0](new[name]) != cols[0](old[name])).any(dim=-1 if name == "W_dec" else 0).all(), name
        assert torch.equal(cols[1](new[name]), cols[1](old[name])), name
    assert torch.equal(new["b_dec"], old["b_dec"]) and torch.equal(new["b_enc"][~dead], old["b_enc"][~dead])
    assert (new["b_enc"][dead] == 0).all()
    # decoder rows: unit residuals of batch inputs; encoder columns: 0.2 x mean live norm along them
    torch.testing.assert_close(new["W_dec"][dead].norm(dim=1), torch.ones(int(dead.sum())))
    unit_res = torch.nn.functional.normalize(residual, dim=1)
    assert ((new["W_dec"][dead] @ unit_res.t()).max(1).values > 1 - 1e-5).all()
    live_norm = old["W_enc"][:, ~dead].norm(dim=0).mean()
    torch.testing.assert_close(new["W_enc"][:, dead], new["W_dec"][dead].t() * 0.2 * live_norm)
    if arch == "gated_anneal":
        assert (new["r_mag"][dead] == 0).all() and (new["b_mag"][dead] == 0).all()
        assert torch.equal(new["r_mag"][~dead], old["r_mag"][~dead])
    # repeatable: a second copy draws the same inputs (a resumed run resamples identically)
    twin = make(arch)
    twin.load_state_dict(old)
    twin.after_step(15, 100, dead, x)
    assert torch.equal(twin.W_dec, sae.W_dec)


@pytest.mark.parametrize("arch", ["p_anneal", "gated_anneal"])
def test_anneal_state_is_saved(arch, tmp_path):
    sae = make(arch)
    x = batch(64)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[:7] = True
    sae.after_step(70, 100, dead, x)
    state = {k: sae.state_dict()[k].clone() for k in ("p", "sparsity_coeff", "p_stage", "steps_done", "n_resampled")}
    assert int(state["p_stage"]) == 4 and int(state["steps_done"]) == 70 and int(state["n_resampled"]) == 7
    sae.save(tmp_path, {})
    loaded, meta = load_sae(tmp_path)
    assert meta["architecture"] == arch
    for k, v in state.items():
        assert torch.equal(loaded.state_dict()[k], v), k
    torch.testing.assert_close(loaded.loss(x)["loss"], sae.loss(x)["loss"])


# --- end to end ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def zoo_store_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("zoo_more_stores")  # activations extracted once for all four runs


@pytest.mark.parametrize("arch", NEW)
def test_end_to_end(arch, tmp_path, zoo_store_dir):
    # train; held-out FVU, L0 and dead fraction within the bounds measured on the demo store
    # (tests/test_sae_zoo.py::MEASURED); load_sae reproduces the latents
    zoo_end_to_end(arch, tmp_path, zoo_store_dir)
    (run_dir,) = (tmp_path / "runs" / arch).iterdir()
    sae, meta = load_sae(run_dir)
    assert meta["steps"] == 23
    if arch == "matryoshka":
        assert float(sae.threshold) > 0 and sae.group_ends[-1] == sae.d_sae
    if arch in ("p_anneal", "gated_anneal"):  # the annealing state of the end of training was saved
        assert int(sae.steps_done) == meta["steps"] and int(sae.p_stage) == sae.n_p_updates
        assert math.isclose(float(sae.p), sae.p_end, rel_tol=1e-6)
        assert float(sae.sparsity_coeff) != meta["hyperparams"]["l1_coeff"]


@pytest.mark.parametrize("arch", ["standard", "gated", "jumprelu", "p_anneal", "gated_anneal"])
def test_sparsity_scale_multiplies_the_penalty_alone(arch):
    torch.manual_seed(0)
    sae = build_sae(arch, D_IN, D_SAE, {"l0_coeff": 0.3} if arch == "jumprelu" else {"l1_coeff": 0.5})
    x = batch(32)
    full = sae.loss(x)["loss"]
    sae.sparsity_scale = 0.0
    without = sae.loss(x)["loss"]
    sae.sparsity_scale = 0.25
    torch.testing.assert_close(sae.loss(x)["loss"], without + 0.25 * (full - without))
    assert full - without > 0.01 * full
