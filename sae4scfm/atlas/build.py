"""Write the atlas: a static single-page site of one or several runs, opened from disk (no network).

Layout (``ATLAS_CONTRACT``): ``index.html``, ``assets/{atlas.js,atlas.css,plotly.min.js}`` and ``data/``, where
every data file is JavaScript calling ``window.atlasData(key, payload)`` (file:// pages may not fetch JSON):
``data/manifest.js``, ``data/flow.js``, per run ``data/<run_id>/{overview,cells,layer_map,modules}.js`` and
``data/<run_id>/features/<index>.js`` (one per feature, loaded on demand), and the search indexes
``data/search/<kind>/<shard>.js`` (kind gene / term / label; shard = FNV-1a of the lower-cased key's UTF-16
code units modulo the kind's shard count in the manifest; values: feature ids, most relevant first).
The site is built in a temp folder next to ``out_dir`` and renamed over it, so a killed build never
leaves a half-written site.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections import defaultdict
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np
from omegaconf import DictConfig, OmegaConf

from sae4scfm.atlas.export import DumpedRecord
from sae4scfm.atlas.records import AtlasRun, _num, _read_csv, _words, feature_id_of, link_causal_edges, search_terms
from sae4scfm.errors import InputError

SITE_SCHEMA = "sae4scfm.atlas/1"
ASSETS = Path(__file__).parent / "assets"
SEARCH_KINDS = ("gene", "term", "label")
SHARD_ENTRIES = 4000  # index keys per search shard (a shard file stays small for a 100k-feature run)


def shard_of(key: str, n_shards: int) -> int:
    """Search shard of a lower-cased key: 32-bit FNV-1a over its UTF-16 code units (atlas.js does the same)."""
    h = 0x811C9DC5
    data = key.encode("utf-16-le")
    for i in range(0, len(data), 2):
        h ^= data[i] | (data[i + 1] << 8)
        h = (h * 0x01000193) & 0xFFFFFFFF
    return h % n_shards


def write_js(path: Path, key: str, payload, mkdir: bool = True) -> str:
    """``path`` := ``window.atlasData(key, payload);`` (JSON, no NaN); returns the payload's JSON text."""
    if mkdir:
        path.parent.mkdir(parents=True, exist_ok=True)
    body = json.dumps(payload, separators=(",", ":"), allow_nan=False, ensure_ascii=False)
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"window.atlasData({json.dumps(key)},{body});\n")
    return body


def copy_assets(site: Path) -> None:
    """index.html, assets/atlas.{js,css} from the package, plotly.min.js from the installed plotly wheel."""
    import plotly

    plotly_js = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    if not plotly_js.is_file():
        raise InputError(f"{plotly_js} is missing: the atlas needs the plotly wheel's bundled plotly.js "
                         "(pip install plotly).")
    (site / "assets").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ASSETS / "index.html", site / "index.html")
    for name in ("atlas.js", "atlas.css"):
        shutil.copyfile(ASSETS / name, site / "assets" / name)
    shutil.copyfile(plotly_js, site / "assets" / "plotly.min.js")


def _records_written(run: AtlasRun, site: Path, search: dict, summary: dict) -> Iterator[dict]:
    """Yield the run's records after writing each one's page data and noting its search keys."""
    from tqdm import tqdm

    min_auroc = float(run.opts["label_min_auroc"])
    folder = site / "data" / run.run_id / "features"
    folder.mkdir(parents=True, exist_ok=True)
    for rec in tqdm(run.records(), total=run.n_features, desc=f"atlas {run.run_id}", unit="feature",
                    mininterval=2.0):
        rec = DumpedRecord(rec)
        rec.json = write_js(folder / f"{rec['index']}.js", f"feature/{rec['id']}", rec, mkdir=False)
        scores = {"gene": {g["gene"].lower(): g["score"] if g["score"] is not None else 1.0 for g in rec["top_genes"]},
                  "label": {}, "term": {}}
        for g in rec["firing_genes"]:
            scores["gene"].setdefault(g["gene"].lower(), (g["freq"] or 0.0) - 1.0)  # after the top genes
        for kind, text, s in [("term", e["term"], -math.log10(max(1.0 if e["fdr"] is None else e["fdr"], 1e-300)))
                              for e in rec["enrichment"]] + \
                             [("label", a["label"], a["auroc"]) for a in rec["label_auroc"] if a["auroc"] is not None]:
            for k in [text.lower(), *_words(text)]:  # a term / label and each of its words: its best score
                scores[kind][k] = max(scores[kind].get(k, -1.0), s)
        for kind, keys in search_terms(rec, min_auroc).items():
            for k in keys:
                search[kind][k].append((scores[kind].get(k, 0.0), rec["id"]))
        label = rec["module"] or _best_label(rec, min_auroc)
        summary["colour"].append(label)
        summary["hover"].append(f"#{rec['index']} {rec['explanation'] or ''}"[:120])
        summary["density"].append(rec["density"]["cells"])
        yield rec


