"""tools/preprocess_data.py: exact round trip, identical bytes for any --workers, and every bad input."""

import gzip
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from megatron_lite.core.datasets.indexed_dataset import IndexedDataset
from megatron_lite.tokenizer import build_tokenizer

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "preprocess_data.py"
SHAKESPEARE = ROOT / "data" / "shakespeare.jsonl.gz"


def run(*args, cwd=None):
    return subprocess.run(
        [sys.executable, str(TOOL), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd or ROOT,
        timeout=300,
    )


@pytest.fixture(scope="module")
def shakespeare_outputs(tmp_path_factory):
    """All of Shakespeare preprocessed with 1 and with 2 workers."""
    out = tmp_path_factory.mktemp("shakespeare")
    results = {}
    for workers in (1, 2):
        proc = run(
            "--input",
            SHAKESPEARE,
            "--output-prefix",
            out / f"w{workers}",
            "--append-eod",
            "--workers",
            workers,
        )
        assert proc.returncode == 0, proc.stderr
        results[workers] = (out / f"w{workers}_text_document", proc)
    return results


def test_round_trip_of_all_shakespeare(shakespeare_outputs):
    prefix, proc = shakespeare_outputs[1]
    tok = build_tokenizer("GPT2BPETokenizer")
    with gzip.open(SHAKESPEARE, "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    assert len(texts) == 42
    ds = IndexedDataset(str(prefix))
    assert ds.dtype is np.uint16 and len(ds) == 42 and ds.num_documents == 42
    for i, text in enumerate(texts):
        assert ds[i].tolist() == tok.encode(text) + [50256]
    assert proc.stderr.strip().splitlines()[-1].startswith("Processed 42 documents (")
    assert proc.stderr.strip().endswith("MB/s).")
    assert f"{ds.num_tokens} tokens (uint16); dropped 0 empty 'text' documents" in proc.stdout


def test_output_identical_for_any_workers(shakespeare_outputs):
    one, two = shakespeare_outputs[1][0], shakespeare_outputs[2][0]
    for ext in (".bin", ".idx"):
        assert Path(f"{one}{ext}").read_bytes() == Path(f"{two}{ext}").read_bytes()


def test_many_small_chunks_same_bytes(tmp_path, monkeypatch):
    import megatron_lite.core.datasets.preprocessing as dp
    import megatron_lite.core.datasets.preprocessing.inputs as inputs

    lines = [json.dumps({"text": f"doc {i} " * (i % 7), "t": "x" * (i % 3)}) for i in range(3000)]
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    monkeypatch.setattr(inputs, "BLOCK_BYTES", 1000)  # ~100 chunks
    dp.preprocess(
        str(src), str(tmp_path / "a"), json_keys=["text", "t"], append_eod=True, workers=1, log=io.StringIO()
    )
    dp.preprocess(
        str(src), str(tmp_path / "b"), json_keys=["text", "t"], append_eod=True, workers=2, log=io.StringIO()
    )
    for name in ("text", "t"):
        for ext in (".bin", ".idx"):
            a = (tmp_path / f"a_{name}_document{ext}").read_bytes()
            assert a == (tmp_path / f"b_{name}_document{ext}").read_bytes()
    # 3000 docs, of which i % 7 == 0 have an empty "text" and i % 3 == 0 an empty "t".
    assert len(IndexedDataset(str(tmp_path / "a_text_document"))) == 3000 - 429
    assert len(IndexedDataset(str(tmp_path / "a_t_document"))) == 2000


def test_byte_tokenizer_keys_gzip_blank_lines_and_empty_documents(tmp_path):
    src = tmp_path / "in.jsonl.gz"
    rows = [{"text": "héllo", "title": "A"}, {"text": "", "title": "B"}, {"text": "x\ny", "title": ""}]
    body = "\n".join(json.dumps(r) for r in rows[:2]) + "\n\n  \r\n" + json.dumps(rows[2]) + "\r\n"
    with gzip.open(src, "wt", encoding="utf-8") as f:
        f.write(body)
    proc = run(
        "--input", src, "--output-prefix", tmp_path / "out", "--json-keys", "text", "title",
        "--tokenizer-type", "ByteTokenizer", "--append-eod", "--keep-newlines", "--partitions", "1",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    text = IndexedDataset(str(tmp_path / "out_text_document"))
    assert text.dtype is np.uint16
    assert [text[i].tolist() for i in range(len(text))] == [
        list("héllo".encode()) + [256],
        [120, 10, 121, 256],
    ]
    title = IndexedDataset(str(tmp_path / "out_title_document"))
    assert [title[i].tolist() for i in range(len(title))] == [[65, 256], [66, 256]]
    assert (
        "dropped 1 empty 'text' documents" in proc.stdout
        and "dropped 1 empty 'title' documents" in proc.stdout
    )
    assert "Processed 3 documents" in proc.stderr


def assert_clean_failure(proc, tmp_path, *needles, keep=()):
    """Exit status 2, one stderr line with every needle, no traceback, and no files but the inputs."""
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(keep), left


def write_lines(path, lines):
    path.write_bytes(b"".join(line + b"\n" for line in lines))


GOOD = json.dumps({"text": "fine"}).encode()


@pytest.mark.parametrize("workers", [1, 2])
def test_malformed_json(tmp_path, workers):
    src = tmp_path / "bad.jsonl"
    write_lines(src, [GOOD, GOOD, b'{"text": "unterminated'])
    proc = run("--input", src, "--output-prefix", tmp_path / "out", "--workers", workers)
    assert_clean_failure(proc, tmp_path, f"{src}:3: malformed JSON", keep=["bad.jsonl"])


def test_missing_key(tmp_path):
    src = tmp_path / "bad.jsonl"
    write_lines(src, [GOOD, json.dumps({"body": "x"}).encode()])
    proc = run("--input", src, "--output-prefix", tmp_path / "out")
    assert_clean_failure(
        proc, tmp_path, f"{src}:2: no key 'text'", "'body'", "--json-keys", keep=["bad.jsonl"]
    )


def test_non_string_value(tmp_path):
    src = tmp_path / "bad.jsonl"
    write_lines(src, [GOOD, GOOD, GOOD, json.dumps({"text": 42}).encode()])
    proc = run("--input", src, "--output-prefix", tmp_path / "out")
    assert_clean_failure(
        proc, tmp_path, f"{src}:4: the value of 'text' is a JSON number, not a string", keep=["bad.jsonl"]
    )


def test_undecodable_utf8(tmp_path):
    src = tmp_path / "bad.jsonl"
    write_lines(src, [GOOD, b'{"text": "caf\xe9"}'])
    proc = run("--input", src, "--output-prefix", tmp_path / "out")
    assert_clean_failure(proc, tmp_path, f"{src}:2: not valid UTF-8", keep=["bad.jsonl"])


def test_not_an_object(tmp_path):
    src = tmp_path / "bad.jsonl"
    write_lines(src, [b'["text"]'])
    proc = run("--input", src, "--output-prefix", tmp_path / "out")
    assert_clean_failure(proc, tmp_path, f"{src}:1: a JSON list, not an object", keep=["bad.jsonl"])


def test_empty_input(tmp_path):
    src = tmp_path / "empty.jsonl"
    src.write_bytes(b"\n  \n")
    proc = run("--input", src, "--output-prefix", tmp_path / "out")
    assert_clean_failure(proc, tmp_path, str(src), "no documents", keep=["empty.jsonl"])
    src.write_bytes(json.dumps({"text": ""}).encode() + b"\n")
    proc = run("--input", src, "--output-prefix", tmp_path / "out")
    assert_clean_failure(proc, tmp_path, "every document's 'text' is empty", keep=["empty.jsonl"])


def test_glob_matching_nothing(tmp_path):
    pattern = tmp_path / "*.jsonl"
    proc = run("--input", pattern, "--output-prefix", tmp_path / "out")
    assert_clean_failure(proc, tmp_path, f"--input {pattern}: no file matches")
    proc = run("--input", tmp_path / "missing.jsonl", "--output-prefix", tmp_path / "out")
    assert_clean_failure(proc, tmp_path, "missing.jsonl: --input file not found")


def test_unknown_tokenizer(tmp_path):
    src = tmp_path / "in.jsonl"
    write_lines(src, [GOOD])
    proc = run("--input", src, "--output-prefix", tmp_path / "out", "--tokenizer-type", "Nope")
    assert_clean_failure(proc, tmp_path, "--tokenizer-type 'Nope'", "GPT2BPETokenizer", keep=["in.jsonl"])


def test_corrupt_gzip(tmp_path):
    src = tmp_path / "in.jsonl.gz"
    src.write_bytes(gzip.compress(GOOD * 1000 + b"\n")[:-30])
    proc = run("--input", src, "--output-prefix", tmp_path / "out")
    assert_clean_failure(proc, tmp_path, f"{src}: corrupt gzip data", keep=["in.jsonl.gz"])


def test_failure_keeps_existing_good_output(tmp_path):
    good = tmp_path / "good.jsonl"
    write_lines(good, [GOOD])
    assert run("--input", good, "--output-prefix", tmp_path / "out").returncode == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    bad = tmp_path / "bad.jsonl"
    write_lines(bad, [GOOD, b"{"])
    proc = run("--input", bad, "--output-prefix", tmp_path / "out", "--workers", 2)
    assert_clean_failure(proc, tmp_path, f"{bad}:2:", keep=[*before, "bad.jsonl"])
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name != "bad.jsonl"} == before


def test_interrupt_removes_temporary_files(tmp_path):
    fifo = tmp_path / "in.jsonl"
    os.mkfifo(fifo)
    proc = subprocess.Popen(
        [
            sys.executable,
            str(TOOL),
            "--input",
            str(fifo),
            "--output-prefix",
            str(tmp_path / "out"),
            "--workers",
            "2",
        ],
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        # A shell's background job inherits SIGINT ignored, and Python then never raises KeyboardInterrupt:
        # give the tool the disposition an interactive user's process has.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    with open(fifo, "wb") as writer:  # returns once the tool has opened the input
        writer.write(GOOD + b"\n")
        writer.flush()
        deadline = time.time() + 30
        while not any(".tmp" in p.name for p in tmp_path.iterdir()) and time.time() < deadline:
            time.sleep(0.05)
        assert any(".tmp" in p.name for p in tmp_path.iterdir())
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and stderr.strip().startswith("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_unwritable_output_directory(tmp_path):
    src = tmp_path / "in.jsonl"
    write_lines(src, [GOOD])
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    proc = run("--input", src, "--output-prefix", blocker / "out")
    assert_clean_failure(
        proc, tmp_path, "cannot write the output", "--output-prefix", keep=["file", "in.jsonl"]
    )


# ---- the file-backed tokenizers: same flags as training, ids of the library, dtype by optimal_dtype ----


def _preprocess_in_process(tmp_path, texts, *flags):
    from megatron_lite.core.datasets.preprocessing import preprocess_main

    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    prefix = tmp_path / "out"
    assert preprocess_main(["--input", str(src), "--output-prefix", str(prefix), *map(str, flags)]) == 0
    return IndexedDataset(f"{prefix}_text_document")


@pytest.mark.parametrize("name", ["GPTSentencePieceTokenizer", "Llama2Tokenizer"])
def test_sentencepiece_via_tokenizer_model(tmp_path, name):
    sentencepiece = pytest.importorskip("sentencepiece")
    from tokenizer.tokenizer_files import paragraphs, train_sentencepiece

    model = train_sentencepiece(tmp_path / "sp")
    sp = sentencepiece.SentencePieceProcessor(model_file=str(model))
    texts = paragraphs(chars=20_000)
    flags = [
        "--tokenizer-type",
        name,
        "--tokenizer-model",
        model,
        "--append-eod",
        "--workers",
        2,
    ]
    ds = _preprocess_in_process(tmp_path, texts, *flags)
    assert ds.dtype is np.uint16 and len(ds) == len(texts)
    for i, text in enumerate(texts):
        # Llama2Tokenizer puts bos first; both end with eod = eos.
        bos = [sp.bos_id()] if name == "Llama2Tokenizer" else []
        assert ds[i].tolist() == [*bos, *sp.encode_as_ids(text), sp.eos_id()]


def test_tiktoken_flags(tmp_path):
    import tiktoken
    from tokenizer.tokenizer_files import gpt2_ranks_bytes_first, paragraphs, write_tiktoken_vocab

    from megatron_lite.tokenizer.tiktoken_tokenizer import PATTERN_TIKTOKEN_V1

    tokens = gpt2_ranks_bytes_first()[:20_000]
    vocab = write_tiktoken_vocab(tmp_path / "vocab.json", tokens)
    ref = tiktoken.Encoding(
        name="ref",
        pat_str=PATTERN_TIKTOKEN_V1,
        mergeable_ranks={t: r for r, t in enumerate(tokens)},
        special_tokens={},
    )
    texts = paragraphs(chars=10_000)
    flags = ["--tokenizer-type", "TikTokenizer", "--tokenizer-model", vocab, "--vocab-size", 20_010]
    flags += ["--tiktoken-pattern", "v1", "--tiktoken-num-special-tokens", 10, "--append-eod"]
    flags += ["--tiktoken-special-tokens", "<unk>", "<s>", "</s>", "<pad>"]
    ds = _preprocess_in_process(tmp_path, texts, *flags)
    assert ds.dtype is np.uint16
    for i, text in enumerate(texts):
        assert ds[i].tolist() == [t + 10 for t in ref.encode_ordinary(text)] + [2]


def test_null_tokenizer_dtype_follows_vocab_size(tmp_path):
    # optimal_dtype(vocab_size): uint16 below 65500 ids, else int32 (Megatron's choice).
    ds = _preprocess_in_process(
        tmp_path, ["1 2 3", "65499 0"], "--tokenizer-type", "NullTokenizer", "--vocab-size", 65500
    )
    assert ds.dtype is np.int32 and [ds[0].tolist(), ds[1].tolist()] == [[1, 2, 3], [65499, 0]]
    ds = _preprocess_in_process(
        tmp_path, ["7 8", "9"], "--tokenizer-type", "NullTokenizer", "--vocab-size", 65499, "--append-eod"
    )
    assert ds.dtype is np.uint16 and [ds[0].tolist(), ds[1].tolist()] == [[7, 8, 65498], [9, 65498]]


def test_huggingface_tokenizer_directory(tmp_path):
    transformers = pytest.importorskip("transformers")
    from tokenizer.tokenizer_files import paragraphs, save_hf_tokenizer

    directory = save_hf_tokenizer(tmp_path / "hf")
    ref = transformers.AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    texts = paragraphs(chars=10_000)
    flags = ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", directory, "--append-eod"]
    ds = _preprocess_in_process(tmp_path, texts, *flags, "--workers", 2)
    for i, text in enumerate(texts):
        assert ds[i].tolist() == ref(text).input_ids + [ref.eos_token_id]


def test_tokenizer_flag_errors_are_one_line(tmp_path):
    src = tmp_path / "in.jsonl"
    write_lines(src, [GOOD])
    proc = run("--input", src, "--output-prefix", tmp_path / "out", "--tokenizer-type", "NullTokenizer")
    assert_clean_failure(proc, tmp_path, "NullTokenizer needs --vocab-size", keep=["in.jsonl"])
    proc = run(
        "--input", src, "--output-prefix", tmp_path / "out", "--tokenizer-type", "GPTSentencePieceTokenizer",
        "--tokenizer-model", tmp_path / "none.model",
    )  # fmt: skip
    assert_clean_failure(proc, tmp_path, "none.model: file not found", keep=["in.jsonl"])
