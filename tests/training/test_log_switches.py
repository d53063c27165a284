"""What each of Megatron's logging switches changes, read back from the TensorBoard events and the log lines:
params norm, the ramped-up batch size, --skip-train, --log-throughput, the queue size and the removed flags."""

import math

import pytest
import torch
from helpers import ONE_LAYER_RUN, tiny_flags
from megatron_log import MEGATRON_LINE
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from megatron_lite.arguments import parse_config
from megatron_lite.core.models.gpt import GPTModel
from megatron_lite.errors import UserError
from megatron_lite.parallel_state import ParallelState
from megatron_lite.training.logger import TrainingLogger
from megatron_lite.training.training import pretrain

TINY = tiny_flags(**ONE_LAYER_RUN, global_batch_size=4, hidden_dropout=0, attention_dropout=0)


def _scalars(path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(path), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def _lines(result) -> list[dict]:
    return [m.groupdict() for m in map(MEGATRON_LINE.match, result.log_lines) if m]


def test_params_norm_at_every_tensorboard_point_and_in_the_line(tmp_path):
    built = []

    def provider(cfg, pstate):
        built.append(GPTModel(cfg, pstate))
        return built[0]

    flags = "--train-iters 4 --log-interval 2 --eval-iters 0 --log-params-norm --log-num-zeros-in-grad"
    result = pretrain(
        parse_config(TINY + flags.split() + ["--tensorboard-dir", str(tmp_path)]), model_provider=provider
    )
    scalars = _scalars(tmp_path)
    # Megatron computes it every iteration, so TensorBoard has it every --tensorboard-log-interval (1).
    norms = scalars["params-norm"]
    assert [s for s, _ in norms] == [1, 2, 3, 4]
    assert len({v for _, v in norms}) == 4  # the norm after each step
    assert [s for s, _ in scalars["params-norm vs samples"]] == [4, 8, 12, 16]
    final = math.sqrt(sum(float((p.detach().double() ** 2).sum()) for p in built[0].parameters()))
    assert norms[-1][1] == pytest.approx(final, rel=1e-5)
    lines = _lines(result)
    assert [line["params_norm"] for line in lines] == [f"{norms[1][1]:.3f}", f"{norms[3][1]:.3f}"]
    assert [s for s, _ in scalars["num-zeros vs samples"]] == [4, 8, 12, 16]
    assert [line["num_zeros"] for line in lines] == [str(dict(scalars["num-zeros"])[s]) for s in (2, 4)]

    # Without the flag: no norm anywhere.
    result = pretrain(parse_config(TINY + "--train-iters 2 --log-interval 1 --eval-iters 0".split()))
    assert all(line["params_norm"] is None for line in _lines(result))


def test_batch_size_is_the_ramped_up_one(tmp_path):
    # --rampup-batch-size 2 2 4: batch 2 until 4 samples are consumed, then the full 4.
    flags = "--rampup-batch-size 2 2 4 --train-samples 12 --eval-iters 0 --log-interval 1"
    result = pretrain(parse_config(TINY + flags.split() + ["--tensorboard-dir", str(tmp_path)]))
    scalars = _scalars(tmp_path)
    assert scalars["batch-size"] == [(1, 2.0), (2, 2.0), (3, 4.0), (4, 4.0)]
    assert [s for s, _ in scalars["batch-size vs samples"]] == [2, 4, 8, 12]
    lines = _lines(result)
    assert [line["gbs"] for line in lines] == ["2", "2", "4", "4"]
    # Throughput counts the samples the iteration trained on: tokens/s = batch x seq / time per iteration.
    for line in lines:
        expected = int(line["gbs"]) * 8 / (float(line["ms"]) / 1000)
        assert float(line["tokens_per_second"]) == pytest.approx(expected, rel=0.02)


def test_skip_train_evaluates_without_writing_scalars(tmp_path):
    flags = "--train-iters 2 --skip-train --eval-iters 1 --tensorboard-dir"
    result = pretrain(parse_config(TINY + flags.split() + [str(tmp_path)]))
    assert result.iteration == 0 and result.test_loss is not None
    assert [box.splitlines()[1].split("|")[0] for box in result.log_lines] == [
        " validation loss at iteration 0 on validation set ",
        " validation loss at iteration 0 on test set ",
    ]
    assert _scalars(tmp_path) == {}  # Megatron's write_to_tensorboard=not skip_train


def test_log_throughput_switches_the_line_field_and_its_scalar(tmp_path):
    base = TINY + "--train-iters 2 --log-interval 1 --eval-iters 0 --tensorboard-dir".split()
    runs = {}
    for name, extra in {
        "off": [],
        "line only": ["--log-throughput"],
        "both": ["--log-throughput", "--log-timers-to-tensorboard"],
    }.items():
        out = tmp_path / name.replace(" ", "-")
        runs[name] = (_lines(pretrain(parse_config(base + [str(out)] + extra))), _scalars(out))
    lines, scalars = runs["off"]
    assert all(line["megatron_tflops"] is None for line in lines) and "throughput" not in scalars
    lines, scalars = runs["line only"]
    assert all(line["megatron_tflops"] is not None for line in lines) and "throughput" not in scalars
    lines, scalars = runs["both"]
    assert [s for s, _ in scalars["throughput"]] == [1, 2]
    for (_, tflops), line in zip(scalars["throughput"], lines):
        assert tflops == pytest.approx(float(line["megatron_tflops"]), abs=0.051)
    # At --timing-log-level 0 the only timer scalar is the iteration time.
    assert {tag for tag in scalars if tag.endswith("-time")} == {"iteration-time"}
    assert [s for s, _ in scalars["iteration-time"]] == [1, 2]


def test_tensorboard_queue_size_is_the_writers_queue(tmp_path):
    flags = f"--train-iters 1 --tensorboard-queue-size 7 --tensorboard-dir {tmp_path}"
    cfg = parse_config(TINY + flags.split()).finalize(1, None)
    logger = TrainingLogger(cfg, ParallelState(), print_fn=lambda _: None)
    try:
        # SummaryWriter(max_queue=7): at most 7 events wait for the writer thread.
        assert logger.writer.file_writer.event_writer._async_writer._byte_queue.maxsize == 7
    finally:
        logger.close()


def test_flags_megatron_removed_are_refused_as_megatron_does():
    # Megatron dropped --log-batch-size-to-tensorboard and --no-log-learnig-rate-to-tensorboard (sic) in
    # 2024: learning-rate and batch-size are always written (test_logger's default tag set), and argparse
    # refuses the old spellings.
    for flag in ("--log-batch-size-to-tensorboard", "--no-log-learnig-rate-to-tensorboard"):
        with pytest.raises(UserError, match=rf"^unrecognized arguments: {flag} \(see --help\)$"):
            parse_config(TINY + ["--train-iters", "1", flag])


def test_lm_loss_scalar_of_a_skipped_iteration_is_written(tmp_path):
    class NanAtTwo(GPTModel):
        calls = 0

        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            if self.training:
                NanAtTwo.calls += 1
                if NanAtTwo.calls in (3, 4):  # both micro batches of iteration 2
                    out = out * torch.tensor(float("nan"))
            return out

    flags = "--train-iters 3 --log-interval 3 --eval-iters 0 --tensorboard-dir"
    result = pretrain(parse_config(TINY + flags.split() + [str(tmp_path)]), model_provider=NanAtTwo)
    assert result.skipped_iterations == 1
    losses = dict(_scalars(tmp_path)["lm loss"])
    assert sorted(losses) == [1, 2, 3] and math.isnan(losses[2])  # Megatron's loss_dict has it either way
    assert "grad-norm" in _scalars(tmp_path) and 2 not in dict(_scalars(tmp_path)["grad-norm"])
