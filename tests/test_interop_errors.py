"""A malformed file given to ``import_dictionary_learning`` / ``import_saelens`` raises one
``InputError`` naming the file, what is wrong and the fix; never a traceback from torch,
safetensors or json. Files are written by hand (no reference library needed)."""

from __future__ import annotations

import collections
import json
import re

import pytest
import torch
from safetensors.torch import save_file

from sae4scfm.errors import InputError
from sae4scfm.saes.interop import import_dictionary_learning, import_saelens

D_IN, D_SAE = 8, 32


class NotWeights:  # a pickled object beyond tensors: weights_only loading refuses it
    def __init__(self):
        self.payload = "arbitrary code could run here"


def standard_sd() -> dict[str, torch.Tensor]:
    """dictionary_learning AutoEncoder state dict."""
    return {"encoder.weight": torch.randn(D_SAE, D_IN), "encoder.bias": torch.randn(D_SAE),
            "decoder.weight": torch.randn(D_IN, D_SAE), "bias": torch.randn(D_IN)}


def topk_sd() -> dict[str, torch.Tensor]:
    sd = standard_sd()
    return {**{k: v for k, v in sd.items() if k != "bias"}, "b_dec": sd["bias"], "k": torch.tensor(4),
            "threshold": torch.tensor(0.3)}


def saelens_dir(tmp_path, arch="standard", weights=None, **cfg):
    path = tmp_path / "lens"
    path.mkdir(exist_ok=True)
    weights = weights if weights is not None else {
        "W_enc": torch.randn(D_IN, D_SAE), "W_dec": torch.randn(D_SAE, D_IN), "b_enc": torch.randn(D_SAE),
        "b_dec": torch.randn(D_IN)}
    save_file(weights, path / "sae_weights.safetensors")
    (path / "cfg.json").write_text(json.dumps({"architecture": arch, "d_in": D_IN, "d_sae": D_SAE, **cfg}))
    return path


def raises(where, *phrases):
    """pytest.raises(InputError) whose message names ``where`` and every phrase."""
    return pytest.raises(InputError, match="(?s)" + re.escape(str(where)) + "".join(
        f"(?=.*{re.escape(p)})" for p in phrases))


# --- dictionary_learning -------------------------------------------------------------------------

def test_valid_files_import(tmp_path):  # the baseline the malformed variants below start from
    torch.save(standard_sd(), tmp_path / "ae.pt")
    assert import_dictionary_learning(tmp_path / "ae.pt", "standard").d_sae == D_SAE
    torch.save(topk_sd(), tmp_path / "topk.pt")
    assert import_dictionary_learning(tmp_path / "topk.pt", "batchtopk").k == 4
    assert import_saelens(saelens_dir(tmp_path)).d_sae == D_SAE


def test_dl_missing_file(tmp_path):
    with raises(tmp_path / "ae.pt", "does not exist", "torch.save(ae.state_dict(), path)"):
        import_dictionary_learning(tmp_path / "ae.pt", "standard")


@pytest.mark.parametrize("content", [b"not a checkpoint at all", b""], ids=["text", "empty"])
def test_dl_not_a_torch_file(tmp_path, content):
    (tmp_path / "ae.pt").write_bytes(content)
    with raises(tmp_path / "ae.pt", "is not a torch.save file", "pass the ae.pt"):
        import_dictionary_learning(tmp_path / "ae.pt", "standard")


def test_dl_pickle_that_is_not_weights_only_is_refused_not_unpickled(tmp_path):
    torch.save({**standard_sd(), "extra": NotWeights()}, tmp_path / "ae.pt")
    with raises(tmp_path / "ae.pt", "pickled Python objects beyond tensors", "torch.save(ae.state_dict(), path)"):
        import_dictionary_learning(tmp_path / "ae.pt", "standard")
    torch.save(collections.OrderedDict(standard_sd()), tmp_path / "ordered.pt")  # a real state dict is fine
    import_dictionary_learning(tmp_path / "ordered.pt", "standard")


def test_dl_not_a_state_dict(tmp_path):
    torch.save(torch.randn(3), tmp_path / "ae.pt")
    with raises(tmp_path / "ae.pt", "holds a Tensor, not a state dict"):
        import_dictionary_learning(tmp_path / "ae.pt", "standard")


def test_dl_missing_key(tmp_path):
    sd = standard_sd()
    del sd["bias"]
    torch.save(sd, tmp_path / "ae.pt")
    with raises(tmp_path / "ae.pt", "has no 'bias' tensor", "dictionary_learning 'standard' checkpoint",
                "decoder.weight, encoder.bias, encoder.weight"):
        import_dictionary_learning(tmp_path / "ae.pt", "standard")
    with raises("the state dict", "has no 'k' tensor"):  # a TopK import of a standard state dict
        import_dictionary_learning({**standard_sd(), "b_dec": torch.zeros(D_IN)}, "topk")


