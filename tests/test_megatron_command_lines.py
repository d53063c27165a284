"""Real Megatron-LM command lines, verbatim, shrunk to this machine: each trains 3 iterations or stops in one line.

Where a line stops, the line must name a GPU-only feature or the open issue that will make it run; no flag is
ever "unrecognized". The expected outcome of each line is pinned below, so a line that starts to fail, or
starts to run, changes a test.
"""

from __future__ import annotations

import gzip
import json
import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import PRETRAIN_GPT, ROOT, subprocess_env
from tests.megatron_command_lines import DATA, example_argv, functional_argv, shrink
from tests.tokenizer.tokenizer_files import save_hf_tokenizer, train_sentencepiece

ASSETS = ROOT / "megatron_lite" / "tokenizer" / "assets"
TRAINS = "trains"

# Each line: TRAINS, or the start of the one line it stops with.
EXPECTED = {
    "examples/gpt3__train_gpt3_175b_distributed.sh": TRAINS,
    "examples/llama__train_llama3_8b_h100_fp8.sh": "--fp8-format hybrid: FP8/FP4 training needs Transformer Engine",
    "examples/mixtral__train_mixtral_8x7b_distributed.sh": TRAINS,
    "examples/gptoss__02_train.sh": "--fp8-format hybrid: FP8/FP4 training needs Transformer Engine",
    "examples/Qwen__Qwen3-8B.sh": TRAINS,
    "examples/Qwen__Qwen2.5-7B-Instruct.sh": TRAINS,
    "examples/Qwen__Qwen3-30B-A3B.sh": TRAINS,
    "examples/meta-llama__Llama-3.2-1B-Instruct.sh": TRAINS,
    "examples/deepseek-ai__DeepSeek-V2-Lite.sh": TRAINS,
    "functional_tests/gpt__gpt3_15b_8t_release.yaml": TRAINS,
    "functional_tests/gpt__gpt3_7b_tp4_pp1_memory_speed.yaml": TRAINS,
    "functional_tests/gpt__gpt3_mcore_reruns_enable.yaml": TRAINS,
    "functional_tests/gpt__gpt3_mcore_te_tp1_pp1_dist_optimizer_no_mmap_bin_files.yaml": TRAINS,
    "functional_tests/gpt__gpt3_mcore_te_tp1_pp1_uniform_full_recompute.yaml": TRAINS,
    "functional_tests/gpt__gpt3_mcore_te_tp1_pp2_rope_embeddings_interleaved_no_fusion.yaml": TRAINS,
    "functional_tests/gpt__gpt3_mcore_te_tp1_pp4_swiglu.yaml": TRAINS,
    "functional_tests/gpt__gpt3_mcore_te_tp1_pp4_vp1_calculate_per_token_loss.yaml": TRAINS,
    "functional_tests/gpt__gpt3_mcore_te_tp1_pp4_vp1_decoupled_lr.yaml": TRAINS,
    "functional_tests/gpt__gpt3_mcore_te_tp2_pp1_cp2_nondeterministic.yaml": TRAINS,
    "functional_tests/moe__gpt3_mcore_te_tp2_pp1_te_8experts2parallel_top2router.yaml": TRAINS,
    "functional_tests/mixtral__mixtral_8x7b_alltoall_tp2pp4ep4_release.yaml": TRAINS,
}


@dataclass
class TokenizerFiles:
    """The flags that point a tokenizer class at local files, and a dataset preprocessed with it."""

    flags: dict[str, str]
    data: str


def _preprocess(tmp: Path, name: str, flags: dict[str, str]) -> str:
    jsonl = tmp / "corpus.jsonl"
    if not jsonl.exists():
        with gzip.open(ROOT / "data" / "shakespeare.jsonl.gz", "rt", encoding="utf-8") as f:
            texts = [json.loads(line)["text"] for line in f][:3]
        # 60 documents: Megatron's splits (949,50,1; 99,1,0) give every used split at least one.
        docs = [t[i : i + 1000] for t in texts for i in range(0, 20000, 1000)]
        jsonl.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    prefix = tmp / name
    argv = [sys.executable, str(ROOT / "tools" / "preprocess_data.py"), "--input", str(jsonl)]
    argv += ["--output-prefix", str(prefix), "--append-eod", "--workers", "1", "--tokenizer-type", name]
    for flag, value in flags.items():
        argv += [flag, value]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return f"{prefix}_text_document"


