"""Test setup: the scripts live at the repo root as single files, and the tests run on CPU by default."""

import os
import sys
from pathlib import Path

# Must happen before anything imports jax; an explicit JAX_PLATFORMS (e.g. "cuda") still wins.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
