"""Tokenise JSONL documents into Megatron .bin/.idx datasets (see megatron_lite/core/datasets/preprocessing/)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_lite.core.datasets.preprocessing import preprocess_main  # noqa: E402
from megatron_lite.errors import run_cli  # noqa: E402

if __name__ == "__main__":
    run_cli(lambda: preprocess_main(sys.argv[1:]))
