"""Greedy decoding speed of our GPTModel with and without the KV cache, against HF generate on the same weights.

    python benchmarks/bench_generate.py                          # cpu-small, fp32, 5 rounds
    python benchmarks/bench_generate.py --config gpt2-124m       # 3 rounds by default
    python benchmarks/bench_generate.py --config all --new-tokens 128 --prompt-tokens 32
    python benchmarks/bench_generate.py --device cuda --dtype bf16

Batch 1, a random prompt, greedy decoding of exactly --new-tokens tokens (HF: min_new_tokens equal to
max_new_tokens and no eos, so it cannot stop early). Contenders:
  ours (KV cache)          megatron_lite.inference.generate(..., greedy=True)
  ours (cache, F.linear)   the same with decode_linear="torch", when the default picked another
                           matrix-vector kernel (fp32 on CPU: oneDNN's): what that choice buys here
  ours (no cache)          the same with use_kv_cache=False: the whole context again every step
  HF generate              transformers' GPT2LMHeadModel.generate(do_sample=False, use_cache=True),
                           with our model's weights exported in memory by megatron_lite.convert.gpt2
                           (skipped, with a printed line, when transformers is not installed)
Each round runs every contender once, in a rotated order, so drifts in machine load hit all alike; the
median and best round per contender are reported in tokens per second (prefill included), with the
ratios cache / no-cache and ours / HF. The greedy tokens of all contenders are compared first: a ratio
between runs that decode different sequences would compare unlike work. In fp32 they must be equal
(exit status 1 otherwise); under bf16 autocast rounding may legitimately diverge, which is printed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_lite.config import MegatronConfig  # noqa: E402
from megatron_lite.core.models.gpt import GPTModel  # noqa: E402
from megatron_lite.inference import generate  # noqa: E402
from megatron_lite.parallel_state import ParallelState  # noqa: E402

CONFIGS = {
    # nanoGPT's shakespeare-char shape on the byte vocabulary (257, padded to 384 as GPTModel pads).
    "cpu-small": dict(num_layers=6, hidden_size=384, num_attention_heads=6, vocab=257, max_positions=512),
    # GPT-2 small: 12 x 768, 12 heads, the 50257-token BPE vocabulary, 1024 positions.
    "gpt2-124m": dict(
        num_layers=12, hidden_size=768, num_attention_heads=12, vocab=50257, max_positions=1024
    ),
}
# Rounds per config when --rounds is not given: the no-cache contender of gpt2-124m takes about a minute.
DEFAULT_ROUNDS = {"cpu-small": 5, "gpt2-124m": 3}
DTYPES = {"fp32": None, "bf16": torch.bfloat16}
# A random model with the usual init std 0.02 has nearly flat logits: the top two of 50k are often within
# float rounding of each other, and paths that sum in different orders (ours vs HF) may then pick
# different tokens. A wider init spreads the logits so that greedy decoding is a well-posed comparison.
INIT_STD = 0.1

Decode = Callable[[list[int], int], list[int]]


def build_config(name: str, min_positions: int = 0) -> MegatronConfig:
    """The benchmark's model config; max positions are raised to min_positions when that is larger."""
    shape = dict(CONFIGS[name])
    vocab = shape.pop("vocab")
    positions = max(shape.pop("max_positions"), min_positions)
    cfg = MegatronConfig(
        **shape,
        seq_length=min(positions, 1024),
        max_position_embeddings=positions,
        init_method_std=INIT_STD,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        micro_batch_size=1,
        train_iters=1,
        lr=1e-4,
        mock_data=True,
        seed=1234,
    )
    return cfg.finalize(world_size=1, vocab_size=vocab)


def random_prompt(vocab_size: int, length: int, seed: int = 0) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (length,), generator=generator).tolist()


