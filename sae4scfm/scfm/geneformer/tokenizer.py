"""Geneformer's rank value encoding, and a safe reader for its dictionaries.

The official tokenizer (``geneformer/tokenizer.py``, ``TranscriptomeTokenizer``)
turns a cell's raw counts into a list of gene tokens:

1. genes are identified by Ensembl IDs (symbols are mapped with the gene-name
   dictionary; with a gene-mapping dictionary, IDs are upper-cased and mapped,
   and columns that map to the same ID are summed);
2. only genes in the token dictionary are kept;
3. each count is normalised as ``count / n_counts * 10,000 / median``, where
   ``n_counts`` is the cell's total count and ``median`` the gene's non-zero
   median over the pretraining corpus;
4. the expressed genes are sorted by that value, descending (``np.argsort`` of
   the negated values in column order, as the official code, so ties break the same way);
5. the list is truncated to ``model_input_size`` tokens; V2 models get
   ``<cls>`` in front and ``<eos>`` at the end (within the same budget).

The dictionaries are published as pickles. They are read with a restricted
unpickler that only builds dicts, strings, numbers and numpy numeric scalars, so a
tampered file cannot run code. JSON files with the same content are read too.
"""

from __future__ import annotations

import json
import logging
import pickle
from collections import Counter
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp

from sae4scfm.data import check_expression, require_obs_column
from sae4scfm.errors import InputError
from sae4scfm.scfm.tokens import TokenizedCells

log = logging.getLogger(__name__)

TARGET_SUM = 10_000  # official ``target_sum``: counts per cell after normalisation
SPECIAL_TOKENS = ("<pad>", "<mask>", "<cls>", "<eos>")


# ----------------------------------------------------------------- safe dictionary reading


def _numeric_dtype(spec, align=False, copy=False) -> np.dtype:
    """``numpy.dtype`` as called by a pickle, for numeric dtypes only."""
    dtype = np.dtype(spec, bool(align), bool(copy))
    if dtype.kind not in "biuf":
        raise pickle.UnpicklingError(f"numpy dtype {dtype} is not allowed (numeric dtypes only)")
    return dtype


def _numeric_scalar(dtype, data=None):
    """``numpy.core.multiarray.scalar`` as called by a pickle: a numeric scalar from its bytes."""
    if not (isinstance(dtype, np.dtype) and dtype.kind in "biuf" and isinstance(data, bytes)
            and len(data) == dtype.itemsize):
        raise pickle.UnpicklingError("only numeric numpy scalars stored as raw bytes are allowed")
    return np.frombuffer(data, dtype=dtype)[0]


class DictionaryUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy numeric scalars; every other global is refused."""

    ALLOWED = {
        ("numpy", "dtype"): _numeric_dtype,
        ("numpy.core.multiarray", "scalar"): _numeric_scalar,
        ("numpy._core.multiarray", "scalar"): _numeric_scalar,
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return self.ALLOWED[(module, name)]
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a dictionary file")


def read_dictionary(path: str | Path, field: str) -> dict:
    """A Geneformer dictionary file (``.pkl`` read safely, or ``.json``) as a dict with str keys.

    ``field`` names the config key in error messages (e.g. ``scfm.token_dictionary``).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"{field}: file {path} does not exist; point it at the Geneformer dictionary "
                         "(.pkl as published, or .json).")
    try:
        if path.suffix == ".json":
            content = json.loads(path.read_text())
        else:
            with open(path, "rb") as f:
                content = DictionaryUnpickler(f).load()
    except (pickle.UnpicklingError, json.JSONDecodeError, EOFError, ValueError, TypeError,
            AttributeError, IndexError, KeyError) as e:
        raise InputError(f"{field}: {path} is not a readable dictionary file ({type(e).__name__}: {e}). "
                         "Only plain dicts of strings and numbers are accepted; use the official "
                         "Geneformer .pkl or a .json with the same content.") from e
    if not isinstance(content, dict) or not all(isinstance(k, str) for k in content):
        raise InputError(f"{field}: {path} does not hold a dict with string keys "
                         f"(found {type(content).__name__}).")
    return content


