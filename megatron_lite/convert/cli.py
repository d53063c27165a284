"""`tools/convert_checkpoint.py export|import`: the command line over megatron_lite.convert."""

from __future__ import annotations

import argparse
import shlex
import typing

from megatron_lite.errors import fail

DESCRIPTION = (
    "Convert between megatron-lite checkpoints and HuggingFace model directories "
    "(GPT2LMHeadModel, LlamaForCausalLM, Qwen3ForCausalLM, MistralForCausalLM, MixtralForCausalLM, "
    "Qwen3MoeForCausalLM, Qwen2MoeForCausalLM, DeepseekV3ForCausalLM). Needs the hf extra: "
    "pip install -e .[hf]"
)


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line without the usage dump."""

    def error(self, message: str) -> typing.NoReturn:
        fail(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    from megatron_lite.tokenizer import BUNDLED_TOKENIZER_TYPES

    parser = _Parser(prog="convert_checkpoint.py", description=DESCRIPTION)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{export,import}")
    export = commands.add_parser(
        "export", help="megatron-lite checkpoint -> HuggingFace directory", description="Export a checkpoint."
    )
    export.add_argument("--load", required=True, help="Checkpoint directory (as given to --save).")
    export.add_argument("--iteration", type=int, help="Iteration to export (default: the latest).")
    export.add_argument("--save-dir", required=True, help="New HuggingFace model directory to write.")
    export.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16"], help="Weights dtype (default float32)."
    )
    imp = commands.add_parser(
        "import", help="HuggingFace directory -> megatron-lite checkpoint", description="Import a model."
    )
    imp.add_argument(
        "--hf-dir", required=True, help="Local HuggingFace model directory (config.json + weights)."
    )
    imp.add_argument("--save", required=True, help="New checkpoint directory to write (iteration 0).")
    imp.add_argument(
        "--tokenizer-type",
        choices=list(BUNDLED_TOKENIZER_TYPES),
        help="megatron-lite tokenizer of the model's ids (default: recorded by an export, or GPT-2 BPE files).",
    )
    return parser


def convert_main(argv: list[str]) -> int:
    """Run one conversion; UserErrors propagate to run_cli as one line."""
    args = build_parser().parse_args(argv)
    if args.command == "export":
        from megatron_lite.convert.hf_export import export_to_hf

        result = export_to_hf(args.load, args.save_dir, iteration=args.iteration, dtype=args.dtype)
        print(
            f"exported iteration {result.iteration} of {args.load} as {result.architecture} "
            f"({result.dtype}, vocabulary {result.vocab_size}) to {result.save_dir}"
        )
        if result.tokenizer_files:
            print(f"tokenizer: {result.tokenizer_type} ({', '.join(result.tokenizer_files)})")
        elif result.tokenizer_type is not None:
            print(
                f"tokenizer: {result.tokenizer_type} has no HuggingFace tokenizer files, so none were written; "
                "config.json names it in megatron_lite_tokenizer_type"
            )
        return 0
    from megatron_lite.convert.hf_import import import_from_hf

    result = import_from_hf(args.hf_dir, args.save, tokenizer_type=args.tokenizer_type)
    tokenizer = result.config.tokenizer_type or "none recognised (pass --tokenizer-type when training)"
    print(f"imported {result.architecture} from {args.hf_dir} into {result.save_dir} (iteration 0)")
    print(f"tokenizer: {tokenizer}")
    print(f"model settings: {result.args_file}")
    print(f"model flags: {shlex.join(result.model_flags)}")
    print(
        f"continue training: python pretrain_gpt.py --yaml-cfg {shlex.quote(str(result.args_file))} "
        f"--finetune --load {shlex.quote(str(result.save_dir))} --seq-length ... --micro-batch-size ... "
        "--lr ... --train-iters ... (--data-path ... or --mock-data)"
    )
    return 0
