"""The feature atlas (`sae4scfm.cli.atlas_main` -> `sae4scfm.atlas.build`, config/atlas.yaml):

    python scripts/build_atlas.py sae_checkpoint.experiment=E sae_checkpoint.timestamp=T [atlas.out=DIR]
    python scripts/build_atlas.py 'atlas.runs=[E1/T1,E2/latest]' [--serve | atlas.serve=true]
"""

from sae4scfm.cli import atlas_main

if __name__ == "__main__":
    atlas_main()
