"""Tokenizer facts: GPT-2 ids and eod, user vocab files, batch encoding, the byte tokenizer, errors."""

import random
from pathlib import Path

import pytest

from megatron_lite.errors import UserError
from megatron_lite.tokenizer import ByteTokenizer, GPT2BPETokenizer, build_tokenizer

ASSETS = Path(__file__).resolve().parents[2] / "megatron_lite" / "tokenizer" / "assets"


@pytest.fixture(scope="module")
def gpt2() -> GPT2BPETokenizer:
    return build_tokenizer("GPT2BPETokenizer")


def test_gpt2_facts(gpt2):
    assert gpt2.name == "GPT2BPETokenizer"
    assert gpt2.vocab_size == 50257
    assert gpt2.eod == 50256
    assert gpt2.encode("Hello, I am") == [15496, 11, 314, 716]
    assert gpt2.decode([15496, 11, 314, 716]) == "Hello, I am"
    assert gpt2.decode([50256]) == "<|endoftext|>"
    assert gpt2.decode([15496, 50300, 11]) == "Hello,"  # padded-vocabulary ids have no text


def test_gpt2_never_makes_eod_from_text(gpt2):
    ids = gpt2.encode("a<|endoftext|>b")
    assert 50256 not in ids
    assert gpt2.decode(ids) == "a<|endoftext|>b"


def test_gpt2_from_user_vocab_and_merge_files_equals_shipped(gpt2):
    user = build_tokenizer("GPT2BPETokenizer", str(ASSETS / "encoder.json"), str(ASSETS / "vocab.bpe"))
    assert user.vocab_size == 50257 and user.eod == 50256
    for token in range(50256):
        assert user._enc.decode_single_token_bytes(token) == gpt2._enc.decode_single_token_bytes(token)
    text = "The quick brown fox's 3 jumps — naïve café, 1234567 ! \n\n  indented\ttab"
    assert user.encode(text) == gpt2.encode(text)


def _tricky_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    alphabet = [
        "a",
        "b",
        " ",
        "  ",
        "\n",
        "\t",
        "'s",
        "'ll",
        "1",
        "23",
        "é",
        "日本",
        "🙂",
        ".",
        "!",
        "\r\n",
        "<|",
        "|>",
    ]
    texts = ["", " ", "\n", "x", "<|endoftext|>", "a <|endoftext|> b", "\ud800 lone surrogate"]
    for _ in range(n):
        texts.append("".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12))))
    return texts


def test_gpt2_encode_flat_and_batch_equal_one_by_one(gpt2):
    texts = _tricky_texts(3000, seed=0)
    flat, lengths = gpt2.encode_flat(texts)
    expected = [gpt2.encode(t) for t in texts]
    assert lengths.tolist() == [len(e) for e in expected]
    assert flat.tolist() == [i for e in expected for i in e]
    assert gpt2.encode_batch(texts) == expected
    assert gpt2.encode_batch([]) == []


def test_gpt2_encode_flat_splits_large_batches(gpt2, monkeypatch):
    import megatron_lite.tokenizer.gpt2_bpe as gpt2_bpe

    monkeypatch.setattr(gpt2_bpe, "JOIN_TARGET_CHARS", 10)
    texts = _tricky_texts(500, seed=1)
    flat, lengths = gpt2.encode_flat(texts)
    assert lengths.tolist() == [len(gpt2.encode(t)) for t in texts]
    assert flat.tolist() == [i for t in texts for i in gpt2.encode(t)]


def test_byte_tokenizer_round_trip():
    tok = build_tokenizer("ByteTokenizer")
    assert isinstance(tok, ByteTokenizer)
    assert (tok.vocab_size, tok.eod, tok.name) == (257, 256, "ByteTokenizer")
    text = "héllo ✓ 𝄞\n"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode(ids + [256]) == text  # eod is not text
    assert tok.decode([0xFF, 0x41]) == "\ufffdA"
    flat, lengths = tok.encode_flat(["ab", "", "é"])
    assert flat.tolist() == [97, 98, 0xC3, 0xA9] and lengths.tolist() == [2, 0, 2]
    assert tok.encode_batch(["ab", "é"]) == [[97, 98], [0xC3, 0xA9]]


def test_unknown_tokenizer_type_names_flag_and_choices():
    with pytest.raises(UserError) as err:
        build_tokenizer("Nope")
    message = str(err.value)
    assert "--tokenizer-type" in message and "'Nope'" in message
    assert "GPT2BPETokenizer" in message and "ByteTokenizer" in message and "TikTokenizer" in message
    # Megatron's classes for other model families: refused in one line that says why.
    with pytest.raises(UserError, match=r"--tokenizer-type 'BertWordPieceCase' is for BERT models"):
        build_tokenizer("BertWordPieceCase")


def test_missing_vocab_file_is_named(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(UserError, match=r"nope\.json: --vocab-file not found"):
        build_tokenizer("GPT2BPETokenizer", str(missing), str(ASSETS / "vocab.bpe"))
    with pytest.raises(UserError, match="go together"):
        build_tokenizer("GPT2BPETokenizer", str(ASSETS / "encoder.json"), None)


def test_mismatched_vocab_and_merge_files(tmp_path):
    merges = tmp_path / "vocab.bpe"
    lines = (ASSETS / "vocab.bpe").read_text(encoding="utf-8").split("\n")
    merges.write_text("\n".join(lines[:1] + lines[2:]), encoding="utf-8")  # drop the first merge
    with pytest.raises(UserError, match="does not match"):
        build_tokenizer("GPT2BPETokenizer", str(ASSETS / "encoder.json"), str(merges))


def test_tokenizer_flags_parse_into_the_config_and_build(tmp_path):
    from tokenizer.tokenizer_files import gpt2_ranks_bytes_first, write_tiktoken_vocab

    from megatron_lite.arguments import parse_config

    vocab = write_tiktoken_vocab(tmp_path / "v.json", gpt2_ranks_bytes_first()[:400])
    flags = ["--tokenizer-type", "TikTokenizer", "--tokenizer-model", str(vocab), "--vocab-size", "300"]
    flags += ["--tiktoken-pattern", "v1", "--tiktoken-num-special-tokens", "10"]
    flags += ["--tiktoken-special-tokens", "<unk>", "<s>", "</s>", "<pad>"]
    cfg = parse_config(flags)
    assert (cfg.tokenizer_model, cfg.tiktoken_pattern, cfg.tiktoken_num_special_tokens) == (
        str(vocab),
        "v1",
        10,
    )
    assert cfg.tiktoken_special_tokens == ["<unk>", "<s>", "</s>", "<pad>"]
    tok = build_tokenizer(cfg)
    assert (tok.name, tok.vocab_size, tok.pad, tok.eod) == ("TikTokenizer", 300, 3, 2)
    null = build_tokenizer(parse_config(["--tokenizer-type", "NullTokenizer", "--vocab-size", "64"]))
    assert (null.vocab_size, null.eod) == (64, 63)
    # Megatron's GPT examples: BPE files without a type mean GPT-2 BPE.
    gpt2 = parse_config(
        ["--vocab-file", str(ASSETS / "encoder.json"), "--merge-file", str(ASSETS / "vocab.bpe")]
    )
    assert build_tokenizer(gpt2).name == "GPT2BPETokenizer"
    with pytest.raises(UserError, match="--tokenizer-type is required"):
        build_tokenizer(parse_config([]))
