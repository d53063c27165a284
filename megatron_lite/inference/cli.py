"""tools/generate.py: load a checkpoint, read a prompt, stream the continuation to stdout."""

from __future__ import annotations

import argparse
import sys
import typing

import torch

from megatron_lite.errors import fail
from megatron_lite.inference.generation import check_sampling_arguments, generate, load_model_for_inference
from megatron_lite.inference.streaming import IncrementalDecoder
from megatron_lite.parallel_state import pick_device


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line without the usage dump."""

    def error(self, message: str) -> typing.NoReturn:
        fail(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="generate.py", description="Generate text from a megatron-lite checkpoint.")
    parser.add_argument("--load", required=True, help="Checkpoint directory (as given to --save).")
    parser.add_argument("--prompt", help="Text to continue (default: read all of stdin).")
    parser.add_argument("--max-new-tokens", type=int, default=100, help="Tokens to generate (default 100).")
    parser.add_argument("--temperature", type=float, default=1.0, help="Softmax temperature (default 1.0).")
    parser.add_argument("--top-k", type=int, default=0, help="Sample from the k most likely (0 = off).")
    parser.add_argument(
        "--top-p", type=float, default=0.0, help="Nucleus sampling mass, applied after --top-k (0 = off)."
    )
    parser.add_argument("--greedy", action="store_true", help="Always take the most likely token.")
    parser.add_argument("--seed", type=int, help="Seed of the sampling for reproducible output.")
    parser.add_argument("--no-kv-cache", action="store_true", help="Recompute the whole context each step.")
    parser.add_argument("--bf16", action="store_true", help="Run the model under bf16 autocast.")
    parser.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda"],
        help="Device (default: cuda if available).",
    )
    return parser


def generate_main(argv: list[str] | None = None) -> int:
    """Entry point of tools/generate.py: prints the prompt, then each token as soon as it is complete text."""
    args = build_parser().parse_args(argv)
    check_sampling_arguments(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.greedy)
    prompt = args.prompt
    if prompt is None:
        # A trailing newline from `echo` or a file end is not part of the text to continue.
        prompt = sys.stdin.read().rstrip("\n")
    if not prompt:
        fail("the prompt is empty; give --prompt TEXT or pipe text on stdin")
    model, _, tokenizer = load_model_for_inference(args.load, device=pick_device(args.device))
    prompt_ids = tokenizer.encode(prompt)
    # The prompt is context: the first new token's leading space (SentencePiece, NullTokenizer) is kept.
    decoder = IncrementalDecoder(tokenizer, context=prompt_ids)
    out = sys.stdout

    def emit(token: int) -> None:
        text = decoder.push(token)
        if text:
            out.write(text)
            out.flush()

    out.write(prompt)
    out.flush()
    generate(
        model,
        prompt_ids,
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        greedy=args.greedy,
        seed=args.seed,
        eod=tokenizer.eod,
        use_kv_cache=not args.no_kv_cache,
        on_token=emit,
        autocast_dtype=torch.bfloat16 if args.bf16 else None,
    )
    out.write(decoder.flush() + "\n")
    out.flush()
    return 0
