"""Logging on 2 real gloo ranks: num zeros counted over TP shards as one model, world-size, rank-wide timers."""

from dist_utils import run_distributed
from helpers import ONE_LAYER_RUN, tiny_flags
from megatron_log import MEGATRON_LINE, parse_timer_blocks

from megatron_lite.arguments import parse_config
from megatron_lite.parallel_state import initialize_parallel
from megatron_lite.training.training import pretrain

# Untied embeddings make unused vocabulary rows exact zeros; divisible-by 32 pads 64 to 64 for TP 1 and 2.
FLAGS = tiny_flags(
    **ONE_LAYER_RUN,
    global_batch_size=4,
    hidden_dropout=0,
    attention_dropout=0,
    train_iters=2,
    log_interval=1,
    eval_iters=0,
    log_num_zeros_in_grad=True,
    untie_embeddings_and_output_weights=True,
    make_vocab_size_divisible_by=32,
)


def _zeros(lines: list[str]) -> list[str]:
    return [MEGATRON_LINE.match(line)["num_zeros"] for line in lines]


def _worker(rank: int, world_size: int, tensorboard_dir: str) -> dict:
    import io
    from contextlib import redirect_stdout

    results = {}
    for name, extra, tp in (
        ("tp2", ["--tensor-model-parallel-size", "2"], 2),
        (
            "dp2",
            [
                "--timing-log-level",
                "1",
                "--log-world-size-to-tensorboard",
                "--tensorboard-dir",
                tensorboard_dir,
            ],
            1,
        ),
    ):
        out = io.StringIO()
        with redirect_stdout(out):
            result = pretrain(parse_config(FLAGS + extra), initialize_parallel(tp))
        results[name] = {"lines": result.log_lines, "out": out.getvalue()}
    return results


def test_num_zeros_world_size_and_timers_over_two_ranks(tmp_path):
    single = _zeros(pretrain(parse_config(FLAGS)).log_lines)
    assert len(single) == 2 and all(float(z) > 0 for z in single)
    rank0, rank1 = run_distributed(_worker, 2, str(tmp_path))
    assert rank0["tp2"]["lines"] == [] and rank0["dp2"]["lines"] == []  # the last rank logs
    # The whole model's zeros: TP shards summed, replicated parameters once, DP ranks not added up.
    assert _zeros(rank1["tp2"]["lines"]) == single
    assert _zeros(rank1["dp2"]["lines"]) == single

    blocks = [b for b in parse_timer_blocks(rank1["dp2"]["out"]) if "forward-backward" in b]
    assert len(blocks) == 2 and all("all-grads-sync" in b for b in blocks)  # DP's gradient all-reduce
    assert all(low <= high for block in blocks for low, high in block.values())
    assert parse_timer_blocks(rank0["dp2"]["out"]) == []

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("world-size")] == [(1, 2.0), (2, 2.0)]
