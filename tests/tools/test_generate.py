"""tools/generate.py end to end: a saved checkpoint, streamed output equal to the API, one-line errors."""

import io
import sys
from pathlib import Path

import pytest
import torch
from helpers import ROOT, run_python, tiny_config

from megatron_lite.config import MegatronConfig
from megatron_lite.core.models.gpt import GPTModel
from megatron_lite.errors import UserError
from megatron_lite.inference import generate, load_model_for_inference
from megatron_lite.inference.cli import generate_main
from megatron_lite.parallel_state import ParallelState
from megatron_lite.tokenizer import build_tokenizer
from megatron_lite.training.checkpointing import save_checkpoint

SCRIPT = ROOT / "tools" / "generate.py"
PROMPT = "Hello, wörld"


def _trained_like_model() -> tuple[MegatronConfig, GPTModel]:
    cfg = tiny_config(
        1,
        257,
        hidden_size=64,
        seq_length=32,
        init_method_std=0.3,  # spread logits: greedy choices far from ties
        tokenizer_type="ByteTokenizer",
        micro_batch_size=1,
        lr=1e-4,
        seed=11,
    )
    return cfg, GPTModel(cfg, ParallelState())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[Path, GPTModel]:
    path = tmp_path_factory.mktemp("ckpt")
    cfg, model = _trained_like_model()
    with torch.no_grad():  # make the weights differ from a fresh build of the same seed
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_checkpoint(path, 7, model, None, None, cfg, None, consumed_train_samples=0)
    return path, model


def _expected(model: GPTModel, prompt: str, n: int, **kwargs) -> str:
    tokenizer = build_tokenizer("ByteTokenizer")
    ids = generate(model, tokenizer.encode(prompt), n, eod=tokenizer.eod, **kwargs)
    return prompt + tokenizer.decode(ids) + "\n"


def test_loaded_model_equals_saved_one(checkpoint):
    path, saved = checkpoint
    model, cfg, tokenizer = load_model_for_inference(str(path))
    assert tokenizer.name == "ByteTokenizer" and cfg.tensor_model_parallel_size == 1
    assert not model.training
    for (name, a), (_, b) in zip(model.state_dict().items(), saved.state_dict().items()):
        assert torch.equal(a, b), name


def test_cli_greedy_streams_prompt_then_tokens(checkpoint, tmp_path):
    path, model = checkpoint
    argv = ["--load", str(path), "--prompt", PROMPT, "--greedy", "--max-new-tokens", "40", "--device", "cpu"]
    done = run_python([SCRIPT, *argv], tmp_path, text=False)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode("utf-8") == _expected(model, PROMPT, 40, greedy=True)


def test_cli_stdin_no_cache_and_seeded_sampling(checkpoint, monkeypatch, capsys):
    path, model = checkpoint
    monkeypatch.setattr(sys, "stdin", io.StringIO(PROMPT + "\n"))
    assert generate_main(["--load", str(path), "--greedy", "--no-kv-cache", "--max-new-tokens", "25"]) == 0
    assert capsys.readouterr().out == _expected(model, PROMPT, 25, greedy=True)

    argv = ["--load", str(path), "--prompt", PROMPT, "--seed", "5", "--top-k", "20", "--top-p", "0.9"]
    assert generate_main(argv + ["--temperature", "0.8", "--max-new-tokens", "30"]) == 0
    expected = _expected(model, PROMPT, 30, seed=5, top_k=20, top_p=0.9, temperature=0.8)
    assert capsys.readouterr().out == expected


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--prompt", ""], "the prompt is empty; give --prompt TEXT or pipe text on stdin"),
        (["--prompt", "x", "--top-p", "2"], r"--top-p must be in \[0, 1\] \(0 = off\), got 2.0"),
        (["--prompt", "x", "--temperature", "0"], "--temperature must be > 0, got 0.0; use --greedy"),
        (["--prompt", "x", "--top-k", "many"], "argument --top-k: invalid int value: 'many'"),
    ],
)
def test_cli_user_errors(checkpoint, argv, message):
    path, _ = checkpoint
    with pytest.raises(UserError, match=message):
        generate_main(["--load", str(path), *argv])


def test_cli_missing_checkpoint_is_one_line(tmp_path):
    missing = tmp_path / "nope"
    done = run_python([SCRIPT, "--load", str(missing), "--prompt", "hi"], tmp_path, timeout=120)
    assert done.returncode == 2
    assert done.stderr == (
        f"error: --load {missing}: no such directory; give a checkpoint directory written by --save\n"
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(
        UserError, match=r"no checkpoint in this directory \(no latest_checkpointed_iteration.txt\)"
    ):
        generate_main(["--load", str(empty), "--prompt", "hi"])