def _best_label(rec: dict, min_auroc: float) -> str:
    a = rec["label_auroc"]
    return a[0]["label"] if a and a[0]["auroc"] is not None and a[0]["auroc"] >= min_auroc else "unlabelled"


def _export(records: Iterator[dict], out: Path, run_entry: dict, want: bool) -> str:
    """Pass the records to the Neuronpedia / SAEDashboard export (``sae4scfm.atlas.export.export_run``, which
    writes ``<out>/<run_id>/``) when it exists; otherwise just drain them (the site's files are written as they
    stream)."""
    try:
        from sae4scfm.atlas.export import export_run
    except ImportError:
        export_run = None
    if want and export_run is not None:
        export_run(records, out, runs=[run_entry])
        return f"export/{run_entry['run_id']}/"
    for _ in records:
        pass
    if not want:
        return "off"
    print("atlas: no Neuronpedia / SAEDashboard export: sae4scfm.atlas.export is not in this version "
          "(atlas.export=false silences this).")
    return "skipped: sae4scfm.atlas.export is not in this version"


def overview(run: AtlasRun) -> dict:
    """Run overview payload: metadata, eval metrics, training curves, feature density histogram,
    trained-vs-random-init control table, baselines, cross-layer persistence, analysis counts."""
    curves = defaultdict(list)
    metrics = run.run_dir / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            for k in ("step", "fvu", "l0", "loss", "dead_fraction"):
                curves[k].append(_num(row.get(k)))
    fires = np.asarray((run.X > 0).sum(0)).ravel() / max(run.n_cells, 1)
    log_d = np.log10(fires[fires > 0]) if (fires > 0).any() else np.zeros(0)
    counts, edges = np.histogram(log_d, bins=30) if len(log_d) else (np.zeros(0, int), np.zeros(0))

    def table(name):
        t = _read_csv(run.analysis_dir / name)
        return None if t is None else json.loads(t.to_json(orient="records"))

    return {"run": run.manifest_entry(),
            "curves": dict(curves),
            "density": {"log10_edges": [_num(x) for x in edges], "counts": [int(c) for c in counts],
                        "dead": int((fires == 0).sum()), "median": _num(np.median(fires)) if len(fires) else None},
            "control": table("control_comparison.csv"), "baselines": table("baselines.csv"),
            "cross_layer": table("cross_layer.csv"),
            "analyses": sorted(set(run.long["analysis"])) if len(run.long) else []}


def cells_payload(run: AtlasRun) -> dict:
    layout = run.cell_layout()
    out = {"n_cells_total": run.n_cells, "n": len(layout.cells),
           "x": [round(float(v), 3) for v in layout.xy[:, 0]], "y": [round(float(v), 3) for v in layout.xy[:, 1]],
           "categories": {}, "keys": {}}
    for name, key in (("cell_type", run.cell_type_key), ("condition", run.condition_key), ("split", "split")):
        coded = run.obs_codes(key, layout.cells)
        if coded is not None:
            out["categories"][name], out[name] = coded
            out["keys"][name] = key
    return out


def modules_payload(run: AtlasRun, hover: list[str]) -> dict:
    mods = run.modules()
    rows = []
    if mods is not None:
        for r in mods.to_dict(orient="records"):
            members = [int(x) for x in str(r.get("features") or "").split(";") if x != ""]
            rows.append({"module": f"m{int(r['module'])}", "size": int(r["size"]),
                         "labels": {k.split(":", 1)[1]: (v if isinstance(v, str) else "") for k, v in r.items()
                                    if k.startswith("label:")},
                         "features": [{"feature_id": run.feature_id(i), "text": hover[i]} for i in members]})
    return {"run_id": run.run_id, "modules": rows}


