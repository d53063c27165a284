"""HuggingFaceTokenizer: transformers' ids from a local directory, eos as eod, never the network."""

import socket
import sys

import pytest
from tokenizer.tokenizer_files import SENTENCES, paragraphs, save_hf_tokenizer

from megatron_lite.errors import UserError
from megatron_lite.tokenizer import build_tokenizer

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return str(save_hf_tokenizer(tmp_path_factory.mktemp("hf") / "tok"))


def test_ids_equal_transformers(hf_dir):
    tok = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=hf_dir)
    ref = transformers.AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    # Megatron: vocab_size = len(tokenizer), eod = eos; the ids include what the tokenizer adds (<s>).
    assert (tok.vocab_size, tok.eod, tok.bos, tok.pad) == (len(ref), ref.eos_token_id, 0, ref.pad_token_id)
    assert (tok.eod, tok.pad) == (1, 2)
    texts = SENTENCES + paragraphs(chars=20_000)
    for text in texts:
        ids = tok.encode(text)
        assert ids == ref(text).input_ids and ids[0] == 0
    assert tok.encode_batch(texts) == ref(texts).input_ids
    flat, lengths = tok.encode_flat(texts)
    assert flat.tolist() == [i for t in texts for i in ref(t).input_ids]
    ids = tok.encode(SENTENCES[1])
    assert tok.decode(ids) == ref.decode(ids) == "<s>" + SENTENCES[1]


def test_built_from_a_config(hf_dir):
    from megatron_lite.arguments import parse_config

    cfg = parse_config(["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", hf_dir])
    assert build_tokenizer(cfg).encode("the") == build_tokenizer(
        "HuggingFaceTokenizer", tokenizer_model=hf_dir
    ).encode("the")


def test_not_found_is_one_line_and_offline(tmp_path, monkeypatch):
    connects = []

    def no_network(self, address):
        connects.append(address)
        raise OSError("network use in a test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    with pytest.raises(UserError, match=r"--tokenizer-model .*/absent: directory not found"):
        build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(tmp_path / "absent"))
    # A hub name that is not in the local cache is not downloaded.
    with pytest.raises(UserError, match="not in the local HuggingFace cache; megatron-lite never downloads"):
        build_tokenizer("HuggingFaceTokenizer", tokenizer_model="megatron-lite-tests/no-such-tokenizer")
    (tmp_path / "file.json").write_text("{}")
    with pytest.raises(UserError, match="file.json: a file; give the directory"):
        build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(tmp_path / "file.json"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty: transformers cannot load a tokenizer from it"):
        build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(tmp_path / "empty"))
    with pytest.raises(UserError, match="HuggingFaceTokenizer needs --tokenizer-model"):
        build_tokenizer("HuggingFaceTokenizer")
    assert connects == []


def test_missing_transformers_is_one_line(monkeypatch, hf_dir):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(UserError, match=r"needs the 'transformers' package.*megatron-lite\[hf\]"):
        build_tokenizer("HuggingFaceTokenizer", tokenizer_model=hf_dir)


def test_hub_name_already_in_the_local_cache_loads_offline(hf_dir, tmp_path, monkeypatch):
    # A hub name resolves through the HuggingFace cache layout (models--org--name/refs/main ->
    # snapshots/<commit>/), with the network off.
    import shutil

    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--megatron-lite-tests--tiny"
    shutil.copytree(hf_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    # A model repository has its config.json too; AutoTokenizer reads it (offline, it must be cached).
    (repo / "snapshots" / commit / "config.json").write_text('{"model_type": "gpt2"}')
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(
        socket.socket, "connect", lambda self, address: pytest.fail(f"network use: {address}")
    )
    tok = build_tokenizer("HuggingFaceTokenizer", tokenizer_model="megatron-lite-tests/tiny")
    ref = transformers.AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    text = SENTENCES[0]
    assert (tok.vocab_size, tok.eod, tok.encode(text)) == (len(ref), ref.eos_token_id, ref(text).input_ids)
    # The same name with the cache moved away: the one-line "not in the local cache" error, no download.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    with pytest.raises(
        UserError, match="megatron-lite-tests/tiny: not a local directory and not in the local"
    ):
        build_tokenizer("HuggingFaceTokenizer", tokenizer_model="megatron-lite-tests/tiny")
