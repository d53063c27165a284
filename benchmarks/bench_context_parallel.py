"""Context parallelism at a long sequence: CP=2 (1 thread per rank) against one process (2 threads), tokens/s.

Both train the same model on the same global batch (one 2048-token sequence per iteration by default), one
after the other in this invocation, each in freshly spawned processes over gloo on this machine. For CP=2 it
also reports the seconds per iteration a rank waits for K/V blocks (and their gradients) in the ring, which
is the exchange the compute did not hide. Usage: `python benchmarks/bench_context_parallel.py [--seq 2048]`.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_lite.config import MegatronConfig  # noqa: E402
from megatron_lite.core.context_parallel import attention as cp_attention  # noqa: E402
from megatron_lite.core.models.gpt import GPTModel  # noqa: E402
from megatron_lite.parallel_state import initialize_parallel  # noqa: E402
from megatron_lite.training.logger import TrainingLogger  # noqa: E402
from megatron_lite.training.training import Trainer, set_random_seed  # noqa: E402

SHAPE = dict(num_layers=4, hidden_size=256, num_attention_heads=4, micro_batch_size=1)
VOCAB = 257


class ExchangeTimer:
    """Seconds spent waiting on the ring's K/V (and gradient) transfers: the part compute did not hide."""

    def __init__(self) -> None:
        self.seconds = 0.0
        original = cp_attention._exchange

        def timed_exchange(send, group, forward):
            recv, reqs = original(send, group, forward)
            return recv, [_TimedWait(req, self) for req in reqs]

        cp_attention._exchange = timed_exchange


class _TimedWait:
    def __init__(self, req, timer: ExchangeTimer) -> None:
        self.req, self.timer = req, timer

    def wait(self) -> None:
        start = time.perf_counter()
        self.req.wait()
        self.timer.seconds += time.perf_counter() - start


def worker(rank: int, world_size: int, port: int, threads: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank))
    os.environ["WORLD_SIZE"] = str(world_size)
    torch.set_num_threads(threads)
    if world_size > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
    cfg = MegatronConfig(
        **SHAPE,
        seq_length=args.seq,
        max_position_embeddings=args.seq,
        position_embedding_type="rope",
        context_parallel_size=world_size,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        lr=1e-4,
        train_iters=1000,
        mock_data=True,
        peak_tflops=1.0,
    ).finalize(world_size=world_size, vocab_size=VOCAB)
    pstate = initialize_parallel(1, context_parallel_size=world_size)
    set_random_seed(cfg.seed, pstate)
    timer = ExchangeTimer()
    trainer = Trainer(cfg, pstate, TrainingLogger(cfg, pstate, print_fn=lambda _: None), GPTModel)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (1, args.seq), generator=generator)
    batch = {"tokens": tokens, "labels": tokens, "loss_mask": torch.ones(1, args.seq)}
    times, waits = [], []
    for i in range(args.warmup + args.iters):
        timer.seconds = 0.0
        start = time.perf_counter()
        trainer.train_step(trainer._next_micro_batches(iter([batch]), "training"))
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
            waits.append(timer.seconds)
    if rank == 0:
        torch.save({"times": times, "waits": waits}, out)
    if world_size > 1:
        dist.destroy_process_group()


def run(world_size: int, threads: int, args: argparse.Namespace) -> dict:
    os.environ["OMP_NUM_THREADS"] = str(threads)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.pt")
        mp.start_processes(
            worker, args=(world_size, port, threads, args, out), nprocs=world_size, start_method="spawn"
        )
        return torch.load(out, weights_only=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=2048, help="Sequence length (default 2048).")
    parser.add_argument("--iters", type=int, default=4, help="Timed iterations (default 4).")
    parser.add_argument("--warmup", type=int, default=1, help="Untimed iterations first (default 1).")
    args = parser.parse_args()
    one = run(1, 2, args)
    cp2 = run(2, 1, args)
    t1, t2 = statistics.median(one["times"]), statistics.median(cp2["times"])
    wait = statistics.median(cp2["waits"])
    print(
        f"seq {args.seq}, {SHAPE['num_layers']} layers, hidden {SHAPE['hidden_size']}, RoPE, one sequence per step"
    )
    print(f"1 process x 2 threads: {t1 * 1000:8.1f} ms/iteration  {args.seq / t1:8.1f} tokens/s")
    print(f"CP=2 x 1 thread      : {t2 * 1000:8.1f} ms/iteration  {args.seq / t2:8.1f} tokens/s")
    print(f"CP=2 / 1 process     : {t1 / t2:.2f}x tokens/s")
    print(f"K/V ring waits on rank 0: {wait * 1000:.1f} ms/iteration ({wait / t2:.1%} of the step)")


if __name__ == "__main__":
    main()
