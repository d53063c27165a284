"""--profile: torch.profiler records exactly Megatron's window and writes one Chrome trace per profiled rank."""

import gzip
import json

import pytest

from megatron_lite.arguments import parse_config
from megatron_lite.errors import UserError
from megatron_lite.training.training import pretrain
from tests.helpers import tiny_flags


def _config(tmp_path, *extra):
    argv = tiny_flags(train_iters=6, vocab_size=64, num_workers=0, eval_iters=0, peak_tflops=0.5)
    return parse_config(argv + ["--tensorboard-dir", str(tmp_path / "tb"), *extra])


def _profiled_steps(trace_path) -> list[int]:
    with gzip.open(trace_path, "rt") as f:
        events = json.load(f)["traceEvents"]
    return sorted(
        {int(e["name"].split("#")[1]) for e in events if e.get("name", "").startswith("ProfilerStep#")}
    )


def test_pytorch_profiler_records_megatrons_window(tmp_path):
    cfg = _config(
        tmp_path,
        "--profile",
        "--use-pytorch-profiler",
        "--profile-step-start",
        "2",
        "--profile-step-end",
        "4",
        "--pytorch-profiler-collect-shapes",
    )
    result = pretrain(cfg)
    assert result.iteration == 6
    trace = tmp_path / "torch_profile" / "rank-0.json.gz"
    # schedule(wait=start-1, warmup=1, active=end-start): iterations 2 and 3 (steps counted from 0) are active.
    assert _profiled_steps(trace) == [2, 3]


def test_profile_ranks_exclude_this_rank(tmp_path):
    pretrain(_config(tmp_path, "--profile", "--use-pytorch-profiler", "--profile-ranks", "1"))
    assert not (tmp_path / "torch_profile").exists()


def test_profile_without_pytorch_profiler_says_it_does_nothing_on_cpu(tmp_path, capsys):
    pretrain(_config(tmp_path, "--profile"))
    assert (
        "> --profile without --use-pytorch-profiler marks an nsys range on CUDA; no effect on this CPU"
        in (capsys.readouterr().out)
    )


def test_bad_profiling_window_is_one_line(tmp_path):
    cfg = _config(tmp_path, "--profile", "--profile-step-start", "5", "--profile-step-end", "5")
    with pytest.raises(
        UserError, match=r"^--profile-step-start 5 and --profile-step-end 5: the end must come"
    ):
        cfg.finalize(1, 64)
