"""Export atlas feature records: our JSON, and the files Neuronpedia / SAEDashboard import.

``export_run(records, out_dir)`` streams feature records (schema ``sae4scfm.atlas.feature/1``,
``feature_record.schema.json``) and writes, per run, ``<out_dir>/<run_id>/``:

- ``features.jsonl.gz``: one record per line, exactly as given (our documented format, gzipped);
- ``feature_record.schema.json``: the JSON Schema of those lines;
- ``saedashboard/batch-<n>.json``: the output format of SAEDashboard's ``NeuronpediaRunner``
  (``{model_id, layer, sae_set, features: [...]}``, :func:`neuronpedia_feature` per feature), which
  Neuronpedia's importer reads, and ``saedashboard/skipped_indexes.json``;
- ``neuronpedia/explanations.jsonl``: one Neuronpedia ``Explanation`` row per feature with an
  explanation.

A single-cell "token" is a gene of a cell: an SAEDashboard example ("activation") is one top cell,
its ``tokens`` the genes where the feature fires in that cell and ``values`` their activations.
Field names and types follow the upstream files cited in docs/atlas.md; numbers are written at full
precision (upstream rounds to 3 decimals), so :func:`validate_export` and a reader get ours back.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from sae4scfm.errors import InputError

RECORD_SCHEMA = "sae4scfm.atlas.feature/1"
SCHEMA_FILE = Path(__file__).with_name("feature_record.schema.json")
FEATURES_JSONL = "features.jsonl.gz"  # gzip level 1: a fifth of the size for little time
SAEDASHBOARD_DIR = "saedashboard"
NEURONPEDIA_DIR = "neuronpedia"
EXPLANATIONS_JSONL = "explanations.jsonl"
EXPLANATION_TYPE = "sae4scfm-auto"  # our explanations: best label AUROC + best enriched term, not an LLM's

_num = {"type": "number"}
_int = {"type": "integer"}
_str = {"type": "string"}


def _list(items: dict) -> dict:
    return {"type": "array", "items": items}


def _object(properties: dict, optional: tuple[str, ...] = ()) -> dict:
    """A JSON Schema object of exactly these properties, all required but ``optional``."""
    return {"type": "object", "required": [k for k in properties if k not in optional], "properties": properties,
            "additionalProperties": False}


# JSON Schemas written from the upstream examples (docs/atlas.md cites them): the field names and
# JSON types of SAEDashboard's tests/acceptance/test_simple/batch-0.json and skipped_indexes.json, and
# of neuronpedia-utils' Explanation row. additionalProperties false: a misspelt field fails.
SAEDASHBOARD_ACTIVATION_SCHEMA = _object({
    "bin_min": _num, "bin_max": _num, "bin_contains": _num, "tokens": _list(_str), "values": _list(_num),
    "qualifying_token_index": _int, "dfa_values": _list(_num), "dfa_maxValue": _num, "dfa_targetIndex": _int,
}, optional=("dfa_values", "dfa_maxValue", "dfa_targetIndex"))  # upstream writes dfa_* only when computed
SAEDASHBOARD_FEATURE_SCHEMA = _object({
    "feature_index": _int,
    "neuron_alignment_indices": _list(_int), "neuron_alignment_values": _list(_num),
    "neuron_alignment_l1": _list(_num),
    "correlated_neurons_indices": _list(_int), "correlated_neurons_l1": _list(_num),
    "correlated_neurons_pearson": _list(_num),
    "correlated_features_indices": _list(_int), "correlated_features_l1": _list(_num),
    "correlated_features_pearson": _list(_num),
    "neg_str": _list(_str), "neg_values": _list(_num), "pos_str": _list(_str), "pos_values": _list(_num),
    "frac_nonzero": _num,
    "freq_hist_data_bar_values": _list(_num), "freq_hist_data_bar_heights": _list(_int),
    "logits_hist_data_bar_heights": _list(_num), "logits_hist_data_bar_values": _list(_num),
    "n_prompts_total": _int, "n_tokens_in_prompt": _int, "dataset": _str,
    "decoder_weights_dist": _list(_num),
    "activations": _list(SAEDASHBOARD_ACTIVATION_SCHEMA),
})
SAEDASHBOARD_BATCH_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    **_object({"model_id": _str, "layer": _int, "sae_set": _str, "features": _list(SAEDASHBOARD_FEATURE_SCHEMA)}),
}
SAEDASHBOARD_SKIPPED_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    **_object({"model_id": _str, "layer": _str, "sae_set": _str, "log_sparsity": _int,
               "skipped_indexes": _list(_int)}),
}
_null_or_str = {"type": ["string", "null"]}
NEURONPEDIA_EXPLANATION_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    **_object({"id": _str, "modelId": _str, "layer": _str, "index": _str, "description": _str, "authorId": _str,
               "embedding": {"type": ["array", "null"], "items": _num}, "triggeredById": _null_or_str,
               "typeName": _null_or_str, "explanationModelName": _null_or_str, "notes": _null_or_str,
               "createdAt": _str}),
}


def slug(text: str) -> str:
    """A Neuronpedia-safe id: lower case, runs of other characters -> '-' ("scgpt demo" -> "scgpt-demo")."""
    out = re.sub(r"[^a-z0-9.]+", "-", str(text).lower()).strip("-")
    return out or "unnamed"


def _centres(edges: list[float]) -> list[float]:
    return [(float(a) + float(b)) / 2 for a, b in zip(edges[:-1], edges[1:])]


def neuronpedia_feature(record: Mapping, *, n_prompts_total: int = 0, n_tokens_in_prompt: int = 0) -> dict:
    """One feature record as an SAEDashboard/Neuronpedia dashboard feature (``SAEDASHBOARD_FEATURE_SCHEMA``).

    feature_index = record index; frac_nonzero = fraction of cells where it fires; the activation
    histogram's bins (over the cells where it fires) as bar centres / counts; pos_str / pos_values =
    its top genes and gene scores (the genes it stands for, where a language model's dashboard lists
    the tokens it promotes); one "activation" per top cell: tokens = the genes where it fires in that
    cell, values = their activations, bin_max = the feature's max activation, bin_min = bin_contains
    = -1 (upstream's marker of the top-activations group), qualifying_token_index = argmax of values; the
    optional dfa_* fields (direct feature attribution) are left out.
    n_prompts_total: cells the statistics ran on; n_tokens_in_prompt: gene tokens read per cell.
    Lists with no single-cell counterpart (logit histogram, neuron alignment, correlations) are empty.
    """
    hist = record.get("activation_histogram") or {"edges": [], "counts": []}
    edges, counts = list(hist.get("edges") or []), list(hist.get("counts") or [])
    if counts and len(edges) != len(counts) + 1:
        raise InputError(f"feature {record.get('id')}: activation_histogram has {len(edges)} edges for "
                         f"{len(counts)} counts; it needs counts + 1 edges")
    max_act = record.get("max_activation")
    activations = []
    for cell in record.get("top_cells") or []:
        genes = cell.get("genes") or []
        values = [float(g["activation"]) for g in genes]
        activations.append({
            "bin_min": -1, "bin_max": float(max_act if max_act is not None else cell["activation"]),
            "bin_contains": -1,
            "tokens": [str(g["gene"]) for g in genes], "values": values,
            "qualifying_token_index": max(range(len(values)), key=values.__getitem__) if values else -1,
        })  # no dfa_* fields: upstream omits them where no direct feature attribution was computed
    top_genes = record.get("top_genes") or []
    density = (record.get("density") or {}).get("cells")
    return {
        "feature_index": int(record["index"]),
        "neuron_alignment_indices": [], "neuron_alignment_values": [], "neuron_alignment_l1": [],
        "correlated_neurons_indices": [], "correlated_neurons_l1": [], "correlated_neurons_pearson": [],
        "correlated_features_indices": [], "correlated_features_l1": [], "correlated_features_pearson": [],
        "neg_str": [], "neg_values": [],
        "pos_str": [str(g["gene"]) for g in top_genes if g.get("score") is not None],
        "pos_values": [float(g["score"]) for g in top_genes if g.get("score") is not None],
        "frac_nonzero": float(density or 0.0),
        "freq_hist_data_bar_values": _centres(edges) if counts else [],
        "freq_hist_data_bar_heights": [int(c) for c in counts],
        "logits_hist_data_bar_heights": [], "logits_hist_data_bar_values": [],
        "n_prompts_total": int(n_prompts_total), "n_tokens_in_prompt": int(n_tokens_in_prompt),
        "dataset": str(record.get("dataset") or ""),
        "decoder_weights_dist": [],
        "activations": activations,
    }


def explanation_row(record: Mapping, *, model_id: str, source_id: str, author_id: str, created_at: str) -> dict:
    """A Neuronpedia ``Explanation`` row (``NEURONPEDIA_EXPLANATION_SCHEMA``) for a record with an explanation.

    id is stable across rebuilds (a hash of the feature id); layer is the Neuronpedia source id
    ``<layer>-<sae_set>``; typeName names our method (best label AUROC + best enriched term)."""
    return {
        "id": "sae4scfm" + hashlib.sha1(str(record["id"]).encode()).hexdigest()[:17],
        "modelId": model_id, "layer": source_id, "index": str(int(record["index"])),
        "description": str(record["explanation"]), "authorId": author_id,
        "embedding": None, "triggeredById": None, "typeName": EXPLANATION_TYPE, "explanationModelName": None,
        "notes": f"sae4scfm feature {record['id']}", "createdAt": created_at,
    }


def _plain(obj):
    """json.dumps default: numpy scalars and arrays as Python numbers and lists."""
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _bad_number(obj, path: str = "") -> str | None:
    """The JSON path of the first NaN/inf in ``obj``, else None."""
    if isinstance(obj, (float, np.floating)) and not math.isfinite(obj):
        return path or "."
    if isinstance(obj, Mapping):
        items = obj.items()
    elif isinstance(obj, (list, tuple, np.ndarray)):
        items = enumerate(obj)
    else:
        return None
    for k, v in items:
        found = _bad_number(v, f"{path}.{k}" if isinstance(k, str) else f"{path}[{k}]")
        if found:
            return found
    return None


def dumps(obj, where: str) -> str:
    """Strict JSON (no NaN/inf: a missing number is null); InputError naming ``where`` and the field."""
    try:
        return json.dumps(obj, default=_plain, allow_nan=False, separators=(",", ":"))
    except ValueError:
        raise InputError(f"{where}: {_bad_number(obj)} is NaN or infinite; feature records must write a "
                         "missing number as null") from None


class DumpedRecord(dict):
    """A feature record with its strict JSON text already made (``.json``, one line, no NaN): the atlas build
    dumps each record once for its page file and the export writes that text as is."""

    json: str


class _RunExport:
    """The files of one run's export, written into a temp folder renamed into place by ``finish``."""

    def __init__(self, out_dir: Path, first: Mapping, run: Mapping, batch_size: int, author_id: str,
                 created_at: str, model_id: str | None, sae_set: str | None):
        self.run_id = str(first["run_id"])
        self.final = out_dir / self.run_id
        self.tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=f".{self.run_id}.", suffix=".tmp"))
        (self.tmp / SAEDASHBOARD_DIR).mkdir()
        (self.tmp / NEURONPEDIA_DIR).mkdir()
        shutil.copyfile(SCHEMA_FILE, self.tmp / SCHEMA_FILE.name)
        self.features = gzip.open(self.tmp / FEATURES_JSONL, "wt", compresslevel=1, encoding="utf-8")
        self.explanations = open(self.tmp / NEURONPEDIA_DIR / EXPLANATIONS_JSONL, "w")
        self.model_id = model_id or slug(first.get("model") or "scfm")
        self.layer = int(first["layer"])
        self.sae_set = sae_set or slug(f"sae4scfm-{self.run_id}")
        self.source_id = f"{self.layer}-{self.sae_set}"
        self.n_prompts_total = int(run.get("n_cells") or 0)
        self.n_tokens_in_prompt = int(run.get("n_tokens_in_prompt") or 0)
        self.batch_size, self.author_id, self.created_at = batch_size, author_id, created_at
        self.batch: list[dict] = []
        self.n_batches = self.n_features = self.n_explanations = 0

    def add(self, record: Mapping) -> None:
        where = f"feature record {record.get('id')!r}"
        if record.get("schema") != RECORD_SCHEMA:
            raise InputError(f"{where}: schema is {record.get('schema')!r}, expected {RECORD_SCHEMA!r}")
        if int(record["layer"]) != self.layer:
            raise InputError(f"{where}: layer {record['layer']} differs from layer {self.layer} of the run's "
                             f"other records; one run has one layer")
        text = record.json if isinstance(record, DumpedRecord) else dumps(record, where)
        self.features.write(text + "\n")
        self.batch.append(neuronpedia_feature(record, n_prompts_total=self.n_prompts_total,
                                              n_tokens_in_prompt=self.n_tokens_in_prompt))
        if record.get("explanation"):
            self.explanations.write(dumps(explanation_row(
                record, model_id=self.model_id, source_id=self.source_id, author_id=self.author_id,
                created_at=self.created_at), where) + "\n")
            self.n_explanations += 1
        self.n_features += 1
        if len(self.batch) >= self.batch_size:
            self.flush()

    def flush(self) -> None:
        if not self.batch:
            return
        batch = {"model_id": self.model_id, "layer": self.layer, "sae_set": self.sae_set, "features": self.batch}
        path = self.tmp / SAEDASHBOARD_DIR / f"batch-{self.n_batches}.json"
        path.write_text(dumps(batch, str(path)))
        self.batch, self.n_batches = [], self.n_batches + 1

    def finish(self) -> dict:
        self.flush()
        self.features.close()
        self.explanations.close()
        skipped = {"model_id": self.model_id, "layer": str(self.layer), "sae_set": self.sae_set,
                   "log_sparsity": 1, "skipped_indexes": []}  # every feature is written, dead ones too
        (self.tmp / SAEDASHBOARD_DIR / "skipped_indexes.json").write_text(json.dumps(skipped))
        summary = {"run_id": self.run_id, "n_features": self.n_features, "n_batches": self.n_batches,
                   "n_explanations": self.n_explanations, "model_id": self.model_id, "layer": self.layer,
                   "sae_set": self.sae_set, "neuronpedia_source_id": self.source_id, "created_at": self.created_at}
        (self.tmp / "export.json").write_text(json.dumps(summary, indent=1))
        for p in self.tmp.rglob("*"):
            if p.is_file():
                os.chmod(p, 0o644)
        os.chmod(self.tmp, 0o755)
        old = None
        if self.final.exists():
            old = self.final.with_name(f".{self.run_id}.old-{os.getpid()}")
            os.replace(self.final, old)
        os.replace(self.tmp, self.final)
        if old is not None:
            shutil.rmtree(old)
        return summary

    def abort(self) -> None:
        self.features.close()
        self.explanations.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def export_run(records: Iterable[Mapping], out_dir: Path, *, runs: Iterable[Mapping] = (), batch_size: int = 128,
               author_id: str = "sae4scfm", model_id: str | None = None, sae_set: str | None = None) -> list[dict]:
    """Write the export of every run in ``records`` to ``<out_dir>/<run_id>/`` (module docstring).

    records: feature records (several runs may be interleaved), consumed once, never held all at once
    (one batch of ``batch_size`` dashboard features per run is). runs: the manifest's run entries
    (``run_id``, ``n_cells``, optionally ``n_tokens_in_prompt``) for the dashboard's prompt counts.
    model_id / sae_set: Neuronpedia ids (default: slug of the record's model / ``sae4scfm-<run_id>``).
    Each run's folder appears whole or not at all (built in a temp folder, then renamed over the old).
    Returns one summary dict per run (run_id, n_features, n_batches, n_explanations, ids).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if batch_size < 1:
        raise InputError(f"export batch_size must be >= 1, got {batch_size}")
    run_info = {str(r["run_id"]): r for r in runs}
    created_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    open_runs: dict[str, _RunExport] = {}
    try:
        for record in records:
            run_id = str(record["run_id"])
            if run_id not in open_runs:
                open_runs[run_id] = _RunExport(out_dir, record, run_info.get(run_id, {}), batch_size, author_id,
                                               created_at, model_id, sae_set)
            open_runs[run_id].add(record)
        return [run.finish() for run in open_runs.values()]
    except BaseException:
        for run in open_runs.values():
            if run.tmp.exists():
                run.abort()
        raise


def read_records(run_export_dir: Path) -> Iterable[dict]:
    """Stream the records of one run's export (``<out_dir>/<run_id>/features.jsonl.gz``)."""
    with gzip.open(Path(run_export_dir) / FEATURES_JSONL, "rt", encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def validate_export(run_export_dir: Path) -> dict:
    """Validate one run's export against the schemas (ours and the upstream formats'); InputError on the
    first invalid file. Returns counts {features, batches, explanations}. Needs ``jsonschema``."""
    try:
        import jsonschema
    except ImportError:
        raise InputError("validating an export needs jsonschema: pip install jsonschema") from None
    d = Path(run_export_dir)
    record_validator = jsonschema.Draft202012Validator(json.loads(SCHEMA_FILE.read_text()))

    def check(validator, obj, where: str) -> None:
        error = jsonschema.exceptions.best_match(validator.iter_errors(obj))
        if error is not None:
            raise InputError(f"{where}: {'/'.join(map(str, error.absolute_path)) or '.'}: {error.message}")

    counts = {"features": 0, "batches": 0, "explanations": 0}
    for i, record in enumerate(read_records(d)):
        check(record_validator, record, f"{d / FEATURES_JSONL} line {i + 1}")
        counts["features"] += 1
    batch_validator = jsonschema.Draft202012Validator(SAEDASHBOARD_BATCH_SCHEMA)
    for path in sorted((d / SAEDASHBOARD_DIR).glob("batch-*.json")):
        check(batch_validator, json.loads(path.read_text()), str(path))
        counts["batches"] += 1
    check(jsonschema.Draft202012Validator(SAEDASHBOARD_SKIPPED_SCHEMA),
          json.loads((d / SAEDASHBOARD_DIR / "skipped_indexes.json").read_text()),
          str(d / SAEDASHBOARD_DIR / "skipped_indexes.json"))
    explanation_validator = jsonschema.Draft202012Validator(NEURONPEDIA_EXPLANATION_SCHEMA)
    with open(d / NEURONPEDIA_DIR / EXPLANATIONS_JSONL) as f:
        for i, line in enumerate(f):
            check(explanation_validator, json.loads(line), f"{d / NEURONPEDIA_DIR / EXPLANATIONS_JSONL} line {i + 1}")
            counts["explanations"] += 1
    return counts