def autocast_context(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def ours_decoder(
    model: GPTModel, *, use_kv_cache: bool, dtype: torch.dtype | None, decode_linear: str = "auto"
) -> Decode:
    def decode(prompt: list[int], new_tokens: int) -> list[int]:
        return generate(
            model,
            prompt,
            new_tokens,
            greedy=True,
            use_kv_cache=use_kv_cache,
            autocast_dtype=dtype,
            decode_linear=decode_linear,
        )

    return decode


def hf_model_from_ours(model: GPTModel) -> torch.nn.Module:
    """A transformers GPT2LMHeadModel holding `model`'s weights, through our converter's export mapping."""
    import transformers

    from megatron_lite.convert import gpt2
    from megatron_lite.convert.common import TensorSource

    cfg = model.config
    gpt2.check_exportable(cfg, transformers)
    state = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    # Checkpoints (the export's input) hold the true vocabulary; the model's padding rows are dropped.
    state["embedding.word_embeddings.weight"] = state["embedding.word_embeddings.weight"][: cfg.vocab_size]
    src = TensorSource(state, "the benchmark's model")
    weights = gpt2.weights_to_hf(src, cfg)
    if src.unused():
        raise RuntimeError(f"the export left tensors unused: {', '.join(src.unused())}")
    config = gpt2.hf_config(cfg, transformers, dtype="float32", eos=None, extra={})
    hf = transformers.GPT2LMHeadModel(config)
    missing, unexpected = hf.load_state_dict(weights, strict=False)
    # The tied lm_head is the only weight the export does not write: HF ties it to wte itself.
    if unexpected or [m for m in missing if m != "lm_head.weight"]:
        raise RuntimeError(f"HF state dict mismatch: missing {missing}, unexpected {unexpected}")
    hf.tie_weights()
    device = next(model.parameters()).device
    return hf.to(device).eval()


def hf_decoder(hf: torch.nn.Module, device: torch.device, dtype: torch.dtype | None) -> Decode:
    # No eos (the token ids are random), a pad id only to keep generate from warning about it.
    hf.generation_config.eos_token_id = None
    hf.generation_config.bos_token_id = None
    hf.generation_config.pad_token_id = 0

    def decode(prompt: list[int], new_tokens: int) -> list[int]:
        input_ids = torch.tensor([prompt], device=device)
        with torch.inference_mode(), autocast_context(device, dtype):
            out = hf.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                use_cache=True,
                eos_token_id=None,
                pad_token_id=0,
            )
        return out[0, len(prompt) :].tolist()

    return decode


@dataclass
class Contender:
    name: str
    decode: Decode
    seconds: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)


