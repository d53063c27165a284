"""Print parameters, memory per rank and FLOPs of a GPT model from pretrain_gpt.py's flags."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_lite.errors import run_cli  # noqa: E402
from megatron_lite.model_stats import model_stats_main  # noqa: E402

if __name__ == "__main__":
    run_cli(lambda: model_stats_main(sys.argv[1:]))
