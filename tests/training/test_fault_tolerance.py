"""Fault tolerance in one process (and one 4-rank stall): checksums and fallback, kills mid-save, hangs,
non-finite streaks, write errors and changed datasets."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import torch
from dist_utils import run_distributed
from helpers import ONE_LAYER_RUN, PRETRAIN_GPT, run_python, tiny_flags
from test_checkpointing_support import build, make_cfg, snapshot, train_steps

from megatron_lite.arguments import parse_config
from megatron_lite.errors import UserError
from megatron_lite.parallel_state import ParallelState, initialize_parallel
from megatron_lite.training.checkpointing import (
    load_checkpoint,
    load_model_weights,
    read_latest_iteration,
    save_checkpoint,
    verify_checkpoint,
)
from megatron_lite.training.fault_tolerance import CollectiveFailure, collective_failures_as_errors
from megatron_lite.training.training import NonFiniteTrainingError, pretrain

ONE = ParallelState()
TINY = tiny_flags(
    **ONE_LAYER_RUN,
    global_batch_size=4,
    lr=1e-2,
    lr_warmup_iters=2,
    hidden_dropout=0.1,
    attention_dropout=0.1,
    eval_iters=0,
    log_interval=1,
)


def config(extra: str):
    return parse_config(TINY + extra.split())


# ---- checksums and fallback ------------------------------------------------------------------------
def saved_twice(tmp_path):
    """Checkpoints at iterations 2 and 4 of one tiny run; returns (cfg, snapshot at 2, snapshot at 4)."""
    cfg = make_cfg()
    model, optimizer, scheduler = build(cfg)
    snaps = {}
    for iteration in (2, 4):
        train_steps(model, optimizer, scheduler, cfg, ONE, range(iteration - 2, iteration))
        save_checkpoint(
            tmp_path, iteration, model, optimizer, scheduler, cfg, None, consumed_train_samples=iteration
        )
        snaps[iteration] = snapshot(model, optimizer)
    return cfg, snaps


def load_fresh(cfg, path):
    model, optimizer, scheduler = build(cfg, seed=99)
    progress = load_checkpoint(path, model, optimizer, scheduler, cfg, None)
    return progress, snapshot(model, optimizer)


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


def assert_params_equal(actual: dict, expected: dict) -> None:
    assert actual["params"].keys() == expected["params"].keys()
    for name, value in expected["params"].items():
        assert torch.equal(actual["params"][name], value), name


@pytest.mark.parametrize(
    "name, damage, problem",
    [
        ("__0_0.distcp", truncate, "has {actual} bytes, {size} expected (truncated or overwritten)"),
        ("__0_0.distcp", flip_byte, "does not match its checksum"),
        ("common.pt", flip_byte, "does not match its checksum"),
        ("rng_state_0.pt", truncate, "has {actual} bytes, {size} expected (truncated or overwritten)"),
        (".metadata", flip_byte, "does not match its checksum"),
    ],
)
def test_damaged_latest_checkpoint_falls_back_to_the_newest_intact_one(
    tmp_path, capsys, name, damage, problem
):
    cfg, snaps = saved_twice(tmp_path)
    bad = tmp_path / "iter_0000004" / name
    size = bad.stat().st_size
    damage(bad)
    expected_problem = f"{bad} " + problem.format(actual=bad.stat().st_size, size=size)

    found = verify_checkpoint(tmp_path / "iter_0000004")
    assert found.startswith(expected_problem), found
    assert verify_checkpoint(tmp_path / "iter_0000002") is None
    capsys.readouterr()
    progress, snap = load_fresh(cfg, tmp_path)
    assert (progress.iteration, progress.consumed_train_samples) == (2, 2)
    assert_params_equal(snap, snaps[2])
    err = capsys.readouterr().err
    assert err == (
        f"warning: checkpoint damaged in {tmp_path} (iteration 4: {found}); resuming from iteration 2, "
        "the newest intact checkpoint, and losing the iterations after it\n"
    )


def test_no_intact_checkpoint_and_damaged_weights_are_one_line_errors(tmp_path):
    cfg, _ = saved_twice(tmp_path)
    flip_byte(tmp_path / "iter_0000004" / "__0_0.distcp")
    truncate(tmp_path / "iter_0000002" / "common.pt")
    problem4 = verify_checkpoint(tmp_path / "iter_0000004")
    problem2 = verify_checkpoint(tmp_path / "iter_0000002")
    assert problem2.startswith(f"{tmp_path / 'iter_0000002' / 'common.pt'} has ")
    with pytest.raises(UserError) as caught:
        load_fresh(cfg, tmp_path)
    assert str(caught.value) == (
        f"no intact checkpoint in --load {tmp_path} (iteration 4: {problem4}; iteration 2: {problem2}); "
        "restore the damaged files from a copy, or move the directory away to start from scratch"
    )
    # Loading only the weights (converters, generation) names the damaged checkpoint instead of falling back.
    model, _, _ = build(cfg)
    with pytest.raises(UserError) as caught:
        load_model_weights(model, tmp_path)
    assert str(caught.value) == (
        f"checkpoint {tmp_path / 'iter_0000004'} is damaged: {problem4}; restore it from a copy or load "
        "another iteration"
    )


def test_unreadable_manifest_and_missing_file_are_damage(tmp_path):
    cfg, snaps = saved_twice(tmp_path)
    (tmp_path / "iter_0000004" / "checksums.json").write_text('{"files": ')
    assert verify_checkpoint(tmp_path / "iter_0000004") == (
        f"{tmp_path / 'iter_0000004' / 'checksums.json'} is unreadable or not a checksum list"
    )
    os.remove(tmp_path / "iter_0000002" / "rng_state_0.pt")
    assert (
        verify_checkpoint(tmp_path / "iter_0000002")
        == f"{tmp_path / 'iter_0000002' / 'rng_state_0.pt'} is missing"
    )
    # A checkpoint from before checksums (no manifest at all) still loads.
    os.remove(tmp_path / "iter_0000004" / "checksums.json")
    assert verify_checkpoint(tmp_path / "iter_0000004") is None
    progress, snap = load_fresh(cfg, tmp_path)
    assert progress.iteration == 4
    assert_params_equal(snap, snaps[4])


@pytest.mark.parametrize(
    ("files", "problem"),
    [
        # Issue 16's case: a name that leaves the directory is refused, never looked up.
        ({"../../../../etc/hostname": {"size": 1, "crc32": 0}}, "names '../../../../etc/hostname', which is not a file name inside the checkpoint"),
        ({"/etc/hostname": {"size": 1, "crc32": 0}}, "names '/etc/hostname', which is not a file name inside the checkpoint"),
        ({"common.pt": "abc"}, "gives 'common.pt' no integer size and crc32"),
        ({"common.pt": {"size": "7", "crc32": 0}}, "gives 'common.pt' no integer size and crc32"),
        (["common.pt"], "is unreadable or not a checksum list"),
    ],
)  # fmt: skip
def test_manifest_entries_must_be_plain_names_with_integer_checksums(tmp_path, files, problem):
    saved_twice(tmp_path)
    manifest = tmp_path / "iter_0000004" / "checksums.json"
    manifest.write_text(json.dumps({"algorithm": "crc32", "files": files}))
    assert verify_checkpoint(tmp_path / "iter_0000004") == f"{manifest} {problem}"


# ---- SIGKILL in the middle of writing a checkpoint ----------------------------------------------------
# Runs pretrain in a child process that SIGKILLs itself just before its K-th file-system step (fsync,
# rename, replace) of the save of iteration 4: every point between the first shard byte and the moved pointer.
KILL_DURING_SAVE = """
import os, signal, sys
from megatron_lite.arguments import parse_config
from megatron_lite.training.training import pretrain

