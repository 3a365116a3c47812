"""What every causal command does first: open a trained run with its model, SAE and tokens, choose the
target features (given, or the best feature per label chosen on train cells) and the held-out cells."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from omegaconf import DictConfig

from sae4scfm.analysis.run_data import RunData
from sae4scfm.errors import InputError
from sae4scfm.saes.base import SAE
from sae4scfm.scfm.adapter import ScFMAdapter
from sae4scfm.scfm.tokens import TokenizedCells


@dataclass
class CausalRun:
    """A run opened for interventions: its features (``run``), SAE at residual layer ``layer``, the model
    and the tokens of every cell of its dataset (``adata`` order)."""

    run: RunData
    sae: SAE
    layer: int
    adapter: ScFMAdapter
    adata: object
    tokens: TokenizedCells

    def labels(self, key: str | None, field: str):
        """obs[key] of the run's cells as strings (key None: the dataset's cell_type_key; None if it has none)."""
        key = key or self.run.cell_type_key
        if key is None:
            return None, None
        if key not in self.run.features.obs:
            raise InputError(f"{field}={key!r} is not an obs column of {self.run.run_dir}/features/features.h5ad; "
                             f"use one of {', '.join(map(str, self.run.features.obs.columns))}.")
        return key, self.run.features.obs[key].astype(str)

    def targets(self, section: DictConfig, prefix: str) -> dict[int, str | None]:
        """{feature: the label it was chosen for (None when given)}: ``section.features`` when set, else the
        best feature (on train cells) per value of ``section.label_key`` (only ``section.labels`` if set)."""
        if section.get("features") is not None:
            targets = [int(j) for j in section.features]
            bad = [j for j in targets if not 0 <= j < self.sae.d_sae]
            if bad:
                raise InputError(f"{prefix}.features: feature ids {bad} are out of range; this SAE has features "
                                 f"0..{self.sae.d_sae - 1}.")
            return {j: None for j in targets}
        from sae4scfm.analysis.labels import select_on_train, train_mask

        key, labels = self.labels(section.get("label_key"), f"{prefix}.label_key")
        if labels is None:
            raise InputError(f"{prefix}.features is null and the run's dataset has no cell_type_key; give "
                             f"{prefix}.features=[...] or {prefix}.label_key=<obs column>.")
        wanted = list(section.labels) if section.get("labels") else None
        missing = sorted(set(wanted or ()) - set(labels))
        if missing:
            raise InputError(f"{prefix}.labels: {missing} not in obs[{key!r}]; values: {', '.join(sorted(set(labels)))}.")
        chosen = select_on_train(self.run.features.X, labels, train_mask(self.run.features.obs), min_cells=5)
        chosen = chosen[chosen["rank"] == 0]
        if wanted:
            chosen = chosen[chosen["label"].isin(wanted)]
        return dict(zip(chosen["feature_id"].astype(int), chosen["label"]))

    def eval_tokens(self, n_cells: int, rng: np.random.Generator) -> TokenizedCells:
        """``n_cells`` held-out (eval) cells drawn with ``rng``, in dataset order."""
        from sae4scfm.scfm.loading import split_tokens

        tokens = split_tokens(self.tokens, self.adata, "eval")
        cells = np.sort(rng.choice(len(tokens), min(int(n_cells), len(tokens)), replace=False))
        return tokens.subset(cells)


def open_causal_run(cfg: DictConfig, what: str) -> CausalRun:
    """The run addressed by ``cfg.sae_checkpoint`` with its model on ``cfg.device``; ``what`` names the
    command for the error when the SAE is cell-level (interventions edit gene tokens)."""
    from sae4scfm.analysis.run_data import open_run
    from sae4scfm.runs import resolve_run_dir
    from sae4scfm.saes.base import load_sae
    from sae4scfm.scfm.loading import load_model_and_data, pick_device

    run_dir = resolve_run_dir(cfg.runs_dir, cfg.sae_checkpoint.experiment, cfg.sae_checkpoint.timestamp)
    run = open_run(run_dir)
    if run.sae_cfg.get("hook_point", "").endswith((".cell_mean", ".cls")):
        raise InputError(f"{run_dir}: {what} edits gene tokens, but this SAE is a cell-level SAE "
                         f"({run.sae_cfg['hook_point']}); use a run trained with sae.hook_point=tokens.")
    device = pick_device(cfg.device)
    sae, sae_cfg = load_sae(run_dir, device)
    adapter, adata, tokens = load_model_and_data(run.run_cfg, device)
    return CausalRun(run, sae, int(sae_cfg["layer"]), adapter, adata, tokens)
