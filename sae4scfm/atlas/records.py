"""Feature records of a run dir: one dict per SAE feature in the atlas schema ``sae4scfm.atlas.feature/1``.

Everything a feature page shows is read from what the earlier stages wrote (README, run-dir format):
``cfg.json``, ``eval.json``, ``sae.safetensors`` (W_dec), ``features/features.h5ad`` (cells x features, CSR)
and ``features/token_features.h5ad`` (tokens x features), ``analysis/results_long.parquet`` (label AUROCs,
top genes, best sets, modules, cross-layer matches), ``analysis/enrichment.csv`` (significant Fisher tests),
``analysis/gene_scores.parquet`` (per-token gene statistics), ``analysis/coactivation_pairs.csv`` and
``analysis/cross_layer.csv``; the causal commands' tables (``sae4scfm.causal.RESULT_TABLES``) when they ran.
Absent analyses give empty lists / null. :class:`AtlasRun` loads a run once and streams records
(:meth:`AtlasRun.records`): per-feature rows are kept as sorted numpy slices, never as all records at once.

Search rule (the gene index of the site): a feature is listed under a gene when the gene is in its
``top_genes`` (gene scoring's adaptive top genes, at most ``atlas.top_genes``) or in its ``firing_genes``
(the genes whose tokens it fires on most often, gene scoring's ``top_token_genes``, at most
``atlas.firing_genes``); under a term when the term is enriched (FDR < the analysis's ``max_fdr``), and
under each of its words; under a label (and each of its words) when the label is among its
``atlas.auroc_labels`` best labels with AUROC >= ``atlas.label_min_auroc`` - see :func:`search_terms`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np
import pandas as pd
import scipy.sparse as sp

from sae4scfm.errors import InputError

SCHEMA = "sae4scfm.atlas.feature/1"
DEFAULTS = {"max_cells": 100_000, "umap_neighbors": 15, "svd_components": 30, "layer_map_umap_max": 20000,
            "top_genes": 20, "firing_genes": 10, "top_cells": 10, "cell_genes": 8, "histogram_bins": 30,
            "neighbours": 10, "decoder_neighbours_max": 20000, "label_min_auroc": 0.75, "auroc_labels": 12,
            "seed": 0}


def run_id_of(run_dir: Path) -> str:
    """``<experiment>--<timestamp>``: the run's id in the site (file- and URL-safe)."""
    return f"{Path(run_dir).parent.name}--{Path(run_dir).name}"


def feature_id_of(run_id: str, layer, index: int) -> str:
    """``<run_id>/L<layer>/<index>``: stable across rebuilds."""
    return f"{run_id}/L{layer}/{int(index)}"


def _options(options: Mapping | None) -> dict:
    opts = dict(DEFAULTS)
    opts.update({k: v for k, v in dict(options or {}).items() if v is not None})
    return opts


def _num(x, digits: int = 5):
    """A JSON-safe float rounded to ``digits`` significant digits (None for NaN/inf)."""
    if x is None:
        return None
    x = float(x)
    if x == 0.0 or not math.isfinite(x):
        return 0.0 if x == 0.0 else None
    return round(x, digits - 1 - math.floor(math.log10(abs(x))))


def _nums(values, digits: int = 5) -> list:
    """``_num`` of every element of a float array (NaN/inf -> None), vectorised for long arrays: the integer of
    ``digits`` significant digits divided (or multiplied) by an exact power of ten is the double nearest the
    decimal, as ``round`` gives."""
    x = np.asarray(values, dtype=np.float64)
    if x.size < 64:  # numpy's per-call overhead exceeds the scalar loop's
        return [_num(v, digits) for v in x.tolist()]
    ok = np.isfinite(x) & (x != 0)
    out = np.zeros_like(x)
    v = x[ok]
    e = (digits - 1 - np.floor(np.log10(np.abs(v)))).astype(np.int64)
    pos = e >= 0
    p = 10.0 ** np.abs(e)
    out[ok] = np.where(pos, np.round(v * np.where(pos, p, 1.0)) / np.where(pos, p, 1.0),
                       np.round(v / np.where(pos, 1.0, p)) * np.where(pos, 1.0, p))
    lst = out.tolist()
    if not ok.all():
        for i in np.flatnonzero(~np.isfinite(x)).tolist():
            lst[i] = None
    return lst


