"""The checkpoint-package tests share tests/training's helpers (test_checkpointing_support): put it on sys.path."""

import sys
from pathlib import Path

TRAINING_TESTS = str(Path(__file__).resolve().parent.parent)
if TRAINING_TESTS not in sys.path:
    sys.path.insert(0, TRAINING_TESTS)
