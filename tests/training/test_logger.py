"""Megatron's console line and validation box, interval accounting, and the TensorBoard tags read back."""

import math

import pytest
from helpers import ONE_LAYER_RUN, tiny_flags
from megatron_log import MEGATRON_LINE, REFERENCE_EXAMPLE, VALIDATION_LINE, parse_timer_blocks
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from megatron_lite.arguments import parse_config
from megatron_lite.core.models.gpt import GPTModel
from megatron_lite.parallel_state import ParallelState
from megatron_lite.training.logger import TrainingLogger, format_log_line, format_validation_box
from megatron_lite.training.training import pretrain

TINY = tiny_flags(**ONE_LAYER_RUN, global_batch_size=4, hidden_dropout=0, attention_dropout=0)


def test_reference_example_matches_the_pattern():
    match = MEGATRON_LINE.match(REFERENCE_EXAMPLE)
    assert match is not None
    assert (
        match["lr"] == "3.333333E-05" and match["megatron_tflops"] == "4.5" and match["grad_norm"] == "6.321"
    )


def test_line_format_is_megatrons_with_our_throughput_fields():
    line = format_log_line(
        iteration=20,
        train_iters=100,
        consumed_samples=640,
        elapsed_ms=123.456,
        learning_rate=3.0e-4,
        global_batch_size=32,
        losses={"lm loss": 7.123456789},
        loss_scale=1.0,
        grad_norm=1.23456,
        skipped_iterations=2,
        nan_iterations=1,
        tokens_per_second=16587.04,
        tokens_per_second_per_rank=8293.52,
        tflops=0.2549,
        mfu=0.1234,
        timestamp="2025-05-09 06:11:17",
    )
    assert line == (
        " [2025-05-09 06:11:17] iteration       20/     100 | consumed samples:          640 |"
        " elapsed time per iteration (ms): 123.5 | tokens per second: 16587.0 | tokens per second per rank:"
        " 8293.5 | TFLOP/s: 0.255 | MFU: 12.3% | learning rate: 3.000000E-04 | global batch size:    32 |"
        " lm loss: 7.123457E+00 | loss scale: 1.0 | grad norm: 1.235 | number of skipped iterations:   2 |"
        " number of nan iterations:   1 |"
    )
    fields = MEGATRON_LINE.match(line).groupdict()
    assert (fields["iteration"], fields["tokens_per_rank"], fields["mfu"]) == ("20", "8293.5", "12.3")


def test_megatron_throughput_field_and_zero_loss_is_hidden():
    line = format_log_line(
        iteration=1,
        train_iters=10,
        consumed_samples=32,
        elapsed_ms=21847.94,
        learning_rate=3.333333e-05,
        global_batch_size=32,
        losses={"lm loss": 0.0},
        loss_scale=1.0,
        grad_norm=None,
        skipped_iterations=1,
        nan_iterations=1,
        megatron_tflops_per_gpu=4.49,
        timestamp="2025-05-09 06:11:17",
    )
    assert "lm loss" not in line and "grad norm" not in line
    assert (
        " elapsed time per iteration (ms): 21847.9 | throughput per GPU (TFLOP/s/GPU): 4.5 | learning rate:"
        in line
    )
    assert MEGATRON_LINE.match(line)


def test_validation_box():
    box = format_validation_box("iteration 100", {"lm loss": 2.5})
    middle = " validation loss at iteration 100 | lm loss value: 2.500000E+00 | lm loss PPL: 1.218249E+01 | "
    assert box.splitlines() == ["-" * (len(middle) + 1), middle, "-" * (len(middle) + 1)]
    assert VALIDATION_LINE.match(middle)["where"] == "iteration 100"
    # Megatron caps the perplexity at exp(20).
    assert f"PPL: {math.exp(20):.6E}" in format_validation_box("x", {"lm loss": 25.0})


