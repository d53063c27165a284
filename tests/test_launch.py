"""torchrun launches of pretrain_gpt.py: two "nodes" over c10d rendezvous (and one --standalone node)
reproduce a one-process run's losses, and Megatron's line comes once per interval from one rank."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from dist_utils import free_port
from training.megatron_log import parse_lines

from megatron_lite.arguments import parse_config
from megatron_lite.training.training import pretrain

ROOT = Path(__file__).resolve().parent.parent
TRAIN_ITERS = 6
LOG_INTERVAL = 2
GLOBAL_BATCH = 4
SEQ = 16
ARGS = (
    f"--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length {SEQ} --mock-data --vocab-size 250 "
    f"--micro-batch-size 1 --global-batch-size {GLOBAL_BATCH} --lr 3e-3 --lr-warmup-iters 1 "
    f"--train-iters {TRAIN_ITERS} --log-interval {LOG_INTERVAL} --num-workers 0 --hidden-dropout 0 "
    "--attention-dropout 0 --eval-iters 0 --peak-tflops 1"
).split()
RTOL = 1e-5


def _env(tmp_path: Path) -> dict:
    # torchrun writes torchelastic_* under $TMPDIR; several ranks share 2 cores.
    return {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path), "PYTHONPATH": str(ROOT)}


def _torchrun(launch: list[str], extra: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *launch,
        str(ROOT / "pretrain_gpt.py"),
        *ARGS,
        *extra,
    ]


def _run_all(commands: list[list[str]], tmp_path: Path, timeout: float = 240) -> list[str]:
    """Start every command at once (the nodes must meet at the rendezvous) and return each one's stdout."""
    procs = [
        subprocess.Popen(
            cmd, cwd=tmp_path, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for cmd in commands
    ]
    outputs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=timeout)
            assert proc.returncode == 0, err[-3000:]
            outputs.append(out)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return outputs


@pytest.fixture(scope="module")
def interval_losses() -> list[float]:
    """The one-process run of the same global batch: the mean lm loss of each log interval."""
    losses = [v for _, v in pretrain(parse_config(ARGS)).losses]
    assert len(losses) == TRAIN_ITERS
    return [sum(losses[i : i + LOG_INTERVAL]) / LOG_INTERVAL for i in range(0, TRAIN_ITERS, LOG_INTERVAL)]


def _check_log(outputs: list[str], world: int, reference: list[float]) -> None:
    text = "".join(outputs)
    lines = parse_lines(text)
    # Exactly one line per interval over all ranks of all nodes: only the last rank prints.
    assert [int(f["iteration"]) for f in lines] == list(range(LOG_INTERVAL, TRAIN_ITERS + 1, LOG_INTERVAL))
    assert sum("iteration " in line and "consumed samples" in line for line in text.splitlines()) == len(
        lines
    )
    assert [int(f["consumed"]) for f in lines] == [int(f["iteration"]) * GLOBAL_BATCH for f in lines]
    assert [float(f["loss"]) for f in lines] == pytest.approx(reference, rel=RTOL)
    for f in lines:
        total, per_rank, ms = float(f["tokens_per_second"]), float(f["tokens_per_rank"]), float(f["ms"])
        # Both figures are printed with one decimal: total = ranks x per rank up to that rounding.
        assert abs(total - world * per_rank) <= 0.05 * (world + 1)
        # The total is the whole global batch's tokens per elapsed second (ms is rounded to 0.1).
        tokens = GLOBAL_BATCH * SEQ
        assert tokens * 1000 / (ms + 0.05) - 0.1 <= total <= tokens * 1000 / max(ms - 0.05, 1e-3) + 0.1


def test_two_nodes_over_c10d_rendezvous_match_one_process(tmp_path, interval_losses):
    port, run_id = free_port(), uuid.uuid4().hex[:12]
    nodes = [
        _torchrun(
            [
                "--nnodes=2",
                "--nproc-per-node=1",
                f"--node-rank={node}",  # ignored under c10d (torchrun warns), kept as users write it
                "--rdzv-backend=c10d",
                f"--rdzv-endpoint=127.0.0.1:{port}",
                f"--rdzv-id={run_id}",
                "--local-addr=127.0.0.1",
            ],
            [],
        )
        for node in (0, 1)
    ]
    outputs = _run_all(nodes, tmp_path)
    # One node holds the last rank and prints every line; the other prints none of them.
    assert sorted(len(parse_lines(out)) for out in outputs) == [0, TRAIN_ITERS // LOG_INTERVAL]
    _check_log(outputs, world=2, reference=interval_losses)


@pytest.mark.slow
def test_standalone_tp2_matches_one_process(tmp_path, interval_losses):
    cmd = _torchrun(["--standalone", "--nproc-per-node=2"], ["--tensor-model-parallel-size", "2"])
    _check_log(_run_all([cmd], tmp_path), world=2, reference=interval_losses)
