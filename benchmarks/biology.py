"""The biology bars on real labelled and perturbed data: features selected on train cells, reported on eval cells.

Trains the default SAE (or one chosen by overrides) on ``data=kang`` with the demo scGPT, encodes every cell,
runs label scoring, gene scoring, enrichment, the matched baselines (PCA directions, raw neurons) and the
random-init control (``analysis.control=random_init``), then prints one table of the claims and whether each
holds:

  cell types      Seurat types (``analysis.cell_type_groups=labels``) with a feature of eval AUROC >= 0.9
                  whose top genes are enriched (FDR < 0.05) for the type's marker set (data.marker_sets)
  condition       best STIM-vs-CTRL feature (chosen on train cells): eval AUROC, and its enriched terms
  baselines       fraction of candidates with an enriched term: SAE (random subsets of the baselines'
                  size) vs PCA directions vs raw neurons, same pooling, selection and gene scoring
  control         trained vs random-init twin: mean held-out cell-type AUROC, enriched fraction
  kNN             the demo's zero-shot cell-embedding kNN accuracy vs expression PCA (pretrain report)
  ceiling         (not a bar) per cell type the single gene of the universe with the best train AUROC
                  (log1p CP10k), its eval AUROC and whether it is in the type's marker set, and the eval
                  AUROC of the marker-set score (mean expression of its genes): how far the expression a
                  marker-aligned feature would follow separates the type

    python benchmarks/biology.py [--runs-dir DIR] [--out results.json] [Hydra overrides for training,
        e.g. data=pbmc3k sae.target_layer=4 sae.hook_point=cell_mean]
    python benchmarks/biology.py --run DIR/biology/<timestamp>   # the claims of a run made by this script
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

import sae4scfm
from sae4scfm.analysis.enrichment import load_gene_sets
from sae4scfm.analysis.labels import auroc_sparse, select_on_train, train_mask
from sae4scfm.analysis.report import cell_type_summary
from sae4scfm.analysis.results import read_results
from sae4scfm.analysis.run_data import RunData, load_run_data, marker_set_for

ANALYSES = ["run_label_scoring", "run_gene_scoring", "run_enrichment", "run_pca_comparison"]
GENE_SETS = "[markers,go_bp,kegg]"


def run_pipeline(runs_dir: Path, overrides: list[str]) -> tuple[Path, list[str]]:
    """Train, encode and analyse one run; returns its dir and the analyze overrides."""
    cfg = sae4scfm.compose("train", ["data=kang", "experiment=biology", f"runs_dir={runs_dir}", *overrides])
    run_dir = Path(sae4scfm.train(cfg))
    sae4scfm.generate_features(sae4scfm.compose("features", run_address(run_dir)))
    analyze = analyze_overrides(run_dir)
    sae4scfm.analyze_features(sae4scfm.compose("analyze", analyze))
    return run_dir, analyze


def run_address(run_dir: Path) -> list[str]:
    """The overrides that address ``run_dir`` (``<runs_dir>/<experiment>/<timestamp>``)."""
    return [f"runs_dir={run_dir.parent.parent}", f"sae_checkpoint.experiment={run_dir.parent.name}",
            f"sae_checkpoint.timestamp={run_dir.name}"]


def analyze_overrides(run_dir: Path) -> list[str]:
    """The analyze config of ``run_dir``: every analysis of the bars, with the random-init control."""
    return [*run_address(run_dir), *(f"analysis.{a}=true" for a in ANALYSES), f"analysis.gene_sets={GENE_SETS}",
            "analysis.control=random_init"]


def claims(run_dir: Path, analyze: list[str]) -> dict:
    """The bars of the issue, read back from the run's analysis outputs."""
    cfg = sae4scfm.compose("analyze", [*analyze, "analysis.cell_type_groups=labels"])
    run = load_run_data(cfg)
    table = read_results(run.out_dir)
    types = cell_type_summary(run, table, cfg.analysis)
    out: dict = {"cell_types": types[["cell_type", "feature", "train_auroc", "eval_auroc", "marker_set", "marker_fdr",
                                      "interpreted"]].to_dict("records"),
                 "n_types": int(len(types)), "n_types_interpreted": int(types["interpreted"].sum())}
    cond = pd.read_csv(run.out_dir / "condition_features.csv") if (run.out_dir / "condition_features.csv").is_file() \
        else pd.DataFrame()
    if len(cond):
        term_cols = [c for c in cond.columns if c.startswith("top_set:")]
        best = cond[cond["rank"] == 0].sort_values("eval_auroc", ascending=False).iloc[0]
        enriched = cond.assign(has_term=cond[term_cols].notna().any(axis=1) if term_cols else False)
        with_term = enriched[enriched["has_term"]].sort_values("eval_auroc", ascending=False)
        out["condition"] = {"best": best.to_dict(),
                            "best_with_term": with_term.iloc[0].to_dict() if len(with_term) else None}
    base = pd.read_csv(run.out_dir / "baselines.csv")
    frac_cols = [c for c in base.columns if c.startswith("enriched_fraction:")]
    by_method = base.groupby("method")[["n_candidates", "mean_eval_auroc", *frac_cols]].mean()
    out["baselines"] = by_method.reset_index().to_dict("records")
    control = pd.read_csv(run.out_dir / "control_comparison.csv", keep_default_na=False)
    out["control"] = control.to_dict("records")
    report = json.loads((sae4scfm.scfm.demo.SHIPPED / "pretrain_report.json").read_text())
    out["knn"] = report.get("knn", {})
    out["expression_ceiling"] = expression_ceiling(run)
    return out