def test_interval_means_over_advanced_iterations_and_counts_skips():
    cfg = parse_config(TINY + "--train-iters 8 --log-interval 4".split()).finalize(1)
    printed = []
    logger = TrainingLogger(cfg, ParallelState(), print_fn=printed.append)
    assert printed == [
        "> MFU is measured against a peak of 0.500 TFLOP/s per rank (given by --peak-tflops: 0.5 TFLOP/s)"
    ]
    logger.start()
    steps = [(2.0, False), (float("nan"), True), (4.0, False), (9.0, True)]  # one nan, one overflow skip
    lines = [
        logger.training_step(
            iteration=i + 1,
            consumed_samples=4 * (i + 1),
            learning_rate=1e-3,
            loss=loss,
            grad_norm=0.5,
            loss_scale=1.0,
            skipped=skipped,
        )
        for i, (loss, skipped) in enumerate(steps)
    ]
    assert lines[:3] == [None, None, None]
    fields = MEGATRON_LINE.match(lines[3]).groupdict()
    assert (fields["loss"], fields["skipped"], fields["nan"]) == ("3.000000E+00", "2", "1")
    assert fields["tokens_per_second"] is not None and fields["tokens_per_rank"] is None
    assert printed[-1] == lines[3]
    # The next interval starts from zero.
    logger.training_step(
        iteration=5,
        consumed_samples=20,
        learning_rate=1e-3,
        loss=1.0,
        grad_norm=0.5,
        loss_scale=1.0,
        skipped=False,
    )
    assert logger._skipped == 0 and logger._loss_sum == 1.0


def _scalars(accumulator, tag):
    return [(e.step, e.value) for e in accumulator.Scalars(tag)]


