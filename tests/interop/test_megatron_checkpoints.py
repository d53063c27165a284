"""Megatron-LM torch_dist checkpoints in both directions, against megatron-core itself running on CPU."""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from dist_utils import run_distributed
from helpers import PRETRAIN_GPT, ROOT, run_python

from megatron_lite.arguments import parse_config
from megatron_lite.core.models.gpt import GPTModel
from megatron_lite.errors import UserError
from megatron_lite.inference import load_model_for_inference
from megatron_lite.parallel_state import ParallelState, initialize_parallel
from megatron_lite.training.checkpointing import (
    load_checkpoint,
    load_model_weights,
    load_saved_config,
    save_checkpoint,
)
from megatron_lite.training.checkpointing.checkpoint_args import apply_checkpoint_args
from megatron_lite.training.checkpointing.chunks import load_pickled
from megatron_lite.training.lr_schedule import OptimizerParamScheduler
from megatron_lite.training.optimizer import build_optimizer

if importlib.util.find_spec("megatron.core") is None:
    pytest.skip("the interop tier needs megatron-core: pip install -e .[megatron]", allow_module_level=True)

REFERENCE = Path(__file__).with_name("mcore_reference.py")
FLAGS_JSON = ROOT / "megatron_lite" / "arguments" / "megatron_flags.json"
GPT2_VOCAB = 50257
TOKENS = [[464, 2068, 7586, 21831, 18045, 625, 262, 16931], [40, 1842, 257, 50256, 13, 0, 11, 1169]]
TOLERANCE = 1e-5
# The two styles, as megatron-core and as our flags describe them (GPT-2 BPE: bundled, no files needed).
STYLES = {
    "gpt2": {"ffn_hidden_size": 128},
    "llama": {"ffn_hidden_size": 64, "num_query_groups": 2},
}
OUR_FLAGS = {
    "gpt2": [],
    "llama": [
        "--normalization", "RMSNorm", "--position-embedding-type", "rope", "--swiglu",
        "--group-query-attention", "--num-query-groups", "2", "--untie-embeddings-and-output-weights",
        "--disable-bias-linear", "--ffn-hidden-size", "64",
    ],
}  # fmt: skip
SCHEDULER = {
    "max_lr": 1e-3,
    "min_lr": 1e-4,
    "lr_warmup_steps": 8,
    "num_steps": 28,
    "lr_decay_style": "cosine",
    "lr_decay_steps": 400,
    "start_wd": 0.01,
    "end_wd": 0.01,
    "wd_incr_style": "constant",
    "wd_incr_steps": 400,
}


def model_spec(style: str) -> dict:
    return {
        "style": style,
        "num_layers": 2,
        "hidden_size": 32,
        "num_attention_heads": 4,
        "max_position_embeddings": 32,
        "seq_length": 32,
        "vocab_size": GPT2_VOCAB,
        "padded_vocab_size": 50304,
        "make_vocab_size_divisible_by": 128,
        "tokenizer_type": "GPT2BPETokenizer",
        "flags_json": str(FLAGS_JSON),
        **STYLES[style],
    }