def layer_map_payload(run: AtlasRun, summary: dict) -> dict:
    xy, method = run.layer_map()
    colour = summary["colour"]
    cats = sorted(set(colour), key=lambda c: (c == "unlabelled", c))
    look = {c: i for i, c in enumerate(cats)}
    return {"run_id": run.run_id, "layer": run.layer, "method": method,
            "colour_by": "module" if run.modules() is not None else "best label",
            "x": [round(float(v), 3) for v in xy[:, 0]], "y": [round(float(v), 3) for v in xy[:, 1]],
            "colour": [look[c] for c in colour], "categories": cats, "text": summary["hover"],
            "density": summary["density"]}


def flow_payload(runs: dict[str, AtlasRun], colours: dict[str, list[str]]) -> dict:
    """Cross-layer flow: persistence per matched run pair, and for the pairs of runs both in the site a Sankey
    from the shallower layer's groups (module or best label) to the deeper one's, counting decoder matches with
    cosine >= the analysis's ``cross_layer_cosine`` (a pair matched both ways is drawn once, from the shallower
    run's matching when it exists), plus the strongest matches as links."""
    pairs, nodes, links, strongest, drawn = [], {}, defaultdict(int), [], set()
    matched = []
    for run_id, run in runs.items():
        table = _read_csv(run.analysis_dir / "cross_layer.csv")
        for layer, other_id, label in run.cross_layer_partners():
            row = table[table["layer_b"] == layer].iloc[0].to_dict()
            pairs.append({"run_a": run_id, "layer_a": run.layer, "run_b": other_id, "layer_b": layer,
                          "in_site": other_id in runs,
                          "decoder_persistence": _num(row.get("decoder_persistence")),
                          "cofiring_persistence": _num(row.get("cofiring_persistence"))})
            if other_id in runs:
                matched.append((layer < run.layer, run_id, other_id, layer, label))
    for _, run_id, other_id, layer, label in sorted(matched):  # shallower -> deeper matchings first
        if frozenset((run_id, other_id)) in drawn:
            continue
        drawn.add(frozenset((run_id, other_id)))
        run = runs[run_id]
        match = run.column("cross_layer", "decoder_match", "layer", label)
        cos = np.nan_to_num(run.column("cross_layer", "decoder_cos", "layer", label), nan=-1.0)
        if match is None:
            continue
        threshold = float(run.analysis_params("cross_layer").get("cross_layer_cosine", 0.5))
        for f in np.flatnonzero(cos >= threshold):  # nodes: (run, group), shown as "L<layer>: <group>"
            a = (run_id, f"L{run.layer}: {colours[run_id][f]}")
            b = (other_id, f"L{layer}: {colours[other_id][int(match[f])]}")
            a, b = (a, b) if run.layer <= layer else (b, a)
            links[(nodes.setdefault(a, len(nodes)), nodes.setdefault(b, len(nodes)))] += 1
        for f in np.argsort(-cos, kind="stable")[:60]:
            ids = (run.feature_id(f), feature_id_of(other_id, layer, int(match[f])))
            a, b = ids if run.layer <= layer else ids[::-1]
            strongest.append({"a": a, "b": b, "cosine": _num(cos[f], 4)})
    return {"pairs": pairs, "nodes": [label for _, label in nodes],
            "links": [{"source": s, "target": t, "value": v} for (s, t), v in links.items()],
            "strongest": sorted(strongest, key=lambda r: -(r["cosine"] or 0))[:60]}


def write_search(site: Path, search: dict) -> dict[str, int]:
    """Shard each kind's index {key: [feature ids, most relevant first]}; returns {kind: n_shards}."""
    counts = {}
    for kind in SEARCH_KINDS:
        index = search[kind]
        n = max(1, math.ceil(len(index) / SHARD_ENTRIES))
        shards: list[dict] = [{} for _ in range(n)]
        for key, hits in index.items():
            shards[shard_of(key, n)][key] = [fid for _, fid in sorted(hits, key=lambda h: -h[0])]
        for i, shard in enumerate(shards):
            write_js(site / "data" / "search" / kind / f"{i}.js", f"search/{kind}/{i}", shard)
        counts[kind] = n
    return counts


