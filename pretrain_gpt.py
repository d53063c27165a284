"""Pretrain a GPT model with Megatron-LM's flags: `python pretrain_gpt.py ...` or `torchrun ... pretrain_gpt.py ...`."""

from __future__ import annotations

import sys

from megatron_lite.arguments import parse_config
from megatron_lite.errors import run_cli
from megatron_lite.parallel_state import destroy_parallel, initialize_parallel
from megatron_lite.training.training import pretrain


def main() -> int:
    cfg = parse_config(sys.argv[1:])
    pstate = initialize_parallel(
        cfg.tensor_model_parallel_size,
        device=cfg.device,
        backend=cfg.distributed_backend,
        timeout_minutes=cfg.distributed_timeout_minutes,
        pipeline_model_parallel_size=cfg.pipeline_model_parallel_size,
        context_parallel_size=cfg.context_parallel_size,
    )
    try:
        pretrain(cfg, pstate)
    finally:
        destroy_parallel()
    return 0


if __name__ == "__main__":
    run_cli(main)
