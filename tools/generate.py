"""Generate text from a checkpoint: python tools/generate.py --load DIR --prompt "Once upon a time"."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_lite.errors import run_cli  # noqa: E402
from megatron_lite.inference.cli import generate_main  # noqa: E402

if __name__ == "__main__":
    run_cli(lambda: generate_main(sys.argv[1:]))