def build_site(run_dirs: list[Path], out_dir: Path, options: Mapping | None = None) -> Path:
    """Write the atlas of ``run_dirs`` to ``out_dir`` (replaced as a whole); returns ``out_dir``."""
    options = dict(options or {})
    run_dirs = [Path(p) for p in run_dirs]
    if not run_dirs:
        raise InputError("the atlas needs at least one run: sae_checkpoint.experiment=E sae_checkpoint.timestamp=T "
                         "or atlas.runs=[E/T, ...].")
    out_dir = Path(out_dir).resolve()
    if any(out_dir == p.resolve() or out_dir in p.resolve().parents for p in run_dirs):
        raise InputError(f"atlas.out={out_dir} would replace a run dir; choose another folder.")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.building-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    started = time.perf_counter()
    try:
        copy_assets(tmp)
        search = {k: defaultdict(list) for k in SEARCH_KINDS}
        runs, colours, entries, exports = {}, {}, [], {}
        site_runs = []
        for run_dir in run_dirs:
            site_runs.append(AtlasRun(run_dir, options))
            if site_runs[-1].run_id in {r.run_id for r in site_runs[:-1]}:
                raise InputError(f"{run_dir} is listed twice in atlas.runs.")
        link_causal_edges(site_runs)
        for run in site_runs:
            summary = {"colour": [], "hover": [], "density": []}
            exports[run.run_id] = _export(_records_written(run, tmp, search, summary), tmp / "export",
                                          run.manifest_entry(), bool(options.get("export", True)))
            data = tmp / "data" / run.run_id
            write_js(data / "overview.js", f"overview/{run.run_id}", overview(run))
            write_js(data / "cells.js", f"cells/{run.run_id}", cells_payload(run))
            write_js(data / "layer_map.js", f"layer_map/{run.run_id}", layer_map_payload(run, summary))
            write_js(data / "modules.js", f"modules/{run.run_id}", modules_payload(run, summary["hover"]))
            runs[run.run_id], colours[run.run_id] = run, summary["colour"]
            entries.append(run.manifest_entry())
        write_js(tmp / "data" / "flow.js", "flow", flow_payload(runs, colours))
        shards = write_search(tmp, search)
        write_js(tmp / "data" / "manifest.js", "manifest", {
            "schema": SITE_SCHEMA, "built": time.strftime("%Y-%m-%d %H:%M:%S"), "runs": entries,
            "search": shards, "export": exports, "build_seconds": round(time.perf_counter() - started, 1)})
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"atlas: {sum(e['n_features'] for e in entries)} features of {len(entries)} run(s) in "
          f"{time.perf_counter() - started:.1f} s: {out_dir / 'index.html'}")
    return out_dir


def _replace_dir(new: Path, final: Path) -> None:
    """Rename ``new`` to ``final``; an old ``final`` is moved aside first and deleted after."""
    old = final.parent / f".{final.name}.old-{os.getpid()}"
    if final.exists():
        os.replace(final, old)
    os.replace(new, final)
    shutil.rmtree(old, ignore_errors=True)


def resolve_runs(cfg: DictConfig) -> list[Path]:
    """The run dirs of ``atlas.runs=[exp/stamp, ...]``, else of ``sae_checkpoint`` (timestamp may be a list)."""
    from sae4scfm.runs import resolve_run_dir

    listed = list(cfg.atlas.get("runs") or [])
    if listed:
        out = []
        for address in listed:
            experiment, _, stamp = str(address).partition("/")
            out.append(resolve_run_dir(cfg.runs_dir, experiment, stamp or "latest"))
        return out
    stamps = cfg.sae_checkpoint.timestamp
    stamps = list(stamps) if OmegaConf.is_list(stamps) else [stamps]
    return [resolve_run_dir(cfg.runs_dir, cfg.sae_checkpoint.experiment, s) for s in stamps]


def build_atlas(cfg: DictConfig) -> Path:
    """``scripts/build_atlas.py``: build the site of the configured runs; ``atlas.serve=true`` then serves it."""
    run_dirs = resolve_runs(cfg)
    out = cfg.atlas.get("out")
    out = Path(out) if out else (run_dirs[0] / "atlas" if len(run_dirs) == 1 else Path(cfg.runs_dir) / "atlas")
    options = OmegaConf.to_container(cfg.atlas, resolve=True)
    site = build_site(run_dirs, out, options)
    if cfg.atlas.get("serve"):
        try:
            from sae4scfm.atlas.server import serve
        except ImportError:
            raise InputError("atlas.serve=true needs sae4scfm.atlas.server, not in this version; open "
                             f"{site / 'index.html'} from disk instead.") from None
        server, url = serve(site, host=str(cfg.atlas.host), port=int(cfg.atlas.port))
        print(f"serving {site} at {url} (Ctrl-C stops)", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            server.shutdown()
    return site


