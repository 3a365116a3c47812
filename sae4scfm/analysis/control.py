"""The random-init control: every claim of a run beside the same analysis on its untrained twin.

``analysis.control=random_init`` makes ``analyze_features`` also analyse the run's twin, the
same training config (data, layer, SAE, seed) with ``scfm.random_init=true``: same
architecture, untrained weights drawn from the family's init under the run's seed. The twin lives at
``<runs_dir>/<experiment>-random_init/<stamp of the run>``; it is trained and its features
generated when missing and found again (not retrained) on a rerun. Its analysis uses the same
``analysis.*`` options (cross-layer matching, which refers to other trained runs, is left out).

``<run>/analysis/control_comparison.csv`` then holds one row per claim metric
(:data:`COMPARISON_COLUMNS`): held-out best cell-type AUROC per type and their mean, the number of
types whose held-out best AUROC is >= ``analysis.auroc_threshold``, and, with enrichment, the
fraction of features with an enriched term (best FDR < ``analysis.max_fdr``) per collection; the
trained value, the control value and whether the trained model beats its control (strictly).
``control_markdown`` renders it for ``summary.md``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from sae4scfm.analysis.labels import select_on_train, train_mask
from sae4scfm.analysis.results import read_results
from sae4scfm.atomic import atomic_write
from sae4scfm.errors import InputError
from sae4scfm.runs import load_run_config

CONTROLS = ("none", "random_init")
CONTROL_SUFFIX = "-random_init"  # the twin's experiment: <experiment>-random_init
COMPARISON_FILE = "control_comparison.csv"
COMPARISON_COLUMNS = ["metric", "label", "trained", "control", "trained_beats_control"]


def control_name(cfg: DictConfig) -> str:
    """``cfg.analysis.control`` (``none`` when unset or null), checked."""
    name = str(cfg.analysis.get("control") or "none")
    if name not in CONTROLS:
        raise InputError(f"analysis.control={name!r}: use random_init (analyse the scfm.random_init=true twin "
                         "beside the run) or none.")
    return name


def control_train_config(run_cfg: DictConfig) -> DictConfig:
    """The twin's training config: the run's resolved config with ``scfm.random_init=true`` and
    experiment ``<experiment>-random_init``; no sweep, no resume."""
    if run_cfg.scfm.get("random_init"):
        raise InputError(f"analysis.control=random_init: the run (experiment {run_cfg.experiment!r}) already uses "
                         "scfm.random_init=true; analyse its trained counterpart with the control instead.")
    cfg = OmegaConf.create(OmegaConf.to_container(run_cfg, resolve=True))
    cfg.scfm.random_init = True
    cfg.experiment = f"{run_cfg.experiment}{CONTROL_SUFFIX}"
    cfg.train.sweep = None
    cfg.resume = False
    return cfg


def _comparable(cfg: DictConfig) -> dict:
    """The parts of a training config that must match between a twin and its expected config."""
    out = OmegaConf.to_container(cfg, resolve=True)
    for key in ("runs_dir", "device", "wandb", "resume", "sae_checkpoint"):
        out.pop(key, None)
    return out


def train_at(cfg: DictConfig, target: Path) -> Path:
    """The finished run of training config ``cfg`` at ``target`` (``<runs_dir>/<experiment>/<name>``):
    reused when its config.yaml is ``cfg`` (up to paths, device and logging), else trained with
    ``sae4scfm.train`` and moved there; a finished run there with another config is an InputError."""
    import sae4scfm

    target = Path(target)
    if (target / "cfg.json").is_file():
        if _comparable(load_run_config(target)) != _comparable(cfg):
            raise InputError(f"{target} holds a run of another config than the one wanted here ({cfg.experiment}, "
                             f"layer {cfg.sae.target_layer}, scfm.random_init={cfg.scfm.get('random_init')}); "
                             "delete it to retrain.")
        print(f"reusing {target}")
        return target
    print(f"training {target}")
    built = Path(sae4scfm.train(cfg))
    if built != target:
        shutil.rmtree(target, ignore_errors=True)  # an unfinished run from a killed build
        built.rename(target)
    return target


def ensure_features(run_dir: Path, runs_dir: str | Path, token_features: bool, device: str = "auto") -> Path:
    """``run_dir``'s features dir, generated (``sae4scfm.generate_features``) when missing."""
    import sae4scfm

    out = Path(run_dir) / "features"
    if not (out / "features.h5ad").is_file() or (token_features and not (out / "token_features.h5ad").is_file()):
        sae4scfm.generate_features(sae4scfm.compose("features", [
            f"runs_dir={runs_dir}", f"sae_checkpoint.experiment={Path(run_dir).parent.name}",
            f"sae_checkpoint.timestamp={Path(run_dir).name}", f"features.token_features={str(token_features).lower()}",
            f"device={device}"]))
    return out


def ensure_control_run(run_dir: Path, runs_dir: str | Path) -> Path:
    """The finished twin of ``run_dir`` at ``<runs_dir>/<experiment>-random_init/<stamp>``, trained
    if missing and its features generated (with token features when the run has them) if missing.
    A twin there with another config is an InputError."""
    run_dir = Path(run_dir)
    expected = control_train_config(load_run_config(run_dir))
    expected.runs_dir = str(runs_dir)
    print("random-init control: ", end="")
    twin = train_at(expected, Path(runs_dir) / expected.experiment / run_dir.name)
    ensure_features(twin, runs_dir, (run_dir / "features" / "token_features.h5ad").is_file(), expected.device)
    return twin


