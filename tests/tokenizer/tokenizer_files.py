"""Builds the tokenizer files the tests need in a temporary directory, from the repo's English corpus."""

from __future__ import annotations

import base64
import gzip
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MILTON = ROOT / "data" / "milton.jsonl.gz"
KJV = ROOT / "data" / "kjv.jsonl.gz"

# A few sentences the tokenizers are compared on, besides corpus paragraphs: punctuation, digits,
# repeated spaces, newlines, non-ASCII letters.
SENTENCES = [
    "Of Mans First Disobedience, and the Fruit",
    "In the beginning God created the heaven and the earth.",
    "Hello, I am a language model; 42 apples cost $3.50  (twice   spaced).\nNew line\ttab.",
    "naïve café — Größe 日本語",
    "",
]


def paragraphs(path: Path = MILTON, chars: int = 60_000) -> list[str]:
    """Non-empty paragraphs from the start of a corpus file, about `chars` characters in all."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        text = json.loads(f.readline())["text"]
    out, total = [], 0
    for para in text.split("\n\n"):
        para = para.strip()
        if para:
            out.append(para)
            total += len(para)
        if total >= chars:
            break
    return out


def train_sentencepiece(prefix: Path, vocab_size: int = 800, **options: object) -> Path:
    """A small BPE SentencePiece model trained on Milton; returns the .model path."""
    import sentencepiece

    lines = [line for p in paragraphs() for line in p.splitlines() if line.strip()]
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_prefix=str(prefix),
        vocab_size=vocab_size,
        model_type="bpe",
        character_coverage=1.0,
        minloglevel=2,
        **options,
    )
    return Path(f"{prefix}.model")


def gpt2_ranks_bytes_first() -> list[bytes]:
    """The bundled GPT-2 BPE tokens in rank order, with ranks 0..255 reordered to be bytes 0..255.

    Megatron's tiktoken format needs rank i = byte i for i < 256. Only single bytes move: every
    merged token keeps its GPT-2 rank, so merges (ordered by rank) are unchanged.
    """
    from megatron_lite.tokenizer.gpt2_bpe import load_shipped_ranks

    by_rank = sorted(load_shipped_ranks().items(), key=lambda item: item[1])
    assert all(len(token) == 1 for token, _ in by_rank[:256])
    return [bytes([i]) for i in range(256)] + [token for token, _ in by_rank[256:]]


def write_tiktoken_vocab(path: Path, tokens: list[bytes], fmt: str = "json") -> Path:
    """Megatron's JSON list of {rank, token_bytes, token_str}, or tiktoken's `<base64> <rank>` lines."""
    if fmt == "json":
        entries = [
            {
                "rank": rank,
                "token_bytes": base64.b64encode(token).decode("ascii"),
                "token_str": token.decode("utf-8", errors="replace"),
            }
            for rank, token in enumerate(tokens)
        ]
        path.write_text(json.dumps(entries), encoding="utf-8")
    else:
        lines = [f"{base64.b64encode(token).decode('ascii')} {rank}" for rank, token in enumerate(tokens)]
        path.write_text("\n".join(lines) + "\n", encoding="ascii")
    return path


def save_hf_tokenizer(directory: Path, vocab_size: int = 600) -> Path:
    """A byte-level BPE trained with `tokenizers`, bos added before every text, saved by transformers."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(paragraphs(), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.save_pretrained(str(directory))
    return directory
