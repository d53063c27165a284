"""Convert checkpoints to and from HuggingFace: python tools/convert_checkpoint.py export|import --help."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_lite.convert.cli import convert_main  # noqa: E402
from megatron_lite.errors import run_cli  # noqa: E402

if __name__ == "__main__":
    run_cli(lambda: convert_main(sys.argv[1:]))
