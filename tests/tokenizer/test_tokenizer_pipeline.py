"""Each file-backed tokenizer end to end: padded vocabulary, training on its data, generation and HF export."""

import json
import math
import re
import types

import numpy as np
import pytest
from helpers import PRETRAIN_GPT, run_python, tiny_flags
from tokenizer.tokenizer_files import (
    SENTENCES,
    gpt2_ranks_bytes_first,
    paragraphs,
    save_hf_tokenizer,
    train_sentencepiece,
    write_tiktoken_vocab,
)

from megatron_lite.arguments import parse_config
from megatron_lite.core.datasets.indexed_dataset import IndexedDataset
from megatron_lite.tokenizer import build_tokenizer

pytest.importorskip("sentencepiece")
transformers = pytest.importorskip("transformers")

NAMES = [
    "NullTokenizer",
    "HuggingFaceTokenizer",
    "GPTSentencePieceTokenizer",
    "Llama2Tokenizer",
    "TikTokenizer",
]
# The tokenizers' vocabulary sizes as the files below make them (NullTokenizer: --vocab-size exactly).
VOCAB = {
    "NullTokenizer": 300,
    "HuggingFaceTokenizer": 600,
    "GPTSentencePieceTokenizer": 800,
    "Llama2Tokenizer": 800,
    "TikTokenizer": 620,
}
# Each prompt starts a corpus document, so the tiny model has seen its ids.
PROMPTS = {name: SENTENCES[0] for name in NAMES} | {"NullTokenizer": "1 2 3"}
TINY = tiny_flags(vocab_size=None, num_workers=0, peak_tflops=1, hidden_dropout=0, attention_dropout=0)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The tokenizer files, the flags that name them, and a dataset preprocessed with each tokenizer."""
    from megatron_lite.core.datasets.preprocessing import preprocess_main

    root = tmp_path_factory.mktemp("tokenizers")
    sp = str(train_sentencepiece(root / "sp"))
    tik = str(write_tiktoken_vocab(root / "tik.json", gpt2_ranks_bytes_first()[:600]))
    flags = {
        "NullTokenizer": ["--vocab-size", "300"],
        "HuggingFaceTokenizer": ["--tokenizer-model", str(save_hf_tokenizer(root / "hf"))],
        "GPTSentencePieceTokenizer": ["--tokenizer-model", sp],
        "Llama2Tokenizer": ["--tokenizer-model", sp],
        "TikTokenizer": [
            "--tokenizer-model",
            tik,
            "--vocab-size",
            "620",
            "--tiktoken-num-special-tokens",
            "20",
        ],
    }
    texts = [SENTENCES[0] + " " + p for p in paragraphs(chars=8_000)]
    rng = np.random.default_rng(0)
    numbers = ["1 2 3 " + " ".join(map(str, rng.integers(0, 300, size=60))) for _ in range(40)]
    data = {}
    for name in NAMES:
        corpus = root / f"{name}.jsonl"
        docs = numbers if name == "NullTokenizer" else texts
        corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs), encoding="utf-8")
        prefix = root / name
        argv = ["--input", str(corpus), "--output-prefix", str(prefix), "--tokenizer-type", name]
        assert preprocess_main([*argv, *flags[name], "--append-eod", "--workers", "1"]) == 0
        data[name] = (f"{prefix}_text_document", docs)
    return types.SimpleNamespace(root=root, flags=flags, data=data)


def tokenizer_flags(files, name):
    return ["--tokenizer-type", name, *files.flags[name]]


def train_flags(files, name, tmp):
    prefix, _ = files.data[name]
    return [
        *TINY,
        *tokenizer_flags(files, name),
        *("--data-path", prefix, "--split", "1,0,0", "--data-cache-path", str(tmp / "cache")),
        *("--train-iters", "2", "--eval-iters", "0", "--log-interval", "1"),
    ]


def library_ids(files, name):
    """text -> ids + eod computed by the wrapped library itself, as Megatron's class uses it."""
    if name == "NullTokenizer":
        return lambda text: [int(x) for x in text.split(" ")] + [299]  # eod = --vocab-size - 1
    model = files.flags[name][1]
    if name == "HuggingFaceTokenizer":
        ref = transformers.AutoTokenizer.from_pretrained(model, local_files_only=True)
        return lambda text: ref(text).input_ids + [ref.eos_token_id]
    if name == "TikTokenizer":
        import tiktoken

        from megatron_lite.tokenizer.tiktoken_tokenizer import PATTERN_TIKTOKEN_V2

        ranks = {token: rank for rank, token in enumerate(gpt2_ranks_bytes_first()[:600])}
        enc = tiktoken.Encoding(
            name="ref", pat_str=PATTERN_TIKTOKEN_V2, mergeable_ranks=ranks, special_tokens={}
        )
        return lambda text: [i + 20 for i in enc.encode_ordinary(text)] + [2]  # </s> is special id 2
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=model)
    bos = [sp.bos_id()] if name == "Llama2Tokenizer" else []
    return lambda text: bos + sp.encode_as_ids(text) + [sp.eos_id()]


