"""``python -m sae4scfm.saes [DIR]``: (re)write config/sae/<architecture>.yaml from the config classes."""

import sys
from pathlib import Path

from sae4scfm.saes.config import YAML_DIR, write_yaml_files

for path in write_yaml_files(Path(sys.argv[1]) if len(sys.argv) > 1 else YAML_DIR):
    print(path)