class LocalTokenizers(dict):
    """Tokenizer files and datasets built on first use, once per test module."""

    def __init__(self, tmp: Path) -> None:
        super().__init__()
        self.tmp = tmp

    def __missing__(self, name: str) -> TokenizerFiles:
        gpt2 = {"--vocab-file": str(ASSETS / "encoder.json"), "--merge-file": str(ASSETS / "vocab.bpe")}
        if name == "GPT2BPETokenizer":
            files = TokenizerFiles(gpt2, _preprocess(self.tmp, name, gpt2))
        elif name == "NullTokenizer":
            files = TokenizerFiles({"--vocab-size": "512"}, self["GPT2BPETokenizer"].data)
        elif name in ("GPTSentencePieceTokenizer", "Llama2Tokenizer", "SentencePieceTokenizer"):
            model = self.tmp / "spm.model"
            if not model.exists():
                pytest.importorskip("sentencepiece")
                train_sentencepiece(self.tmp / "spm", vocab_size=500)
            spm = {"--tokenizer-model": str(model)}
            files = TokenizerFiles(spm, _preprocess(self.tmp, name, spm))
        elif name == "HuggingFaceTokenizer":
            pytest.importorskip("transformers")
            hf = {"--tokenizer-model": str(save_hf_tokenizer(self.tmp / "hf_tokenizer", vocab_size=500))}
            files = TokenizerFiles(hf, _preprocess(self.tmp, name, hf))
        else:
            raise KeyError(name)
        self[name] = files
        return files


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory) -> LocalTokenizers:
    return LocalTokenizers(tmp_path_factory.mktemp("tokenizers"))


def _paths(tmp: Path) -> dict[str, str]:
    names = ("ckpt", "tb", "cache", "wandb", "out", "data_root")
    paths = {name: str(tmp / name) for name in names}
    paths.update(vocab=str(ASSETS / "encoder.json"), merges=str(ASSETS / "vocab.bpe"))
    return paths


def command_line(name: str, tmp: Path, tokenizers: dict[str, TokenizerFiles]) -> list[str]:
    paths = _paths(tmp)
    paths["data"] = tokenizers["GPT2BPETokenizer"].data
    if name.startswith("examples/mixtral"):
        paths["spm"] = tokenizers["Llama2Tokenizer"].flags["--tokenizer-model"]
    kind, file = name.split("/")
    paths.setdefault("spm", "")
    argv = example_argv(file, tmp, paths) if kind == "examples" else functional_argv(file, paths)
    return shrink(argv, paths, tokenizers)


def test_every_kept_line_has_an_expectation():
    kept = {f"{p.parent.name}/{p.name}" for p in DATA.glob("*/*") if p.suffix in (".sh", ".yaml")}
    assert kept == set(EXPECTED)
    assert len(kept) >= 15


# About 4 s a line on an idle machine: all of them run in the default suite.
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_megatron_command_line(name, tmp_path, tokenizers):
    argv = command_line(name, tmp_path, tokenizers)
    print(" ".join(argv))
    proc = subprocess.run(
        [sys.executable, str(PRETRAIN_GPT), *argv],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=subprocess_env(tmp_path, OMP_NUM_THREADS="2", WANDB_MODE="offline"),
        timeout=300,
    )
    assert "unrecognized arguments" not in proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    expected = EXPECTED[name]
    if expected == TRAINS:
        assert proc.returncode == 0, proc.stderr[-3000:]
        lines = [
            line
            for line in proc.stdout.splitlines()
            if line.strip().startswith("[") and " iteration " in line
        ]
        iterations = [int(line.split(" iteration ")[1].split("/")[0]) for line in lines]
        losses = [
            float(p.split(":")[1])
            for line in lines
            for p in line.split("|")
            if p.strip().startswith("lm loss:")
        ]
        skipped = sum(
            int(p.split(":")[1]) for line in lines for p in line.split("|") if "skipped iterations" in p
        )
        # Three iterations, each with a finite loss or (fp16's first steps at loss scale 2^32) skipped, as
        # Megatron logs a skipped step: no loss in its line.
        assert iterations == [1, 2, 3] and len(losses) + skipped == 3, proc.stdout[-3000:]
        assert all(math.isfinite(x) for x in losses), proc.stdout[-3000:]
    else:
        assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
        message = proc.stderr.strip().splitlines()
        assert len(message) == 1 and message[0].startswith(f"error: {expected}"), proc.stderr