kill_at, argv = sys.argv[1], sys.argv[2:]
events = []
def watch(real):
    def step(*args):
        where = os.readlink(f"/proc/self/fd/{args[0]}") if isinstance(args[0], int) else str(args[0])
        event = f"{real.__name__} {os.path.basename(where)}"
        if events or "iter_0000004" in where:
            events.append(event)
            if str(len(events)) == kill_at or (not kill_at.isdigit() and event.startswith(kill_at)):
                os.kill(os.getpid(), signal.SIGKILL)
        return real(*args)
    return step
os.fsync, os.rename, os.replace = watch(os.fsync), watch(os.rename), watch(os.replace)
pretrain(parse_config(argv))
print("EVENTS", len(events))
"""


def run_with_kill(kill_at: int | str, flags: str, tmp_path: Path) -> subprocess.CompletedProcess:
    return run_python(["-c", KILL_DURING_SAVE, str(kill_at), *TINY, *flags.split()], tmp_path)


SAVE_FLAGS = "--train-iters 6 --save-interval 2"


def kill_then_resume(kill_at: int | str, tmp_path: Path, straight) -> int:
    """Kill a run at `kill_at`, restart it on the same directory; returns the iteration it resumed from."""
    ckpt = tmp_path / f"kill{kill_at}".replace(" ", "_")
    proc = run_with_kill(kill_at, f"{SAVE_FLAGS} --save {ckpt} --load {ckpt}", tmp_path)
    assert proc.returncode == -9, (kill_at, proc.stderr[-2000:])
    latest = read_latest_iteration(ckpt)
    # The pointer names a complete checkpoint: iteration 2 until the very end of the save, then 4 (or 6
    # when the kill came during the final save).
    assert latest in (2, 4, 6), kill_at
    assert verify_checkpoint(ckpt / f"iter_{latest:07d}") is None
    # The restarted run (same --save/--load) resumes and ends exactly where the uninterrupted one did.
    resumed = pretrain(config(f"{SAVE_FLAGS} --save {ckpt} --load {ckpt}"))
    assert resumed.losses == [x for x in straight.losses if x[0] > latest], kill_at
    assert verify_checkpoint(ckpt / "iter_0000006") is None
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "iter_0000002",
        "iter_0000004",
        "iter_0000006",
        "latest_checkpointed_iteration.txt",
    ], kill_at
    return latest


@pytest.mark.parametrize(
    "kill_at, resumed_from",
    [
        ("fsync __0_0.distcp", 2),  # the first shard is being written
        ("fsync checksums.json", 2),  # everything but the manifest is written
        ("rename iter_0000004.tmp-", 2),  # the whole directory is written, not yet renamed into place
        ("replace latest_checkpointed_iteration.txt.tmp-", 2),  # renamed, the pointer not yet moved
    ],
)
def test_sigkill_during_a_checkpoint_write_keeps_the_previous_one_and_resumes(
    tmp_path, kill_at, resumed_from
):
    straight = pretrain(config(SAVE_FLAGS))
    assert kill_then_resume(kill_at, tmp_path, straight) == resumed_from


@pytest.mark.slow
def test_sigkill_at_every_step_of_a_checkpoint_write_leaves_a_loadable_checkpoint(tmp_path):
    straight = pretrain(config(SAVE_FLAGS))
    # How many file-system steps the save of iteration 4 (and what follows) takes.
    dry = run_with_kill("0", f"{SAVE_FLAGS} --save {tmp_path / 'dry'} --load {tmp_path / 'dry'}", tmp_path)
    assert dry.returncode == 0, dry.stderr
    total = int(dry.stdout.split("EVENTS ")[1])
    assert total > 10
    outcomes = {kill_then_resume(kill_at, tmp_path, straight) for kill_at in range(1, total + 1)}
    assert {2, 4} <= outcomes


# ---- hangs -----------------------------------------------------------------------------------------
def _stall_in_tp_collective(rank: int, world_size: int, flag_file: str) -> str | None:
    # 2 x 2 mesh: the TP groups are new process groups, which torch would give a 30-minute timeout.
    pstate = initialize_parallel(2, device="cpu", timeout_minutes=0.05)
    value = torch.ones(1)
    torch.distributed.all_reduce(value, group=pstate.tp_group)
    if rank == 1:
        # Stalled until rank 0 has given up on it: rank 0 can only get there through the timeout.
        while not os.path.exists(flag_file):
            time.sleep(0.05)
        return None
    try:
        with collective_failures_as_errors(pstate, 0.05):
            torch.distributed.all_reduce(value, group=pstate.tp_group)
    except CollectiveFailure as err:
        return str(err)
    finally:
        if rank == 0:
            Path(flag_file).touch()
    return "completed"


def test_a_stalled_rank_makes_the_others_fail_with_one_line_within_the_timeout(tmp_path):
    results = run_distributed(_stall_in_tp_collective, 4, str(tmp_path / "go"), timeout=120)
    assert results[0] == (
        "rank 0: a collective did not complete within 0.05 minutes (--distributed-timeout-minutes); "
        "another rank may have died or stalled, see its log. Exiting so that torchrun --max-restarts can "
        "restart the job from the last checkpoint"
    )


def test_collective_failure_messages():
    from megatron_lite.training.fault_tolerance import describe_collective_failure

    lost = RuntimeError("[../gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:46260.")
    wrapped = ValueError("save failed")
    wrapped.__cause__ = lost
    assert describe_collective_failure(wrapped, 3, 10.0) == (
        "rank 3: lost the connection to another rank during a collective; that rank probably died, see its "
        "log. Exiting so that torchrun --max-restarts can restart the job from the last checkpoint"
    )
    assert describe_collective_failure(RuntimeError("shapes do not match"), 0, 10.0) is None
    # In one process nothing is converted.
    with pytest.raises(RuntimeError, match="Connection closed"):
        with collective_failures_as_errors(ONE, 10.0):
            raise lost


# ---- training faults -------------------------------------------------------------------------------
def test_non_finite_streak_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    from test_training_loop import instrumented

    provider, built = instrumented(nan_loss=(3, 4, 5))
    ckpt = tmp_path / "ckpt"
    cfg = config(f"--train-iters 10 --save {ckpt} --save-interval 1 --max-consecutive-skipped-iterations 3")
    with pytest.raises(NonFiniteTrainingError) as caught:
        pretrain(cfg, model_provider=provider)
    assert str(caught.value) == (
        "stopping at iteration 5: 3 iterations in a row had a non-finite loss or gradient "
        "(--max-consecutive-skipped-iterations 3); they did not update the model and no checkpoint was "
        f"written after them; the last good checkpoint is iteration 2 in {ckpt}. Try a lower --lr, --bf16 "
        "instead of --fp16, or check the data"
    )
    assert read_latest_iteration(ckpt) == 2
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "iter_0000001",
        "iter_0000002",
        "latest_checkpointed_iteration.txt",
    ]
    # The checkpoint holds the weights the third iteration started from.
    model = built[0]
    loaded = type(model)(cfg, ONE)
    load_model_weights(loaded, ckpt)
    assert torch.equal(torch.cat([p.detach().flatten() for p in loaded.parameters()]), model.snapshots[3])


def test_unwritable_save_directory_stops_the_run_with_one_line(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    proc = run_python(
        [PRETRAIN_GPT, *TINY, "--train-iters", "4", "--save", blocker / "ckpt", "--save-interval", "2"],
        tmp_path,
    )
    assert proc.returncode == 2
    assert proc.stderr == (
        f"error: cannot save checkpoint iteration 2 to {blocker / 'ckpt'}: Not a directory; check that --save "
        "is a writable directory with free space (earlier checkpoints are untouched)\n"
    )


def test_dataset_rewritten_after_its_index_cache_was_built_is_reindexed(tmp_path):
    from megatron_lite.core.datasets.preprocessing import preprocess_main

    def write_corpus(verse: str, docs: int) -> str:
        corpus = tmp_path / "corpus.jsonl"
        corpus.write_text("".join(json.dumps({"text": verse * (3 + i % 5)}) + "\n" for i in range(docs)))
        prefix = str(tmp_path / "data")
        preprocess_main(
            ["--input", str(corpus), "--output-prefix", prefix, "--tokenizer-type", "ByteTokenizer"]
            + ["--append-eod", "--workers", "1"]
        )
        return prefix + "_text_document"

    def train(data: str, cache: Path):
        flags = (
            "--num-layers 1 --hidden-size 16 --num-attention-heads 2 --seq-length 16 --micro-batch-size 2 "
            "--lr 1e-2 --train-iters 3 --eval-iters 0 --num-workers 0 --peak-tflops 1 --hidden-dropout 0 "
            f"--attention-dropout 0 --tokenizer-type ByteTokenizer --split 1,0,0 --data-path {data} "
            f"--data-cache-path {cache}"
        )
        return pretrain(parse_config(flags.split())).losses

    data = write_corpus("Of Mans First Disobedience, and the Fruit. ", 20)
    first = train(data, tmp_path / "cache")
    assert train(data, tmp_path / "cache") == first  # the cache is reused
    # Rewritten in place with other documents (a different document count: a stale index would point
    # past or into the wrong documents).
    data = write_corpus("Sing Heav'nly Muse, that on the secret top. ", 27)
    rebuilt = train(data, tmp_path / "cache")
    assert rebuilt == train(data, tmp_path / "fresh_cache")
    assert rebuilt != first
    assert len(list((tmp_path / "cache").glob("*description.txt"))) == 2 * len(
        list((tmp_path / "fresh_cache").glob("*description.txt"))
    )
