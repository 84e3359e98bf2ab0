"Run inside a fresh virtual environment holding only the built wheel and its core dependencies."
import importlib.util

for dev_only in ("nbdev", "jupyter", "matplotlib", "datasets"):
    assert importlib.util.find_spec(dev_only) is None, f"{dev_only} should not be installed with the core wheel"

import torch
import vishwamai
from vishwamai import VishwamaiConfig

cfg = VishwamaiConfig.preset("tiny")
print(f"vishwamai {vishwamai.__version__} imported from {vishwamai.__file__} with torch {torch.__version__}")
