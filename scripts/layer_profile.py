"""The layer profile (`sae4scfm.analysis.layer_profile`, config/layer_profile.yaml):

    python scripts/layer_profile.py [train overrides] [layer_profile.layers=[0,2,4]] [layer_profile.control=none]
"""

from sae4scfm.cli import layer_profile_main

if __name__ == "__main__":
    layer_profile_main()
