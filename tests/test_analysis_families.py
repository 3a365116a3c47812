"""The whole analysis suite end to end on every model family (tiny random-weight checkpoints in
the official layouts, from the families' own test helpers), and Geneformer's gene-level analyses
on symbol data (defect 3: its tokens are Ensembl IDs, the dataset's var holds symbols).

Per family: two SAEs on the same tokens (k=8 and k=4) -> features -> every ``analysis.run_<name>``
(cross-layer between the two) -> results (wide and long), features.h5ad var/uns, figures, summary.
"""

from __future__ import annotations

import re

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy.stats import fisher_exact, pearsonr
from statsmodels.stats.multitest import multipletests

import sae4scfm
from sae4scfm.analysis.analyze import ANALYSES, load_run_data
from sae4scfm.analysis.enrichment import load_gene_sets
from sae4scfm.analysis.gene_scoring import DEFAULT_FAMILIES
from sae4scfm.analysis.results import read_tidy_results
from sae4scfm.data import load_pbmc
from tests.test_geneformer import hf_bert, pbmc_genes, write_checkpoint, write_dictionaries  # noqa: F401 (fixture)

COMMON = ["data=pbmc", "sae=topk", "sae.target_layer=1", "sae.dictionary_multiplier=2", "train.n_epochs=1",
          "train.batch_size=256", "wandb.mode=disabled", "device=cpu"]


def _scgpt(tmp_path, _genes):
    from tests.test_scgpt import tiny_checkpoint

    ckpt = tiny_checkpoint(tmp_path / "ckpt", list(load_pbmc().var_names), max_seq_len=128)
    return ["scfm=scgpt", f"scfm.checkpoint_dir={ckpt}", "data.n_cells=60"]


def _geneformer(tmp_path, genes):
    dicts = write_dictionaries(tmp_path / "dicts", "V2", genes)
    ckpt = write_checkpoint(hf_bert("V2", 4 + len(genes[0]), layers=2, d=32, heads=4), tmp_path / "ckpt", "safetensors")
    return ["scfm=geneformer_v2_104m", f"scfm.checkpoint_dir={ckpt}", *[f"scfm.{k}={v}" for k, v in dicts.items()],
            "scfm.n_layers=null", "scfm.d_model=null", "scfm.n_heads=null", "scfm.d_mlp=null", "data.n_cells=60"]


def _scfoundation(tmp_path, _genes):
    from tests.test_scfoundation import write_models_ckpt

    write_models_ckpt(tmp_path / "ckpt")
    return ["scfm=scfoundation", f"scfm.checkpoint_dir={tmp_path / 'ckpt'}", "scfm.architecture=null", "data.n_cells=60"]


def _aido_cell(tmp_path, _genes):
    from tests.test_aido_cell import official_model
    from tests.test_aido_cell import write_checkpoint as write_aido

    sizes = dict(hidden_size=8, num_hidden_layers=2, num_attention_heads=1, intermediate_size=16)
    ckpt = write_aido(tmp_path / "ckpt", official_model(seed=2, **sizes))
    return ["scfm=aido_cell_3m", f"scfm.checkpoint_dir={ckpt}", "scfm.n_layers=2", "scfm.d_model=8", "scfm.n_heads=1",
            "scfm.d_mlp=16", "data.n_cells=12", "data.preprocess.split=0.25", "train.eval_max_cells=1"]


FAMILIES = {"scgpt": _scgpt, "geneformer": _geneformer, "scfoundation": _scfoundation, "aido_cell": _aido_cell}


def _address(runs, run_dir):
    return [f"runs_dir={runs}", f"sae_checkpoint.experiment={run_dir.parent.name}",
            f"sae_checkpoint.timestamp={run_dir.name}"]


def run_suite(tmp_path, family: str, genes) -> tuple:
    """(analyze config, run dir, results table) of the whole suite on a tiny ``family`` model."""
    runs, stores = tmp_path / "runs", tmp_path / "stores"
    model = FAMILIES[family](tmp_path, genes)
    run_dirs = []
    for k in (8, 4):  # the second SAE is the cross-layer partner (same layer and tokens, other SAE)
        cfg = sae4scfm.compose("train", [*COMMON, *model, f"sae.hyperparams.k={k}", f"runs_dir={runs}",
                                         f"buffer.store_dir={stores}", f"experiment={family}{k}"])
        run_dirs.append(sae4scfm.train(cfg))
        sae4scfm.generate_features(sae4scfm.compose("features", _address(runs, run_dirs[-1])))
    run_dir, other = run_dirs
    cfg = sae4scfm.compose("analyze", [
        *_address(runs, run_dir), *[f"analysis.run_{name}=true" for name in ANALYSES], "analysis.min_cells=2",
        "analysis.gene_sets=[markers,kegg]", "analysis.run_gsea=true", "analysis.gsea_permutations=50",
        "analysis.n_pcs=4", "analysis.coactivation_min_count=2", f"analysis.cross_layer_runs=[{family}4/{other.name}]"])
    return cfg, run_dir, sae4scfm.analyze_features(cfg)