def run_reference(tmp: Path, spec: dict) -> None:
    """megatron-core in a process of its own (it patches torch.cuda); fails the test with its output."""
    path = tmp / f"spec_{spec['action']}.json"
    path.write_text(json.dumps({"tokens": TOKENS, "seed": 1234, "out": str(tmp), **spec}))
    result = run_python([REFERENCE, path], tmp, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.fixture(scope="module", params=["gpt2", pytest.param("llama", marks=pytest.mark.slow)])
def megatron_ckpt(request, tmp_path_factory) -> tuple[str, Path]:
    """A checkpoint megatron-core wrote as Megatron-LM's save_checkpoint does (iteration 7, Adam moments,
    scheduler, RNG), with megatron-core's logits on TOKENS; args.vocab_size unset, as Megatron-LM leaves it."""
    style = request.param
    tmp = tmp_path_factory.mktemp(f"mcore_{style}")
    args = {"vocab_size": None, "consumed_train_samples": 28, "lr": 1e-3, "min_lr": 1e-4}
    run_reference(
        tmp,
        {
            "action": "save",
            "iteration": 7,
            "model": model_spec(style),
            "optimizer": True,
            "scheduler": SCHEDULER,
            "args": args,
        },
    )
    return style, tmp


def logits(model: GPTModel) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(torch.tensor(TOKENS))[..., :GPT2_VOCAB].float()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def test_megatron_checkpoint_gives_megatron_core_logits(megatron_ckpt):
    style, tmp = megatron_ckpt
    expected = torch.load(tmp / "mcore_logits.pt")["logits"]
    model, cfg, tokenizer = load_model_for_inference(str(tmp / "ckpt"))
    assert (cfg.num_layers, cfg.hidden_size, cfg.vocab_size, tokenizer.vocab_size) == (
        2,
        32,
        GPT2_VOCAB,
        GPT2_VOCAB,
    )
    assert (cfg.normalization, cfg.swiglu) == (
        ("RMSNorm", True) if style == "llama" else ("LayerNorm", False)
    )
    diff = max_diff(logits(model), expected)
    print(f"{style}: megatron-core's checkpoint, our logits vs megatron-core's: max |diff| {diff:.2e}")
    assert diff < TOLERANCE, diff
    # The weights matter: a model with other weights is far off.
    other = GPTModel(cfg, ParallelState())
    assert max_diff(logits(other), expected) > 1e-2
    assert load_model_weights(other, tmp / "ckpt") == 7
    assert max_diff(logits(other), expected) < TOLERANCE


def resume_config(tmp: Path, style: str, *extra: str):
    flags = [
        "--load", str(tmp / "ckpt"), "--use-checkpoint-args", "--mock-data", "--micro-batch-size", "2",
        "--global-batch-size", "4", "--train-iters", "9", "--lr", "1e-3", "--min-lr", "1e-4",
        "--lr-warmup-iters", "2", "--lr-decay-style", "cosine", "--lr-decay-iters", "100",
        "--adam-beta2", "0.999", "--adam-eps", "1e-8", "--weight-decay", "0.01", "--eval-iters", "0",
        "--num-workers", "0", "--log-interval", "1", *extra,
    ]  # fmt: skip
    cfg = parse_config(flags)
    apply_checkpoint_args(cfg)
    cfg.finalize(1, GPT2_VOCAB)
    return cfg


def test_megatron_checkpoint_resumes_moments_schedule_and_progress(megatron_ckpt):
    style, tmp = megatron_ckpt
    cfg = parse_config(["--load", str(tmp / "ckpt"), "--use-checkpoint-args", "--mock-data"])
    changed = apply_checkpoint_args(cfg)
    assert "Setting num_layers to 2 from checkpoint" in changed
    cfg = resume_config(tmp, style)
    assert (cfg.num_layers, cfg.hidden_size, cfg.ffn_hidden_size) == (2, 32, STYLES[style]["ffn_hidden_size"])
    model = GPTModel(cfg, ParallelState())
    optimizer = build_optimizer(model, cfg, ParallelState())
    scheduler = OptimizerParamScheduler.from_config(optimizer, cfg)
    progress = load_checkpoint(cfg.load, model, optimizer, scheduler, cfg, ParallelState())
    assert (progress.iteration, progress.consumed_train_samples) == (7, 28)
    assert scheduler.num_steps == 28
    assert optimizer.param_groups[0]["lr"] == pytest.approx(scheduler.get_lr(optimizer.param_groups[0]))
    adam = torch.load(tmp / "mcore_adam.pt")
    for name, param in model.named_parameters():
        state = optimizer.state[param]
        assert torch.equal(state["exp_avg"], adam[f"{name}.exp_avg"]), name
        assert torch.equal(state["exp_avg_sq"], adam[f"{name}.exp_avg_sq"]), name
        assert state["step"].item() == 2.0
    # --finetune: the weights only, from iteration 0.
    fine = resume_config(tmp, style, "--finetune")
    fresh = GPTModel(fine, ParallelState())
    assert (
        load_checkpoint(
            fine.load, fresh, build_optimizer(fresh, fine, ParallelState()), None, fine, None
        ).iteration
        == 0
    )
    assert max_diff(logits(fresh), torch.load(tmp / "mcore_logits.pt")["logits"]) < TOLERANCE


def _ours_gpt2_flags(tmp: Path, tp: int) -> list[str]:
    return [
        "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
        "--max-position-embeddings", "32", "--ffn-hidden-size", "128", "--tokenizer-type", "GPT2BPETokenizer",
        "--mock-data", "--micro-batch-size", "2", "--train-iters", "1", "--lr", "1e-3", "--init-method-std", "0.2",
        "--tensor-model-parallel-size", str(tp), "--save", str(tmp / "ours"), "--save-interval", "1", "--seed", "5",
    ]  # fmt: skip


def _save_ours(rank: int, world_size: int, tmp: str, tp: int) -> None:
    pstate = initialize_parallel(tp)
    cfg = parse_config(_ours_gpt2_flags(Path(tmp), tp))
    cfg.finalize(world_size, GPT2_VOCAB)
    model = GPTModel(cfg, pstate)
    optimizer = build_optimizer(model, cfg, pstate)
    save_checkpoint(cfg.save, 3, model, optimizer, None, cfg, pstate, consumed_train_samples=6)


def _check_megatron_reads_ours(tmp: Path) -> None:
    """megatron-core's strict load of our checkpoint into its GPTModel at TP=1 gives our logits."""
    ours_cfg = load_saved_config(tmp / "ours")
    model, _, _ = load_model_for_inference(str(tmp / "ours"))
    expected = logits(model)
    spec = model_spec("gpt2")
    spec["padded_vocab_size"] = ours_cfg.padded_vocab_size
    run_reference(tmp, {"action": "load", "model": spec, "ckpt": str(tmp / "ours" / "iter_0000003")})
    loaded = torch.load(tmp / "mcore_loaded.pt")
    assert loaded["absent_from_checkpoint"] == []
    assert (loaded["iteration"], loaded["checkpoint_version"]) == (3, 3.0)
    assert loaded["args"] == {
        "num_layers": 2,
        "hidden_size": 32,
        "padded_vocab_size": ours_cfg.padded_vocab_size,
        "consumed_train_samples": 6,
    }
    assert loaded["not_asked_for"] == ["rng_state"]
    diff = max_diff(loaded["logits"], expected)
    print(f"our checkpoint in megatron-core, its logits vs ours: max |diff| {diff:.2e}")
    assert diff < TOLERANCE, diff
    assert max_diff(loaded["logits"], torch.zeros_like(expected)) > 1e-2


def test_our_checkpoint_loads_strictly_into_megatron_core(tmp_path):
    _save_ours(0, 1, str(tmp_path), 1)
    _check_megatron_reads_ours(tmp_path)


@pytest.mark.slow
def test_our_tp2_checkpoint_loads_into_megatron_core_at_tp1(tmp_path):
    run_distributed(_save_ours, 2, str(tmp_path), 2)
    _check_megatron_reads_ours(tmp_path)


def _rewrite_args(ckpt: Path, **changes) -> None:
    path = ckpt / "common.pt"
    common = load_pickled(path.read_bytes())
    for key, value in changes.items():
        setattr(common["args"], key, value)
    torch.save(common, path)


def test_megatron_checkpoints_we_cannot_read_are_one_line(megatron_ckpt, tmp_path):
    style, tmp = megatron_ckpt
    if style != "gpt2":
        pytest.skip("one style is enough for the refusals")
    mtp = tmp_path / "mtp"
    shutil.copytree(tmp / "ckpt", mtp)
    _rewrite_args(mtp / "iter_0000007", mtp_num_layers=1)
    with pytest.raises(UserError) as caught:
        load_saved_config(mtp)
    assert str(caught.value) == (
        f"checkpoint {mtp / 'iter_0000007'} was trained with --mtp-num-layers 1: megatron-lite "
        "cannot build multi-token prediction layers"
    )
    legacy = tmp_path / "legacy"
    (legacy / "iter_0000007" / "mp_rank_00").mkdir(parents=True)
    torch.save(
        {"args": argparse.Namespace(num_layers=2)},
        legacy / "iter_0000007" / "mp_rank_00" / "model_optim_rng.pt",
    )
    (legacy / "latest_checkpointed_iteration.txt").write_text("7")
    with pytest.raises(UserError) as caught:
        load_saved_config(legacy)
    assert str(caught.value) == (
        f"{legacy / 'iter_0000007'} is a legacy --ckpt-format torch checkpoint "
        "(iter_0000007/mp_rank_00/model_optim_rng.pt); megatron-lite reads torch_dist only: convert it with "
        "Megatron-LM, loading it with --ckpt-format torch --ckpt-convert-format torch_dist --ckpt-convert-save DIR"
    )
    # A release checkpoint (tracker "release", directory release/) loads its weights at iteration 0.
    release = tmp_path / "release_ckpt"
    shutil.copytree(tmp / "ckpt" / "iter_0000007", release / "release")
    (release / "latest_checkpointed_iteration.txt").write_text("release")
    cfg = resume_config(tmp, style)
    cfg.load = str(release)
    model = GPTModel(cfg, ParallelState())
    optimizer = build_optimizer(model, cfg, ParallelState())
    progress = load_checkpoint(release, model, optimizer, None, cfg, ParallelState())
    assert progress.iteration == 0 and not optimizer.state
    assert max_diff(logits(model), torch.load(tmp / "mcore_logits.pt")["logits"]) < TOLERANCE


@pytest.mark.slow
def test_pretrain_and_generate_continue_from_a_megatron_checkpoint(megatron_ckpt, tmp_path):
    style, tmp = megatron_ckpt
    flags = [str(PRETRAIN_GPT), "--load", str(tmp / "ckpt"), "--use-checkpoint-args", "--mock-data",
             "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "9", "--lr", "1e-3",
             "--min-lr", "1e-4", "--lr-warmup-iters", "2", "--lr-decay-style", "cosine", "--lr-decay-iters", "100",
             "--eval-iters", "0", "--num-workers", "0", "--log-interval", "1", "--save", str(tmp_path / "next"),
             "--save-interval", "9"]  # fmt: skip
    result = run_python(flags, tmp_path, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"resuming from {tmp / 'ckpt'} at iteration 7, 28 consumed samples" in result.stdout
    assert " iteration        8/       9 |" in result.stdout
    generated = run_python(
        [
            ROOT / "tools" / "generate.py",
            "--load",
            str(tmp / "ckpt"),
            "--prompt",
            "Hello",
            "--max-new-tokens",
            "4",
            "--greedy",
        ],
        tmp_path,
    )
    assert generated.returncode == 0, generated.stderr[-3000:]
    assert generated.stdout.startswith("Hello")


def test_convert_checkpoint_exports_a_megatron_checkpoint_to_hf(megatron_ckpt, tmp_path):
    transformers = pytest.importorskip(
        "transformers", reason="export needs the hf extra: pip install -e .[hf]"
    )
    pytest.importorskip("safetensors")
    style, tmp = megatron_ckpt
    result = run_python(
        [
            ROOT / "tools" / "convert_checkpoint.py",
            "export",
            "--load",
            str(tmp / "ckpt"),
            "--save-dir",
            str(tmp_path / "hf"),
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), local_files_only=True).eval()
    assert type(hf).__name__ == ("LlamaForCausalLM" if style == "llama" else "GPT2LMHeadModel")
    with torch.no_grad():
        hf_logits = hf(torch.tensor(TOKENS)).logits.float()
    diff = max_diff(hf_logits, torch.load(tmp / "mcore_logits.pt")["logits"])
    print(
        f"{style}: megatron-core's checkpoint exported to HF, HF logits vs megatron-core's: max |diff| {diff:.2e}"
    )
    assert diff < TOLERANCE, diff
