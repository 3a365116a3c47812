"""Interoperability with the reference implementations, which are test dependencies: SAELens 6.x
(``sae_lens``) and dictionary_learning 0.1.0.

* every architecture both sides implement: the same random weights in ours and in the reference
  give the same ``encode`` and ``decode`` (1e-5), through the reference classes, through
  ``import_saelens`` / ``import_dictionary_learning`` and through ``export_saelens`` →
  ``sae_lens.SAE.load_from_disk``;
* every exportable architecture trained briefly through the real pipeline, exported and loaded
  by SAELens, gives the run's latents on the held-out activation store;
* reference-bug tests: where a reference deviates from the paper and ours does not.

dictionary_learning's package ``__init__`` imports its ActivationBuffer, which needs nnsight (and
with it a CUDA torch); its dictionaries and trainers need torch and einops only, so the package
is registered without running ``__init__`` (``_dictionary_learning``).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import sys
import types

import pytest
import sae_lens  # noqa: E402  (test dependency)
import torch
import torch.nn.functional as F
from sae_lens import saes as lens_saes  # noqa: E402

import sae4scfm
from sae4scfm.errors import InputError
from sae4scfm.saes import ARCHITECTURES, StandardSAE, build_sae, load_sae
from sae4scfm.saes.interop import export_saelens, import_dictionary_learning, import_saelens
from sae4scfm.saes.jumprelu import jumprelu, step
from sae4scfm.store.shards import ActivationStore
from tests.conftest import SMALL_RUN

D_IN, D_SAE = 16, 64
HP = {"standard": {"l1_coeff": 0.5}, "standard_dnl1": {"l1_coeff": 0.5, "decoder_norm_l1": True},
      "topk": {"k": 5}, "batchtopk": {"k": 5}, "jumprelu": {"bandwidth": 0.1},
      "gated": {"l1_coeff": 0.5}, "gated_free": {"l1_coeff": 0.5, "unit_norm_decoder": False}}


def _dictionary_learning():
    """dictionary_learning.dictionary and .trainers, imported without the package's __init__ (nnsight)."""
    if "dictionary_learning" not in sys.modules:
        spec = importlib.util.find_spec("dictionary_learning")
        assert spec is not None, "dictionary-learning==0.1.0 is a test dependency (pip install --no-deps)"
        pkg = types.ModuleType("dictionary_learning")
        pkg.__path__ = list(spec.submodule_search_locations)
        pkg.__spec__ = spec
        sys.modules["dictionary_learning"] = pkg
    return types.SimpleNamespace(
        dictionary=importlib.import_module("dictionary_learning.dictionary"),
        top_k=importlib.import_module("dictionary_learning.trainers.top_k"),
        batch_top_k=importlib.import_module("dictionary_learning.trainers.batch_top_k"),
        jumprelu=importlib.import_module("dictionary_learning.trainers.jumprelu"),
        matryoshka=importlib.import_module("dictionary_learning.trainers.matryoshka_batch_top_k"))


def make(name: str, seed: int = 0):
    """Our SAE with random weights off the symmetric init (biases, thresholds and norms matter)."""
    torch.manual_seed(seed)
    arch = name.split("_")[0]
    sae = build_sae(arch, D_IN, D_SAE, HP[name])
    with torch.no_grad():
        sae.W_enc.normal_(0, 0.5)
        sae.b_dec.normal_()
        sae.b_enc.normal_(0, 0.3)
        if arch == "batchtopk":
            sae.threshold.fill_(0.4)
        if arch == "jumprelu":
            sae.log_threshold.copy_(torch.empty(D_SAE).uniform_(0.05, 0.8).log())
        if arch == "gated":
            sae.r_mag.normal_(0, 0.3)
            sae.b_mag.normal_(0, 0.3)
        if name in ("standard_dnl1", "gated_free"):
            sae.W_dec.mul_(torch.empty(D_SAE, 1).uniform_(0.2, 2.0))
    return sae.eval()


def lens_for(sae):
    """The SAELens inference SAE with ``sae``'s weights (BatchTopK as SAELens saves it: JumpReLU)."""
    arch = sae.architecture
    if arch == "standard":
        lens = lens_saes.StandardSAE(lens_saes.StandardSAEConfig(d_in=D_IN, d_sae=D_SAE))
    elif arch == "topk":
        lens = lens_saes.TopKSAE(lens_saes.TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=sae.k))
    elif arch == "gated":
        lens = lens_saes.GatedSAE(lens_saes.GatedSAEConfig(d_in=D_IN, d_sae=D_SAE))
    else:
        lens = lens_saes.JumpReLUSAE(lens_saes.JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE))
    with torch.no_grad():
        for name in ("W_enc", "W_dec", "b_dec"):
            getattr(lens, name).copy_(getattr(sae, name))
        if arch == "gated":
            lens.b_gate.copy_(sae.b_enc)
            lens.b_mag.copy_(sae.b_mag)
            lens.r_mag.copy_(sae.r_mag)
        else:
            lens.b_enc.copy_(sae.b_enc)
        if arch in ("jumprelu", "batchtopk"):
            lens.threshold.copy_(sae.threshold.expand(D_SAE))
    return lens.eval()


