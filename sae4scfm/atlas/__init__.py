"""The feature atlas: a static, offline site of one or several runs (``scripts/build_atlas.py``).

``records.feature_records`` streams each feature's record (schema ``sae4scfm.atlas.feature/1``),
``build.build_site`` writes the site (``assets/`` holds its page, script and style).
"""
