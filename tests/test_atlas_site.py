"""The atlas site builder on a real small run (two layers, made by the real pipeline): files, record numbers
against the run's own files, the search indexes' rule, atomic rebuilds and the command's error line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import sae4scfm
from sae4scfm.analysis.results import read_tidy_results
from sae4scfm.atlas import build as atlas_build
from sae4scfm.atlas.build import build_site, shard_of
from sae4scfm.atlas.records import feature_records, run_id_of
from tests.conftest import REPO_ROOT

LAYERS = (1, 2)
ANALYSES = ["label_scoring", "gene_scoring", "enrichment", "density", "coactivation", "cross_layer"]
_BUILT: dict = {}


def build_demo_site(tmp_path_factory) -> dict:
    """Two runs of the README recipe (layers 1 and 2, 300 cells, one epoch), every analysis the atlas shows
    (cross-layer matched both ways), and their site; built once per test session (shared with the browser test)."""
    if _BUILT:
        return _BUILT
    root = tmp_path_factory.mktemp("atlas")
    runs, stores = root / "runs", root / "stores"
    common = ["scfm=demo", "data=pbmc", "sae=topk", "sae.dictionary_multiplier=4", "sae.hyperparams.k=16",
              "sae.hyperparams.lr=3e-4", "seed=0", "data.n_cells=300", "data.preprocess.split=0.2",
              "data.preprocess.subset_hvg=true", "wandb.mode=disabled", "train.n_epochs=1", f"runs_dir={runs}",
              f"buffer.store_dir={stores}"]
    dirs = {}
    for layer in LAYERS:
        dirs[layer] = sae4scfm.train(sae4scfm.compose("train", [*common, f"sae.target_layer={layer}",
                                                                f"experiment=layer{layer}"]))
        sae4scfm.generate_features(sae4scfm.compose("features", _address(runs, dirs[layer])))
    for layer in LAYERS:
        other = dirs[3 - layer]
        sae4scfm.analyze_features(sae4scfm.compose("analyze", [
            *_address(runs, dirs[layer]), *[f"analysis.run_{a}=true" for a in ANALYSES],
            "analysis.gene_sets=[markers]", f"analysis.cross_layer_runs=[{other.parent.name}/{other.name}]"]))
    _write_causal_tables(dirs)
    site = build_site([dirs[layer] for layer in LAYERS], root / "site", {})
    _BUILT.update(runs=runs, dirs=dirs, site=site)
    return _BUILT


# hand-written causal tables (the columns of sae4scfm.causal's writers): steering and patching of layer-2
# features, circuit edges from layer-1 features into layer 2 (in the site) and layer 5 (not in it)
CAUSAL_EDGES = [(3, 2, 7, 0.5, 0.01), (3, 2, 9, -0.25, 0.2), (4, 5, 1, 1.5, 0.001)]  # source, target_layer, target,
CAUSAL_STEERING = [(7, 2.0, 0.8), (7, 4.0, 1.6), (8, 2.0, -0.1)]  # effect, q / target, alpha, effect


def _write_causal_tables(dirs) -> None:
    tracing = dirs[1] / "causal" / "tracing"
    tracing.mkdir(parents=True)
    pd.DataFrame(CAUSAL_EDGES, columns=["source", "target_layer", "target", "effect", "q"]).to_csv(
        tracing / "edges.csv", index=False)
    steering = dirs[2] / "causal" / "steering"
    steering.mkdir(parents=True)
    pd.DataFrame(CAUSAL_STEERING, columns=["target", "alpha", "effect"]).to_csv(steering / "steering.csv", index=False)


def _address(runs, run_dir):
    return [f"runs_dir={runs}", f"sae_checkpoint.experiment={run_dir.parent.name}",
            f"sae_checkpoint.timestamp={run_dir.name}"]


def read_js(path: Path) -> tuple[str, object]:
    """(key, payload) of a site data file ``window.atlasData(key, payload);``."""
    text = path.read_text(encoding="utf-8").strip()
    assert text.startswith("window.atlasData(") and text.endswith(");"), path
    body = text[len("window.atlasData("):-2]
    key, end = json.JSONDecoder().raw_decode(body)
    assert body[end] == ","
    return key, json.loads(body[end + 1:])


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return build_demo_site(tmp_path_factory)


def _record(site: Path, run_dir: Path, index: int) -> dict:
    key, rec = read_js(site / "data" / run_id_of(run_dir) / "features" / f"{index}.js")
    assert key == f"feature/{rec['id']}"
    return rec


def test_site_files_and_manifest(demo):
    import plotly

    site, dirs = demo["site"], demo["dirs"]
    assert (site / "index.html").is_file() and (site / "assets" / "atlas.js").is_file()
    bundled = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    assert (site / "assets" / "plotly.min.js").read_bytes() == bundled.read_bytes()
    key, manifest = read_js(site / "data" / "manifest.js")
    assert key == "manifest" and manifest["schema"] == "sae4scfm.atlas/1"
    assert [r["run_id"] for r in manifest["runs"]] == [run_id_of(dirs[layer]) for layer in LAYERS]
    for entry, layer in zip(manifest["runs"], LAYERS):
        run_dir = dirs[layer]
        cfg, ev = json.loads((run_dir / "cfg.json").read_text()), json.loads((run_dir / "eval.json").read_text())
        assert entry["layer"] == layer and entry["d_sae"] == cfg["d_sae"] == 512 and entry["n_cells"] == 300
        assert entry["eval"]["fvu"] == pytest.approx(ev["fvu"], rel=1e-4)
        files = sorted((site / "data" / entry["run_id"] / "features").glob("*.js"))
        assert len(files) == cfg["d_sae"]
        for name in ("overview", "cells", "layer_map", "modules"):
            assert read_js(site / "data" / entry["run_id"] / f"{name}.js")[0] == f"{name}/{entry['run_id']}"
        _, cells = read_js(site / "data" / entry["run_id"] / "cells.js")
        assert cells["n"] == len(cells["x"]) == len(cells["cell_type"]) == 300
        _, lmap = read_js(site / "data" / entry["run_id"] / "layer_map.js")
        assert len(lmap["x"]) == len(lmap["colour"]) == 512 and lmap["method"] == "umap"
    for kind, n in manifest["search"].items():
        assert len(list((site / "data" / "search" / kind).glob("*.js"))) == n
    # no leftovers of the atomic build next to the site
    assert [p.name for p in site.parent.iterdir() if p.name.startswith(".site")] == []


def test_records_equal_the_runs_numbers(demo):
    site, run_dir = demo["site"], demo["dirs"][2]
    long = read_tidy_results(run_dir / "analysis")
    features = ad.read_h5ad(run_dir / "features" / "features.h5ad")
    tokens = ad.read_h5ad(run_dir / "features" / "token_features.h5ad")
    X = features.X.tocsc()
    auroc = long[(long["analysis"] == "label_scoring") & (long["metric"] == "auroc")]
    best = long[(long["analysis"] == "label_scoring") & (long["metric"] == "best")].set_index("feature_id")["text"]
    module = long[(long["analysis"] == "coactivation") & (long["metric"] == "module")].set_index("feature_id")["value"]
    match = long[(long["analysis"] == "cross_layer") & (long["metric"] == "decoder_match")].set_index("feature_id")
    for f in (0, 17, 300, 511):
        rec = _record(site, run_dir, f)
        assert rec["id"] == f"{run_id_of(run_dir)}/L2/{f}" and rec["index"] == f
        # label AUROCs: those of results_long, highest first; the best label carries its eval AUROC
        mine = auroc[auroc["feature_id"] == f].set_index("label")["value"]
        assert len(rec["label_auroc"]) == len(mine) == 9
        for a in rec["label_auroc"]:
            assert a["auroc"] == pytest.approx(mine[a["label"]], abs=5e-4)
        assert [a["auroc"] for a in rec["label_auroc"]] == sorted((a["auroc"] for a in rec["label_auroc"]), reverse=True)
        assert [a["label"] for a in rec["label_auroc"] if a["auroc_eval"] is not None] == [best[f]]
        top = rec["label_auroc"][0]  # the explanation names the best label only when its AUROC is >= 0.75
        assert rec["explanation"].startswith(f"{top['label']} (AUROC {top['auroc']:.2f})") == (top["auroc"] >= 0.75)
        # top cells: the argmax cells of features.h5ad X, with the genes where the feature fires in each
        col = X[:, f].toarray().ravel()
        order = np.argsort(-col, kind="stable")[: len(rec["top_cells"])]
        assert [c["cell_index"] for c in rec["top_cells"]] == order.tolist() and len(order) == 10
        assert [c["activation"] for c in rec["top_cells"]] == pytest.approx(col[order].tolist(), rel=1e-4)
        assert [c["cell"] for c in rec["top_cells"]] == features.obs_names[order].tolist()
        assert [c["cell_type"] for c in rec["top_cells"]] == features.obs["bulk_labels"].iloc[order].astype(str).tolist()
        cell = rec["top_cells"][0]
        tok = tokens.X[:, f].toarray().ravel()
        rows = np.flatnonzero((tokens.obs["cell_index"].to_numpy() == cell["cell_index"]) & (tok > 0))
        rows = rows[np.argsort(-tok[rows], kind="stable")][:8]
        assert [g["gene"] for g in cell["genes"]] == tokens.obs["gene_name"].iloc[rows].astype(str).tolist()
        assert cell["genes"][0]["activation"] == pytest.approx(cell["activation"], rel=1e-3)  # max pooling
        assert rec["density"]["cells"] == pytest.approx((col > 0).mean(), rel=1e-4)
        assert sum(rec["activation_histogram"]["counts"]) == (col > 0).sum()
        assert sorted(rec["cell_activations"]["index"]) == np.flatnonzero(col > 0).tolist()  # 300 cells: none dropped
        expected = None if module[f] < 0 else f"m{int(module[f])}"
        assert rec["module"] == expected
        other = run_id_of(demo["dirs"][1])
        assert rec["cross_layer"][0]["feature_id"] == f"{other}/L1/{int(match.loc[f, 'value'])}"
        assert (site / "data" / other / "features" / f"{int(match.loc[f, 'value'])}.js").is_file()
    # enrichment: exactly the significant rows of enrichment.csv, most significant first
    enr = pd.read_csv(run_dir / "analysis" / "enrichment.csv")
    enr = enr[enr["fdr"] < 0.05]
    f = int(enr["feature_id"].iloc[0])
    rec = _record(site, run_dir, f)
    want = enr[enr["feature_id"] == f].sort_values("fdr", kind="stable")
    assert [e["term"] for e in rec["enrichment"]] == want["gene_set"].tolist()
    assert rec["enrichment"][0]["genes"] == want["overlap_genes"].iloc[0].split(";")
    assert rec["explanation"].endswith(f"markers: {want['gene_set'].iloc[0]} (FDR {rec['enrichment'][0]['fdr']:.1g})")


def test_causal_tables_on_feature_pages_with_incoming_edges_linked(demo):
    site, dirs = demo["site"], demo["dirs"]
    src, dst = run_id_of(dirs[1]), run_id_of(dirs[2])
    out = _record(site, dirs[1], 3)["causal"]
    assert [(e["target_layer"], e["target"], e["effect"], e["target_id"]) for e in out["edges"]] == [
        (2, 7, 0.5, f"{dst}/L2/7"), (2, 9, -0.25, f"{dst}/L2/9")]
    assert _record(site, dirs[1], 4)["causal"]["edges"][0]["target_id"] is None  # layer 5: not in the site
    assert _record(site, dirs[1], 5)["causal"] == {"edges": []}
    into = _record(site, dirs[2], 7)["causal"]
    assert into["incoming_edges"] == [{"source_id": f"{src}/L1/3", "effect": 0.5, "q": 0.01}]
    assert [(r["alpha"], r["effect"]) for r in into["steering"]] == [(2.0, 0.8), (4.0, 1.6)]
    assert _record(site, dirs[2], 8)["causal"] == {"steering": [{"target": 8, "alpha": 2.0, "effect": -0.1}],
                                                  "incoming_edges": []}


def test_search_index_lists_a_feature_under_a_gene_exactly_when_it_is_a_top_or_firing_gene(demo):
    site, dirs = demo["site"], demo["dirs"]
    _, manifest = read_js(site / "data" / "manifest.js")
    index: dict[str, set[str]] = {}
    for i in range(manifest["search"]["gene"]):
        key, shard = read_js(site / "data" / "search" / "gene" / f"{i}.js")
        assert key == f"search/gene/{i}"
        for gene, ids in shard.items():
            assert shard_of(gene, manifest["search"]["gene"]) == i and len(ids) == len(set(ids))
            index[gene] = set(ids)
    expected: dict[str, set[str]] = {}
    for layer in LAYERS:
        long = read_tidy_results(dirs[layer] / "analysis")
        gs = long[long["analysis"] == "gene_scoring"]
        for metric, cap in (("top_genes", 20), ("top_token_genes", 10)):
            for f, text in gs[gs["metric"] == metric].set_index("feature_id")["text"].items():
                for g in [g for g in (text or "").split(";") if g][:cap]:
                    expected.setdefault(g.lower(), set()).add(f"{run_id_of(dirs[layer])}/L{layer}/{f}")
    assert index == expected and len(index) > 50


def test_label_index_uses_the_auroc_threshold(demo):
    site, run_dir = demo["site"], demo["dirs"][2]
    _, manifest = read_js(site / "data" / "manifest.js")
    n = manifest["search"]["label"]
    key = "cd14+ monocyte"
    _, shard = read_js(site / "data" / "search" / "label" / f"{shard_of(key, n)}.js")
    long = read_tidy_results(run_dir / "analysis")
    a = long[(long["metric"] == "auroc") & (long["label"] == "CD14+ Monocyte")].set_index("feature_id")["value"]
    listed = {int(i.rsplit("/", 1)[1]) for i in shard[key] if i.startswith(run_id_of(run_dir))}
    assert listed == set(a.index[a >= 0.75]) and listed
    ranked = [a[int(i.rsplit("/", 1)[1])] for i in shard[key] if i.startswith(run_id_of(run_dir))]
    assert ranked == sorted(ranked, reverse=True)


def test_label_words_are_indexed(demo):
    """``monocyte`` lists the features listed under ``cd14+ monocyte`` (and the other monocyte labels)."""
    site = demo["site"]
    _, manifest = read_js(site / "data" / "manifest.js")
    n = manifest["search"]["label"]
    shard = {k: read_js(site / "data" / "search" / "label" / f"{shard_of(k, n)}.js")[1] for k in
             ("monocyte", "cd14+ monocyte", "cd14")}
    full = set(shard["cd14+ monocyte"]["cd14+ monocyte"])
    assert full and full <= set(shard["monocyte"]["monocyte"]) and full <= set(shard["cd14"]["cd14"])


def test_a_run_without_a_layer_is_an_input_error(demo, tmp_path):
    from sae4scfm.atlas.records import AtlasRun
    from sae4scfm.errors import InputError

    run_dir = tmp_path / "exp" / "stamp"
    run_dir.mkdir(parents=True)
    cfg = json.loads((demo["dirs"][1] / "cfg.json").read_text())
    del cfg["layer"]
    (run_dir / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match=r"exp/stamp/cfg\.json: no integer `layer`"):
        AtlasRun(run_dir)


def test_a_one_feature_layer_map_is_padded_to_two_axes(demo, monkeypatch):
    from sae4scfm.atlas.build import layer_map_payload
    from sae4scfm.atlas.records import AtlasRun

    run = AtlasRun(demo["dirs"][1])
    W = run.decoder()[:1]
    monkeypatch.setattr(run, "decoder", lambda: W)
    run.n_features = 1
    d = layer_map_payload(run, {"colour": ["unlabelled"], "hover": ["#0"], "density": [0.1]})
    assert (d["x"], d["y"], d["method"], d["colour"]) == ([0.0], [0.0], "pca", [0])


def test_records_stream_in_index_order_with_the_ids_of_the_site(demo):
    run_dir = demo["dirs"][1]
    it = feature_records(run_dir, {"top_cells": 3})
    first, second = next(it), next(it)
    assert (first["index"], second["index"]) == (0, 1) and len(first["top_cells"]) == 3
    assert first["id"] == _record(demo["site"], run_dir, 0)["id"]


def test_a_failed_rebuild_keeps_the_old_site(demo, tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    (site / "old.txt").write_text("old")

    def boom(*a, **k):
        raise RuntimeError("killed")

    monkeypatch.setattr(atlas_build, "flow_payload", boom)
    with pytest.raises(RuntimeError, match="killed"):
        build_site([demo["dirs"][1]], site, {"export": False})
    assert [p.name for p in tmp_path.iterdir()] == ["site"] and (site / "old.txt").read_text() == "old"


def test_build_atlas_command_reports_a_missing_run(demo, tmp_path):
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "build_atlas.py"), f"runs_dir={demo['runs']}",
                           "sae_checkpoint.experiment=layer9", "sae_checkpoint.timestamp=latest",
                           f"atlas.out={tmp_path / 'x'}"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error:") and "layer9" in proc.stderr
    assert not (tmp_path / "x").exists()


def test_build_atlas_command_serves_the_site_with_dash_dash_serve(demo, tmp_path):
    import re
    import urllib.request

    run_dir = demo["dirs"][1]
    proc = subprocess.Popen([sys.executable, str(REPO_ROOT / "scripts" / "build_atlas.py"), f"runs_dir={demo['runs']}",
                             f"sae_checkpoint.experiment={run_dir.parent.name}",
                             f"sae_checkpoint.timestamp={run_dir.name}", f"atlas.out={tmp_path / 'site'}",
                             "atlas.export=false", "--serve"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    try:
        lines = []
        for line in proc.stdout:  # the build's lines, then "serving <site> at <url> (Ctrl-C stops)"
            lines.append(line)
            if m := re.search(r"serving .* at (http://127\.0\.0\.1:\d+/)", line):
                break
        assert m, "".join(lines[-20:])
        with urllib.request.urlopen(m.group(1) + "index.html", timeout=10) as r:
            assert r.status == 200 and r.read() == (tmp_path / "site" / "index.html").read_bytes()
        assert proc.poll() is None  # still serving
    finally:
        proc.kill()
        proc.wait(10)


def test_build_passes_every_record_to_the_export_when_it_exists(demo, tmp_path, monkeypatch):
    import types

    seen = []

    def export_run(records, out_dir, runs=()):
        for rec in records:
            seen.append((rec["id"], (Path(out_dir).parent / "data" / rec["run_id"] / "features" /
                                     f"{rec['index']}.js").is_file()))
        (Path(out_dir) / "marker").parent.mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "marker").write_text(json.dumps([r["run_id"] for r in runs]))

    monkeypatch.setitem(sys.modules, "sae4scfm.atlas.export", types.SimpleNamespace(export_run=export_run))
    run_dir = demo["dirs"][1]
    site = build_site([run_dir], tmp_path / "site", {"export": True})
    assert [i for i, _ in seen] == [f"{run_id_of(run_dir)}/L1/{f}" for f in range(512)]
    assert all(written for _, written in seen)  # each record's page file exists when the export sees it
    assert json.loads((site / "export" / "marker").read_text()) == [run_id_of(run_dir)]
    assert read_js(site / "data" / "manifest.js")[1]["export"] == {run_id_of(run_dir): f"export/{run_id_of(run_dir)}/"}


def test_cells_above_max_cells_are_subsampled_and_large_layer_maps_use_pca(demo):
    from sae4scfm.atlas.records import AtlasRun

    run_dir = demo["dirs"][2]
    run = AtlasRun(run_dir, {"max_cells": 50, "layer_map_umap_max": 100})
    layout = run.cell_layout()
    assert len(layout.cells) == 50 == len(np.unique(layout.cells)) and layout.xy.shape == (50, 2)
    assert (np.diff(layout.cells) > 0).all() and layout.cells.max() < 300
    rec = next(run.records())
    X = ad.read_h5ad(run_dir / "features" / "features.h5ad").X.tocsc()
    col = X[:, 0].toarray().ravel()
    idx = np.asarray(rec["cell_activations"]["index"])
    assert len(idx) == (col[layout.cells] > 0).sum() and idx.max() < 50
    assert rec["cell_activations"]["value"] == pytest.approx(col[layout.cells[idx]].tolist(), rel=1e-3)
    xy, method = run.layer_map()
    assert method == "pca" and xy.shape == (512, 2)
    W = run.decoder()
    assert abs(np.corrcoef(xy[:, 0], (W - W.mean(0)) @ np.linalg.svd(W - W.mean(0), full_matrices=False)[2][0])[0, 1]) \
        == pytest.approx(1, abs=1e-4)  # the first axis is PC1 of the unit decoder directions


def test_flow_draws_each_run_pair_once_from_the_shallower_layer(demo):
    site, dirs = demo["site"], demo["dirs"]
    _, flow = read_js(site / "data" / "flow.js")
    assert {(p["layer_a"], p["layer_b"]) for p in flow["pairs"]} == {(1, 2), (2, 1)}
    assert all(p["in_site"] for p in flow["pairs"])
    nodes = flow["nodes"]
    assert all(nodes[lk["source"]].startswith("L1: ") and nodes[lk["target"]].startswith("L2: ") for lk in flow["links"])
    long = read_tidy_results(dirs[1] / "analysis")
    cos = long[(long["analysis"] == "cross_layer") & (long["metric"] == "decoder_cos")]["value"]
    assert sum(lk["value"] for lk in flow["links"]) == int((cos >= 0.5).sum()) > 0  # layer 1's own matching
    assert all(s["a"].startswith(run_id_of(dirs[1])) and s["b"].startswith(run_id_of(dirs[2])) for s in flow["strongest"])


def test_overview_shows_the_control_table_and_the_runs_density(demo, tmp_path):
    import shutil

    from sae4scfm.analysis.control import COMPARISON_FILE, control_comparison
    from sae4scfm.atlas.build import overview
    from sae4scfm.atlas.records import AtlasRun

    run_dir = tmp_path / "exp" / "stamp"
    shutil.copytree(demo["dirs"][2], run_dir)
    # a real comparison table (the layer-1 run standing in for the random-init twin)
    table = control_comparison(run_dir, demo["dirs"][1], sae4scfm.compose("analyze").analysis)
    table.to_csv(run_dir / "analysis" / COMPARISON_FILE, index=False)
    o = overview(AtlasRun(run_dir))
    assert [r["metric"] for r in o["control"]] == table["metric"].tolist() and len(table) > 0
    assert [r["trained"] for r in o["control"]] == pytest.approx(table["trained"].tolist())
    X = ad.read_h5ad(run_dir / "features" / "features.h5ad").X
    fires = np.asarray((X > 0).sum(0)).ravel() / X.shape[0]
    assert sum(o["density"]["counts"]) + o["density"]["dead"] == 512 and o["density"]["dead"] == (fires == 0).sum()
    assert o["density"]["median"] == pytest.approx(np.median(fires), rel=1e-4)
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert o["curves"]["step"] == steps