def assert_same(ours, encode, decode, x):
    with torch.no_grad():
        f = ours.encode(x)
        assert (f > 0).any() and (f == 0).any()
        torch.testing.assert_close(encode(x), f, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(decode(f), ours.decode(f), rtol=1e-5, atol=1e-5)


# --- SAELens --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["standard", "standard_dnl1", "topk", "jumprelu", "batchtopk", "gated",
                                  "gated_free"])
def test_saelens_same_weights_same_latents(name, tmp_path):
    """Reference class with our weights; export → load_from_disk; SAELens save_model → import."""
    ours = make(name)
    x = torch.randn(128, D_IN) * 2
    lens = lens_for(ours)
    assert_same(ours, lens.encode, lens.decode, x)
    # export_saelens -> sae_lens.SAE.load_from_disk
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    ours.save(run_dir, {"layer": 2, "hook_point": "hook_resid.2"})
    loaded = sae_lens.SAE.load_from_disk(export_saelens(run_dir, tmp_path / "lens"))
    assert type(loaded) is type(lens)
    assert_same(ours, loaded.encode, loaded.decode, x)
    # SAELens' own save_model -> import_saelens
    lens.save_model(tmp_path / "saved")
    back = import_saelens(tmp_path / "saved")
    expected_arch = "jumprelu" if ours.architecture == "batchtopk" else ours.architecture
    assert back.architecture == expected_arch
    assert_same(back, lens.encode, lens.decode, x)


@pytest.mark.parametrize("variant", ["standard_no_b_dec_in", "jumprelu_no_b_dec_in", "gated_no_b_dec_in",
                                     "topk_rescaled", "expected_average_only_in"])
def test_import_saelens_variants(variant, tmp_path):
    """SAELens options ours folds into the weights: no b_dec subtraction before encoding, TopK on
    ‖W_dec,i‖-rescaled pre-activations, and a constant input-norm scaling factor."""
    torch.manual_seed(1)
    arch = variant.split("_")[0]
    kw = {"apply_b_dec_to_input": False} if variant.endswith("no_b_dec_in") else {}
    if arch == "topk":
        lens = lens_saes.TopKSAE(lens_saes.TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=5,
                                                         rescale_acts_by_decoder_norm=True))
    elif arch == "expected":
        lens = lens_saes.StandardSAE(lens_saes.StandardSAEConfig(d_in=D_IN, d_sae=D_SAE))
    else:
        cls = {"standard": "StandardSAE", "jumprelu": "JumpReLUSAE", "gated": "GatedSAE"}[arch]
        lens = getattr(lens_saes, cls)(getattr(lens_saes, cls + "Config")(d_in=D_IN, d_sae=D_SAE, **kw))
    with torch.no_grad():
        for p in lens.parameters():
            p.normal_(0, 0.5)
        if hasattr(lens, "threshold"):
            lens.threshold.uniform_(-0.1, 0.8)  # a non-positive threshold acts as 0
    lens.eval().save_model(tmp_path / "saved")
    x = torch.randn(128, D_IN) * 2
    if arch == "expected":  # SAELens folds s into W_enc, W_dec, b_dec (fold_activation_norm_scaling_factor)
        cfg = json.loads((tmp_path / "saved" / "cfg.json").read_text())
        (tmp_path / "saved" / "cfg.json").write_text(json.dumps({**cfg, "normalize_activations":
                                                                 "expected_average_only_in"}))
        with pytest.raises(InputError, match="norm_scaling_factor"):
            import_saelens(tmp_path / "saved")
        ours = import_saelens(tmp_path / "saved", norm_scaling_factor=0.3)
        lens.fold_activation_norm_scaling_factor(0.3)
    else:
        ours = import_saelens(tmp_path / "saved")
    assert_same(ours, lens.encode, lens.decode, x)