# ----------------------------------------------------------------- the tokenizer


class GeneformerTokenizer:
    """Official Geneformer rank value encoding of an AnnData of raw counts.

    token_ids: Ensembl ID (and special token) -> token id; medians: Ensembl ID ->
    non-zero median; gene_names: symbol -> Ensembl ID (optional); gene_mapping:
    upper-case Ensembl ID/alias -> Ensembl ID used to collapse IDs (optional);
    special_tokens: add ``<cls>``/``<eos>`` (V2); model_input_size: tokens per cell.
    """

    def __init__(self, token_ids: dict[str, int], medians: dict[str, float], *, special_tokens: bool,
                 model_input_size: int, gene_names: dict[str, str] | None = None,
                 gene_mapping: dict[str, str] | None = None):
        for tok in ("<pad>", "<mask>", *(("<cls>", "<eos>") if special_tokens else ())):
            if tok not in token_ids:
                raise InputError(f"scfm.token_dictionary: special token {tok!r} is missing; "
                                 f"{'V2' if special_tokens else 'V1'} dictionaries have "
                                 f"{'<pad>, <mask>, <cls>, <eos>' if special_tokens else '<pad>, <mask>'}.")
        if not special_tokens and "<cls>" in token_ids:
            log.warning("the token dictionary has <cls>/<eos> but scfm.version=V1 adds no special tokens; "
                        "V2 models need version=V2.")
        genes = [g for g in token_ids if g not in SPECIAL_TOKENS]
        no_median = [g for g in genes if g not in medians]
        if no_median:
            raise InputError(f"scfm.gene_median_dictionary has no median for {len(no_median)} genes of the token "
                             f"dictionary (e.g. {', '.join(no_median[:3])}); use the median file that belongs "
                             "to the token dictionary.")
        min_size = 3 if special_tokens else 1
        if model_input_size < min_size:
            raise InputError(f"scfm.model_input_size={model_input_size} leaves no room for genes.")
        self.token_ids = token_ids
        self.gene_set = set(genes)
        self.medians = {g: float(medians[g]) for g in genes}
        self.gene_names = gene_names
        # as the official code: keep only mappings onto genes of the token dictionary
        self.gene_mapping = None if gene_mapping is None else {
            k: v for k, v in gene_mapping.items() if v in self.gene_set}
        self.special_tokens = special_tokens
        self.model_input_size = int(model_input_size)

    @property
    def pad_id(self) -> int:
        return int(self.token_ids["<pad>"])

    def ensembl_ids(self, identifiers: np.ndarray) -> np.ndarray:
        """The vocabulary Ensembl ID of each identifier (symbol or Ensembl ID), '' where it has none."""
        out = []
        for ident in identifiers:
            gene = self.gene_names.get(ident, ident) if self.gene_names else ident
            if self.gene_mapping is not None:
                gene = self.gene_mapping.get(gene.upper(), "")
            out.append(gene if gene in self.gene_set else "")
        return np.array(out, dtype=object)

    def gene_columns(self, identifiers: np.ndarray) -> tuple[sp.csr_matrix, np.ndarray]:
        """(S [n_identifiers, n_genes] 0/1 summing matrix, Ensembl IDs [n_genes]).

        ``X @ S`` keeps the vocabulary genes and sums columns that map to one ID. Column
        order as the official collapse: genes with one column in data order, then the
        summed ones in order of first appearance.
        """
        ensembl = self.ensembl_ids(identifiers)
        counts = Counter(e for e in ensembl if e)
        single = [e for e in ensembl if e and counts[e] == 1]
        summed = [e for e in counts if counts[e] > 1]
        genes = np.array(single + summed, dtype=object)
        position = {e: j for j, e in enumerate(genes)}
        rows = np.flatnonzero(ensembl != "")
        cols = np.array([position[e] for e in ensembl[rows]], dtype=np.int64)
        S = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(ensembl), len(genes)))
        return S, genes

    def __call__(self, adata: ad.AnnData, *, gene_key: str | None = None, n_counts_key: str | None = None,
                 source: str = "data") -> TokenizedCells:
        """Tokens of every cell of ``adata`` [cells, genes] (raw counts in X).

        ``gene_key``: var column of gene identifiers (None = var_names); ``n_counts_key``:
        obs column of per-cell total counts (None = the sum of X over all genes).
        Values are the normalised, median-scaled expression the ranking uses (0 for
        special tokens). Raises InputError if a cell expresses no vocabulary gene
        (the official tokenizer drops such cells; here every AnnData row needs tokens).
        """
        if gene_key is not None and gene_key not in adata.var.columns:
            raise InputError(f"data.gene_key={gene_key!r}: {source} has no var column {gene_key!r}; available: "
                             f"{', '.join(map(str, adata.var.columns)) or 'none'} (use null for var_names).")
        identifiers = np.asarray(adata.var[gene_key] if gene_key else adata.var_names).astype(str)
        X = sp.csr_matrix(adata.X, dtype=np.float64)
        check_expression(X, "counts", source)
        S, genes = self.gene_columns(identifiers)
        if len(genes) == 0:
            hint = ("" if self.gene_names else " If they are gene symbols, set scfm.gene_name_dictionary "
                    "(symbol -> Ensembl ID).")
            raise InputError(f"{source}: none of its {len(identifiers)} genes (e.g. {', '.join(identifiers[:3])}) "
                             f"maps to the Geneformer vocabulary (Ensembl IDs, e.g. {next(iter(self.gene_set))})."
                             f"{hint} Or set data.gene_key to a var column of Ensembl IDs.")
        log.info("%s: %d of %d genes map to %d Geneformer genes", source, S.nnz, len(identifiers), len(genes))
        if n_counts_key is None:
            n_counts = np.asarray(X.sum(axis=1)).ravel()
        else:
            n_counts = require_obs_column(adata, n_counts_key, "scfm.n_counts_key", source).to_numpy(np.float64)
        counts = sp.csr_matrix(X @ S)
        counts.eliminate_zeros()
        counts.sort_indices()
        empty = np.flatnonzero(np.diff(counts.indptr) == 0)
        if len(empty):
            raise InputError(f"{source}: {len(empty)} cells express no gene of the Geneformer vocabulary "
                             f"(e.g. {', '.join(map(str, adata.obs_names[empty[:3]]))}); remove them (QC) first.")
        if not (n_counts > 0).all():
            raise InputError(f"{source}: per-cell total counts must be positive"
                             f"{'' if n_counts_key is None else f' (obs column {n_counts_key!r})'}.")
        medians = np.array([self.medians[g] for g in genes])
        tokens = np.array([self.token_ids[g] for g in genes], dtype=np.int64)
        n_genes = self.model_input_size - (2 if self.special_tokens else 0)
        cls_id, eos_id = self.token_ids.get("<cls>"), self.token_ids.get("<eos>")
        ids, vals, special = [], [], []
        for i in range(counts.shape[0]):
            sl = slice(counts.indptr[i], counts.indptr[i + 1])
            cols = counts.indices[sl]
            normalised = counts.data[sl] / n_counts[i] * TARGET_SUM / medians[cols]
            order = np.argsort(-normalised)[:n_genes]  # default kind: ties break as in the official code
            cell_ids, cell_vals = tokens[cols[order]], normalised[order]
            is_special = np.zeros(len(order), dtype=bool)
            if self.special_tokens:
                cell_ids = np.concatenate([[cls_id], cell_ids, [eos_id]])
                cell_vals = np.concatenate([[0.0], cell_vals, [0.0]])
                is_special = np.concatenate([[True], is_special, [True]])
            ids.append(cell_ids)
            vals.append(cell_vals.astype(np.float32))
            special.append(is_special)
        lengths = [len(c) for c in ids]
        return TokenizedCells(
            np.concatenate(ids).astype(np.int64), np.concatenate(vals), np.concatenate(special),
            np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            np.arange(adata.n_obs, dtype=np.int64), self.pad_id, 0.0,
        )