def make_contenders(
    model: GPTModel, device: torch.device, dtype: torch.dtype | None, with_hf: bool
) -> list[Contender]:
    contenders = [
        Contender("ours (KV cache)", ours_decoder(model, use_kv_cache=True, dtype=dtype)),
        Contender("ours (no cache)", ours_decoder(model, use_kv_cache=False, dtype=dtype)),
    ]
    choice = model.init_kv_cache(1, 1).decode_linear
    if dtype is not None:
        print("decode linear: torch (F.linear: autocast casts only the inputs of the ops it knows)")
    elif choice.name != "torch":
        print(choice.description)
        decoder = ours_decoder(model, use_kv_cache=True, dtype=dtype, decode_linear="torch")
        contenders.insert(1, Contender("ours (cache, F.linear)", decoder))
    else:
        print(choice.description)
    if with_hf:
        try:
            import transformers

            transformers.logging.set_verbosity_error()
        except ImportError:
            print("HF generate: skipped (transformers is not installed: pip install -e .[hf])")
            return contenders
        contenders.append(Contender("HF generate", hf_decoder(hf_model_from_ours(model), device, dtype)))
    return contenders


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The first index where the two token lists differ (a length difference counts), else None."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def compare_tokens(contenders: list[Contender]) -> tuple[bool, list[str]]:
    """Whether every contender decoded the same tokens as the first, and one line per comparison."""
    reference = contenders[0]
    same, lines = True, []
    for other in contenders[1:]:
        at = first_difference(reference.tokens, other.tokens)
        if at is None:
            lines.append(f"  {other.name} == {reference.name}: {len(other.tokens)} identical tokens")
        else:
            same = False
            lines.append(f"  {other.name} != {reference.name}: first difference at new token {at}")
    return same, lines


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(contender: Contender, prompt: list[int], new_tokens: int, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    tokens = contender.decode(prompt, new_tokens)
    _sync(device)
    seconds = time.perf_counter() - start
    contender.tokens = tokens
    return seconds


def run_config(name: str, args: argparse.Namespace, device: torch.device) -> bool:
    dtype = DTYPES[args.dtype]
    # Every contender decodes inside the position window: past it ours re-prefills, HF stops.
    cfg = build_config(name, args.prompt_tokens + args.new_tokens)
    model = GPTModel(cfg, ParallelState(device=device)).eval()
    params = sum(p.numel() for p in model.parameters())
    rounds = args.rounds or DEFAULT_ROUNDS[name]
    print(
        f"\n== {name}: {cfg.num_layers} layers, hidden {cfg.hidden_size}, {cfg.num_attention_heads} heads, "
        f"vocab {cfg.vocab_size} (padded {cfg.padded_vocab_size}), {params / 1e6:.1f}M parameters; "
        f"{args.dtype}, prompt {args.prompt_tokens} + {args.new_tokens} new tokens, {rounds} rounds"
    )
    prompt = random_prompt(cfg.vocab_size, args.prompt_tokens, seed=args.seed)
    contenders = make_contenders(model, device, dtype, with_hf=not args.no_hf)
    if args.no_uncached:
        contenders = [c for c in contenders if c.name != "ours (no cache)"]

    for contender in contenders:  # warm-up: allocator, kernel selection, lazy imports
        contender.decode(prompt, min(8, args.new_tokens))
    for r in range(rounds):
        shift = r % len(contenders)
        for contender in contenders[shift:] + contenders[:shift]:
            contender.seconds.append(timed(contender, prompt, args.new_tokens, device))

    same, lines = compare_tokens(contenders)
    print("greedy tokens:")
    for line in lines:
        print(line)
    if not same:
        verdict = "MISMATCH: the ratios below compare different sequences"
        if dtype is not None:
            verdict += " (bf16 rounding can flip near-tied greedy choices)"
        print(f"  {verdict}")

    rates = {}
    print(f"{'contender':<24} {'median tok/s':>13} {'best tok/s':>11}   rounds (s)")
    for c in contenders:
        median, best = args.new_tokens / statistics.median(c.seconds), args.new_tokens / min(c.seconds)
        rates[c.name] = (median, best)
        print(f"{c.name:<24} {median:>13.1f} {best:>11.1f}   {' '.join(f'{s:.2f}' for s in c.seconds)}")

    def ratio(a: str, b: str) -> None:
        if a in rates and b in rates:
            m, best = rates[a][0] / rates[b][0], rates[a][1] / rates[b][1]
            print(f"{a} / {b}: {m:.2f}x (median), {best:.2f}x (best)")

    ratio("ours (KV cache)", "ours (no cache)")
    ratio("ours (KV cache)", "HF generate")
    ratio("ours (KV cache)", "ours (cache, F.linear)")
    return same or dtype is not None


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo, or what platform knows elsewhere."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=[*sorted(CONFIGS), "all"], default="cpu-small")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, help="Timed rounds per contender (default: 5, gpt2-124m 3).")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="bf16 runs under autocast.")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random prompt.")
    parser.add_argument("--no-hf", action="store_true", help="Skip the HF generate contender.")
    parser.add_argument("--no-uncached", action="store_true", help="Skip ours without the KV cache.")
    args = parser.parse_args(argv)
    if args.prompt_tokens < 1 or args.new_tokens < 1:
        parser.error("--prompt-tokens and --new-tokens must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({cpu_name()})"
    print(
        f"torch {torch.__version__}, device {where}, {torch.get_num_threads()} threads, "
        f"fp32 matmul precision {torch.get_float32_matmul_precision()}"
    )
    names = sorted(CONFIGS) if args.config == "all" else [args.config]
    ok = all([run_config(name, args, device) for name in names])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
