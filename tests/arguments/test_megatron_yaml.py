"""Megatron-LM's own examples/gpt3/gpt_config.yaml, both versions kept verbatim, trains through --yaml-cfg.

The files are used as they are; the command line adds what they leave null (data and tokenizer paths)
and, as for the kept command lines, sizes this machine trains in seconds. Flags override the YAML.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from tests.helpers import PRETRAIN_GPT, ROOT, subprocess_env
from tests.tokenizer.tokenizer_files import paragraphs, train_sentencepiece

YAMLS = sorted((ROOT / "tests" / "data" / "megatron_yaml").glob("gpt_config_*.yaml"))
SHRINK = [
    "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
    "--seq-length", "32", "--max-position-embeddings", "64", "--micro-batch-size", "4",
    "--train-samples", "96", "--eval-iters", "1", "--log-interval", "1",
]  # fmt: skip


@pytest.fixture(scope="module")
def sentencepiece_data(tmp_path_factory):
    """A SentencePiece model (the YAML's GPTSentencePieceTokenizer) and a corpus preprocessed with it."""
    pytest.importorskip("sentencepiece")
    tmp = tmp_path_factory.mktemp("yaml_data")
    model = train_sentencepiece(tmp / "spm")
    jsonl = tmp / "corpus.jsonl"
    jsonl.write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs()))
    argv = [sys.executable, str(ROOT / "tools" / "preprocess_data.py"), "--input", str(jsonl)]
    argv += ["--output-prefix", str(tmp / "spm"), "--tokenizer-type", "GPTSentencePieceTokenizer"]
    argv += ["--tokenizer-model", str(model), "--append-eod", "--workers", "1"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return model, tmp / "spm_text_document"


def _argument(stdout: str, name: str) -> str:
    """One value of the start-up arguments block (`  name ........ value`)."""
    match = re.search(rf"^  {name} \.+ (.*)$", stdout, re.MULTILINE)
    assert match is not None, f"{name} not in the arguments block"
    return match.group(1)


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.stem)
def test_megatron_gpt_config_yaml_trains(path, tmp_path, sentencepiece_data):
    model, data = sentencepiece_data
    argv = ["--yaml-cfg", str(path), "--data-path", str(data), "--tokenizer-model", str(model), *SHRINK]
    proc = subprocess.run(
        [sys.executable, str(PRETRAIN_GPT), *argv],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=subprocess_env(tmp_path, OMP_NUM_THREADS="2"),
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    # The YAML's own settings, under TransformerConfig and argparse names, took effect...
    expected = {
        "lr": "0.00025",
        "min_lr": "2.5e-05",
        "rotary_percent": "0.5",
        "position_embedding_type": "rope",
        "layernorm_zero_centered_gamma": "True",  # TransformerConfig's name for --apply-layernorm-1p
        "add_bias_linear": "False",
        "swiglu": "True",
        "untie_embeddings_and_output_weights": "True",
        "bf16": "True",
        "tokenizer_type": "GPTSentencePieceTokenizer",
        "split": "99,1,0",
        "weight_decay": "0.1",
        "adam_beta2": "0.95",
    }
    assert {name: _argument(out, name) for name in expected} == expected
    # ...the flags given override it...
    assert (_argument(out, "num_layers"), _argument(out, "seq_length")) == ("2", "32")
    # ...and it trains 96 samples at the YAML's first batch size, 32. The 2024 file's --rampup-batch-size
    # counts iterations as Megatron's ramp-up does (while consumed <= --train-samples: 4); the 2026 file's
    # --step-batch-size-schedule gives 96 / 32 = 3.
    iterations = 4 if "rampup_batch_size:" in path.read_text() else 3
    steps = re.findall(r"global batch size:\s+(\d+) \| lm loss: ([0-9.E+-]+)", out)
    assert [batch for batch, _ in steps] == ["32"] * iterations, out[-2000:]