def _histogram(values: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """``np.histogram(values, bins)`` (equal-width bins over [min, max], the last one closed), for small
    per-feature arrays without numpy's per-call overhead: (counts [bins] int, edges [bins + 1])."""
    if not len(values):
        return np.zeros(0, np.int64), np.zeros(0)
    lo, hi = float(values.min()), float(values.max())
    if hi == lo:
        lo, hi = lo - 0.5, hi + 0.5  # as numpy does for a constant array
    edges = np.linspace(lo, hi, bins + 1)
    idx = np.minimum(((values - lo) * (bins / (hi - lo))).astype(np.int64), bins - 1)
    return np.bincount(idx, minlength=bins), edges


class Grouped:
    """Rows of a table grouped by an integer feature column: ``rows(f)`` -> {column: numpy slice}."""

    def __init__(self, table: pd.DataFrame | None, key: str, n: int, order: list[str] | None = None,
                 ascending: list[bool] | None = None):
        if table is None or table.empty:
            self.cols, self.start = {}, np.zeros(n + 1, np.int64)
            return
        sort = [key] + list(order or [])
        table = table.sort_values(sort, ascending=[True] + list(ascending or [True] * len(order or [])),
                                  kind="stable")
        keys = table[key].to_numpy(np.int64)
        self.cols = {c: table[c].to_numpy() for c in table.columns}
        self.start = np.searchsorted(keys, np.arange(n + 1))

    def rows(self, f: int) -> dict[str, np.ndarray]:
        a, b = self.start[f], self.start[f + 1]
        return {c: v[a:b] for c, v in self.cols.items()}


def _read_csv(path: Path) -> pd.DataFrame | None:
    return pd.read_csv(path, keep_default_na=False, na_values=[""]) if path.is_file() else None


@dataclass
class CellLayout:
    """The run's cell UMAP: ``cells`` [n] positions into features.h5ad obs, ``xy`` [n, 2]."""

    cells: np.ndarray
    xy: np.ndarray


class AtlasRun:
    """One run dir loaded once for the atlas: metadata, per-feature tables, cell layout, layer map."""

    def __init__(self, run_dir: Path, options: Mapping | None = None):
        from sae4scfm.analysis.run_data import open_run

        self.run_dir = Path(run_dir)
        self.opts = _options(options)
        if not (self.run_dir / "cfg.json").is_file():
            raise InputError(f"{self.run_dir}: not a run dir (no cfg.json); address a trained run with "
                             "sae_checkpoint.experiment / sae_checkpoint.timestamp or atlas.runs=[exp/stamp].")
        self.cfg = json.loads((self.run_dir / "cfg.json").read_text())
        self.layer = self.cfg.get("layer")
        if not isinstance(self.layer, int) or isinstance(self.layer, bool):
            raise InputError(f"{self.run_dir / 'cfg.json'}: no integer `layer` (got {self.layer!r}); the atlas names "
                             "features <run>/L<layer>/<index>: retrain the run, or add the SAE's layer to cfg.json.")
        eval_file = self.run_dir / "eval.json"
        self.eval = json.loads(eval_file.read_text()) if eval_file.is_file() else {}
        self.run = open_run(self.run_dir)
        self.features = self.run.features
        self.tokens = self.run.tokens
        self.n_features = int(self.features.n_vars)
        self.n_cells = int(self.features.n_obs)
        self.run_id = run_id_of(self.run_dir)
        data = self.cfg.get("dataset") or {}
        self.dataset = data.get("name")
        self.cell_type_key = data.get("cell_type_key")
        self.condition_key = data.get("condition_key")
        model = self.cfg.get("model") or {}
        self.model = f"{self.cfg.get('model_family', '?')} {model.get('family', '')}".strip()
        self.X = sp.csc_matrix(self.features.X, dtype=np.float32)  # [cells, features], per-feature columns
        self.analysis_dir = self.run_dir / "analysis"
        self.long = self._read_long()
        self._long_groups: dict | None = None  # (analysis, metric) -> row positions of results_long
        self._cell_layout: CellLayout | None = None
        self.edge_runs: dict[int, str] = {}  # circuit edges: target layer -> the site's run of it (link_causal_edges)
        self.incoming: dict[int, list[dict]] = {}  # feature -> circuit edges into it from the site's runs

    # ---- metadata ------------------------------------------------------------------------------------
    def feature_id(self, index: int) -> str:
        return feature_id_of(self.run_id, self.layer, index)

    def manifest_entry(self) -> dict:
        c = self.cfg
        return {"run_id": self.run_id, "experiment": self.run_dir.parent.name, "timestamp": self.run_dir.name,
                "model": self.model, "dataset": self.dataset, "layer": self.layer, "hook_point": c.get("hook_point"),
                "sae_hook_point": c.get("sae_hook_point"), "architecture": c.get("architecture"),
                "d_in": c.get("d_in"), "d_sae": c.get("d_sae"), "hyperparams": c.get("hyperparams"),
                "n_cells": self.n_cells, "n_features": self.n_features, "steps": c.get("steps"),
                "eval": {k: _num(v) if isinstance(v, (int, float)) else v for k, v in self.eval.items()},
                "path": str(self.run_dir)}

    # ---- tables --------------------------------------------------------------------------------------
    def _read_long(self) -> pd.DataFrame:
        from sae4scfm.analysis.results import read_tidy_results

        try:
            return read_tidy_results(self.analysis_dir)
        except InputError:
            print(f"atlas: {self.run_dir} has no analysis results; feature pages show activations only "
                  "(run scripts/analyze_features.py for labels, genes and terms).")
            return pd.DataFrame(columns=["feature_id", "analysis", "label_key", "label", "metric", "value", "text"])

    def column(self, analysis: str, metric: str, label_key=None, label=None, text: bool = False) -> np.ndarray | None:
        """One per-feature column of results_long [n_features] (value, or text when ``text``), None if absent."""
        t = self._long_rows(analysis, metric)
        sel = t["label_key"].isna() if label_key is None else t["label_key"] == label_key
        sel = sel & (t["label"].isna() if label is None else t["label"] == label)
        rows = t[sel]
        if rows.empty:
            return None
        s = rows.set_index("feature_id")["text" if text else "value"]
        return s.reindex(range(self.n_features)).to_numpy()

    def _long_rows(self, analysis: str, metric: str) -> pd.DataFrame:
        """The rows of results_long of one (analysis, metric): the table is grouped once (string compares over
        millions of rows per column would dominate a 100k-feature build)."""
        if self._long_groups is None:
            self._long_groups = self.long.groupby(["analysis", "metric"], sort=False).indices
        idx = self._long_groups.get((analysis, metric))
        return self.long.iloc[idx] if idx is not None else self.long.iloc[:0]

    def label_aurocs(self) -> tuple[list[tuple[str, str]], np.ndarray]:
        """Label scoring's one-vs-rest AUROCs: [(label_key, label)] and [n_features, n_labels] (NaN if absent)."""
        t = self._long_rows("label_scoring", "auroc")
        t = t[t["label"].notna()]
        if t.empty:
            return [], np.zeros((self.n_features, 0))
        wide = t.pivot_table(index="feature_id", columns=["label_key", "label"], values="value", aggfunc="first")
        wide = wide.reindex(range(self.n_features))
        return [tuple(map(str, c)) for c in wide.columns], wide.to_numpy(np.float64)

    def _split_list(self, col: np.ndarray | None) -> list[list[str]]:
        if col is None:
            return [[] for _ in range(self.n_features)]
        return [[g for g in str(v).split(";") if g] if isinstance(v, str) else [] for v in col]

    def top_gene_lists(self) -> list[list[str]]:
        """Gene scoring's adaptive top genes per feature, capped at ``atlas.top_genes``."""
        n = int(self.opts["top_genes"])
        return [g[:n] for g in self._split_list(self.column("gene_scoring", "top_genes", text=True))]

    def firing_gene_lists(self) -> list[list[str]]:
        """The genes each feature fires on most often (gene scoring's ``top_token_genes``), capped."""
        n = int(self.opts["firing_genes"])
        return [g[:n] for g in self._split_list(self.column("gene_scoring", "top_token_genes", text=True))]

    def analysis_params(self, analysis: str) -> dict:
        return dict((self.features.uns.get(analysis) or {}).get("params") or {})

    def max_fdr(self) -> float:
        return float(self.analysis_params("enrichment").get("max_fdr", 0.05))

    def modules(self) -> pd.DataFrame | None:
        return _read_csv(self.analysis_dir / "modules.csv")

    def cross_layer_partners(self) -> list[tuple[int, str, str]]:
        """[(layer, run_id, results label)] of the runs this run was matched to (cross_layer.csv)."""
        table = _read_csv(self.analysis_dir / "cross_layer.csv")
        if table is None:
            return []
        return [(int(r.layer_b), run_id_of(Path(str(r.run))), str(int(r.layer_b))) for r in table.itertuples()]

    # ---- gene scores of the top genes -----------------------------------------------------------------
    def _top_gene_scores(self, top: list[list[str]]) -> list[list[float | None]]:
        """The score that ranked each top gene (``analysis.gene_score``): Pearson r with the gene's log1p
        CP10k expression (correlation, recomputed from the run's data), or the token log2 enrichment
        (token_specificity, gene_scores.parquet). None where the data to recompute it is missing."""
        empty = [[None] * len(g) for g in top]
        genes = sorted({g for gs in top for g in gs})
        if not genes:
            return empty
        how = self.analysis_params("gene_scoring").get("gene_score", "correlation")
        if how == "token_specificity":
            gs = self.gene_scores()
            if gs is None:
                return empty
            look = dict(zip(zip(gs["feature_id"].to_numpy(), gs["gene"].astype(str).to_numpy()),
                            gs["log2_enrichment"].to_numpy()))
            return [[_num(look.get((f, g))) for g in gs_] for f, gs_ in enumerate(top)]
        from sae4scfm.analysis.gene_scoring import cell_gene_correlation

        try:
            expr, names = self.run.expression()
        except (InputError, OSError, KeyError, ValueError) as e:
            print(f"atlas: top-gene correlations of {self.run_id} not recomputed ({e}); scores left empty.")
            return empty
        pos = {g: i for i, g in enumerate(names)}
        keep = [g for g in genes if g in pos]
        col = {g: i for i, g in enumerate(keep)}
        E = sp.csr_matrix(expr)[:, [pos[g] for g in keep]]
        out = []
        step = 4096
        for a in range(0, self.n_features, step):
            r = cell_gene_correlation(self.X[:, a:a + step], E)
            for f in range(a, min(a + step, self.n_features)):
                out.append([_num(r[f - a, col[g]], 4) if g in col else None for g in top[f]])
        return out

    def gene_scores(self) -> pd.DataFrame | None:
        path = self.analysis_dir / "gene_scores.parquet"
        return pd.read_parquet(path) if path.is_file() else None

    # ---- cells ---------------------------------------------------------------------------------------
    def cell_layout(self) -> CellLayout:
        """UMAP of the cells' feature vectors (TruncatedSVD first), subsampled above ``atlas.max_cells``."""
        if self._cell_layout is None:
            rng = np.random.default_rng(int(self.opts["seed"]))
            n, m = self.n_cells, int(self.opts["max_cells"])
            cells = np.sort(rng.choice(n, m, replace=False)) if n > m else np.arange(n)
            X = sp.csr_matrix(self.features.X)[cells].astype(np.float32)
            self._cell_layout = CellLayout(cells, embed_2d(X, int(self.opts["svd_components"]),
                                                           int(self.opts["umap_neighbors"]), int(self.opts["seed"])))
        return self._cell_layout

    def obs_codes(self, key: str | None, cells: np.ndarray) -> tuple[list[str], list[int]] | None:
        if not key or key not in self.features.obs:
            return None
        s = self.features.obs[key].iloc[cells].astype(str)
        cats = sorted(set(s))
        look = {c: i for i, c in enumerate(cats)}
        return cats, [look[v] for v in s]

    # ---- decoder --------------------------------------------------------------------------------------
    def decoder(self) -> np.ndarray:
        """Unit-norm decoder directions [n_features, d_in] (sae.safetensors W_dec)."""
        from safetensors.numpy import load_file

        W = load_file(str(self.run_dir / "sae.safetensors"))["W_dec"].astype(np.float32)
        return W / np.maximum(np.linalg.norm(W, axis=1, keepdims=True), 1e-12)

    def layer_map(self) -> tuple[np.ndarray, str]:
        """2-D layout [n_features, 2] of the unit decoder directions and its method: UMAP up to
        ``atlas.layer_map_umap_max`` features, PCA (2 axes) above, so a 100k-feature run stays fast."""
        W = self.decoder()
        if self.n_features <= int(self.opts["layer_map_umap_max"]) and self.n_features > 4:
            # unit vectors: euclidean distance is monotone in cosine (and avoids UMAP's slow callable metric)
            return embed_2d(W, 0, int(self.opts["umap_neighbors"]), int(self.opts["seed"])), "umap"
        W = W - W.mean(0)
        _, _, vt = np.linalg.svd(W[:: max(1, len(W) // 20000)], full_matrices=False)
        xy = np.zeros((len(W), 2), np.float32)  # fewer than 2 axes (1 feature, d_in 1): the rest stay 0
        xy[:, : min(2, len(vt))] = W @ vt[:2].T
        return xy, "pca"

    def decoder_neighbours(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Each feature's nearest decoder directions by cosine ([n, k] indices, [n, k] cosines), or None
        above ``atlas.decoder_neighbours_max`` features (an O(F^2) product)."""
        k = int(self.opts["neighbours"])
        if self.n_features > int(self.opts["decoder_neighbours_max"]) or self.n_features < 2 or k < 1:
            return None
        W = self.decoder()
        k = min(k, self.n_features - 1)
        idx = np.empty((self.n_features, k), np.int64)
        cos = np.empty((self.n_features, k), np.float32)
        for a in range(0, self.n_features, 2048):
            c = W[a:a + 2048] @ W.T
            c[np.arange(len(c)), np.arange(a, a + len(c))] = -np.inf
            part = np.argpartition(-c, k - 1, axis=1)[:, :k]
            vals = np.take_along_axis(c, part, 1)
            order = np.argsort(-vals, axis=1)
            idx[a:a + len(c)] = np.take_along_axis(part, order, 1)
            cos[a:a + len(c)] = np.take_along_axis(vals, order, 1)
        return idx, cos

    # ---- records -------------------------------------------------------------------------------------
    def records(self) -> Iterator[dict]:
        """One record per feature (index order), schema :data:`SCHEMA`."""
        o, n = self.opts, self.n_features
        layout = self.cell_layout()
        position = np.full(self.n_cells, -1, np.int64)
        position[layout.cells] = np.arange(len(layout.cells))
        obs = self.features.obs
        names = obs.index.astype(str).to_numpy()
        ctype = obs[self.cell_type_key].astype(str).to_numpy() if self.cell_type_key in obs else None
        cond = obs[self.condition_key].astype(str).to_numpy() if self.condition_key and self.condition_key in obs \
            else None
        split = obs["split"].astype(str).to_numpy() if "split" in obs else None

        labels, auroc = self.label_aurocs()
        best = {key: (self.column("label_scoring", "best", key, text=True),
                      self.column("label_scoring", "best_eval_auroc", key)) for key in {k for k, _ in labels}}
        top = self.top_gene_lists()
        top_scores = self._top_gene_scores(top)
        firing = self.firing_gene_lists()
        gscores = self.gene_scores()
        firing_stats = {}
        if gscores is not None:
            firing_stats = dict(zip(zip(gscores["feature_id"].to_numpy(), gscores["gene"].astype(str).to_numpy()),
                                    zip(gscores["freq"].to_numpy(), gscores["mean_act"].to_numpy())))
        enr = _read_csv(self.analysis_dir / "enrichment.csv")
        if enr is not None and not enr.empty:
            enr = enr[enr["fdr"] < self.max_fdr()]
        enr = Grouped(enr, "feature_id", n, ["fdr"]) if enr is not None and "feature_id" in enr else Grouped(None, "", n)
        pairs = _read_csv(self.analysis_dir / "coactivation_pairs.csv")
        if pairs is not None and not pairs.empty:
            both = pd.concat([pairs.rename(columns={"i": "a", "j": "b"}), pairs.rename(columns={"j": "a", "i": "b"})])
            pairs = Grouped(both[["a", "b", "pmi", "fdr"]], "a", n, ["pmi"], [False])
        else:
            pairs = Grouped(None, "", n)
        module = self.column("coactivation", "module")
        dec = self.decoder_neighbours()
        cross = []
        for layer, other_id, label in self.cross_layer_partners():
            cols = [self.column("cross_layer", m, "layer", label) for m in ("decoder_match", "decoder_cos",
                                                                            "cofiring_match", "jaccard")]
            if cols[0] is not None:
                cross.append((other_id, layer, *cols))
        tok = self._token_columns()
        causal = self._causal_tables()
        token_density = self.column("density", "token_fraction")
        bins = int(o["histogram_bins"])

        for f in range(n):
            a, b = self.X.indptr[f], self.X.indptr[f + 1]
            rows, vals = self.X.indices[a:b], self.X.data[a:b]
            fire = vals > 0
            rows, vals = rows[fire], vals[fire]
            counts, edges = _histogram(vals, bins)
            order = np.argsort(-vals, kind="stable")[: int(o["top_cells"])]
            top_cells = []
            cell_genes = tok(f, rows[order]) if tok else {}
            for r, v in zip(rows[order].tolist(), _nums(vals[order])):
                top_cells.append({"cell": names[r], "cell_index": r, "activation": v,
                                  "cell_type": None if ctype is None else ctype[r],
                                  "condition": None if cond is None else cond[r],
                                  "split": None if split is None else split[r],
                                  "genes": cell_genes.get(int(r), [])})
            pos = position[rows]
            keep = pos >= 0
            la = []
            if labels:
                vals_f = auroc[f]
                ok = np.flatnonzero(np.isfinite(vals_f))
                for j in ok[np.argsort(-vals_f[ok], kind="stable")][: int(o["auroc_labels"])]:
                    key, lab = labels[j]
                    bl, be = best[key]
                    la.append({"key": key, "label": lab, "auroc": _num(vals_f[j], 4),
                               "auroc_eval": _num(be[f], 4) if bl is not None and bl[f] == lab else None})
            e = enr.rows(f)
            enrichment = [{"collection": str(c), "term": str(t), "fdr": _num(q, 3), "overlap": int(ov),
                           "genes": [g for g in str(gs).split(";") if g] if isinstance(gs, str) else []}
                          for c, t, q, ov, gs in zip(e.get("collection", []), e.get("gene_set", []), e.get("fdr", []),
                                                     e.get("overlap", []), e.get("overlap_genes", []))]
            p = pairs.rows(f)
            coact = [{"feature_id": self.feature_id(j), "pmi": _num(m, 4), "q": _num(q, 3)}
                     for j, m, q in zip(p.get("b", [])[: int(o["neighbours"])], p.get("pmi", []), p.get("fdr", []))]
            mod = None if module is None or not np.isfinite(module[f]) or module[f] < 0 else f"m{int(module[f])}"
            cl = []
            for other_id, layer, dm, dc, fm, jac in cross:
                if np.isfinite(dm[f]) and dm[f] >= 0:
                    cl.append({"feature_id": feature_id_of(other_id, layer, int(dm[f])), "cosine": _num(dc[f], 4),
                               "jaccard": _num(jac[f], 4) if fm is not None and fm[f] == dm[f] else None,
                               "by": "decoder"})
                if fm is not None and np.isfinite(fm[f]) and fm[f] >= 0 and fm[f] != dm[f]:
                    cl.append({"feature_id": feature_id_of(other_id, layer, int(fm[f])), "cosine": None,
                               "jaccard": _num(jac[f], 4), "by": "cofiring"})
            record = {
                "schema": SCHEMA, "id": self.feature_id(f), "run_id": self.run_id, "layer": self.layer,
                "hook_point": self.cfg.get("sae_hook_point", "tokens"), "index": f, "model": self.model,
                "dataset": self.dataset, "explanation": None,
                "density": {"cells": _num(len(vals) / max(self.n_cells, 1)),
                            "tokens": None if token_density is None else _num(token_density[f])},
                "max_activation": _num(vals.max()) if len(vals) else 0.0,
                "activation_histogram": {"edges": _nums(edges), "counts": counts.tolist()},
                "top_genes": [{"gene": g, "score": s} for g, s in zip(top[f], top_scores[f])],
                "firing_genes": [{"gene": g, "freq": _num(firing_stats.get((f, g), (None, None))[0], 4),
                                  "mean_activation": _num(firing_stats.get((f, g), (None, None))[1], 4)}
                                 for g in firing[f]],
                "label_auroc": la,
                "enrichment": enrichment,
                "top_cells": top_cells,
                "cell_activations": {"index": pos[keep].tolist(), "value": _nums(vals[keep], 4)},
                "coactivation": coact,
                "decoder_neighbours": [] if dec is None else [
                    {"feature_id": self.feature_id(j), "cosine": _num(c, 4)} for j, c in zip(dec[0][f], dec[1][f])],
                "module": mod,
                "cross_layer": cl,
                "causal": causal(f) if causal else None,
            }
            record["explanation"] = explanation(record, float(o["label_min_auroc"]))
            yield record

    def _token_columns(self):
        """``genes(f, cells) -> {cell: [{gene, activation}]}``: the genes where feature f fires in each of
        ``cells`` (token_features.h5ad), highest first; None without a token file."""
        if self.tokens is None:
            return None
        T = sp.csc_matrix(self.tokens.X, dtype=np.float32)
        cell_of = self.tokens.obs["cell_index"].to_numpy(np.int64)
        gene_of = self.tokens.obs["gene_name"].astype(str).to_numpy()
        k = int(self.opts["cell_genes"])

        wanted = np.zeros(max(self.n_cells, int(cell_of.max()) + 1 if len(cell_of) else 0), bool)

        def genes(f: int, cells: np.ndarray) -> dict[int, list[dict]]:
            a, b = T.indptr[f], T.indptr[f + 1]
            rows, vals = T.indices[a:b], T.data[a:b]
            wanted[cells] = True
            sel = wanted[cell_of[rows]] & (vals > 0)
            wanted[cells] = False
            rows, vals = rows[sel], vals[sel]
            out: dict[int, list[dict]] = {}
            order = np.argsort(-vals, kind="stable")
            for c, g, v in zip(cell_of[rows[order]].tolist(), gene_of[rows[order]], _nums(vals[order], 4)):
                lst = out.setdefault(c, [])
                if len(lst) < k:
                    lst.append({"gene": g, "activation": v})
            return out

        return genes

    def causal_table(self, name: str) -> tuple[pd.DataFrame, str] | None:
        """(table, the column naming this run's feature) of causal command ``name`` (``sae4scfm.causal.RESULT_TABLES``:
        steering / patching / edges, under ``<run>/causal/``), None when it has not run."""
        from sae4scfm.causal import RESULT_TABLES

        path, column = RESULT_TABLES[name]
        t = _read_csv(self.run_dir / "causal" / path)
        return (t, column) if t is not None and column in t else None

    def _causal_tables(self):
        """``causal(f) -> {steering, patching, edges, incoming_edges}``: the rows of each causal table about f
        (edges: with ``target_id``, the target's feature id when its run is in the site, else null) and the
        circuit edges into f from the site's runs (``incoming_edges``, with ``source_id``); None when no causal
        command has run on this run and no edge comes in."""
        from sae4scfm.causal import RESULT_TABLES

        tables = {}
        for name in RESULT_TABLES:
            found = self.causal_table(name)
            if found is not None:
                t, column = found
                tables[name] = {int(k): json.loads(g.to_json(orient="records")) for k, g in t.groupby(column)}
        if not tables and not self.incoming:
            return None
        for row in (r for rows in tables.get("edges", {}).values() for r in rows):
            run_id = self.edge_runs.get(int(row["target_layer"]))
            row["target_id"] = None if run_id is None else feature_id_of(run_id, row["target_layer"], row["target"])

        def causal(f: int) -> dict:
            out = {name: rows.get(f, []) for name, rows in tables.items()}
            if self.incoming:
                out["incoming_edges"] = self.incoming.get(f, [])
            return out

        return causal


def link_causal_edges(runs: list[AtlasRun]) -> None:
    """Resolve the circuit edges (``causal/tracing/edges.csv``: source feature, target_layer, target) among the
    site's runs: an edge's target run is the first run of the site at ``target_layer`` deeper than the source
    of the same model (``cfg.json`` model); sets each run's ``edge_runs`` and the targets' ``incoming``
    (rows with ``source_id`` and the edge's statistics)."""
    for run in runs:
        run.edge_runs, run.incoming = {}, {}
        for other in runs:
            if other is not run and other.layer > run.layer and other.cfg.get("model") == run.cfg.get("model"):
                run.edge_runs.setdefault(other.layer, other.run_id)
    by_id = {r.run_id: r for r in runs}
    for run in runs:
        found = run.causal_table("edges")
        if found is None:
            continue
        t, column = found
        for row in json.loads(t.to_json(orient="records")):
            target = by_id.get(run.edge_runs.get(int(row["target_layer"]), ""))
            if target is not None:
                target.incoming.setdefault(int(row["target"]), []).append(
                    {"source_id": run.feature_id(row[column]),
                     **{k: v for k, v in row.items() if k not in (column, "target_layer", "target")}})


def explanation(record: dict, min_auroc: float) -> str | None:
    """Auto text: the best label (by AUROC, when at least ``min_auroc``) and the most significant enriched
    term; else the first top genes; None without any."""
    parts = []
    if record["label_auroc"] and record["label_auroc"][0]["auroc"] >= min_auroc:
        b = record["label_auroc"][0]
        parts.append(f"{b['label']} (AUROC {b['auroc']:.2f})")
    if record["enrichment"]:
        e = record["enrichment"][0]
        parts.append(f"{e['collection']}: {e['term']} (FDR {e['fdr']:.1g})")
    if not parts and record["top_genes"]:
        parts.append("genes: " + ", ".join(g["gene"] for g in record["top_genes"][:3]))
    return " · ".join(parts) or None


def search_terms(record: dict, min_auroc: float) -> dict[str, set[str]]:
    """What the site's search indexes list this feature under, by kind (lower-cased keys):
    gene: its top genes and firing genes; term: each enriched term (FDR below the analysis's max_fdr)
    and each word of it; label: each label of its ``label_auroc`` (its ``atlas.auroc_labels`` best) with
    AUROC >= ``min_auroc``, and each word of it (``monocyte`` finds ``CD14+ Monocyte``)."""
    genes = {g["gene"].lower() for g in record["top_genes"]} | {g["gene"].lower() for g in record["firing_genes"]}
    terms = set()
    for e in record["enrichment"]:
        t = e["term"].lower()
        terms.add(t)
        terms.update(w for w in _words(t))
    labels = set()
    for a in record["label_auroc"]:
        if a["auroc"] is not None and a["auroc"] >= min_auroc:
            labels.add(a["label"].lower())
            labels.update(_words(a["label"]))
    return {"gene": genes, "term": terms, "label": labels}


def _words(text: str) -> list[str]:
    """The words of a term as the page's search splits a query: runs of letters and digits."""
    import re

    return re.findall(r"[0-9a-z]+", text.lower())


def feature_records(run_dir: Path, options: Mapping | None = None) -> Iterator[dict]:
    """Stream the feature records of ``run_dir`` (schema :data:`SCHEMA`, index order)."""
    yield from AtlasRun(run_dir, options).records()


EXACT_KNN_MAX = 20000  # embed_2d: exact kNN (sklearn, brute force) up to this many rows, UMAP's own search above


def embed_2d(X, svd_components: int, n_neighbors: int, seed: int) -> np.ndarray:
    """[n, 2] layout of the rows of ``X``: TruncatedSVD to ``svd_components`` (0 = none), then UMAP (euclidean;
    kNN graph exact up to :data:`EXACT_KNN_MAX` rows); fewer than 5 rows are placed by their first two SVD axes."""
    from sklearn.decomposition import TruncatedSVD

    n = X.shape[0]
    if svd_components and min(X.shape) > 2:
        X = TruncatedSVD(n_components=max(2, min(svd_components, min(X.shape) - 1)),
                         random_state=seed).fit_transform(X)
    X = np.asarray(X.todense() if sp.issparse(X) else X, dtype=np.float32)
    if n < 5:
        out = np.zeros((n, 2), np.float32)
        out[:, : min(2, X.shape[1])] = X[:, :2]
        return out
    import warnings

    import umap
    from sklearn.neighbors import NearestNeighbors

    k = max(2, min(n_neighbors, n - 1))
    knn = (None, None, None)
    if n <= EXACT_KNN_MAX:
        # exact kNN by sklearn (each row's first neighbour is itself, as UMAP's own search returns): UMAP
        # then skips its numba-compiled neighbour search, about half its time in a fresh process
        dist, idx = NearestNeighbors(n_neighbors=k).fit(X).kneighbors(X)
        knn = (idx, dist.astype(np.float32), None)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*knn_search_index.*")  # no .transform needed
        return umap.UMAP(n_neighbors=k, random_state=seed, n_components=2, n_jobs=1, precomputed_knn=knn,
                         init="random" if n < 50 else "spectral").fit_transform(X).astype(np.float32)