@pytest.mark.parametrize("name", NAMES)
def test_dataset_ids_are_the_librarys(files, name):
    # preprocess_data.py with the tokenizer's flags and --append-eod: the library's ids, then eod.
    prefix, docs = files.data[name]
    ds = IndexedDataset(prefix)
    ref = library_ids(files, name)
    assert len(ds) == len(docs) and ds.dtype is np.uint16
    assert [ds[i].tolist() for i in range(len(ds))] == [ref(t) for t in docs]
    tok = build_tokenizer(parse_config(tokenizer_flags(files, name)))
    assert tok.vocab_size == VOCAB[name] and [tok.encode(t) + [tok.eod] for t in docs] == [
        ref(t) for t in docs
    ]


@pytest.mark.parametrize("name", NAMES)
def test_padded_vocab_is_megatrons_on_the_tokenizers_vocab(files, name):
    # Megatron: padded = ceil(tokenizer.vocab_size / (make_vocab_size_divisible_by * TP)) * that.
    from megatron_lite.parallel_state import ParallelState
    from megatron_lite.training.training import setup_config

    for divisible_by, tp in ((128, 1), (96, 2)):
        cfg = parse_config(
            [*TINY, *tokenizer_flags(files, name), "--make-vocab-size-divisible-by", str(divisible_by)]
            + ["--tensor-model-parallel-size", str(tp), "--train-iters", "1"]
        )
        tok = setup_config(cfg, ParallelState(world_size=2, tp_size=tp, dp_size=2 // tp))
        multiple = divisible_by * tp
        assert cfg.vocab_size == tok.vocab_size == VOCAB[name]
        assert cfg.padded_vocab_size == math.ceil(VOCAB[name] / multiple) * multiple
    literal = {300: 384, 600: 768, 800: 960, 620: 768}  # multiple 192
    assert cfg.padded_vocab_size == literal[VOCAB[name]]


@pytest.fixture(scope="module")
def trained(files, tmp_path_factory):
    """Two iterations of pretrain() on each tokenizer's dataset, saved; name -> (result, checkpoint dir)."""
    from megatron_lite.training.training import pretrain

    out = {}
    for name in NAMES:
        tmp = tmp_path_factory.mktemp(name)
        argv = train_flags(files, name, tmp) + ["--save", str(tmp / "ckpt"), "--save-interval", "2"]
        out[name] = (pretrain(parse_config(argv)), tmp / "ckpt")
    return out


@pytest.mark.parametrize("name", NAMES)
def test_trains_two_iterations(trained, name):
    result, _ = trained[name]
    assert result.iteration == 2 and [i for i, _ in result.losses] == [1, 2]
    # At initialisation the logits are nearly uniform over the tokenizer's (unpadded) vocabulary.
    assert abs(result.losses[0][1] - math.log(VOCAB[name])) < 0.3


@pytest.mark.parametrize("name", NAMES)
def test_generate_prints_the_tokenizers_text(trained, name, capsys):
    from megatron_lite.inference import generate, load_model_for_inference
    from megatron_lite.inference.cli import generate_main

    _, ckpt = trained[name]
    prompt = PROMPTS[name]
    argv = ["--load", str(ckpt), "--prompt", prompt, "--max-new-tokens", "6", "--greedy"]
    assert generate_main(argv) == 0
    printed = capsys.readouterr().out
    model, cfg, tok = load_model_for_inference(str(ckpt))
    assert (cfg.tokenizer_type, tok.vocab_size) == (name, VOCAB[name])
    ids = tok.encode(prompt)
    new = generate(model, ids, 6, greedy=True, eod=tok.eod)
    assert len(new) > 0
    # Streaming keeps the space before each new piece: the text is decode(prompt + new) after the prompt.
    assert printed == prompt + tok.decode(ids + new)[len(tok.decode(ids)) :] + "\n"


@pytest.mark.parametrize("name", NAMES)
def test_export_writes_hf_tokenizer_files_where_there_are_some(files, trained, name, tmp_path, capsys):
    from megatron_lite.convert.cli import convert_main
    from megatron_lite.convert.hf_export import TOKENIZER_CONFIG_KEY

    _, ckpt = trained[name]
    out = tmp_path / "hf"
    assert convert_main(["export", "--load", str(ckpt), "--save-dir", str(out)]) == 0
    said = capsys.readouterr().out.splitlines()[-1]
    config = json.loads((out / "config.json").read_text())
    tok = build_tokenizer(parse_config(tokenizer_flags(files, name)))
    assert (config[TOKENIZER_CONFIG_KEY], config["vocab_size"], config["eos_token_id"]) == (
        name,
        VOCAB[name],
        tok.eod,
    )
    if name != "HuggingFaceTokenizer":
        assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
        assert said == (
            f"tokenizer: {name} has no HuggingFace tokenizer files, so none were written; "
            "config.json names it in megatron_lite_tokenizer_type"
        )
        return
    assert said.startswith("tokenizer: HuggingFaceTokenizer (") and "tokenizer_config.json" in said
    exported = transformers.AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    texts = SENTENCES + paragraphs(chars=3_000)
    assert [exported(t).input_ids for t in texts] == [tok.encode(t) for t in texts]
    assert (exported.eos_token_id, len(exported)) == (tok.eod, tok.vocab_size)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_pretrain_gpt_script_trains_two_iterations(files, name, tmp_path):
    proc = run_python([PRETRAIN_GPT, *train_flags(files, name, tmp_path)], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "iteration        2/       2" in proc.stdout
    padded = math.ceil(VOCAB[name] / 128) * 128
    assert re.search(
        rf"^  padded_vocab_size \.+ {padded}$", proc.stdout, re.M
    )  # Megatron's arguments listing