def _events(path):
    events = EventAccumulator(str(path), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return events


def test_tensorboard_tags_and_values(tmp_path):
    flags = "--train-iters 6 --log-interval 3 --eval-interval 3 --eval-iters 1 --tensorboard-dir"
    cfg = parse_config(TINY + flags.split() + [str(tmp_path)])
    result = pretrain(cfg)
    events = _events(tmp_path)
    tags = set(events.Tags()["scalars"])
    # Megatron's default set; everything else needs its flag. The test set's loss is `lm loss validation`
    # too (Megatron writes both evaluations under that tag), so there is no `lm loss test`.
    default = ("learning-rate", "batch-size", "lm loss", "grad-norm", "loss-scale", "lm loss validation")
    assert tags == {t for tag in default for t in (tag, f"{tag} vs samples")}

    losses = _scalars(events, "lm loss")
    assert [s for s, _ in losses] == [1, 2, 3, 4, 5, 6]
    assert [v for _, v in losses] == pytest.approx([v for _, v in result.losses], rel=1e-6)
    assert [s for s, _ in _scalars(events, "lm loss vs samples")] == [4, 8, 12, 16, 20, 24]
    # linear decay from 1e-3 to 0 over 6 iterations; the logged value is the one after the step
    assert [v for _, v in _scalars(events, "learning-rate")] == pytest.approx(
        [1e-3 * (1 - k / 6) for k in range(1, 7)], abs=1e-10
    )
    assert [v for _, v in _scalars(events, "batch-size")] == [4.0] * 6
    assert [v for _, v in _scalars(events, "loss-scale")] == [1.0] * 6
    validation = _scalars(events, "lm loss validation")
    # iterations 3 and 6, then the final validation and the test evaluation
    assert [s for s, _ in validation] == [3, 6, 6, 6]
    assert [v for _, v in validation] == pytest.approx(
        [*(v for _, v in result.validation_losses), result.test_loss], rel=1e-6
    )
    assert [s for s, _ in _scalars(events, "lm loss validation vs samples")] == [12, 24, 24, 24]

    def text(name):
        return events.Tensors(f"{name}/text_summary")[0].tensor_proto.string_val[0].decode()

    assert (text("hidden_size"), text("lr"), text("mock_data"), text("tensorboard_dir")) == (
        "16",
        "0.001",
        "True",
        str(tmp_path),
    )


def test_each_tensorboard_flag_switches_its_tags(tmp_path, capsys):
    flags = (
        "--train-iters 6 --log-interval 3 --eval-interval 3 --eval-iters 1 --tensorboard-log-interval 2 "
        "--log-validation-ppl-to-tensorboard --log-memory-to-tensorboard --log-world-size-to-tensorboard "
        "--no-log-loss-scale-to-tensorboard --log-timers-to-tensorboard --log-throughput --timing-log-level 2 "
        "--log-num-zeros-in-grad --tensorboard-dir"
    )
    capsys.readouterr()
    result = pretrain(parse_config(TINY + flags.split() + [str(tmp_path)]))
    out = capsys.readouterr().out
    events = _events(tmp_path)
    tags = set(events.Tags()["scalars"])
    assert "loss-scale" not in tags and "loss-scale vs samples" not in tags
    assert [s for s, _ in _scalars(events, "learning-rate")] == [2, 4, 6]  # --tensorboard-log-interval 2
    assert _scalars(events, "world-size") == [(2, 1.0), (4, 1.0), (6, 1.0)]
    assert [s for s, _ in _scalars(events, "world-size vs samples")] == [8, 16, 24]

    # mem-* every TensorBoard interval; on CPU: virtual size >= peak resident >= resident, and no count.
    memory = {tag: [v for _, v in _scalars(events, tag)] for tag in tags if tag.startswith("mem-")}
    assert set(memory) == {"mem-reserved-bytes", "mem-allocated-bytes", "mem-max-allocated-bytes"}
    for reserved, allocated, peak in zip(
        *(memory[f"mem-{k}-bytes"] for k in ("reserved", "allocated", "max-allocated"))
    ):
        assert reserved >= peak >= allocated > 50e6  # torch alone is more than 50 MB resident

    ppl = [v for _, v in _scalars(events, "lm loss validation ppl")]
    losses = [*(v for _, v in result.validation_losses), result.test_loss]
    assert ppl == pytest.approx([math.exp(v) for v in losses], rel=1e-5)
    assert [s for s, _ in _scalars(events, "lm loss validation ppl vs samples")] == [12, 24, 24, 24]

    # Interval values at the log lines, equal to what the lines and timer reports print.
    lines = [MEGATRON_LINE.match(line).groupdict() for line in result.log_lines if MEGATRON_LINE.match(line)]
    assert [s for s, _ in _scalars(events, "iteration-time")] == [3, 6]
    for (_, seconds), fields in zip(_scalars(events, "iteration-time"), lines):
        assert seconds * 1000 == pytest.approx(float(fields["ms"]), abs=0.051)
    for (_, tflops), fields in zip(_scalars(events, "throughput"), lines):
        assert tflops == pytest.approx(float(fields["tflops"]), abs=5.1e-4)  # Megatron's TFLOP/s/GPU
        assert fields["megatron_tflops"] is not None
    zeros = [v for s, v in _scalars(events, "num-zeros") if s in (2, 4, 6)]
    assert zeros == [v for v in zeros if v == int(v) and v > 0]
    assert [s for s, _ in _scalars(events, "num-zeros")] == [2, 4, 6]
    assert lines[1]["num_zeros"] == f"{_scalars(events, 'num-zeros')[-1][1]}"  # iteration 6 in both

    blocks = [b for b in parse_timer_blocks(out) if "forward-backward" in b]
    assert len(blocks) == 2
    for step, block in zip((3, 6), blocks):
        for name, (_, high) in block.items():
            value = dict(_scalars(events, f"{name}-time"))[step]
            assert value * 1000 == pytest.approx(high, abs=0.0051), name
    assert {
        "forward-backward-time",
        "optimizer-time",
        "batch-generator-time",
        "backward-compute-time",
    } <= tags


def test_num_zeros_counts_the_gradient_zeros(tmp_path):
    built = []

    def provider(cfg, pstate):
        built.append(GPTModel(cfg, pstate))
        return built[0]

    flags = "--train-iters 1 --log-interval 1 --eval-iters 0 --log-num-zeros-in-grad --untie-embeddings-and-output-weights"
    result = pretrain(parse_config(TINY + flags.split()), model_provider=provider)
    # The last step's gradients are still there: count their zeros independently.
    zeros = sum(int((p.grad == 0).sum()) for p in built[0].parameters() if p.grad is not None)
    # Untied, the rows of the 64 - (tokens seen) unused input embeddings are zero, whole rows of h=16.
    assert zeros > 0 and zeros % 16 == 0
    assert MEGATRON_LINE.match(result.log_lines[0])["num_zeros"] == f"{float(zeros)}"
    assert f"| num zeros: {float(zeros)} | number of skipped" in result.log_lines[0]
