"""Megatron's run-time switches: --manual-gc, --deterministic-mode, --exit-signal-handler / --exit-signal."""

import gc
import os
import signal

import pytest
import torch
from helpers import ONE_LAYER_RUN, PRETRAIN_GPT, start_python, tiny_flags
from megatron_log import parse_lines

from megatron_lite.arguments import parse_config
from megatron_lite.core.models.gpt import GPTModel
from megatron_lite.errors import UserError
from megatron_lite.training.fault_tolerance import ExitSignal
from megatron_lite.training.training import pretrain

TINY = tiny_flags(**ONE_LAYER_RUN, global_batch_size=4, hidden_dropout=0, attention_dropout=0)


class Probe(GPTModel):
    """Records, at the first micro batch of each training iteration, what the run's switches have set;
    optionally sends a signal to its own process during one iteration."""

    def __init__(self, cfg, pstate, record, send=None):
        super().__init__(cfg, pstate)
        self.record, self.send, self.calls, self.micro = record, send, 0, cfg.num_microbatches

    def forward(self, *args, **kwargs):
        if self.training:
            if self.calls % self.micro == 0:
                iteration = self.calls // self.micro + 1
                self.record(iteration)
                if self.send is not None and self.send[0] == iteration:
                    os.kill(os.getpid(), self.send[1])
            self.calls += 1
        return super().forward(*args, **kwargs)


def run(flags: str, record=lambda iteration: None, send=None, **kwargs):
    provider = lambda cfg, pstate: Probe(cfg, pstate, record, send)  # noqa: E731
    return pretrain(parse_config(TINY + flags.split()), model_provider=provider, **kwargs)


# ---- --manual-gc ---------------------------------------------------------------------------------------
def test_manual_gc_collects_at_megatrons_points_only():
    events = []

    def on_gc(phase, info):
        if phase == "start":
            events.append(f"gc{info['generation']}")

    def record(iteration):
        events.append(f"it{iteration}" if not gc.isenabled() else f"it{iteration}-AUTOMATIC-GC-ON")

    gc.callbacks.append(on_gc)
    try:
        run("--train-iters 4 --eval-interval 3 --eval-iters 1 --manual-gc --manual-gc-interval 2", record)
        assert gc.isenabled()  # restored after the run
        first = events.index("it1")
        # One full collection at the start, one every 2 iterations, full before and young after the
        # evaluation during training (at 3); nothing automatic, and (as in Megatron) none around the final
        # validation and test evaluations, which run with the collector still off.
        assert events[first - 1 :] == ["gc2", "it1", "it2", "gc2", "it3", "gc2", "gc0", "it4", "gc2"]

        events.clear()
        run("--train-iters 2 --eval-interval 1 --eval-iters 1 --manual-gc --no-manual-gc-eval", record)
        assert events[events.index("it1") - 1 :] == ["gc2", "it1", "it2"]

        events.clear()
        run("--train-iters 1 --eval-iters 0", record)
        assert "it1-AUTOMATIC-GC-ON" in events  # off by default
    finally:
        gc.callbacks.remove(on_gc)
        gc.enable()


def test_manual_gc_interval_must_not_be_negative():
    with pytest.raises(UserError, match=r"^--manual-gc-interval must be >= 0, got -1$"):
        run("--train-iters 1 --manual-gc --manual-gc-interval -1")


# ---- --deterministic-mode ------------------------------------------------------------------------------
def test_deterministic_mode_gives_bit_identical_runs(monkeypatch, capsys):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.delenv("NCCL_ALGO", raising=False)
    seen = []

    def record(iteration):
        seen.append((torch.are_deterministic_algorithms_enabled(), os.environ.get("CUBLAS_WORKSPACE_CONFIG")))

    # dropout on: the RNG streams must replay too
    flags = "--train-iters 4 --eval-iters 0 --hidden-dropout 0.1 --attention-dropout 0.1 --deterministic-mode"
    runs = [run(flags, record) for _ in range(2)]
    assert runs[0].losses == runs[1].losses  # exactly, not approximately
    assert len({loss for _, loss in runs[0].losses}) == 4
    assert set(seen) == {(True, ":4096:8")} and len(seen) == 8
    assert os.environ["NCCL_ALGO"] == "Ring"
    assert not torch.are_deterministic_algorithms_enabled()  # restored after the run
    out = capsys.readouterr().out
    assert "> --deterministic-mode: --fp32-matmul-precision auto resolved to highest" in out
    assert "fp32 matmul precision: highest" in out


