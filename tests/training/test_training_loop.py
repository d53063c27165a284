"""The training loop on one process: accumulation, skipping non-finite steps, evaluation, exits, precision."""

import json
import math
import os
import signal

import pytest
import torch
from megatron_log import MEGATRON_LINE, VALIDATION_LINE

from megatron_lite.arguments import parse_config
from megatron_lite.core.models.gpt import GPTModel
from megatron_lite.core.performance import matmul_precision
from megatron_lite.errors import UserError
from megatron_lite.training import setup as training_setup
from megatron_lite.training import training
from megatron_lite.training.data_samplers import MockGPTDataset
from megatron_lite.training.training import NonFiniteTrainingError, pretrain

TINY = (
    "--num-layers 1 --hidden-size 16 --num-attention-heads 2 --seq-length 8 --mock-data --vocab-size 64 "
    "--lr 1e-2 --num-workers 0 --peak-tflops 0.5 --hidden-dropout 0 --attention-dropout 0 --eval-iters 0"
)


def config(extra: str):
    return parse_config((TINY + " " + extra).split())


class Instrumented(GPTModel):
    """GPTModel that can poison chosen training iterations, raise SIGTERM, and snapshot its weights."""

    def __init__(self, cfg, pstate, *, nan_loss=(), nan_grad=(), sigterm_at=None):
        super().__init__(cfg, pstate)
        self.micro_batches = cfg.num_microbatches
        self.calls = 0
        self.nan_loss, self.nan_grad, self.sigterm_at = set(nan_loss), set(nan_grad), sigterm_at
        self.snapshots = {}

    def forward(self, tokens, position_ids=None, attention_mask=None, labels=None, kv_cache=None):
        out = super().forward(tokens, position_ids, attention_mask, labels, kv_cache)
        if not self.training:
            return out
        iteration = self.calls // self.micro_batches + 1
        if self.calls % self.micro_batches == 0:
            self.snapshots[iteration] = torch.cat([p.detach().flatten() for p in self.parameters()])
        self.calls += 1
        if iteration in self.nan_loss:
            out = out * float("nan")
        if iteration in self.nan_grad:
            self.nan_grad.discard(iteration)
            handle = None

            def poison(grad):
                handle.remove()  # a hook on a parameter stays until removed: fire once
                return torch.full_like(grad, float("nan"))

            handle = self.embedding.word_embeddings.weight.register_hook(poison)
        if iteration == self.sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return out


def instrumented(**kwargs):
    built = []

    def provider(cfg, pstate):
        built.append(Instrumented(cfg, pstate, **kwargs))
        return built[0]

    return provider, built


def test_gradient_accumulation_equals_one_big_batch():
    accumulated = pretrain(config("--micro-batch-size 2 --global-batch-size 4 --train-iters 6"))
    single = pretrain(config("--micro-batch-size 4 --global-batch-size 4 --train-iters 6"))
    a = [v for _, v in accumulated.losses]
    b = [v for _, v in single.losses]
    assert a[-1] < a[0] - 1e-3  # it does train
    assert a == pytest.approx(b, rel=1e-6, abs=0)


def test_nan_loss_iteration_is_skipped_counted_and_does_not_update():
    provider, built = instrumented(nan_loss={3})
    cfg = config("--micro-batch-size 2 --global-batch-size 4 --train-iters 6 --log-interval 3 --lr 1e-3")
    result = pretrain(cfg, model_provider=provider)
    model = built[0]
    assert math.isnan(result.losses[2][1]) and all(math.isfinite(v) for i, v in result.losses if i != 3)
    assert result.skipped_iterations == 1
    assert torch.equal(model.snapshots[3], model.snapshots[4])  # iteration 3 did not move the weights
    assert not torch.equal(model.snapshots[2], model.snapshots[3])
    first, second = (MEGATRON_LINE.match(line).groupdict() for line in result.log_lines)
    assert (first["skipped"], first["nan"], first["grad_norm"]) == ("1", "1", "nan")
    assert (second["skipped"], second["nan"]) == ("0", "0")
    # the schedule advanced 5 times, not 6: linear decay 1e-3 -> 0 over 6 iterations
    assert second["lr"] == f"{1e-3 * (1 - 5 / 6):.6E}"
    # the interval mean covers the two advanced iterations only
    assert float(first["loss"]) == pytest.approx((result.losses[0][1] + result.losses[1][1]) / 2, rel=1e-6)


