"""Shared pytest setup: the repo root and tests/ on sys.path, quiet thread counts."""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

# Tests compare numbers, and two cores are shared by several ranks: keep torch from oversubscribing.
os.environ.setdefault("OMP_NUM_THREADS", "1")