@pytest.fixture(scope="module")
def suites(tmp_path_factory, pbmc_genes):  # noqa: F811
    """family -> (analyze config, run dir, results table), each suite run once per module."""
    done = {}

    def get(family):
        if family not in done:
            done[family] = run_suite(tmp_path_factory.mktemp(family), family, pbmc_genes)
        return done[family]
    return get


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_analysis_runs_on_every_family(suites, family):
    cfg, run_dir, table = suites(family)
    out = run_dir / "analysis"
    n = table.shape[0]
    assert set(table.columns.get_level_values(0)) == set(ANALYSES) and n == (16 if family == "aido_cell" else 64)
    long = read_tidy_results(out)
    assert set(long["analysis"]) == set(ANALYSES) and len(long) == table.shape[0] * table.shape[1]
    for name in ("enrichment.csv", "gsea.csv", "pca_comparison.csv", "coactivation_pairs.csv", "modules.csv",
                 "cross_layer.csv", "gene_scores.parquet", "summary.md"):
        assert (out / name).is_file(), name
    for png in ("label_auroc.png", "density.png", "sae_vs_pca.png"):
        assert (out / "figures" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    # every gene-level analysis works on the dataset's gene names (symbols)
    run = load_run_data(cfg)
    universe = set(run.universe())
    assert universe and universe <= set(load_pbmc().var_names)
    top = table["gene_scoring"]["top_genes"].fillna("")
    assert (top != "").mean() > 0.5 and {g for t in top for g in t.split(";") if g} <= universe
    assert (table["enrichment"]["overlap:markers"] > 0).any()
    fam = table["gene_families"]
    assert fam["best_family"].notna().any()  # PBMC tokens include ribosomal genes
    cross = pd.read_csv(out / "cross_layer.csv")
    assert len(cross) == 1 and 0 <= cross["decoder_persistence"].iloc[0] <= 1
    features = ad.read_h5ad(run_dir / "features" / "features.h5ad")
    for name in ANALYSES:
        assert features.uns[name]["analysis"] == name and any(c.startswith(f"{name}:") for c in features.var)
    summary = (out / "summary.md").read_text()
    for section in ("## SAE vs PCA", "## Density", "## Gene families", "## Co-activation modules",
                    "## Cross-layer persistence", "## Cell types"):
        assert section in summary, section


def test_geneformer_gene_analyses_on_symbol_data(suites, pbmc_genes):  # noqa: F811
    """Defect 3: Geneformer tokens are Ensembl IDs, PBMC var_names are symbols. The token file names
    each token's gene as the dataset does (gene_name), and gene scoring, gene families and marker
    enrichment are computed on symbols (independent recomputation from the run's files)."""
    symbols, ensembl = pbmc_genes
    cfg, run_dir, table = suites("geneformer")
    tokens = ad.read_h5ad(run_dir / "features" / "token_features.h5ad")
    symbol_of = dict(zip(ensembl, symbols))
    assert set(tokens.obs["gene"]) <= set(ensembl)  # the model's vocabulary
    assert (tokens.obs["gene_name"].astype(str) == tokens.obs["gene"].astype(str).map(symbol_of)).all()

    run = load_run_data(cfg)
    expr, genes = run.expression()
    assert set(genes) == set(tokens.obs["gene_name"])
    # gene scoring: max_gene_corr is the best Pearson r with a token gene's log1p CP10k expression
    gs = table["gene_scoring"]
    X = run.features.X.toarray()
    E = expr.toarray()
    scored = np.flatnonzero(gs["max_gene_corr"].notna().to_numpy())
    assert len(scored) > 0
    for f in scored[:3]:
        r = np.array([pearsonr(X[:, f], E[:, j])[0] if np.ptp(E[:, j]) > 0 else np.nan for j in range(E.shape[1])])
        assert gs["max_gene_corr"][f] == pytest.approx(np.nanmax(r), abs=1e-6)
        if np.nanmax(r) > 0:
            assert gs["top_genes"][f].split(";")[0] == genes[int(np.nanargmax(r))]
    # gene families: fraction of a feature's firing tokens on ribosomal symbols
    fam = table["gene_families"]
    ribo = tokens.obs["gene_name"].astype(str).str.contains(DEFAULT_FAMILIES["ribosomal"]).to_numpy()
    fires = tokens.X.tocsc()
    checked = 0
    for f in range(tokens.n_vars):
        on = fires[:, f].toarray().ravel() > 0
        if on.any():
            assert fam["frac:ribosomal"][f] == pytest.approx(ribo[on].mean(), abs=1e-12)
            checked += 1
    assert checked and fam["frac:ribosomal"].max() > 0
    # marker enrichment: the best marker set of each feature, recomputed with scipy + statsmodels
    sets = {k: [g for g in v if g in set(genes)] for k, v in load_gene_sets("markers").items()}
    sets = {k: v for k, v in sets.items() if len(v) >= cfg.analysis.min_set_size}
    assert sets
    top = {f: [g for g in t.split(";") if g] for f, t in gs["top_genes"].fillna("").items()}
    N = len(genes)
    p = {(f, s): fisher_exact([[len(set(t) & set(m)), len(t) - len(set(t) & set(m))],
                               [len(m) - len(set(t) & set(m)), N - len(t) - len(m) + len(set(t) & set(m))]],
                              alternative="greater")[1]
         for f, t in top.items() for s, m in sets.items()}
    fdr = dict(zip(p, multipletests(list(p.values()), method="fdr_bh")[1]))
    enr = table["enrichment"]
    with_overlap = enr.index[enr["overlap:markers"] > 0]
    assert len(with_overlap) > 0
    for f in with_overlap[:10]:
        assert enr["fdr:markers"][f] == pytest.approx(fdr[(f, enr["best_set:markers"][f])], rel=1e-9)
        assert enr["overlap:markers"][f] == len(set(top[f]) & set(sets[enr["best_set:markers"][f]]))
    assert re.fullmatch(r"ENSG\d+", str(tokens.obs["gene"].iloc[0]))