def analyze_control(cfg: DictConfig, run_dir: Path) -> pd.DataFrame:
    """Analyse the twin of ``run_dir`` with ``cfg.analysis`` (control off, cross-layer off) and write
    ``<run>/analysis/control_comparison.csv``; returns that table (:data:`COMPARISON_COLUMNS`)."""
    from sae4scfm.analysis.analyze import analyze_features

    twin = ensure_control_run(run_dir, cfg.runs_dir)
    twin_cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    twin_cfg.sae_checkpoint.experiment = twin.parent.name
    twin_cfg.sae_checkpoint.timestamp = twin.name
    twin_cfg.analysis.control = "none"
    twin_cfg.analysis.run_cross_layer = False
    print(f"analysis of the random-init control {twin}")
    analyze_features(twin_cfg)
    table = control_comparison(run_dir, twin, cfg.analysis)
    atomic_write(run_dir / "analysis" / COMPARISON_FILE, lambda tmp: table.to_csv(tmp, index=False))
    print(control_markdown(table))
    return table


def claim_metrics(run_dir: Path, a: DictConfig) -> pd.DataFrame:
    """The claim metrics of one analysed run: rows (metric, label, value).

    ``heldout_auroc`` per cell type (``data.cell_type_key``) and ``mean``, ``n_types_heldout_auroc>=<t>``,
    and ``heldout_auroc_condition`` per condition value (``data.condition_key``): the feature of best AUROC
    on train cells (``select_on_train``), its AUROC on eval cells, in the cell representation
    ``analysis.pooling``; with enrichment, ``enriched_fraction`` per collection (features whose best FDR <
    ``max_fdr``, of all features)."""
    from sae4scfm.analysis.report import pooled_rows
    from sae4scfm.analysis.run_data import open_run

    run = open_run(Path(run_dir), a.get("pooling"))
    cells = OmegaConf.merge(a, {"pooling": None if a.get("pooling") == "token" else a.get("pooling")})
    X, obs = pooled_rows(run, cells)
    rows = []
    for key, metric in ((run.cell_type_key, "heldout_auroc"), (run.run_cfg.data.get("condition_key"),
                                                               "heldout_auroc_condition")):
        if not key or key not in obs:
            continue
        chosen = select_on_train(X, obs[key], train_mask(obs), min_cells=int(a.min_cells))
        auc = chosen.set_index("label")["eval_auroc"]
        rows += [(metric, str(v), float(x)) for v, x in auc.items()]
        if metric == "heldout_auroc":
            rows.append((metric, "mean", float(auc.mean())))
            t = float(a.auroc_threshold)
            rows.append((f"n_types_heldout_auroc>={t:g}", "", float((auc >= t).sum())))
    results_file = run.out_dir / "results.parquet"
    if results_file.is_file():
        results = read_results(run.out_dir)
        if "enrichment" in set(results.columns.get_level_values(0)):
            for metric in results["enrichment"].columns:
                if metric.startswith("fdr:"):
                    fdr = results["enrichment"][metric].astype(float).to_numpy()
                    rows.append(("enriched_fraction", metric.split(":", 1)[1], float((fdr < float(a.max_fdr)).mean())))
    return pd.DataFrame(rows, columns=["metric", "label", "value"])


def control_comparison(run_dir: Path, twin_dir: Path, a: DictConfig) -> pd.DataFrame:
    """Trained vs control claim metrics (:data:`COMPARISON_COLUMNS`); ``trained_beats_control`` is
    trained > control (a missing control value counts as not beaten)."""
    trained = claim_metrics(Path(run_dir), a)
    control = claim_metrics(Path(twin_dir), a)
    table = trained.merge(control, on=["metric", "label"], how="left", suffixes=("_t", "_c"))
    table = table.rename(columns={"value_t": "trained", "value_c": "control"})
    table["trained_beats_control"] = (table["trained"] > table["control"]).to_numpy()
    return table[COMPARISON_COLUMNS]


def control_markdown(table: pd.DataFrame) -> str:
    """Markdown of a comparison table (for ``summary.md``), then the claims the control matches or beats."""
    if table.empty:
        return ("No claim metric to compare with the random-init control: the dataset names no "
                "data.cell_type_key and analysis.run_enrichment is off.\n")
    lines = ["| metric | label | trained | random-init control | trained beats control |",
             "|---|---|---|---|---|"]
    for r in table.itertuples(index=False):
        fmt = "{:.0f}" if r.metric.startswith("n_types") else "{:.3f}"
        lines.append(f"| {r.metric} | {r.label} | {fmt.format(r.trained)} | {fmt.format(r.control)} | "
                     f"{'yes' if r.trained_beats_control else '**no**'} |")
    lost = [f"{r.metric}" + (f" ({r.label})" if r.label else "")
            for r in table.itertuples(index=False) if not r.trained_beats_control]
    lines.append("")
    lines.append("The trained model does not beat its random-init control on: " + ", ".join(lost) + "."
                 if lost else "The trained model beats its random-init control on every metric above.")
    return "\n".join(lines) + "\n"


def read_control_comparison(run_dir: Path) -> pd.DataFrame | None:
    """``<run>/analysis/control_comparison.csv`` if written (for the summary), else None."""
    path = Path(run_dir) / "analysis" / COMPARISON_FILE
    return pd.read_csv(path, keep_default_na=False, dtype={"label": str}) if path.is_file() else None
