"""Atlas export: our JSON records and the SAEDashboard / Neuronpedia files validate against their schemas
(field names and types of the upstream examples) and keep our numbers."""

from __future__ import annotations

import copy
import json

import jsonschema
import pytest

from sae4scfm.atlas import export
from sae4scfm.errors import InputError

RUN = "demo--Dec01-21-28"


def make_record(index: int, run_id: str = RUN, layer: int = 2, fires: bool = True) -> dict:
    """A record in the contract's schema with numbers that are not round (0.1 + 0.2 != 0.3)."""
    fid = f"{run_id}/L{layer}/{index}"
    genes = [{"gene": "CD79A", "activation": 4.9 + index / 7}, {"gene": "MS4A1", "activation": 0.1 + 0.2}]
    return {
        "schema": "sae4scfm.atlas.feature/1", "id": fid, "run_id": run_id, "layer": layer, "hook_point": "tokens",
        "index": index, "model": "scgpt demo", "dataset": "pbmc",
        "explanation": f"B cells (AUROC 0.97) · markers: B #{index}" if index % 2 == 0 else None,
        "density": {"cells": 0.12 + index / 1000 if fires else 0.0, "tokens": 0.01 if fires else 0.0},
        "max_activation": 5.3 + index / 3 if fires else None,
        "activation_histogram": ({"edges": [0.0, 1 / 3, 2 / 3, 1.0, 5.3 + index / 3], "counts": [3, 0, 7, 1]}
                                 if fires else {"edges": [], "counts": []}),
        "top_genes": [{"gene": "CD79A", "score": 3.1 + index / 9}, {"gene": "MS4A1", "score": 2.0000001}]
        if fires else [],
        "label_auroc": [{"key": "bulk_labels", "label": "CD19+ B", "auroc": 0.97, "auroc_eval": None}],
        "enrichment": [{"collection": "markers", "term": "B", "fdr": 1e-6, "overlap": 5, "genes": ["CD79A"]}],
        "top_cells": [{"cell": "AAAC-1", "cell_index": 12, "activation": 5.3, "cell_type": "CD19+ B",
                       "condition": None, "split": "eval", "genes": genes},
                      {"cell": "AAAG-1", "cell_index": 3, "activation": 1.25, "cell_type": "CD19+ B",
                       "condition": None, "split": "train", "genes": list(reversed(genes))}] if fires else [],
        "cell_activations": {"index": [3, 12], "value": [1.25, 5.3]} if fires else {"index": [], "value": []},
        "coactivation": [{"feature_id": f"{run_id}/L{layer}/{index + 1}", "pmi": -0.5, "q": 1e-4}],
        "decoder_neighbours": [{"feature_id": f"{run_id}/L{layer}/{index + 2}", "cosine": 0.8}],
        "module": "m3" if index == 0 else None,
        "cross_layer": [{"feature_id": f"other--Dec01-21-30/L4/{index}", "cosine": 0.9, "jaccard": None}],
        "causal": None,
    }


def batches(run_dir):
    out = []
    for i in range(len(list((run_dir / "saedashboard").glob("batch-*.json")))):
        out.append(json.loads((run_dir / "saedashboard" / f"batch-{i}.json").read_text()))
    return out


