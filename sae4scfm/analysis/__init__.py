"""What SAE features mean: statistics that take and return tables (``labels``, ``gene_scoring``,
``enrichment``, ``coactivation``), the results table (``results``), the analyze stage
(``analyze``, with its inputs in ``run_data`` and its report in ``report``) and the integration
benchmark (``integration``)."""

from sae4scfm.analysis.labels import (
           INDEX_NAME,
           LABEL_METRICS,
           auroc_sparse,
           label_ami,
           label_auroc,
           label_f1,
           label_scoring,
)
from sae4scfm.analysis.results import read_results, update_results

__all__ = ["INDEX_NAME", "LABEL_METRICS", "auroc_sparse", "label_ami", "label_auroc", "label_f1", "label_scoring",
           "read_results", "update_results"]
