"""TikTokenizer: Megatron's vocabulary file, ids offset by the special tokens, and its one-line errors."""

import json

import pytest
import tiktoken
from tokenizer.tokenizer_files import SENTENCES, gpt2_ranks_bytes_first, paragraphs, write_tiktoken_vocab

from megatron_lite.errors import UserError
from megatron_lite.tokenizer import build_tokenizer
from megatron_lite.tokenizer.tiktoken_tokenizer import PATTERN_TIKTOKEN_V1, PATTERN_TIKTOKEN_V2

GPT2_TOKENS = len(gpt2_ranks_bytes_first())  # 50256 BPE tokens (no <|endoftext|>)


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
    """The bundled GPT-2 ranks as Megatron's JSON and as a .tiktoken file."""
    directory = tmp_path_factory.mktemp("tiktoken")
    tokens = gpt2_ranks_bytes_first()
    return {
        "tokens": tokens,
        "json": str(write_tiktoken_vocab(directory / "vocab.json", tokens, "json")),
        "tiktoken": str(write_tiktoken_vocab(directory / "vocab.tiktoken", tokens, "tiktoken")),
    }


def reference(tokens, pattern, inner):
    """tiktoken itself on the file's first `inner` ranks, without any offset."""
    ranks = {token: rank for rank, token in enumerate(tokens[:inner])}
    return tiktoken.Encoding(name="reference", pat_str=pattern, mergeable_ranks=ranks, special_tokens={})


@pytest.mark.parametrize("pattern, regex", [("v1", PATTERN_TIKTOKEN_V1), ("v2", PATTERN_TIKTOKEN_V2)])
@pytest.mark.parametrize("fmt", ["json", "tiktoken"])
def test_ids_are_the_library_ids_after_the_special_tokens(vocab, pattern, regex, fmt):
    vocab_size = 1000 + GPT2_TOKENS
    tok = build_tokenizer(
        "TikTokenizer", tokenizer_model=vocab[fmt], tiktoken_pattern=pattern, vocab_size=vocab_size
    )
    ref = reference(vocab["tokens"], regex, GPT2_TOKENS)
    assert tok.vocab_size == vocab_size
    # Megatron: the special tokens are ids 0..999 (<unk> <s> </s>, then fillers); eod = eos = </s>.
    assert (tok.unk, tok.bos, tok.eos, tok.eod, tok.pad) == (0, 1, 2, 2, None)
    for text in SENTENCES + paragraphs(chars=20_000):
        assert tok.encode(text) == [i + 1000 for i in ref.encode_ordinary(text)]
    # Merged tokens keep their GPT-2 ranks: where the pre-tokenisation agrees, ids are GPT-2's + 1000.
    assert tok.encode("Hello world") == [15496 + 1000, 995 + 1000]
    assert tok.decode(tok.encode(SENTENCES[3])) == SENTENCES[3]
    assert tok.decode([1, 2, 5 + 1000]) == "<s></s>\x05"  # special ids decode to their names
    assert tok.decode([vocab_size, vocab_size + 7]) == ""  # padded-vocabulary ids have no text


def test_vocabulary_is_cut_to_vocab_size(vocab):
    tok = build_tokenizer(
        "TikTokenizer",
        tokenizer_model=vocab["json"],
        vocab_size=600,
        tiktoken_num_special_tokens=100,
        tiktoken_special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
    )
    ref = reference(vocab["tokens"], PATTERN_TIKTOKEN_V2, 500)  # the default pattern is v2
    assert (tok.vocab_size, tok.pad, tok.eod) == (600, 3, 2)
    assert tok.special_tokens[:5] == ["<unk>", "<s>", "</s>", "<pad>", "<SPECIAL_4>"]
    text = paragraphs(chars=5_000)[3]
    ids = tok.encode(text)
    assert ids == [i + 100 for i in ref.encode_ordinary(text)] and max(ids) < 600
    # A special token written in the text stays text (encode_ordinary, as Megatron's tokenize).
    assert 2 not in tok.encode("a</s>b")


@pytest.mark.parametrize(
    "options, message",
    [
        (
            {},
            r"has 50256 tokens, but --vocab-size 131072 less --tiktoken-num-special-tokens 1000 needs 130072",
        ),
        ({"vocab_size": 2000, "tiktoken_special_tokens": ["<s>", "</s>"]}, "must include <unk> <s> </s>"),
        (
            {"vocab_size": 2000, "tiktoken_special_tokens": ["<unk>", "<s>", "</s>", "<s>"]},
            "a token is listed twice",
        ),
        (
            {"vocab_size": 2000, "tiktoken_num_special_tokens": 2},
            "--tiktoken-num-special-tokens 2 is fewer than",
        ),
        ({"vocab_size": 1000}, "--tiktoken-num-special-tokens 1000 leaves no room"),
        ({"vocab_size": 2000, "vocab_file": "x.json"}, "TikTokenizer takes no --vocab-file/--merge-file"),
    ],
)
def test_setting_errors(vocab, options, message):
    with pytest.raises(UserError, match=message):
        build_tokenizer("TikTokenizer", tokenizer_model=vocab["json"], **options)


def test_file_errors(tmp_path, vocab):
    with pytest.raises(UserError, match="TikTokenizer needs --tokenizer-model"):
        build_tokenizer("TikTokenizer", vocab_size=2000)
    with pytest.raises(UserError, match="nope.json: file not found"):
        build_tokenizer("TikTokenizer", tokenizer_model=str(tmp_path / "nope.json"), vocab_size=2000)
    entries = json.loads(open(vocab["json"]).read())[:1300]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([entries[1], *entries[1:]]))
    with pytest.raises(UserError, match="entry 0 has rank 1; ranks must be 0, 1, 2"):
        build_tokenizer("TikTokenizer", tokenizer_model=str(bad), vocab_size=2000)
    swapped = [dict(e) for e in entries]
    swapped[0]["token_bytes"], swapped[1]["token_bytes"] = (
        entries[1]["token_bytes"],
        entries[0]["token_bytes"],
    )
    bad.write_text(json.dumps(swapped))
    with pytest.raises(UserError, match="rank 0 must be the single byte 0"):
        build_tokenizer("TikTokenizer", tokenizer_model=str(bad), vocab_size=2000)
    bad.write_text("[1, 2")
    with pytest.raises(UserError, match="bad.json: not valid JSON"):
        build_tokenizer("TikTokenizer", tokenizer_model=str(bad), vocab_size=2000)
    bad.write_text("hello world\n")
    with pytest.raises(UserError, match=r"bad.json:1: neither Megatron's tiktoken JSON nor"):
        build_tokenizer("TikTokenizer", tokenizer_model=str(bad), vocab_size=2000)


def test_unreadable_vocabulary_is_one_line(monkeypatch, vocab):
    import builtins

    import megatron_lite.tokenizer.base as base

    def deny(path, *args, **kwargs):
        if str(path) == vocab["json"]:
            raise PermissionError(13, "Permission denied", path)
        return builtins.open(path, *args, **kwargs)

    monkeypatch.setattr(base, "open", deny, raising=False)
    with pytest.raises(
        UserError, match=r"^--tokenizer-model .*vocab\.json: cannot be read \(Permission denied\)"
    ):
        build_tokenizer("TikTokenizer", tokenizer_model=vocab["json"], vocab_size=2000)
