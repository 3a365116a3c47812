"""Layer profile: the fraction of SAE features with an enriched gene-set term at every layer, trained
model and random-init control side by side (the U-shaped profile reported for Geneformer and scGPT).

``layer_profile(cfg)`` (``scripts/layer_profile.py``, config ``config/layer_profile.yaml``) trains one SAE
per residual-stream layer with the train config's settings at ``<runs_dir>/<experiment>/layer_<l>``,
encodes its cells and runs ``analyze_features`` with enrichment (``layer_profile.gene_sets``) and,
with ``layer_profile.control=random_init``, the control (``sae4scfm.analysis.control``: the twin at
``<runs_dir>/<experiment>-random_init/layer_<l>``). Finished runs are reused on a rerun. It writes
``<runs_dir>/<experiment>/layer_profile.csv`` (rows layer x claim metric: trained, control,
trained_beats_control), ``layer_profile.md`` and ``layer_profile.png``.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from sae4scfm.analysis.control import claim_metrics, control_comparison, ensure_features, train_at
from sae4scfm.atomic import atomic_write, atomic_write_text
from sae4scfm.cli import compose
from sae4scfm.errors import InputError

PROFILE_COLUMNS = ["layer", "metric", "label", "trained", "control", "trained_beats_control"]


def profile_layers(cfg: DictConfig) -> list[int]:
    """``layer_profile.layers``, or every residual-stream layer 0..n_layers of the model; checked."""
    from sae4scfm.scfm import load_scfm

    adapter = load_scfm(cfg.scfm, "cpu")
    layers = cfg.layer_profile.get("layers")
    layers = list(range(adapter.n_layers + 1)) if layers is None else [int(x) for x in layers]
    if not layers:
        raise InputError("layer_profile.layers=[]: name at least one layer, or null for every layer.")
    for layer in layers:
        adapter.check_layer(layer, "layer_profile.layers")
    return sorted(set(layers))


def layer_profile(cfg: DictConfig) -> pd.DataFrame:
    """Train, encode and analyse one SAE per layer (and its random-init twin); returns the profile
    table (:data:`PROFILE_COLUMNS`, one row per layer x metric), also written as csv, md and png."""
    import sae4scfm

    lp = cfg.layer_profile
    control = str(lp.get("control") or "none")
    if control not in ("none", "random_init"):
        raise InputError(f"layer_profile.control={control!r}: use random_init or none.")
    layers = profile_layers(cfg)
    base = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    del base["layer_profile"]
    base.train.sweep = None
    base.resume = False
    exp_dir = Path(cfg.runs_dir) / str(cfg.experiment)
    analysis_overrides = [f"analysis.gene_sets=[{','.join(map(str, lp.gene_sets))}]", *map(str, lp.analysis)]
    rows = []
    for layer in layers:
        train_cfg = copy.deepcopy(base)
        train_cfg.sae.target_layer = layer
        run_dir = train_at(train_cfg, exp_dir / f"layer_{layer}")
        ensure_features(run_dir, cfg.runs_dir, token_features=False, device=str(cfg.device))
        address = [f"runs_dir={cfg.runs_dir}", f"sae_checkpoint.experiment={cfg.experiment}",
                   f"sae_checkpoint.timestamp={run_dir.name}"]
        acfg = compose("analyze", [*address, "analysis.run_label_scoring=false",
                                            "analysis.run_enrichment=true", f"analysis.control={control}",
                                            *analysis_overrides])
        sae4scfm.analyze_features(acfg)
        if control == "random_init":
            twin = Path(cfg.runs_dir) / f"{cfg.experiment}-random_init" / run_dir.name
            table = control_comparison(run_dir, twin, acfg.analysis)
        else:
            table = claim_metrics(run_dir, acfg.analysis).rename(columns={"value": "trained"})
            table["control"], table["trained_beats_control"] = float("nan"), False
        rows.append(table.assign(layer=layer))
    profile = pd.concat(rows, ignore_index=True)[PROFILE_COLUMNS]
    atomic_write(exp_dir / "layer_profile.csv", lambda tmp: profile.to_csv(tmp, index=False))
    atomic_write_text(exp_dir / "layer_profile.md", profile_markdown(profile))
    plot_profile(profile, exp_dir / "layer_profile.png")
    print(profile_markdown(profile))
    print(f"layer profile: {exp_dir / 'layer_profile.csv'}, .md, .png")
    return profile


def _wide(profile: pd.DataFrame) -> pd.DataFrame:
    """[layers, (metric[:label], trained|control)] of the enriched fractions and the mean held-out AUROC."""
    keep = profile[(profile["metric"] == "enriched_fraction") |
                   ((profile["metric"] == "heldout_auroc") & (profile["label"] == "mean"))]
    keep = keep.assign(name=lambda t: t["metric"].where(t["metric"] != "enriched_fraction",
                                                        "enriched_fraction:" + t["label"].astype(str)))
    keep = keep.assign(name=lambda t: t["name"].where(t["metric"] != "heldout_auroc", "heldout_auroc:mean"))
    return keep.pivot(index="layer", columns="name", values=["trained", "control"]).swaplevel(axis=1).sort_index(axis=1)


def profile_markdown(profile: pd.DataFrame) -> str:
    """Markdown table: one row per layer; per collection the enriched-feature fraction trained / control,
    and the mean held-out best cell-type AUROC trained / control."""
    wide = _wide(profile)
    names = list(dict.fromkeys(wide.columns.get_level_values(0)))
    head = "| layer | " + " | ".join(f"{n} trained | {n} control" for n in names) + " |"
    lines = [head, "|---" * (1 + 2 * len(names)) + "|"]
    for layer, r in wide.iterrows():
        cells = [f"{r[(n, 'trained')]:.3f} | {r[(n, 'control')]:.3f}" for n in names]
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_profile(profile: pd.DataFrame, path: Path) -> Path:
    """Enriched-feature fraction per layer: one solid line per collection (trained), dashed (control)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frac = profile[profile["metric"] == "enriched_fraction"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for i, (coll, t) in enumerate(frac.groupby("label", sort=False)):
        t = t.sort_values("layer")
        color = f"C{i}"
        ax.plot(t["layer"], t["trained"], "o-", color=color, label=f"{coll} (trained)")
        if t["control"].notna().any():
            ax.plot(t["layer"], t["control"], "s--", color=color, alpha=0.7, label=f"{coll} (random-init)")
    ax.set_xlabel("layer (residual stream)")
    ax.set_ylabel("features with an enriched term")
    ax.set_xticks(sorted(profile["layer"].unique()))
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return path