def expression_ceiling(run: RunData) -> list[dict]:
    """Per Seurat type, from log1p CP10k expression of the universe genes: the gene of best train AUROC (one
    type vs the rest) with its eval AUROC and whether it is in the type's marker set (``data.marker_sets``),
    and the eval AUROC of the marker-set score (mean expression of the set's universe genes)."""
    expression, genes = run.expression()
    obs = run.features.obs
    labels = obs[run.cell_type_key].astype("string").reset_index(drop=True)
    is_train = train_mask(obs)
    best = select_on_train(expression, labels, is_train)
    markers = load_gene_sets("markers")
    column = {g: j for j, g in enumerate(genes)}
    rows = []
    for r in best.itertuples():
        gene, marker_set = genes[r.feature_id], marker_set_for(run, r.label)
        set_genes = markers.get(marker_set, [])
        members = [column[g] for g in set_genes if g in column]
        score_auroc = float("nan")
        if members:
            score = np.asarray(expression[~is_train][:, members].mean(axis=1))  # [eval cells, 1]
            score_auroc = float(auroc_sparse(score, (labels[~is_train] == r.label).to_numpy())[0])
        rows.append({"cell_type": r.label, "gene": gene, "train_auroc": r.train_auroc, "eval_auroc": r.eval_auroc,
                     "marker_set": marker_set, "in_marker_set": gene in set_genes, "marker_genes_seen": len(members),
                     "marker_score_eval_auroc": score_auroc})
    return rows


def verdicts(c: dict) -> list[tuple[str, str, bool | None]]:  # None: shown, not a bar
    rows = [(f"cell types interpreted (eval AUROC >= 0.9, marker FDR < 0.05) of {c['n_types']}",
             f"{c['n_types_interpreted']}", c["n_types_interpreted"] >= 9)]
    cond = c.get("condition")
    if cond:
        b = cond["best_with_term"]
        rows.append(("STIM/CTRL feature with an enriched term: eval AUROC",
                     f"{b['eval_auroc']:.3f} (feature {int(b['feature_id'])}, {b['condition']})" if b else "none",
                     bool(b) and b["eval_auroc"] >= 0.95))
    base = {r["method"]: r for r in c["baselines"]}
    for col in (k for k in base.get("sae_subset", {}) if k.startswith("enriched_fraction:")):
        sae, pca, neu = base["sae_subset"][col], base["pca"][col], base["neurons"][col]
        rows.append((f"{col} SAE(subset) / PCA / neurons", f"{sae:.3f} / {pca:.3f} / {neu:.3f}",
                     sae > pca and sae > neu))
    ctl = pd.DataFrame(c["control"])
    for metric, label in (("heldout_auroc", "mean"), ("enriched_fraction", "markers")):
        hit = ctl[(ctl["metric"] == metric) & (ctl["label"] == label)]
        if len(hit):
            r = hit.iloc[0]
            rows.append((f"{metric} {label}: trained / random-init", f"{float(r['trained']):.3f} / "
                         f"{float(r['control']):.3f}", float(r["trained"]) > float(r["control"])))
    for name, r in c["knn"].items():
        rows.append((f"kNN cell-type accuracy {name}: cell embedding / expression PCA",
                     f"{r['cell_embedding']:.3f} / {r['expression_pca']:.3f}",
                     r["cell_embedding"] >= r["expression_pca"]))
    ceiling = c.get("expression_ceiling", [])
    if ceiling:
        reach = [r for r in ceiling if r["eval_auroc"] >= 0.9]
        rows.append((f"single-gene ceiling: types with a gene of eval AUROC >= 0.9 (of {len(ceiling)})",
                     f"{len(reach)}, of them with a marker-set gene {sum(r['in_marker_set'] for r in reach)}", None))
        score = [r for r in ceiling if r["marker_score_eval_auroc"] >= 0.9]
        rows.append((f"marker-set score ceiling: types whose marker-set score has eval AUROC >= 0.9 (of {len(ceiling)})",
                     f"{len(score)}", None))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs-dir", type=Path, default=None, help="where the runs go (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=None, help="write the claims as JSON here")
    parser.add_argument("--run", type=Path, default=None,
                        help="read the claims of this run, already trained and analysed by this script "
                             "(<runs_dir>/biology/<timestamp>), instead of training one")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for training")
    args = parser.parse_args()
    if args.run:
        run_dir, analyze = args.run.resolve(), analyze_overrides(args.run.resolve())
    else:
        run_dir, analyze = run_pipeline(args.runs_dir or Path(tempfile.mkdtemp(prefix="sae4scfm-biology-")),
                                        args.overrides)
    c = claims(run_dir, analyze)
    print(f"\nrun {run_dir} (selection on train cells, every number on eval cells)")
    print(pd.DataFrame(c["cell_types"]).to_string(index=False))
    print("\nexpression ceiling (best gene chosen on train cells; marker-set score; eval AUROC):")
    print(pd.DataFrame(c["expression_ceiling"]).to_string(index=False))
    print()
    for name, value, ok in verdicts(c):
        print(f"{'INFO' if ok is None else 'PASS' if ok else 'FAIL'}  {name}: {value}")
    if args.out:
        args.out.write_text(json.dumps(c, indent=1, default=lambda o: o.item() if isinstance(o, np.generic) else str(o)))


if __name__ == "__main__":
    main()
