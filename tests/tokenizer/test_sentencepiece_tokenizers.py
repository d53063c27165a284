"""GPTSentencePieceTokenizer, Llama2Tokenizer, SentencePieceTokenizer: the library's ids and Megatron's specials."""

import sys

import pytest
from tokenizer.tokenizer_files import SENTENCES, paragraphs, train_sentencepiece

from megatron_lite.errors import UserError
from megatron_lite.tokenizer import build_tokenizer

sentencepiece = pytest.importorskip("sentencepiece")


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    return str(train_sentencepiece(tmp_path_factory.mktemp("sp") / "milton"))


@pytest.fixture(scope="module")
def sp(sp_model):
    return sentencepiece.SentencePieceProcessor(model_file=sp_model)


def texts():
    return SENTENCES + paragraphs(chars=20_000)


def test_gpt_sentencepiece_ids_equal_the_library(sp_model, sp):
    tok = build_tokenizer("GPTSentencePieceTokenizer", tokenizer_model=sp_model)
    assert tok.vocab_size == len(sp) == 800
    # Megatron: eod is the model's eos; bos/pad are the model's (pad disabled = -1 by default).
    assert (tok.eod, tok.bos, tok.pad) == (sp.piece_to_id("</s>"), sp.piece_to_id("<s>"), -1) == (2, 1, -1)
    for text in texts():
        assert tok.encode(text) == sp.encode_as_ids(text)
    assert tok.encode_batch(texts()) == [sp.encode_as_ids(t) for t in texts()]
    flat, lengths = tok.encode_flat(texts())
    assert flat.tolist() == [i for t in texts() for i in sp.encode_as_ids(t)]
    assert lengths.tolist() == [len(sp.encode_as_ids(t)) for t in texts()]
    ids = tok.encode(SENTENCES[1])
    assert tok.decode(ids) == sp.decode_ids(ids) == SENTENCES[1]
    assert tok.decode(ids + [tok.vocab_size + 3]) == SENTENCES[1]  # padded-vocabulary ids have no text


def test_llama2_prepends_bos(sp_model, sp):
    tok = build_tokenizer("Llama2Tokenizer", tokenizer_model=sp_model)
    assert (tok.vocab_size, tok.bos, tok.eod) == (800, 1, 2)
    for text in texts():
        assert tok.encode(text) == [1, *sp.encode(text)]
    assert tok.encode_batch(SENTENCES) == [[1, *sp.encode(t)] for t in SENTENCES]


def test_sentencepiece_tokenizer_adds_megatron_specials(sp_model, sp):
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=sp_model, vocab_extra_ids=2)
    n = len(sp)
    # <CLS> <SEP> <EOD> <MASK> and <PAD> (the model has no pad) come after the pieces; <s> and </s>
    # are the model's own; then the extra ids.
    assert (tok.cls, tok.sep, tok.eod, tok.mask, tok.pad) == (n, n + 1, n + 2, n + 3, n + 4)
    assert (tok.bos, tok.eos) == (1, 2)
    assert tok.extra_ids == [n + 5, n + 6] and tok.vocab_size == n + 7
    for text in texts():
        assert tok.encode(text) == sp.encode_as_ids(text)
    # A special token written in the text is that token; the text around it is encoded apart.
    text = "the Fruit<EOD>Of that</s> Tree"
    expected = sp.encode_as_ids("the Fruit") + [n + 2] + sp.encode_as_ids("Of that") + [2]
    assert tok.encode(text) == expected + sp.encode_as_ids(" Tree")
    assert tok.decode(sp.encode_as_ids("the Fruit") + [n + 2, 5]) == "the Fruit <EOD> " + sp.decode_ids([5])


def test_model_file_errors(tmp_path, sp_model):
    with pytest.raises(UserError, match="GPTSentencePieceTokenizer needs --tokenizer-model: a SentencePiece"):
        build_tokenizer("GPTSentencePieceTokenizer")
    with pytest.raises(UserError, match=r"--tokenizer-model .*missing\.model: file not found"):
        build_tokenizer("Llama2Tokenizer", tokenizer_model=str(tmp_path / "missing.model"))
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a model")
    with pytest.raises(UserError, match=r"junk\.model: not a SentencePiece model"):
        build_tokenizer("GPTSentencePieceTokenizer", tokenizer_model=str(junk))
    with pytest.raises(
        UserError, match="--vocab-extra-ids applies to --tokenizer-type SentencePieceTokenizer"
    ):
        build_tokenizer("Llama2Tokenizer", tokenizer_model=sp_model, vocab_extra_ids=1)
    with pytest.raises(UserError, match="Llama2Tokenizer takes no --vocab-file/--merge-file"):
        build_tokenizer("Llama2Tokenizer", "encoder.json", "vocab.bpe", tokenizer_model=sp_model)


def test_no_eos_piece_is_refused(tmp_path):
    model = train_sentencepiece(tmp_path / "noeos", vocab_size=300, eos_id=-1)
    with pytest.raises(UserError, match="the model has no eos piece"):
        build_tokenizer("GPTSentencePieceTokenizer", tokenizer_model=str(model))


def test_missing_package_is_one_line(monkeypatch, sp_model):
    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # import now raises ImportError
    with pytest.raises(UserError, match=r"needs the 'sentencepiece' package.*megatron-lite\[sentencepiece\]"):
        build_tokenizer("GPTSentencePieceTokenizer", tokenizer_model=sp_model)


@pytest.mark.parametrize("name", ["GPTSentencePieceTokenizer", "Llama2Tokenizer", "SentencePieceTokenizer"])
def test_unreadable_model_file_is_one_line(monkeypatch, sp_model, name):
    # Root reads any file, so unreadability is simulated where the check opens the file.
    import builtins

    import megatron_lite.tokenizer.base as base

    def deny(path, *args, **kwargs):
        if str(path) == sp_model:
            raise PermissionError(13, "Permission denied", path)
        return builtins.open(path, *args, **kwargs)

    monkeypatch.setattr(base, "open", deny, raising=False)
    with pytest.raises(
        UserError, match=r"^--tokenizer-model .*milton\.model: cannot be read \(Permission denied\)"
    ):
        build_tokenizer(name, tokenizer_model=sp_model)


@pytest.mark.parametrize("name", ["GPTSentencePieceTokenizer", "Llama2Tokenizer"])
def test_streamed_generation_keeps_the_spaces(sp_model, name):
    # SentencePiece drops a piece's leading space when the piece starts the decoded text; the streaming
    # decoder that tools/generate.py prints with must decode each new token after its context.
    from megatron_lite.inference import IncrementalDecoder

    tok = build_tokenizer(name, tokenizer_model=sp_model)
    ids = tok.encode(SENTENCES[0] + " " + SENTENCES[1])
    for k in range(1, len(ids)):
        decoder = IncrementalDecoder(tok, context=ids[:k])
        streamed = "".join(decoder.push(t) for t in ids[k:]) + decoder.flush()
        assert streamed == tok.decode(ids)[len(tok.decode(ids[:k])) :]
    decoder = IncrementalDecoder(tok)
    assert "".join(decoder.push(t) for t in ids) + decoder.flush() == tok.decode(ids)
    assert tok.decode(ids).count(" ") == (SENTENCES[0] + " " + SENTENCES[1]).count(" ")