def test_nan_gradient_with_finite_loss_is_skipped_but_not_a_nan_iteration():
    provider, built = instrumented(nan_grad={2})
    result = pretrain(
        config("--micro-batch-size 2 --train-iters 3 --log-interval 3"), model_provider=provider
    )
    fields = MEGATRON_LINE.match(result.log_lines[0]).groupdict()
    assert (fields["skipped"], fields["nan"]) == ("1", "0")
    assert torch.equal(built[0].snapshots[2], built[0].snapshots[3])


def test_too_many_non_finite_iterations_in_a_row_stop_the_run():
    provider, _ = instrumented(nan_loss=set(range(2, 100)))
    cfg = config("--micro-batch-size 2 --train-iters 20 --max-consecutive-skipped-iterations 3")
    with pytest.raises(NonFiniteTrainingError) as err:
        pretrain(cfg, model_provider=provider)
    assert isinstance(err.value, UserError)
    assert str(err.value) == (
        "stopping at iteration 4: 3 iterations in a row had a non-finite loss or gradient "
        "(--max-consecutive-skipped-iterations 3); they did not update the model and no checkpoint was "
        "written after them. Try a lower --lr, --bf16 instead of --fp16, or check the data"
    )


def _mean_loss(model, split, cfg, first, count):
    ds = MockGPTDataset(10_000, cfg.seq_length, cfg.vocab_size, cfg.seed, split)
    tokens = torch.stack([ds[i]["tokens"] for i in range(first, first + count)])
    labels = torch.stack([ds[i]["labels"] for i in range(first, first + count)])
    with torch.no_grad():
        return model(tokens, labels=labels).mean().item()


def test_evaluations_read_consecutive_validation_slices_then_the_test_split():
    # lr 0 keeps the weights fixed, so each evaluation is the plain mean loss over its samples.
    cfg = config(
        "--micro-batch-size 2 --global-batch-size 4 --train-iters 4 --eval-interval 2 --eval-iters 2 --lr 0"
    )
    result = pretrain(cfg)
    reference = GPTModel(cfg).eval()
    expected = [_mean_loss(reference, "valid", cfg, start, 8) for start in (0, 8, 16)]
    assert [it for it, _ in result.validation_losses] == [2, 4, 4]
    assert [v for _, v in result.validation_losses] == pytest.approx(expected, rel=1e-6)
    assert result.test_loss == pytest.approx(_mean_loss(reference, "test", cfg, 0, 8), rel=1e-6)
    boxes = [line.splitlines()[1] for line in result.log_lines if line.startswith("---")]
    wheres = [VALIDATION_LINE.match(b)["where"] for b in boxes]
    assert wheres == [
        "iteration 2",
        "iteration 4",
        "iteration 4 on validation set",
        "iteration 4 on test set",
    ]
    assert result.last_validation_loss == result.validation_losses[-1][1]


def test_exit_interval_stops_without_final_evaluation():
    result = pretrain(config("--micro-batch-size 2 --train-iters 6 --exit-interval 2 --eval-iters 1"))
    assert (result.iteration, result.exit_reason, result.test_loss) == (2, "exit-interval", None)
    assert result.consumed_train_samples == 4


def test_exit_duration():
    result = pretrain(config("--micro-batch-size 2 --train-iters 6 --exit-duration-in-mins 0"))
    assert (result.iteration, result.exit_reason) == (1, "exit-duration")


def test_sigterm_finishes_the_iteration_and_exits_cleanly():
    before = signal.getsignal(signal.SIGTERM)
    provider, _ = instrumented(sigterm_at=2)
    result = pretrain(
        config("--micro-batch-size 2 --global-batch-size 4 --train-iters 6 --exit-signal-handler"),
        model_provider=provider,
    )
    assert (result.iteration, result.exit_reason, len(result.losses)) == (2, "signal", 2)
    assert math.isfinite(result.losses[1][1])
    assert signal.getsignal(signal.SIGTERM) is before


