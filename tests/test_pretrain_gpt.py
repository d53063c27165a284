"""pretrain_gpt.py as users run it: Megatron's log lines, one-line errors, clean exits, torchrun."""

import signal
import subprocess
from pathlib import Path

import pytest
from dist_utils import free_port
from helpers import PRETRAIN_GPT, ROOT, run_python, start_python, tiny_flags, torchrun_args
from training.megatron_log import VALIDATION_LINE, parse_lines

TINY = tiny_flags(vocab_size=100, num_workers=0, peak_tflops=1)


def run(args: list[str], tmp_path: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return run_python([PRETRAIN_GPT, *args], tmp_path, timeout=timeout)


def test_trains_and_prints_megatrons_lines(tmp_path):
    proc = run(
        TINY
        + "--global-batch-size 4 --train-iters 4 --log-interval 2 --eval-interval 2 --eval-iters 1".split(),
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    lines = parse_lines(proc.stdout)
    assert [(f["iteration"], f["train_iters"], f["consumed"], f["gbs"]) for f in lines] == [
        ("2", "4", "8", "4"),
        ("4", "4", "16", "4"),
    ]
    assert all(f["tokens_per_rank"] is None and f["mfu"] is not None for f in lines)
    boxes = [m["where"] for m in map(VALIDATION_LINE.match, proc.stdout.splitlines()) if m]
    assert boxes == ["iteration 2", "iteration 4", "iteration 4 on validation set", "iteration 4 on test set"]
    assert "given by --peak-tflops: 1 TFLOP/s" in proc.stdout


def test_user_error_is_one_line_exit_2(tmp_path):
    proc = run(TINY + "--train-iters 1 --hidden-size 30".split(), tmp_path)
    assert proc.returncode == 2
    assert proc.stderr == (
        "error: --hidden-size 30 is not divisible by --num-attention-heads 4; pick sizes that divide or set --kv-channels\n"
    )
    assert proc.stdout == ""


def test_divergence_stops_with_one_line_and_non_zero_exit(tmp_path):
    # lr 1e30 blows the weights up after the first step; every later iteration is non-finite
    proc = run(
        TINY
        + "--lr 1e30 --train-iters 20 --log-interval 1 --max-consecutive-skipped-iterations 3 --eval-iters 0".split(),
        tmp_path,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith(
        "error: stopping at iteration 4: 3 iterations in a row had a non-finite loss or gradient"
    )
    assert proc.stderr.count("\n") == 1
    assert [(f["iteration"], f["skipped"], f["nan"]) for f in parse_lines(proc.stdout)] == [
        ("1", "0", "0"),
        ("2", "1", "1"),
        ("3", "1", "1"),
        ("4", "1", "1"),
    ]


def test_sigterm_saves_and_exits_zero(tmp_path):
    ckpt = tmp_path / "ckpt"
    args = (
        TINY
        + f"--train-iters 100000 --log-interval 1 --eval-iters 0 --save {ckpt} --save-interval 100000 "
        "--exit-signal-handler".split()
    )
    proc = start_python([PRETRAIN_GPT, *args], tmp_path)
    out = []
    for line in proc.stdout:
        out.append(line)
        if " iteration " in line and "consumed samples" in line:
            proc.send_signal(signal.SIGTERM)
            break
    rest, err = proc.communicate(timeout=120)
    out.append(rest)
    assert proc.returncode == 0, err
    text = "".join(out)
    last = parse_lines(text)[-1]["iteration"]
    assert f"exiting at iteration {last} (signal)" in text
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == last


@pytest.mark.slow
def test_torchrun_dp2_logs_once_from_the_last_rank(tmp_path):
    args = TINY + "--global-batch-size 8 --train-iters 4 --log-interval 2 --eval-iters 0".split()
    rendezvous = ["--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}"]
    proc = run_python(torchrun_args(PRETRAIN_GPT, args, launcher_flags=rendezvous), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = parse_lines(proc.stdout)
    assert [(f["iteration"], f["consumed"]) for f in lines] == [("2", "16"), ("4", "32")]
    assert all(f["tokens_per_rank"] is not None for f in lines)


@pytest.mark.slow
def test_megatron_seed_command_runs(tmp_path):
    # The seed command of Megatron's docs (GPT-2 124M shape, seq 1024) as written, on the bundled Milton
    # corpus preprocessed to my_data_text_document, with the training flags the command leaves to "...".
    prep = run_python(
        [ROOT / "tools" / "preprocess_data.py", "--input", ROOT / "data" / "milton.jsonl.gz"]
        + "--output-prefix my_data --tokenizer-type GPT2BPETokenizer --append-eod --workers 1".split(),
        tmp_path,
    )
    assert prep.returncode == 0, prep.stderr
    seed = (
        "--tensor-model-parallel-size 1 --num-layers 12 --hidden-size 768 --num-attention-heads 12 "
        "--seq-length 1024 --max-position-embeddings 1024 --data-path my_data_text_document"
    ).split()
    rest = (
        "--tokenizer-type GPT2BPETokenizer --micro-batch-size 1 --lr 1e-4 --train-iters 1 --eval-iters 0 "
        "--log-interval 1 --num-workers 0 --peak-tflops 1"
    ).split()
    proc = run(seed + rest, tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr
    (line,) = parse_lines(proc.stdout)
    assert 10.0 < float(line["loss"]) < 11.7  # ln(50257) = 10.82 at init
    assert "number of parameters on (tensor, pipeline) model parallel rank (0, 0): 124475904" in proc.stdout