def test_saelens_errors(tmp_path):
    class Custom(StandardSAE):  # a new inference rule: nothing in SAELens computes it (registers itself)
        architecture = "custom"

        def encode(self, x):
            return F.relu(self.pre_acts(x)) ** 2

    try:
        _saelens_errors(Custom, tmp_path)
    finally:
        ARCHITECTURES.pop("custom")


def _saelens_errors(Custom, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    Custom(D_IN, D_SAE).save(run_dir, {})
    with pytest.raises(InputError, match="cannot be exported"):
        export_saelens(run_dir, tmp_path / "out")
    with pytest.raises(InputError, match="not a run dir"):
        export_saelens(tmp_path / "nothing", tmp_path / "out")
    with pytest.raises(InputError, match="cfg.json is missing"):
        import_saelens(tmp_path)
    lens = lens_saes.StandardSAE(lens_saes.StandardSAEConfig(d_in=D_IN, d_sae=D_SAE))
    lens.save_model(tmp_path / "saved")
    cfg = json.loads((tmp_path / "saved" / "cfg.json").read_text())
    (tmp_path / "saved" / "cfg.json").write_text(json.dumps({**cfg, "architecture": "transcoder"}))
    with pytest.raises(InputError, match="no sae4scfm counterpart"):
        import_saelens(tmp_path / "saved")


# --- dictionary_learning ----------------------------------------------------------------------

def dl_reference(arch: str):
    """A dictionary_learning 0.1.0 SAE of ``arch`` with random weights, biases and thresholds."""
    dl = _dictionary_learning()
    torch.manual_seed(2)
    ae = {"standard": lambda: dl.dictionary.AutoEncoder(D_IN, D_SAE),
          "topk": lambda: dl.top_k.AutoEncoderTopK(D_IN, D_SAE, 5),
          "batchtopk": lambda: dl.batch_top_k.BatchTopKSAE(D_IN, D_SAE, 5),
          "jumprelu": lambda: dl.dictionary.JumpReluAutoEncoder(D_IN, D_SAE),
          "gated": lambda: dl.dictionary.GatedAutoEncoder(D_IN, D_SAE),
          "matryoshka": lambda: dl.matryoshka.MatryoshkaBatchTopKSAE(D_IN, D_SAE, 5, [4, 12, 16, 32])}[arch]()
    with torch.no_grad():
        for name, p in ae.named_parameters():
            if name in ("threshold",):
                p.uniform_(0.05, 0.8)
            elif p.ndim == 2:
                p.normal_(0, 0.5)
            else:
                p.normal_(0, 0.3)
        if arch in ("batchtopk", "matryoshka"):
            ae.threshold.fill_(0.4)
    return ae.eval()


@pytest.mark.parametrize("arch", ["standard", "topk", "batchtopk", "matryoshka", "jumprelu", "gated"])
def test_dictionary_learning_same_weights_same_latents(arch, tmp_path):
    """AutoEncoder / AutoEncoderTopK / BatchTopKSAE / JumpReluAutoEncoder / GatedAutoEncoder:
    nn.Linear weights transposed, their b_dec names (``bias``, ``decoder_bias``, ``b_dec``),
    JumpReLU's b_enc without b_dec subtraction, BatchTopK's global threshold and k buffers."""
    ae = dl_reference(arch)
    x = torch.randn(128, D_IN) * 2
    ours = import_dictionary_learning(ae.state_dict(), arch)
    assert ours.architecture == arch
    assert_same(ours, ae.encode, ae.decode, x)
    torch.save(ae.state_dict(), tmp_path / "ae.pt")  # their checkpoint file
    again = import_dictionary_learning(tmp_path / "ae.pt", arch)
    assert_same(again, ae.encode, ae.decode, x)
    if arch in ("topk", "batchtopk", "matryoshka"):
        assert again.k == 5
    if arch == "matryoshka":  # same groups, and the same training-time batch top-k selection
        assert again.group_ends == [4, 16, 32, 64]
        with torch.no_grad():
            theirs = ae.encode(x, use_threshold=False)
            rows, cols, values = again.batch_topk_entries(F.relu(again.pre_acts(x)))
        f = torch.zeros_like(theirs)
        f[rows, cols] = values
        torch.testing.assert_close(f, theirs, rtol=1e-5, atol=1e-5)
    if arch == "standard":  # their random decoder columns are not unit norm: ours keeps the learned norms
        assert again.decoder_norm_l1 and not again.unit_norm_decoder


def test_dictionary_learning_errors(tmp_path):
    ae = dl_reference("standard")
    with pytest.raises(InputError, match="not a dictionary_learning 'jumprelu'"):
        import_dictionary_learning(ae.state_dict(), "jumprelu")
    with pytest.raises(InputError, match="unknown"):
        import_dictionary_learning(ae.state_dict(), "crosscoder")
    with pytest.raises(InputError, match="does not exist"):
        import_dictionary_learning(tmp_path / "ae.pt", "standard")


# --- reference bugs ---------------------------------------------------------------------------

def test_jumprelu_l0_pseudo_derivative_acts_on_pre_activations():
    """dictionary_learning issue 55: its JumpReluTrainer computes the L0 term as
    StepFunction(f, θ) with f = JumpReLU(z) the *output*, not the pre-activation z. The paper's
    pseudo-derivative ∂H(z−θ)/∂θ = −(1/ε) K((z−θ)/ε) needs z: with f, every z ≤ θ becomes 0, so
    (a) below-threshold z in (θ−ε/2, θ] leave the window and (b) for θ < ε/2 every inactive
    entry (f = 0) falls into it. Ours applies both kernels to z. Same weights, same loss as their
    trainer (target-L0 form): their θ-gradient differs from the paper's, ours equals it."""
    dl = _dictionary_learning()
    eps, coeff, target = 0.1, 1.0, 8.0
    ours = make("jumprelu")
    with torch.no_grad():  # small thresholds (< ε/2) on half the latents
        ours.log_threshold[::2] = math.log(0.03)
    trainer = dl.jumprelu.JumpReluTrainer(steps=10_000, activation_dim=D_IN, dict_size=D_SAE, layer=0,
                                          lm_name="none", bandwidth=eps, sparsity_penalty=coeff,
                                          target_l0=target, sparsity_warmup_steps=None, device="cpu")
    with torch.no_grad():  # their encoder does not subtract b_dec: fold it into b_enc
        trainer.ae.W_enc.copy_(ours.W_enc)
        trainer.ae.W_dec.copy_(ours.W_dec)
        trainer.ae.b_dec.copy_(ours.b_dec)
        trainer.ae.b_enc.copy_(ours.b_enc - ours.b_dec @ ours.W_enc)
        trainer.ae.threshold.copy_(ours.threshold)
    x = torch.randn(256, D_IN) * 2
    (theirs,) = torch.autograd.grad(trainer.loss(x, step=5_000), trainer.ae.threshold)

    theta = ours.threshold.detach().clone().requires_grad_(True)
    z = ours.pre_acts(x).detach()

    def target_l0_loss(f, l0):  # their trainer's loss: ‖x − x̂‖² + c (L0 / L0* − 1)²
        return (x - ours.decode(f)).pow(2).sum(-1).mean() + coeff * (l0 / target - 1).pow(2)

    f = jumprelu(z, theta, eps)
    l0 = step(z, theta, eps).sum(-1).mean()
    (mine,) = torch.autograd.grad(target_l0_loss(f, l0), theta)

    # the paper's pseudo-derivatives on z (Rajamanoharan et al. 2024, eqs. 11-12), by hand
    fz = (z * (z > theta.detach())).requires_grad_(True)
    (g,) = torch.autograd.grad((x - ours.decode(fz)).pow(2).sum(-1).mean(), fz)
    th = theta.detach()
    window = ((z - th).abs() < eps / 2).float()
    l0_val = float((z > th).float().sum(-1).mean())
    paper = (g * -(th / eps) * window).sum(0) \
        + coeff * 2 * (l0_val / target - 1) / target * (-(1 / eps) * window).sum(0) / len(x)
    torch.testing.assert_close(mine, paper, rtol=1e-4, atol=1e-6)
    # theirs equals the same formula with the window taken on f instead of z
    fw = ((fz.detach() - th).abs() < eps / 2).float()
    buggy = (g * -(th / eps) * window).sum(0) \
        + coeff * 2 * (l0_val / target - 1) / target * (-(1 / eps) * fw).sum(0) / len(x)
    torch.testing.assert_close(theirs, buggy, rtol=1e-4, atol=1e-6)
    differs = (window != fw).any(0)
    small = th < eps / 2
    assert differs[small].all()  # every small threshold: all inactive entries counted
    assert not torch.allclose(theirs[differs], paper[differs], rtol=1e-2, atol=1e-4)
    torch.testing.assert_close(theirs[~differs], paper[~differs], rtol=1e-4, atol=1e-6)
    # our own SAE's loss (λ · L0 form) follows the same pseudo-derivatives
    ours.l0_coeff = 0.1
    (g_log,) = torch.autograd.grad(ours.loss(x)["loss"], ours.log_threshold)
    lam_paper = (g * -(th / eps) * window).sum(0) + 0.1 * (-(1 / eps) * window).sum(0) / len(x)
    torch.testing.assert_close(g_log, lam_paper * th, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_auxk_gradient_reaches_encoder(arch):
    """AuxK (Gao et al. 2024, A.2) trains dead latents through ê = W_decᵀ TopK_aux(ReLU(z_dead)):
    its gradient must reach the encoder (W_enc, b_enc) of the dead latents, else they never
    revive. A detached AuxK would leave the value unchanged and silently train only W_dec.
    Ours is checked against dictionary_learning's trainers (value and W_enc / b_enc gradient,
    same normalisation by the residual's variance); in the pinned versions neither
    dictionary_learning 0.1.0 nor SAELens 6.x detaches it."""
    dl = _dictionary_learning()
    ours = make(arch).train().double()  # float64: the AuxK term is read off as loss − mse
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[::3] = True
    x = torch.randn(128, D_IN, dtype=torch.float64) * 2
    out = ours.loss(x, dead=dead)
    aux = (out["loss"] - out["mse"]) / ours.auxk_alpha
    assert math.isclose(float(aux), float(out["auxk"]), rel_tol=1e-5) and float(aux) > 0
    g_ours = torch.autograd.grad(aux, (ours.W_enc, ours.b_enc))
    assert g_ours[0][:, dead].abs().sum() > 0 and g_ours[0][:, ~dead].abs().sum() == 0

    trainer_cls = dl.top_k.TopKTrainer if arch == "topk" else dl.batch_top_k.BatchTopKTrainer
    trainer = trainer_cls(steps=10_000, activation_dim=D_IN, dict_size=D_SAE, k=5, layer=0, lm_name="none",
                          device="cpu")
    ae = trainer.ae.double()
    with torch.no_grad():
        ae.encoder.weight.copy_(ours.W_enc.t())
        ae.encoder.bias.copy_(ours.b_enc)
        ae.decoder.weight.copy_(ours.W_dec.t())
        ae.b_dec.copy_(ours.b_dec)
    trainer.num_tokens_since_fired[dead] = trainer.dead_feature_threshold
    assert trainer.top_k_aux == ours.aux_k
    if arch == "topk":
        f, _, _, post_relu = ae.encode(x, return_topk=True)
    else:
        f, _, post_relu = ae.encode(x, return_active=True, use_threshold=False)
    theirs = trainer.get_auxiliary_loss((x - ae.decode(f)).detach(), post_relu)
    torch.testing.assert_close(aux, theirs.double(), rtol=1e-5, atol=1e-6)  # theirs computes in float32
    g_theirs = torch.autograd.grad(theirs, (ae.encoder.weight, ae.encoder.bias))
    torch.testing.assert_close(g_ours[0], g_theirs[0].t(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(g_ours[1], g_theirs[1], rtol=1e-4, atol=1e-6)


# --- export round trip through the real pipeline ----------------------------------------------

@pytest.fixture(scope="module")
def interop_store_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("interop_stores")  # activations extracted once for all runs


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu", "batchtopk", "gated", "matryoshka", "p_anneal",
                                  "gated_anneal"])
def test_export_round_trip(arch, tmp_path, interop_store_dir):
    """Train briefly, export, load with SAELens: same latents and reconstructions on the held-out
    activations of the run's store."""
    overrides = [o for o in SMALL_RUN if not o.startswith(("sae=", "sae.hyperparams.k=", "data.n_cells="))]
    cfg = sae4scfm.compose("train", [*overrides, f"sae={arch}", "train.n_epochs=1", "data.n_cells=200",
                                     "wandb.mode=disabled", f"runs_dir={tmp_path / 'runs'}",
                                     f"buffer.store_dir={interop_store_dir}", f"experiment=interop_{arch}"])
    run_dir = sae4scfm.train(cfg)
    ours, meta = load_sae(run_dir)
    out = export_saelens(run_dir, tmp_path / "lens")
    lens = sae_lens.SAE.load_from_disk(out)
    saved = json.loads((out / "cfg.json").read_text())
    assert saved["metadata"]["hook_name"] == meta["hook_point"] and saved["d_sae"] == ours.d_sae
    (eval_dir,) = interop_store_dir.glob("*/eval/layer_2")
    n = active = 0
    with torch.no_grad():
        for shard in ActivationStore(eval_dir).iter_shards():
            x = shard["acts"].float()
            f = ours.encode(x)
            torch.testing.assert_close(lens.encode(x), f, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(lens.decode(f), ours.decode(f), rtol=1e-5, atol=1e-5)
            n, active = n + len(x), active + int((f > 0).sum())
    assert n > 0 and active > 0