def test_fp16_on_cpu_trains_with_dynamic_loss_scaling():
    argv = "--micro-batch-size 2 --train-iters 12 --lr 1e-2 --hysteresis 1"
    fp16 = pretrain(config(argv + " --fp16 --initial-loss-scale 1048576"))
    fp32 = pretrain(config(argv))
    # 2^20 overflows fp16's gradients: iterations are skipped while the scale halves (to 2^17), as Megatron's.
    assert fp16.skipped_iterations == 3
    # The first forward pass is the same model in both precisions; after the skips fp16 follows fp32 closely.
    assert abs(fp16.losses[0][1] - fp32.losses[0][1]) < 1e-2
    diffs = [abs(a[1] - b[1]) for a, b in zip(fp16.losses, fp32.losses, strict=True)]
    assert all(math.isfinite(a[1]) for a in fp16.losses) and sum(diffs) / len(diffs) < 0.05


def test_mock_data_needs_a_vocabulary():
    cfg = parse_config(
        TINY.replace("--vocab-size 64", "").split() + ["--micro-batch-size", "1", "--train-iters", "1"]
    )
    with pytest.raises(
        UserError, match=r"^--mock-data without --tokenizer-type needs --vocab-size, e.g. --vocab-size 50257$"
    ):
        pretrain(cfg)


def test_bf16_autocast_trains_close_to_fp32():
    fp32 = pretrain(config("--micro-batch-size 2 --train-iters 4"))
    bf16 = pretrain(config("--micro-batch-size 2 --train-iters 4 --bf16 --log-interval 4"))
    a, b = [v for _, v in fp32.losses], [v for _, v in bf16.losses]
    assert a != b  # autocast really ran the matmuls in bf16
    assert b == pytest.approx(a, rel=2e-2)
    assert MEGATRON_LINE.match(bf16.log_lines[0])["loss_scale"] == "1.0"


def test_fp16_loss_scaling_mechanics_on_cpu(monkeypatch):
    # fp16 is GPU-only for users; CPU autocast runs fp16 too, which lets the loss-scaling path be tested here.
    monkeypatch.setattr(training_setup, "check_precision", lambda cfg, device: None)
    fp32 = pretrain(config("--micro-batch-size 2 --train-iters 4"))
    static = pretrain(config("--micro-batch-size 2 --train-iters 4 --fp16 --loss-scale 256"))
    assert static.skipped_iterations == 0
    assert [v for _, v in static.losses] == pytest.approx([v for _, v in fp32.losses], rel=1e-2)
    # A huge initial scale overflows fp16 until it has come down; these skips do not count toward the
    # consecutive limit (3 here), so the run finishes and trains afterwards.
    dynamic = pretrain(
        config(
            "--micro-batch-size 2 --train-iters 30 --fp16 --initial-loss-scale 1e30 --hysteresis 1 "
            "--max-consecutive-skipped-iterations 3 --log-interval 30"
        )
    )
    fields = MEGATRON_LINE.match(dynamic.log_lines[0]).groupdict()
    assert int(fields["skipped"]) == dynamic.skipped_iterations > 3
    assert fields["nan"] == "0"
    assert float(fields["loss_scale"]) == 1e30 / 2**dynamic.skipped_iterations
    assert math.isfinite(dynamic.losses[-1][1])


def test_skip_train_only_evaluates():
    cfg = config("--micro-batch-size 2 --train-iters 5 --skip-train --eval-iters 1")
    result = pretrain(cfg)
    assert (result.iteration, result.losses) == (0, [])
    assert result.test_loss == pytest.approx(_mean_loss(GPTModel(cfg).eval(), "test", cfg, 0, 2), rel=1e-6)


