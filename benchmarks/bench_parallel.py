"""Training throughput of one process (2 threads) against DP=2, TP=2 and PP=2 (1 thread per rank), and collectives.

    python benchmarks/bench_parallel.py                   # cpu-small, fp32: 2 warm-up + 5 timed iterations
    python benchmarks/bench_parallel.py --iters 10 --warmup 3 --rounds 3   # median and best of 3 rounds

The four layouts run one after the other in this invocation, each in freshly spawned processes over gloo on
127.0.0.1, with the real training step (Trainer.train_step: forward with the loss, backward with DDP's
gradient all-reduce, clipping, AdamW). Each layout first runs its timed iterations untouched; then a
second, instrumented model (same layout) measures the collectives for a few iterations:
- calls into torch.distributed's collectives (the TP mappings, vocab-parallel cross entropy, the grad-norm and
  loss reductions) are wrapped and timed while they block;
- DDP's bucket all-reduces go through a comm hook doing what DDP's default hook does, but waiting for each
  one, so its time is fully seen (the untimed runs overlap them with the backward pass: an upper bound);
- and, with the ranks lined up by a barrier first, one all-reduce of all the gradients (what DDP moves per
  iteration), which is the cost of the transfer without the wait for a slower peer.
Blocking times include waiting for the other rank to arrive, as a profiler would show them.
Timing the instrumented runs separately keeps the wrappers out of the throughput figures.
Tokens per second count the global batch: one micro batch of 8 per model replica, so DP=2 trains 16
samples per iteration and the others 8 (PP=2 as 4 micro batches of 2 through the 1F1B schedule). On a shared machine, rerun and compare: the noise is real.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_lite.config import MegatronConfig  # noqa: E402
from megatron_lite.core.models.gpt import GPTModel  # noqa: E402
from megatron_lite.parallel_state import initialize_parallel  # noqa: E402
from megatron_lite.training.logger import TrainingLogger  # noqa: E402
from megatron_lite.training.training import Trainer, set_random_seed  # noqa: E402

# nanoGPT's shakespeare-char shape on a byte vocabulary (as benchmarks/bench_train.py's cpu-small).
SHAPE = dict(num_layers=6, hidden_size=384, num_attention_heads=6, seq_length=256, micro_batch_size=8)
VOCAB = 257
# name -> (processes, threads per process, TP size, PP size)
LAYOUTS = {
    "1 proc x 2 threads": (1, 2, 1, 1),
    "DP=2 x 1 thread": (2, 1, 1, 1),
    "TP=2 x 1 thread": (2, 1, 2, 1),
    "PP=2 x 1 thread": (2, 1, 1, 2),
}
# PP=2 trains the same 8 samples per iteration as 4 micro batches of 2 (1F1B needs several to fill the
# pipeline; with one micro batch a stage would idle half of each step).
PP_MICRO_BATCH = 2
COLLECTIVES = (
    "all_reduce",
    "all_gather_single",
    "reduce_scatter_single",
    "all_gather_into_tensor",
    "reduce_scatter_tensor",
    "all_gather",
    "broadcast",
)


class CollectiveTimer:
    """Seconds spent in blocking torch.distributed collectives and in DDP's bucket all-reduces."""

    def __init__(self) -> None:
        self.blocking = 0.0
        self.blocking_calls = 0
        self.ddp = 0.0
        self.ddp_buckets = 0

    def install(self) -> None:
        """Wrap the module-level collectives; callers use `dist.<name>(...)`, so they pick the wrappers up."""
        for name in COLLECTIVES:
            if hasattr(dist, name):
                setattr(dist, name, self._timed(getattr(dist, name)))

    def _timed(self, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            if kwargs.get("async_op"):
                return fn(*args, **kwargs)  # DDP's hook below times its own
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            self.blocking += time.perf_counter() - start
            self.blocking_calls += 1
            return out

        return timed

    def ddp_hook(self, group, bucket):
        """DDP's default all-reduce (average over the group), done while DDP waits: its full cost is seen."""
        buffer = bucket.buffer().div_(dist.get_world_size(group))
        start = time.perf_counter()
        dist.all_reduce(buffer, group=group, async_op=True).wait()
        self.ddp += time.perf_counter() - start
        self.ddp_buckets += 1
        future = torch.futures.Future()
        future.set_result(buffer)
        return future

    def reset(self) -> None:
        self.blocking = self.ddp = 0.0
        self.blocking_calls = self.ddp_buckets = 0


def build_trainer(tp: int, world_size: int, timer: CollectiveTimer | None = None, pp: int = 1) -> Trainer:
    shape = dict(SHAPE)
    if pp > 1:
        shape.update(micro_batch_size=PP_MICRO_BATCH, global_batch_size=SHAPE["micro_batch_size"])
    cfg = MegatronConfig(
        **shape,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        lr=6e-4,
        train_iters=1000,
        mock_data=True,
        peak_tflops=1.0,  # no peak measurement: MFU is not reported here
    ).finalize(world_size=world_size, vocab_size=VOCAB)
    pstate = initialize_parallel(tp, pipeline_model_parallel_size=pp)
    set_random_seed(cfg.seed, pstate)
    trainer = Trainer(cfg, pstate, TrainingLogger(cfg, pstate, print_fn=lambda _: None), GPTModel)
    if timer is not None and trainer.ddp is not None:
        trainer.ddp.register_comm_hook(pstate.dp_group, timer.ddp_hook)
    return trainer


def random_batches(trainer: Trainer, generator: torch.Generator) -> list[dict[str, torch.Tensor]]:
    cfg = trainer.cfg
    batches = []
    for _ in range(cfg.num_microbatches):
        text = torch.randint(0, VOCAB, (cfg.micro_batch_size, cfg.seq_length + 1), generator=generator)
        batches.append(
            {
                "tokens": text[:, :-1],
                "labels": text[:, 1:],
                "loss_mask": torch.ones(cfg.micro_batch_size, cfg.seq_length),
                "position_ids": torch.arange(cfg.seq_length).expand(cfg.micro_batch_size, -1),
            }
        )
    return batches


def iteration_times(trainer: Trainer, iters: int, warmup: int, on_warm: Callable[[], None] = lambda: None):
    # Every TP rank of a DP rank must see the same batch, and the DP ranks different ones.
    generator = torch.Generator().manual_seed(1000 + trainer.pstate.dp_rank)
    times = []
    for i in range(warmup + iters):
        if i == warmup:
            on_warm()
        batches = random_batches(trainer, generator)
        if trainer.pstate.is_distributed:
            dist.barrier()
        start = time.perf_counter()
        trainer.train_step(batches)  # ends with the DP loss all-reduce and .item(): all ranks are done
        times.append(time.perf_counter() - start)
    return times[warmup:]


def all_reduce_seconds(trainer: Trainer, repeats: int = 3) -> float:
    """Median time of one all-reduce of every gradient element over DP, ranks lined up first."""
    numel = sum(p.numel() for p in trainer.params)
    group = trainer.pstate.dp_group
    buffer = torch.zeros(numel)
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(buffer, group=group)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def worker(
    rank: int, world_size: int, tp: int, pp: int, threads: int, port: int, args: argparse.Namespace, out: str
):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank))
    os.environ["WORLD_SIZE"] = str(world_size)
    torch.set_num_threads(threads)
    if world_size > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
    trainer = build_trainer(tp, world_size, pp=pp)
    times = iteration_times(trainer, args.iters, args.warmup)
    gbs = trainer.cfg.global_batch_size
    del trainer
    timer = CollectiveTimer()
    collectives = None
    if world_size > 1:
        timer.install()
        trainer = build_trainer(tp, world_size, timer, pp=pp)
        timed = iteration_times(trainer, args.profile_iters, 1, on_warm=timer.reset)
        n = args.profile_iters
        collectives = {
            "step": statistics.mean(timed),
            "grads_all_reduce": all_reduce_seconds(trainer) if trainer.ddp is not None else None,
            "blocking": timer.blocking / n,
            "calls": timer.blocking_calls / n,
            "ddp": timer.ddp / n,
            "buckets": timer.ddp_buckets / n,
        }
    if rank == 0:
        torch.save({"times": times, "gbs": gbs, "collectives": collectives}, out)
    if world_size > 1:
        dist.destroy_process_group()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_layout(name: str, args: argparse.Namespace) -> dict:
    procs, threads, tp, pp = LAYOUTS[name]
    # Spawned ranks read OMP_NUM_THREADS when torch starts; set_num_threads in the worker makes it exact.
    os.environ["OMP_NUM_THREADS"] = str(threads)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.pt")
        mp.start_processes(
            worker, args=(procs, tp, pp, threads, free_port(), args, out), nprocs=procs, start_method="spawn"
        )
        return torch.load(out, weights_only=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=5, help="Timed iterations per layout (default 5).")
    parser.add_argument("--warmup", type=int, default=2, help="Untimed iterations first (default 2).")
    parser.add_argument(
        "--profile-iters",
        type=int,
        default=2,
        help="Instrumented iterations for the collectives (default 2).",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="Run the four layouts this many times, in turn, and also report the best round (default 1).",
    )
    args = parser.parse_args()
    shape = ", ".join(f"{k}={v}" for k, v in SHAPE.items())
    print(
        f"GPT {shape}, vocab {VOCAB}, fp32, dropout 0; {args.warmup} warm-up + {args.iters} timed iterations"
    )
    rounds: dict[str, list[dict]] = {name: [] for name in LAYOUTS}
    for _ in range(args.rounds):
        for name in LAYOUTS:  # in turn, so a burst of load elsewhere hits one round, not one layout
            rounds[name].append(run_layout(name, args))
    results = {name: runs[-1] for name, runs in rounds.items()}
    rates = {
        name: [res["gbs"] * SHAPE["seq_length"] / statistics.median(res["times"]) for res in runs]
        for name, runs in rounds.items()
    }
    base = statistics.median(rates[next(iter(LAYOUTS))])
    best_base = max(rates[next(iter(LAYOUTS))])
    print(
        f"{'layout':<20} {'samples/iter':>12} {'ms/iter':>9} {'tokens/s':>9} {'vs 1 proc':>9}"
        + (f" {'best round':>10}" if args.rounds > 1 else "")
    )
    for name, runs in rounds.items():
        tokens_per_second = statistics.median(rates[name])
        gbs = runs[0]["gbs"]
        line = (
            f"{name:<20} {gbs:>12d} {gbs * SHAPE['seq_length'] / tokens_per_second * 1e3:>9.1f} "
            f"{tokens_per_second:>9.0f} {tokens_per_second / base:>8.2f}x"
        )
        if args.rounds > 1:
            line += f" {max(rates[name]) / best_base:>9.2f}x"
        print(line)
    print(
        "collectives per iteration (instrumented runs, rank 0; blocking times include waiting for the peer):"
    )
    for name, res in results.items():
        c = res["collectives"]
        if c is None:
            continue
        line = (
            f"  {name:<16} step {c['step'] * 1e3:7.1f} ms | torch.distributed collectives {c['blocking'] * 1e3:6.1f} ms "
            f"({c['calls']:.0f} calls, {c['blocking'] / c['step']:.1%} of the step)"
        )
        if c["buckets"]:
            line += (
                f" | DDP gradient all-reduce {c['ddp'] * 1e3:6.1f} ms ({c['buckets']:.0f} buckets, waited for; "
                f"{c['ddp'] / c['step']:.1%}) | all grads in one all-reduce after a barrier "
                f"{c['grads_all_reduce'] * 1e3:5.1f} ms"
            )
        print(line)


if __name__ == "__main__":
    main()
