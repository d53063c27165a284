"""The command lines of tools/preprocess_data.py and tools/merge_datasets.py (Megatron's flags)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import signal
from collections.abc import Iterator, Sequence
from typing import Any

from megatron_lite.arguments.megatron_flags import flags_by_dest
from megatron_lite.config.tokenizer import TOKENIZER_TYPES, TokenizerArgs
from megatron_lite.core.datasets.preprocessing.merging import find_dataset_prefixes, merge_datasets
from megatron_lite.core.datasets.preprocessing.writing import preprocess
from megatron_lite.errors import fail

# The tokenizer settings preprocessing takes, beyond --tokenizer-type/--vocab-file/--merge-file: the same
# flags as training (Megatron's tools/preprocess_data.py adds its whole tokenizer group).
_TOKENIZER_HELP = {f.name: f.metadata["help"] for f in dataclasses.fields(TokenizerArgs)}
_TOKENIZER_HELP["vocab_size"] = "Vocabulary size, for NullTokenizer and TikTokenizer."
TOKENIZER_FLAG_DESTS = (
    "tokenizer_model",
    "vocab_size",
    "tiktoken_pattern",
    "tiktoken_num_special_tokens",
    "tiktoken_special_tokens",
    "vocab_extra_ids",
    "trust_remote_code",
    "null_tokenizer_eod_id",
    "null_tokenizer_pad_id",
)


def _add_tokenizer_flag(group: argparse._ArgumentGroup, dest: str) -> None:
    flag = flags_by_dest()[dest]
    kw: dict[str, Any] = {"dest": dest, "default": flag.default, "help": _TOKENIZER_HELP[dest]}
    if flag.action == "store_true":
        group.add_argument(*flag.flags, action="store_true", **kw)
        return
    kw["type"] = {"int": int, "float": float}.get(flag.type or "", str)
    if flag.choices is not None:
        kw["choices"] = list(flag.choices)
    if flag.nargs not in (None, 0):
        kw["nargs"] = flag.nargs
    group.add_argument(*flag.flags, **kw)


def build_preprocess_parser() -> argparse.ArgumentParser:
    """Megatron's tools/preprocess_data.py flags (the ones that apply to GPT pretraining)."""
    parser = argparse.ArgumentParser(
        prog="preprocess_data.py",
        description="Tokenise loose JSON (one object per line) into Megatron .bin/.idx datasets.",
    )
    group = parser.add_argument_group("input data")
    group.add_argument(
        "--input", required=True, help="a .jsonl or .jsonl.gz file, or a glob of them (sorted)"
    )
    group.add_argument(
        "--json-keys", nargs="+", default=["text"], help="JSON fields to extract, one dataset each"
    )
    group.add_argument(
        "--keep-newlines", action="store_true", help="accepted for compatibility; newlines are always kept"
    )
    group = parser.add_argument_group("tokenizer")
    group.add_argument(
        "--tokenizer-type",
        default="GPT2BPETokenizer",
        help=f"one of {', '.join(TOKENIZER_TYPES)} (default GPT2BPETokenizer)",
    )
    group.add_argument("--vocab-file", default=None, help="GPT-2 encoder.json (default: the shipped copy)")
    group.add_argument("--merge-file", default=None, help="GPT-2 vocab.bpe (default: the shipped copy)")
    for dest in TOKENIZER_FLAG_DESTS:
        _add_tokenizer_flag(group, dest)
    group.add_argument(
        "--append-eod", action="store_true", help="append the end-of-document token to each document"
    )
    group = parser.add_argument_group("output data")
    group.add_argument("--output-prefix", required=True, help="writes {prefix}_{key}_document.bin/.idx")
    group = parser.add_argument_group("runtime")
    group.add_argument(
        "--workers", type=int, default=1, help="tokenising processes (output is identical for any number)"
    )
    group.add_argument(
        "--partitions", type=int, default=1, help="accepted for compatibility; only 1 is supported"
    )
    group.add_argument(
        "--log-interval", type=int, default=1000, help="print progress every this many documents"
    )
    return parser


def preprocess_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of tools/preprocess_data.py."""
    args = build_preprocess_parser().parse_args(argv)
    if args.partitions != 1:
        fail(f"--partitions {args.partitions} is not supported: use --workers for parallelism (same output)")
    with _sigterm_as_interrupt():
        stats = preprocess(
            input_pattern=args.input,
            output_prefix=args.output_prefix,
            json_keys=args.json_keys,
            tokenizer_type=args.tokenizer_type,
            vocab_file=args.vocab_file,
            merge_file=args.merge_file,
            append_eod=args.append_eod,
            workers=args.workers,
            log_interval=args.log_interval,
            tokenizer_options={dest: getattr(args, dest) for dest in TOKENIZER_FLAG_DESTS},
        )
    for key, out in stats.outputs.items():
        print(
            f"Wrote {out.prefix}.bin/.idx: {out.documents} documents, {out.tokens} tokens ({out.dtype}); "
            f"dropped {out.empty} empty '{key}' documents."
        )
    return 0


def build_merge_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="merge_datasets.py",
        description="Concatenate .bin/.idx datasets into one (Megatron's add_index).",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", help="a directory: every .bin/.idx pair in it, in name order")
    source.add_argument(
        "--inputs", nargs="+", metavar="PREFIX", help="dataset prefixes, merged in the order given"
    )
    parser.add_argument("--output-prefix", required=True, help="writes {prefix}.bin/.idx")
    return parser


def merge_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of tools/merge_datasets.py."""
    args = build_merge_parser().parse_args(argv)
    prefixes = find_dataset_prefixes(args.input, exclude=args.output_prefix) if args.input else args.inputs
    with _sigterm_as_interrupt():
        out = merge_datasets(prefixes, args.output_prefix)
    print(
        f"Wrote {out.prefix}.bin/.idx: {out.documents} documents, {out.tokens} tokens ({out.dtype}) from {len(prefixes)} datasets."
    )
    return 0


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """A job scheduler stops us with SIGTERM; treat it like Ctrl-C so temporary files get removed.

    Scoped: the previous handler comes back on return, so calling the entry point in-process (tests, notebooks)
    does not leave the caller's SIGTERM turned into KeyboardInterrupt.
    """

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