def test_resume_after_exit_is_bit_exact(tmp_path):
    # dropout on: bit-exactness needs the RNG streams restored too; validation continues at its position
    flags = (
        "--micro-batch-size 2 --global-batch-size 4 --train-iters 6 --eval-interval 2 --eval-iters 1 "
        "--hidden-dropout 0.1 --attention-dropout 0.1 --lr-warmup-iters 2"
    )
    straight = pretrain(config(flags))
    ckpt = str(tmp_path / "ckpt")
    first = pretrain(config(f"{flags} --save {ckpt} --save-interval 100 --exit-interval 3"))
    assert (first.iteration, first.exit_reason) == (3, "exit-interval")
    resumed = pretrain(config(f"{flags} --save {ckpt} --save-interval 100 --load {ckpt}"))
    assert first.losses + resumed.losses == straight.losses
    assert resumed.validation_losses == [v for v in straight.validation_losses if v[0] > 3]
    assert resumed.test_loss == straight.test_loss
    assert (resumed.iteration, resumed.consumed_train_samples) == (6, 24)


def test_sigterm_saves_a_checkpoint_when_asked(tmp_path):
    from megatron_lite.training.checkpointing import read_latest_iteration

    provider, _ = instrumented(sigterm_at=2)
    ckpt = str(tmp_path / "ckpt")
    result = pretrain(
        config(f"--micro-batch-size 2 --train-iters 6 --save {ckpt} --save-interval 5 --exit-signal-handler"),
        model_provider=provider,
    )
    assert (result.iteration, result.exit_reason) == (2, "signal")
    assert read_latest_iteration(ckpt) == 2


def _verse_dataset(tmp_path) -> str:
    """Byte-tokenised documents of one repeated verse, preprocessed to .bin/.idx; returns the data prefix."""
    from megatron_lite.core.datasets.preprocessing import preprocess_main

    corpus = tmp_path / "corpus.jsonl"
    verse = "Of Mans First Disobedience, and the Fruit Of that Forbidden Tree, whose mortal tast. "
    corpus.write_text("".join(json.dumps({"text": verse * (20 + i)}) + "\n" for i in range(30)))
    prefix = str(tmp_path / "verse")
    preprocess_main(
        [
            "--input",
            str(corpus),
            "--output-prefix",
            prefix,
            "--tokenizer-type",
            "ByteTokenizer",
            "--append-eod",
            "--workers",
            "1",
        ]
    )
    return prefix


def test_trains_on_preprocessed_text(tmp_path):
    # End to end with the data pipeline: byte-tokenised documents -> .bin/.idx -> GPTDataset -> the loop.
    prefix = _verse_dataset(tmp_path)
    flags = (
        "--num-layers 1 --hidden-size 32 --num-attention-heads 4 --seq-length 32 --micro-batch-size 4 "
        f"--lr 2e-2 --train-iters 150 --eval-interval 150 --eval-iters 2 --num-workers 0 --peak-tflops 1 "
        f"--hidden-dropout 0 --attention-dropout 0 --tokenizer-type ByteTokenizer --split 8,1,1 "
        f"--data-path {prefix}_text_document --data-cache-path {tmp_path / 'cache'}"
    )
    result = pretrain(parse_config(flags.split()))
    first, last = result.losses[0][1], result.losses[-1][1]
    assert abs(first - math.log(257)) < 0.1  # uniform over the byte vocabulary at init
    # below the ~2.9 nats of English letter frequencies: it learned the repeated verse, not just unigrams
    assert last < 1.5 and result.last_validation_loss < 1.5


def test_the_loaders_causal_mask_leaves_attention_on_its_causal_path(tmp_path, monkeypatch):
    # Megatron's data loader makes a [b, 1, s, s] mask by default; unless documents are separated
    # (--reset-attention-mask) it is the causal mask the model applies anyway, so the model is not given it.
    from megatron_lite.core.models.gpt import attention

    seen = []
    sdpa = attention.F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append(kwargs.get("attn_mask") is None and kwargs.get("is_causal", False))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", spy)
    prefix = _verse_dataset(tmp_path)
    flags = (
        "--num-layers 1 --hidden-size 32 --num-attention-heads 4 --seq-length 32 --micro-batch-size 2 "
        "--lr 1e-3 --train-iters 2 --eval-iters 0 --num-workers 0 --tokenizer-type ByteTokenizer --split 8,1,1 "
        "--attention-dropout 0 --hidden-dropout 0 "
        f"--data-path {prefix}_text_document --data-cache-path {tmp_path / 'cache'}"
    )
    with_mask = pretrain(parse_config(flags.split()))
    assert seen and all(seen)
    seen.clear()
    without = pretrain(parse_config([*flags.split(), "--no-create-attention-mask-in-dataloader"]))
    assert with_mask.losses == without.losses
    seen.clear()
    pretrain(parse_config([*flags.split(), "--reset-attention-mask"]))
    assert seen and not any(seen)  # documents separated: the mask goes to the model