def test_export_validates_and_keeps_our_numbers(tmp_path):
    records = [make_record(i) for i in range(5)] + [make_record(5, fires=False)]
    summary = export.export_run(iter(records), tmp_path, runs=[{"run_id": RUN, "n_cells": 300}], batch_size=4,
                                model_id="scgpt-demo")
    run_dir = tmp_path / RUN
    assert summary == [{"run_id": RUN, "n_features": 6, "n_batches": 2, "n_explanations": 3,
                        "model_id": "scgpt-demo", "layer": 2, "sae_set": "sae4scfm-demo-dec01-21-28",
                        "neuronpedia_source_id": "2-sae4scfm-demo-dec01-21-28",
                        "created_at": summary[0]["created_at"]}]
    assert export.validate_export(run_dir) == {"features": 6, "batches": 2, "explanations": 3}
    # our JSON: the records come back exactly, floats bit for bit
    assert list(export.read_records(run_dir)) == records
    # the SAEDashboard batches: the same numbers under the upstream names
    got = [f for b in batches(run_dir) for f in b["features"]]
    assert [len(b["features"]) for b in batches(run_dir)] == [4, 2]
    assert {(b["model_id"], b["layer"]) for b in batches(run_dir)} == {("scgpt-demo", 2)}
    for rec, feat in zip(records, got):
        assert feat["feature_index"] == rec["index"]
        assert feat["frac_nonzero"] == rec["density"]["cells"]
        assert feat["freq_hist_data_bar_heights"] == rec["activation_histogram"]["counts"]
        edges = rec["activation_histogram"]["edges"]
        assert feat["freq_hist_data_bar_values"] == [(a + b) / 2 for a, b in zip(edges, edges[1:])]
        assert feat["pos_str"] == [g["gene"] for g in rec["top_genes"]]
        assert feat["pos_values"] == [g["score"] for g in rec["top_genes"]]
        assert feat["n_prompts_total"] == 300 and feat["dataset"] == "pbmc"
        assert len(feat["activations"]) == len(rec["top_cells"])
        for cell, act in zip(rec["top_cells"], feat["activations"]):
            assert act["tokens"] == [g["gene"] for g in cell["genes"]]
            assert act["values"] == [g["activation"] for g in cell["genes"]]
            assert act["values"][act["qualifying_token_index"]] == max(act["values"])
            assert act["bin_max"] == rec["max_activation"]
    assert got[0]["activations"][1]["qualifying_token_index"] == 1  # reversed genes: the max is second
    assert got[5]["activations"] == [] and got[5]["frac_nonzero"] == 0.0
    rows = [json.loads(line) for line in (run_dir / "neuronpedia" / "explanations.jsonl").read_text().splitlines()]
    assert [(r["index"], r["description"]) for r in rows] == [
        (str(r["index"]), r["explanation"]) for r in records if r["explanation"]]
    assert {r["layer"] for r in rows} == {summary[0]["neuronpedia_source_id"]}
    # ids are stable across rebuilds
    export.export_run(iter(records), tmp_path / "again", batch_size=4, model_id="scgpt-demo")
    again = (tmp_path / "again" / RUN / "neuronpedia" / "explanations.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in again] == [r["id"] for r in rows]


def test_upstream_schema_rejects_wrong_names_and_types(tmp_path):
    export.export_run([make_record(0)], tmp_path)
    batch = batches(tmp_path / RUN)[0]
    validator = jsonschema.Draft202012Validator(export.SAEDASHBOARD_BATCH_SCHEMA)
    assert validator.is_valid(batch)
    renamed = copy.deepcopy(batch)
    renamed["features"][0]["freq_hist_bar_heights"] = renamed["features"][0].pop("freq_hist_data_bar_heights")
    assert not validator.is_valid(renamed)
    wrong_type = copy.deepcopy(batch)
    wrong_type["features"][0]["activations"][0]["tokens"] = "CD79A MS4A1"
    assert not validator.is_valid(wrong_type)
    float_index = copy.deepcopy(batch)
    float_index["features"][0]["feature_index"] = 0.5
    assert not validator.is_valid(float_index)
    # a tampered file fails validate_export with the file and the field named
    (tmp_path / RUN / "saedashboard" / "batch-0.json").write_text(json.dumps(renamed))
    with pytest.raises(InputError, match=r"batch-0.json: features/0"):
        export.validate_export(tmp_path / RUN)


# The keys of upstream's to_dict(), copied from SAEDashboard (github.com/jbloomAus/SAEDashboard) at commit
# 234ea3211ce7dbf84d101c4e8bfe844c3903b16a, sae_dashboard/neuronpedia/neuronpedia_dashboard.py:
# NeuronpediaDashboardBatch / NeuronpediaDashboardFeature / NeuronpediaDashboardActivation.to_dict;
# Activation writes the dfa_* keys only when they are not None.
UPSTREAM_BATCH_KEYS = ["model_id", "layer", "sae_set", "features"]
UPSTREAM_FEATURE_KEYS = [
    "feature_index", "neuron_alignment_indices", "neuron_alignment_values", "neuron_alignment_l1",
    "correlated_neurons_indices", "correlated_neurons_l1", "correlated_neurons_pearson",
    "correlated_features_indices", "correlated_features_l1", "correlated_features_pearson", "neg_str",
    "neg_values", "pos_str", "pos_values", "frac_nonzero", "freq_hist_data_bar_values",
    "freq_hist_data_bar_heights", "logits_hist_data_bar_heights", "logits_hist_data_bar_values",
    "n_prompts_total", "n_tokens_in_prompt", "dataset", "decoder_weights_dist", "activations"]
UPSTREAM_ACTIVATION_KEYS = ["bin_min", "bin_max", "bin_contains", "tokens", "values", "qualifying_token_index"]
UPSTREAM_ACTIVATION_OPTIONAL = ["dfa_values", "dfa_maxValue", "dfa_targetIndex"]


def test_upstream_schema_has_upstreams_keys_and_dfa_is_optional(tmp_path):
    batch = export.SAEDASHBOARD_BATCH_SCHEMA
    feature = export.SAEDASHBOARD_FEATURE_SCHEMA
    act = export.SAEDASHBOARD_ACTIVATION_SCHEMA
    assert (list(batch["properties"]), batch["required"]) == (UPSTREAM_BATCH_KEYS, UPSTREAM_BATCH_KEYS)
    assert sorted(feature["properties"]) == sorted(feature["required"]) == sorted(UPSTREAM_FEATURE_KEYS)
    assert sorted(act["properties"]) == sorted(UPSTREAM_ACTIVATION_KEYS + UPSTREAM_ACTIVATION_OPTIONAL)
    assert sorted(act["required"]) == sorted(UPSTREAM_ACTIVATION_KEYS)
    validator = jsonschema.Draft202012Validator(batch)
    export.export_run([make_record(0)], tmp_path)
    ours = batches(tmp_path / RUN)[0]
    assert validator.is_valid(ours) and sorted(ours["features"][0]["activations"][0]) == sorted(UPSTREAM_ACTIVATION_KEYS)
    with_dfa = copy.deepcopy(ours)  # upstream's output with direct feature attribution computed
    with_dfa["features"][0]["activations"][0].update(dfa_values=[0.1, 0.2], dfa_maxValue=0.2, dfa_targetIndex=1)
    assert validator.is_valid(with_dfa)


def test_record_schema(tmp_path):
    schema = json.loads(export.SCHEMA_FILE.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    rec = make_record(0)
    assert validator.is_valid(rec)
    assert validator.is_valid({**rec, "extra_field_the_site_adds": [1, 2]})
    for field in schema["required"]:
        assert not validator.is_valid({k: v for k, v in rec.items() if k != field}), field
    assert not validator.is_valid({**rec, "layer": "2"})
    assert not validator.is_valid({**rec, "density": {"cells": 1.5, "tokens": None}})
    assert not validator.is_valid({**rec, "id": "no run id"})
    bad_cell = copy.deepcopy(rec)
    bad_cell["top_cells"][0]["genes"][0]["activation"] = "4.9"
    assert not validator.is_valid(bad_cell)


def test_several_runs_interleaved(tmp_path):
    other = "demo--Dec01-21-30"
    records = [make_record(0), make_record(0, other, layer=4), make_record(1), make_record(1, other, layer=4)]
    summary = export.export_run(records, tmp_path)
    assert [(s["run_id"], s["n_features"], s["layer"]) for s in summary] == [(RUN, 2, 2), (other, 2, 4)]
    assert [r["id"] for r in export.read_records(tmp_path / other)] == [f"{other}/L4/0", f"{other}/L4/1"]
    assert export.validate_export(tmp_path / other)["features"] == 2


def test_bad_record_leaves_the_old_export(tmp_path):
    export.export_run([make_record(0)], tmp_path)
    before = list(export.read_records(tmp_path / RUN))
    bad = make_record(1)
    bad["top_cells"][0]["genes"][1]["activation"] = float("nan")
    with pytest.raises(InputError, match=r"top_cells\[0\]\.genes\[1\]\.activation is NaN"):
        export.export_run([make_record(0), bad], tmp_path)
    assert list(export.read_records(tmp_path / RUN)) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [RUN]  # no temp folder left
    with pytest.raises(InputError, match="layer 4 differs"):
        export.export_run([make_record(0), make_record(1, layer=4)], tmp_path)
    with pytest.raises(InputError, match="counts \\+ 1 edges"):
        export.export_run([{**make_record(0), "activation_histogram": {"edges": [0, 1], "counts": [1, 2]}}],
                          tmp_path)


# --------------------------------------------------------------------------- synthetic run


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    from sae4scfm.atlas.synthetic import synthetic_run

    run_dir = synthetic_run(tmp_path_factory.mktemp("runs"), n_features=400, n_cells=600, seed=3)
    return run_dir, json.loads((run_dir / "synthetic.json").read_text())


def test_synthetic_run_is_a_run_dir_the_pipeline_reads(synthetic):
    import numpy as np

    from sae4scfm.analysis.results import read_results, read_tidy_results
    from sae4scfm.analysis.run_data import open_run
    from sae4scfm.runs import resolve_run_dir
    from sae4scfm.saes import load_sae

    run_dir, truth = synthetic
    assert resolve_run_dir(run_dir.parents[1], "synthetic", "latest") == run_dir
    for name in ["sae.safetensors", "cfg.json", "config.yaml", "metrics.jsonl", "eval.json",
                 "features/features.h5ad", "features/token_features.h5ad", "analysis/results.parquet",
                 "analysis/results_long.parquet", "analysis/gene_scores.parquet", "analysis/enrichment.csv",
                 "analysis/coactivation_pairs.csv", "analysis/modules.csv"]:
        assert (run_dir / name).is_file(), name
    run = open_run(run_dir)
    assert run.features.shape == (600, 400) and run.tokens.shape == (600 * 48, 400)
    sae, cfg = load_sae(run_dir)
    assert (cfg["d_sae"], cfg["layer"], cfg["sae_hook_point"]) == (400, 2, "tokens")
    assert np.allclose(np.linalg.norm(sae.W_dec.detach().numpy(), axis=1), 1, atol=1e-5)
    # X is the max over each cell's token rows
    T, X = run.tokens.X.tocsr(), run.features.X.tocsr()
    for c in (0, 17, 599):
        rows = np.flatnonzero(run.tokens.obs["cell_index"].to_numpy() == c)
        assert np.array_equal(X[c].toarray().ravel(), T[rows].toarray().max(axis=0))
    wide, long = read_results(run_dir / "analysis"), read_tidy_results(run_dir / "analysis")
    assert {"label_scoring", "gene_scoring", "enrichment", "density", "coactivation"} <= set(
        wide.columns.get_level_values(0))
    assert len(wide) == 400 and set(long["feature_id"]) == set(range(400))


def test_synthetic_run_has_the_planted_structure(synthetic):
    import anndata as ad
    import pandas as pd

    run_dir, truth = synthetic
    var = ad.read_h5ad(run_dir / "features" / "features.h5ad").var
    modules = pd.read_csv(run_dir / "analysis" / "modules.csv")
    for t, f in truth["type_features"].items():
        row = var.iloc[f]
        assert row["label_scoring:best:cell_type"] == t
        assert row["label_scoring:best_eval_auroc:cell_type"] == 1.0
        assert row["gene_scoring:top_genes"].split(";") == truth["markers"][t]
        assert row["enrichment:best_set:markers"] == t and row["enrichment:fdr:markers"] < 1e-6
        members = modules.loc[modules["label:cell_type"] == t, "features"].item().split(";")
        assert str(f) in members and len(members) == 1 + len(truth["markers"][t])
    for gene, f in truth["gene_features"].items():
        assert var.iloc[f]["gene_scoring:top_genes"] == gene
    assert var.iloc[truth["stim_feature"]]["label_scoring:best:condition"] == "STIM"
    density = var["density:token_fraction"]
    assert density.max() / density[density > 0].min() > 10  # Zipf-like: densities span orders of magnitude


def test_records_of_a_run_validate_and_export(synthetic, tmp_path):
    """The site's records of a run dir (records.feature_records) follow feature_record.schema.json, and their
    export validates against the upstream formats with the planted feature's numbers intact."""
    from sae4scfm.atlas.records import feature_records

    run_dir, truth = synthetic
    validator = jsonschema.Draft202012Validator(json.loads(export.SCHEMA_FILE.read_text()))
    records = []
    for rec in feature_records(run_dir, {"max_cells": 600}):
        rec = json.loads(export.dumps(rec, rec["id"]))
        error = jsonschema.exceptions.best_match(validator.iter_errors(rec))
        assert error is None, (rec["id"], list(error.absolute_path), error.message)
        records.append(rec)
    assert [r["index"] for r in records] == list(range(400))
    export.export_run(records, tmp_path, runs=[{"run_id": records[0]["run_id"], "n_cells": 600}])
    out = tmp_path / records[0]["run_id"]
    assert export.validate_export(out)["features"] == 400
    b = truth["type_features"]["B"]
    feat = [f for batch in batches(out) for f in batch["features"] if f["feature_index"] == b][0]
    assert feat["pos_str"][:6] == [g["gene"] for g in records[b]["top_genes"]][:6]
    assert set(feat["pos_str"]) >= set(truth["markers"]["B"])
    assert feat["frac_nonzero"] == records[b]["density"]["cells"] and feat["n_prompts_total"] == 600
    assert all(set(a["tokens"]) & set(truth["markers"]["B"]) for a in feat["activations"])