def test_dl_wrong_shapes(tmp_path):
    sd = standard_sd()
    sd["decoder.weight"] = torch.randn(D_IN, D_SAE - 1)
    torch.save(sd, tmp_path / "ae.pt")
    with raises(tmp_path / "ae.pt", f"W_dec has shape [{D_SAE - 1}, {D_IN}]", f"needs [{D_SAE}, {D_IN}]",
                "do not belong together"):
        import_dictionary_learning(tmp_path / "ae.pt", "standard")
    sd = topk_sd()
    sd["threshold"] = torch.ones(D_SAE)  # BatchTopK's threshold is one number
    torch.save(sd, tmp_path / "btk.pt")
    with raises(tmp_path / "btk.pt", f"'threshold' has shape [{D_SAE}], expected one number"):
        import_dictionary_learning(tmp_path / "btk.pt", "batchtopk")
    sd = standard_sd()
    sd["encoder.weight"] = torch.randn(D_SAE)
    torch.save(sd, tmp_path / "flat.pt")
    with raises(tmp_path / "flat.pt", "not [d_in, d_sae]"):
        import_dictionary_learning(tmp_path / "flat.pt", "standard")


def test_dl_non_tensor_value_and_bad_hyperparameter(tmp_path):
    torch.save({**topk_sd(), "k": "four"}, tmp_path / "ae.pt")
    with raises(tmp_path / "ae.pt", "'k' is a str, not a tensor"):
        import_dictionary_learning(tmp_path / "ae.pt", "topk")
    sd = {"W_enc": torch.randn(D_IN, D_SAE), "W_dec": torch.randn(D_SAE, D_IN), "b_enc": torch.randn(D_SAE),
          "b_dec": torch.randn(D_IN), "k": torch.tensor(4), "threshold": torch.tensor(0.2),
          "group_sizes": torch.tensor([4, 4])}  # sums to 8, not d_sae = 32
    torch.save(sd, tmp_path / "mat.pt")
    with raises(tmp_path / "mat.pt", "group_fractions", "sum to 1"):
        import_dictionary_learning(tmp_path / "mat.pt", "matryoshka")


def test_dl_unknown_architecture():
    with raises("architecture='crosscoder' is unknown", "importable: "):
        import_dictionary_learning(standard_sd(), "crosscoder")
    with raises("architecture='p_anneal' is unknown"):  # ours, but without a dictionary_learning counterpart
        import_dictionary_learning(standard_sd(), "p_anneal")


# --- SAELens -------------------------------------------------------------------------------------

def test_saelens_missing_folder_and_files(tmp_path):
    with raises(tmp_path / "nowhere", "is not a folder", "save_model"):
        import_saelens(tmp_path / "nowhere")
    path = saelens_dir(tmp_path)
    (path / "sae_weights.safetensors").unlink()
    with raises(path / "sae_weights.safetensors", "is missing", "cfg.json + sae_weights.safetensors"):
        import_saelens(path)


def test_saelens_cfg_not_json(tmp_path):
    path = saelens_dir(tmp_path)
    (path / "cfg.json").write_text("{architecture: standard")
    with raises(path / "cfg.json", "is not valid JSON"):
        import_saelens(path)
    (path / "cfg.json").write_text("[1, 2]")
    with raises(path / "cfg.json", "holds a JSON list, not an object"):
        import_saelens(path)


def test_saelens_weights_not_safetensors(tmp_path):
    path = saelens_dir(tmp_path)
    torch.save(standard_sd(), path / "sae_weights.safetensors")  # a torch pickle under the safetensors name
    with raises(path / "sae_weights.safetensors", "is not a readable safetensors file", "save_model"):
        import_saelens(path)


def test_saelens_unknown_architecture(tmp_path):
    path = saelens_dir(tmp_path, arch="transcoder")
    with raises(path / "cfg.json", "'transcoder' has no sae4scfm counterpart", "importable: "):
        import_saelens(path)


def test_saelens_missing_tensor_and_config_entry(tmp_path):
    path = saelens_dir(tmp_path, arch="jumprelu")  # no threshold tensor
    with raises(path / "sae_weights.safetensors", "has no 'threshold' tensor", "SAELens 'jumprelu' SAE"):
        import_saelens(path)
    path = saelens_dir(tmp_path, arch="topk")  # no k in cfg.json
    with raises(path / "cfg.json", "k=None must be an integer"):
        import_saelens(path)


def test_saelens_wrong_shapes(tmp_path):
    weights = {"W_enc": torch.randn(D_IN, D_SAE), "W_dec": torch.randn(D_SAE, D_IN), "b_enc": torch.randn(D_SAE),
               "b_dec": torch.randn(D_IN + 1)}
    path = saelens_dir(tmp_path, weights=weights)
    with raises(path / "sae_weights.safetensors", f"b_dec has shape [{D_IN + 1}]", f"needs [{D_IN}]"):
        import_saelens(path)
