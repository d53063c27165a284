"""NullTokenizer: ids are the integers in the text; vocab_size and eod as Megatron-LM main defines them."""

import numpy as np
import pytest

from megatron_lite.errors import UserError
from megatron_lite.tokenizer import build_tokenizer


def test_ids_are_the_integers_and_eod_is_the_last_id():
    tok = build_tokenizer("NullTokenizer", vocab_size=1000)
    assert (tok.name, tok.vocab_size, tok.eod, tok.pad) == ("NullTokenizer", 1000, 999, -1)
    assert tok.encode("5 17 0 999") == [5, 17, 0, 999]
    assert tok.decode([5, 17, 0, 999]) == "5 17 0 999"
    assert tok.decode(np.array([3, 4])) == "3 4"
    flat, lengths = tok.encode_flat(["1 2", "3", "4 5 6"])
    assert flat.tolist() == [1, 2, 3, 4, 5, 6] and lengths.tolist() == [2, 1, 3]


def test_eod_and_pad_flags():
    tok = build_tokenizer("NullTokenizer", vocab_size=50, null_tokenizer_eod_id=0, null_tokenizer_pad_id=7)
    assert (tok.vocab_size, tok.eod, tok.pad) == (50, 0, 7)


@pytest.mark.parametrize(
    "options, text, message",
    [
        ({}, "1 2", "NullTokenizer needs --vocab-size"),
        ({"vocab_size": 10}, "1 x 2", "NullTokenizer: 'x' is not a token id"),
        ({"vocab_size": 10}, "1  2", "NullTokenizer: '' is not a token id"),
        ({"vocab_size": 10}, "3 10", r"token id 10 is outside 0\.\.9 \(--vocab-size 10\)"),
        ({"vocab_size": 10}, "-1", r"token id -1 is outside"),
        ({"vocab_size": 10, "null_tokenizer_eod_id": 10}, "1", r"--null-tokenizer-eod-id 10 is outside"),
        ({"vocab_size": 10, "tokenizer_model": "x"}, "1", "NullTokenizer takes no --tokenizer-model"),
    ],
)
def test_user_errors(options, text, message):
    with pytest.raises(UserError, match=message):
        build_tokenizer("NullTokenizer", **options).encode(text)


def test_streamed_generation_keeps_the_separating_spaces():
    from megatron_lite.inference import IncrementalDecoder

    tok = build_tokenizer("NullTokenizer", vocab_size=1000)
    decoder = IncrementalDecoder(tok, context=tok.encode("5 17"))
    assert [decoder.push(t) for t in (3, 999, 40)] + [decoder.flush()] == [" 3", " 999", " 40", ""]