def test_deterministic_mode_refuses_a_nondeterministic_environment(monkeypatch):
    monkeypatch.setenv("NCCL_ALGO", "Tree")
    with pytest.raises(UserError) as caught:
        run("--train-iters 1 --deterministic-mode")
    assert str(caught.value) == (
        "--deterministic-mode: NCCL_ALGO=Tree is not a reproducible all-reduce; use one of CollnetChain, "
        "CollnetDirect, Ring, ^NVLS or unset it"
    )
    monkeypatch.setenv("NCCL_ALGO", "Ring")
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":0:0")
    with pytest.raises(UserError, match=r"CUBLAS_WORKSPACE_CONFIG=:0:0 is not deterministic; use :16:8 or"):
        run("--train-iters 1 --deterministic-mode")


# ---- --exit-signal-handler / --exit-signal ----------------------------------------------------------------
def test_exit_signal_handler_stops_on_the_chosen_signal_and_restores_handlers():
    before = signal.getsignal(signal.SIGUSR1)
    result = run(
        "--train-iters 6 --eval-iters 0 --exit-signal-handler --exit-signal SIGUSR1", send=(2, signal.SIGUSR1)
    )
    assert (result.iteration, result.exit_reason, len(result.losses)) == (2, "signal", 2)
    assert signal.getsignal(signal.SIGUSR1) is before


def test_without_the_handler_no_signal_is_taken_over():
    handlers = []
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    run(
        "--train-iters 1 --eval-iters 0", lambda it: handlers.append({s: signal.getsignal(s) for s in before})
    )
    assert handlers == [before]
    with_flag = []
    run(
        "--train-iters 1 --eval-iters 0 --exit-signal-handler",
        lambda it: with_flag.append(signal.getsignal(signal.SIGTERM)),
    )
    assert with_flag[0] is not before[signal.SIGTERM]  # the default signal is SIGTERM


def test_exit_signal_is_chosen_by_name_and_the_handler_is_off_by_default():
    assert parse_config(TINY + ["--train-iters", "1"]).exit_signal_handler is False
    assert ExitSignal.from_config(parse_config(TINY + ["--train-iters", "1"])).signum is None
    cfg = parse_config(TINY + "--train-iters 1 --exit-signal-handler --exit-signal SIGUSR2".split())
    assert (cfg.exit_signal, ExitSignal.from_config(cfg).signum) == ("SIGUSR2", signal.SIGUSR2)
    # Megatron converts the name with signal.Signals[NAME]: neither a number nor lower case parses.
    for value in (str(int(signal.SIGUSR2)), "sigusr2"):
        with pytest.raises(UserError, match=rf"^argument --exit-signal: invalid choice: '{value}' \(choose"):
            parse_config(TINY + ["--exit-signal", value])


def test_exit_signal_errors_and_notice(capsys):
    with pytest.raises(UserError) as caught:
        run("--train-iters 1 --exit-signal-handler --exit-signal SIGKILL")
    assert str(caught.value) == "--exit-signal SIGKILL cannot be caught by a process; use SIGTERM or SIGUSR1"
    run("--train-iters 1 --eval-iters 0 --exit-signal SIGUSR1")
    assert "> --exit-signal SIGUSR1: no effect without --exit-signal-handler (as in Megatron)" in (
        capsys.readouterr().out
    )


def test_signals_on_the_command_line(tmp_path):
    """Default: SIGTERM ends the process, Ctrl-C stops with one line; --exit-signal-handler saves, exits 0."""
    cases = {
        "sigterm": ([], signal.SIGTERM),
        "sigint": ([], signal.SIGINT),
        "handled": (["--exit-signal-handler", "--exit-signal", "SIGINT"], signal.SIGINT),
    }
    procs = {}
    for name, (extra, _) in cases.items():
        workdir = tmp_path / name
        workdir.mkdir()
        args = [*TINY, "--train-iters", "100000", "--log-interval", "1", "--eval-iters", "0"]
        args += ["--save", str(workdir / "ckpt"), "--save-interval", "100000", *extra]
        procs[name] = start_python([PRETRAIN_GPT, *args], workdir)
    outputs = {}
    for name, proc in procs.items():
        out = []
        for line in proc.stdout:
            out.append(line)
            if parse_lines(line):
                proc.send_signal(cases[name][1])
                break
        rest, err = proc.communicate(timeout=120)
        outputs[name] = ("".join(out) + rest, err, proc.returncode)

    _, _, code = outputs["sigterm"]
    assert code == -signal.SIGTERM  # the default action, as in Megatron without the flag
    assert not (tmp_path / "sigterm" / "ckpt" / "latest_checkpointed_iteration.txt").exists()

    _, err, code = outputs["sigint"]
    assert (code, err) == (130, "interrupted: nothing was left half-written\n")

    out, err, code = outputs["handled"]
    assert code == 0, err
    last = parse_lines(out)[-1]["iteration"]
    assert f"exiting at iteration {last} (signal)" in out
    latest = tmp_path / "handled" / "ckpt" / "latest_checkpointed_iteration.txt"
    assert latest.read_text().strip() == last
