"""Megatron-LM's own command lines (kept verbatim under tests/data/megatron_command_lines), read and shrunk.

Three kinds of file, each read the way Megatron-LM itself runs it:
- `examples/*.sh` launch scripts run in bash as they are, with a `torchrun` on PATH that records its arguments;
- `examples/*__*.sh` model-config fragments (ModelOpt's conf files) are sourced and their `$MODEL_ARGS` split;
- `functional_tests/*.yaml` test cases: `MODEL_ARGS` turned into flags by the rules of Megatron's
  `tests/functional_tests/shell_test_utils/_run_training.sh` (true -> bare flag, lists -> values).
`shrink` then fits a command line to this machine: sizes, iterations, parallel sizes, paths and tokenizer
files; every other flag is kept as written.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

DATA = Path(__file__).resolve().parent / "data" / "megatron_command_lines"

# The positional arguments and environment the example scripts and test cases expect, by name.
EXAMPLE_ARGS = {
    "gpt3__train_gpt3_175b_distributed.sh": ["{ckpt}", "{tb}", "{vocab}", "{merges}", "{data}"],
    "llama__train_llama3_8b_h100_fp8.sh": ["{ckpt}", "{tb}", "MOCK", "MOCK"],
    "mixtral__train_mixtral_8x7b_distributed.sh": ["{ckpt}", "{spm}", "{data}"],
    "gptoss__02_train.sh": ["--checkpoint-path", "{ckpt}", "--tensorboard-logs-path", "{tb}"],
}
# ModelOpt's conf files hold only the model; Megatron's examples append these training flags to them.
CONF_TRAINING = "--lr 1e-4 --train-iters 3 --global-batch-size 2 --data-path {data} --split 98,1,1"

_TORCHRUN = """#!/usr/bin/env bash
# Records what Megatron-LM's script would launch: the arguments after pretrain_gpt.py, one per line (NUL-ended).
while [[ $# -gt 0 && "$1" != *pretrain_gpt.py ]]; do shift; done
shift
printf '%s\\0' "$@" > "$MEGATRON_ARGS_OUT"
"""
_PYTHON = """#!/usr/bin/env bash
if [[ "$1" == "-m" && "$2" == "torch.distributed.run" ]]; then shift 2; exec "{torchrun}" "$@"; fi
exec "{python}" "$@"
"""


def example_argv(name: str, tmp: Path, paths: dict[str, str]) -> list[str]:
    """The pretrain_gpt.py arguments an example launch script (or conf fragment) produces."""
    script = DATA / "examples" / name
    # The scripts run from a Megatron-LM checkout's root and check that pretrain_gpt.py is there.
    work = tmp / "script_cwd"
    work.mkdir(exist_ok=True)
    if not (work / "pretrain_gpt.py").exists():
        (work / "pretrain_gpt.py").symlink_to(Path(__file__).resolve().parent.parent / "pretrain_gpt.py")
    out = tmp / "captured_args"
    env = {**os.environ, "MEGATRON_ARGS_OUT": str(out)}
    if name in EXAMPLE_ARGS:
        bin_dir = tmp / "bin"
        bin_dir.mkdir(exist_ok=True)
        (bin_dir / "torchrun").write_text(_TORCHRUN)
        # Some scripts launch with `python -m torch.distributed.run`: record that, run anything else.
        (bin_dir / "python").write_text(_PYTHON.format(python=sys.executable, torchrun=bin_dir / "torchrun"))
        for stub in ("torchrun", "python"):
            (bin_dir / stub).chmod(0o755)
        env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
        args = [a.format(**paths) for a in EXAMPLE_ARGS[name]]
        Path(paths["ckpt"]).mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(["bash", str(script), *args], cwd=work, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, f"{name}: {proc.stderr}"
        return out.read_text().split("\0")[:-1]
    # A conf fragment: source it and split $MODEL_ARGS as the scripts that source it do (unquoted).
    proc = subprocess.run(
        ["bash", "-c", 'source "$0"; printf "%s\\0" $MODEL_ARGS', str(script)],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, f"{name}: {proc.stderr}"
    return proc.stdout.split("\0")[:-1] + shlex.split(CONF_TRAINING.format(**paths))


def functional_argv(name: str, paths: dict[str, str]) -> list[str]:
    """A functional test case's MODEL_ARGS as the flags Megatron's test runner passes."""
    case = yaml.safe_load((DATA / "functional_tests" / name).read_text())
    env = {
        "DATA_PATH": paths["data_root"],
        "DATA_CACHE_PATH": paths["cache"],
        "CHECKPOINT_SAVE_PATH": paths["ckpt"],
        "CHECKPOINT_LOAD_PATH": paths["ckpt"],
        "TENSORBOARD_PATH": paths["tb"],
        "DATA_BLEND": paths["data"],
        "WANDB_EXPERIMENT": "functional-test",
        "WANDB_SAVE_PATH": paths["wandb"],
        "OUTPUT_PATH": paths["out"],
    }
    argv: list[str] = []
    for key, value in case["MODEL_ARGS"].items():
        if value is True:
            argv.append(key)
            continue
        if value == "":
            continue
        if isinstance(value, list):
            argv += [key, *(_substitute(str(v), env) for v in value)]
        else:
            argv += [
                key,
                _substitute(str(value), env),
            ]  # one argument, spaces and all, as the runner quotes it
    return argv


def _substitute(text: str, env: dict[str, str]) -> str:
    for var, sub in env.items():
        text = text.replace("${" + var + "}", sub).replace("$" + var, sub)
    return text


def _items(argv: list[str]) -> list[list[str]]:
    """[[flag, value...], ...]: a token starting with -- begins a flag; others are its values."""
    items: list[list[str]] = []
    for token in argv:
        if token.startswith("--") or not items:
            items.append([token])
        else:
            items[-1].append(token)
    return items


# Flag -> its value (a list for several arguments) where the line has it; _ALWAYS ones are added if absent.
_SIZES: dict[str, str | list[str]] = {
    "--num-layers": "2",
    "--hidden-size": "64",
    "--num-attention-heads": "4",
    "--num-query-groups": "2",
    "--kv-channels": "16",
    "--ffn-hidden-size": "128",
    "--moe-ffn-hidden-size": "64",
    "--moe-shared-expert-intermediate-size": "64",
    # DeepSeek's: the first layer dense, the rest MoE, over the 2 layers; multi-latent attention's sizes.
    "--moe-layer-freq": "([0]+[1]*1)",
    "--q-lora-rank": "24",
    "--kv-lora-rank": "16",
    "--qk-head-dim": "16",
    "--qk-pos-emb-head-dim": "8",
    "--v-head-dim": "16",
    "--seq-length": "32",
    "--max-position-embeddings": "64",
    "--micro-batch-size": "1",
    "--global-batch-size": "2",
    "--eval-iters": "1",
    "--eval-interval": "3",
    "--save-interval": "3",
    "--log-interval": "1",
    "--exit-interval": "3",
    "--num-workers": "0",
    "--tensor-model-parallel-size": "1",
    "--pipeline-model-parallel-size": "1",
    "--context-parallel-size": "1",
    "--expert-model-parallel-size": "1",
    "--expert-tensor-parallel-size": "1",
    "--vocab-size": "512",
    "--lr-decay-iters": "3",
    "--lr-warmup-iters": "1",
    "--train-iters": "3",
    "--train-samples": "6",
    "--lr-decay-samples": "6",
    "--lr-warmup-samples": "2",
    "--lr-wsd-decay-iters": "1",
    "--lr-wsd-decay-samples": "2",
    "--rampup-batch-size": ["1", "1", "2"],
    "--step-batch-size-schedule": "0:1 64:2",
    "--manual-gc-interval": "1",
    "--save-retain-interval": "3",
}
# The test corpus has this many documents (tests/test_megatron_command_lines.py builds it).
CORPUS_DOCUMENTS = 60
_ALWAYS = ("--train-iters", "--eval-iters", "--log-interval", "--num-workers")


def _split_fits(split: str, documents: int) -> bool:
    """Whether every split with a non-zero weight gets a document (Megatron's rounded cumulative bookends)."""
    weights = [float(w) for w in split.strip("'\"").replace("/", ",").split(",")]
    weights += [0.0] * (3 - len(weights))
    total, ends = sum(weights), [0.0]
    for w in weights:
        ends.append(ends[-1] + w / total)
    bounds = [int(round(e * documents)) for e in ends]
    return all(w == 0 or bounds[i + 1] > bounds[i] for i, w in enumerate(weights))


def shrink(argv: list[str], paths: dict[str, str], tokenizers: dict[str, Any]) -> list[str]:
    """The same command line at a size this machine trains in seconds, with local data and tokenizer files."""
    items = _items(argv)
    flags = {item[0] for item in items}
    if "--train-samples" in flags:
        items = [i for i in items if i[0] != "--train-iters"]
    tokenizer = next((i[1] for i in items if i[0] == "--tokenizer-type" and len(i) > 1), "GPT2BPETokenizer")
    files = tokenizers[tokenizer]
    replace = dict(_SIZES)
    replace.update(
        {
            "--save": paths["ckpt"],
            "--load": paths["ckpt"],
            "--tensorboard-dir": paths["tb"],
            "--wandb-save-dir": paths["wandb"],
            "--data-cache-path": paths["cache"],
            # gloo where there is no GPU: the backend is a property of the machine, not of the model.
            "--distributed-backend": "gloo",
        }
    )
    replace.update(files.flags)
    if "--mock-data" not in flags:
        replace["--data-path"] = files.data
    out: list[list[str]] = []
    for item in items:
        flag = item[0]
        if flag == "--split" and len(item) > 1 and not _split_fits(item[1], CORPUS_DOCUMENTS):
            # A split sized for billions of documents (99990,8,2) gives a small corpus' valid split none.
            out.append([flag, "90,5,5"])
        elif flag in replace and len(item) > 1 and item[1] != "0":  # 0 (e.g. no warmup) keeps its meaning
            value = replace[flag]
            out.append([flag, *value] if isinstance(value, list) else [flag, value])
        else:
            out.append(item)
    present = {i[0] for i in out}
    for flag in _ALWAYS:
        if flag not in present and not (flag == "--train-iters" and "--train-samples" in present):
            out.append([flag, replace[flag]])
    for flag, value in files.flags.items():
        if flag not in present:
            out.append([flag, value])
    if "--mock-data" not in present and "--data-path" not in present:
        out.append(["--data-path", files.data])
    return [token for item in out for token in item]