def test_eod_masks_reach_the_model():
    # lr 0: the first iteration's loss is the masked mean of the model's per-token loss on that batch
    cfg = config(
        "--micro-batch-size 2 --train-iters 1 --lr 0 --vocab-size 6 --reset-attention-mask --reset-position-ids --eod-mask-loss"
    )
    result = pretrain(cfg)
    ds = MockGPTDataset(
        2,
        cfg.seq_length,
        6,
        cfg.seed,
        "train",
        eod=5,
        reset_position_ids=True,
        reset_attention_mask=True,
        eod_mask_loss=True,
    )
    batch = {k: torch.stack([ds[0][k], ds[1][k]]) for k in ds[0]}
    assert batch["attention_mask"].shape == (2, 1, 8, 8)
    with torch.no_grad():
        per_token = GPTModel(cfg).eval()(
            batch["tokens"], batch["position_ids"], batch["attention_mask"], batch["labels"]
        )
    expected = (per_token * batch["loss_mask"]).sum() / batch["loss_mask"].sum()
    assert result.losses[0][1] == pytest.approx(expected.item(), rel=1e-6)
    assert 0 < batch["loss_mask"].sum() < 16


def test_fp32_matmul_precision_is_applied_and_logged(capsys):
    with matmul_precision(torch.get_float32_matmul_precision()):  # restored afterwards
        pretrain(config("--micro-batch-size 2 --train-iters 1 --fp32-matmul-precision high"))
        line = next(t for t in capsys.readouterr().out.splitlines() if "fp32 matmul precision" in t)
        assert line.startswith("> fp32 matmul precision: high (set explicitly; rel. error ")
        assert torch.get_float32_matmul_precision() == "high"
        # auto: whatever this machine's measurement picks is logged and applied.
        pretrain(config("--micro-batch-size 2 --train-iters 1"))
        line = next(t for t in capsys.readouterr().out.splitlines() if "fp32 matmul precision" in t)
        chosen = torch.get_float32_matmul_precision()
        assert line.startswith(f"> fp32 matmul precision: {chosen} (auto; highest (torch default)")


@pytest.mark.slow
def test_compiled_training_matches_eager():
    # torch.compile (inductor, system C compiler on CPU) fuses elementwise ops, which may reorder float
    # sums: equal to eager within fp32 rounding, and it must really train the same model.
    eager = pretrain(config("--micro-batch-size 2 --train-iters 4"))
    compiled = pretrain(config("--micro-batch-size 2 --train-iters 4 --compile"))
    a, b = [v for _, v in eager.losses], [v for _, v in compiled.losses]
    assert b == pytest.approx(a, rel=1e-5, abs=0)


def test_resume_keeps_the_checkpointed_runs_fp32_matmul_path(tmp_path, monkeypatch, capsys):
    # "auto" decides by timing; on a busy machine a restart could pick another path and break bit-exact
    # resume, so a resumed auto run takes the path the checkpointed run used.
    ckpt = tmp_path / "ckpt"
    with matmul_precision(torch.get_float32_matmul_precision()):  # restored afterwards
        pretrain(
            config(
                f"--micro-batch-size 2 --train-iters 2 --fp32-matmul-precision medium --save {ckpt} --save-interval 2"
            )
        )

        def picks_highest(device, policy, group=None):
            torch.set_float32_matmul_precision("highest")
            return "highest (auto; stubbed)"

        monkeypatch.setattr(training, "configure_matmul_precision", picks_highest)
        capsys.readouterr()
        pretrain(
            config(f"--micro-batch-size 2 --train-iters 4 --load {ckpt} --save {ckpt} --save-interval 2")
        )
        assert torch.get_float32_matmul_precision() == "medium"
        assert "> fp32 matmul precision: medium (the checkpointed run's choice)" in capsys.readouterr().out
