"""tools/merge_datasets.py: merging equals preprocessing the concatenated input, byte for byte."""

import gzip
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_lite.core.datasets.indexed_dataset_builder import IndexedDatasetBuilder
from megatron_lite.core.datasets.preprocessing import preprocess

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "merge_datasets.py"


def run(*args):
    return subprocess.run(
        [sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True, cwd=ROOT, timeout=300
    )


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """Milton in three pieces, each preprocessed alone, and the whole preprocessed at once."""
    tmp = tmp_path_factory.mktemp("merge")
    with gzip.open(ROOT / "data" / "milton.jsonl.gz", "rb") as f:
        lines = f.read().splitlines(keepends=True)
    pieces = [lines[:2], lines[2:3], lines[3:]]
    (tmp / "parts").mkdir()
    for i, piece in enumerate(pieces):
        (tmp / f"piece{i}.jsonl").write_bytes(b"".join(piece))
        preprocess(
            str(tmp / f"piece{i}.jsonl"), str(tmp / "parts" / f"p{i}"), append_eod=True, log=io.StringIO()
        )
    (tmp / "all.jsonl").write_bytes(b"".join(lines))
    preprocess(str(tmp / "all.jsonl"), str(tmp / "whole"), append_eod=True, log=io.StringIO())
    return tmp


def same_pair(a, b):
    return all(Path(f"{a}{ext}").read_bytes() == Path(f"{b}{ext}").read_bytes() for ext in (".bin", ".idx"))


def test_merge_directory_equals_preprocessing_the_concatenation(parts):
    proc = run("--input", parts / "parts", "--output-prefix", parts / "merged")
    assert proc.returncode == 0, proc.stderr
    assert same_pair(parts / "merged", parts / "whole_text_document")
    assert "7 documents" in proc.stdout and "from 3 datasets" in proc.stdout


def test_merge_prefix_list_in_given_order(parts):
    p = [parts / "parts" / f"p{i}_text_document" for i in range(3)]
    proc = run("--inputs", p[0], p[1], f"{p[2]}.idx", "--output-prefix", parts / "listed")
    assert proc.returncode == 0, proc.stderr
    assert same_pair(parts / "listed", parts / "whole_text_document")
    proc = run("--inputs", p[2], p[0], p[1], "--output-prefix", parts / "reordered")
    assert proc.returncode == 0 and not same_pair(parts / "reordered", parts / "whole_text_document")


def test_output_inside_the_input_directory_is_not_merged_into_itself(parts):
    out = parts / "parts" / "zz_merged"
    for _ in range(2):
        proc = run("--input", parts / "parts", "--output-prefix", out)
        assert proc.returncode == 0, proc.stderr
    assert same_pair(out, parts / "whole_text_document")


def _expect_error(proc, *needles):
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_dtype_mismatch(tmp_path):
    for name, dtype in (("a", np.uint16), ("b", np.int32)):
        with IndexedDatasetBuilder(str(tmp_path / "in" / name), dtype) as b:
            b.add_document([1, 2, 3])
            b.finalize()
    _expect_error(
        run("--input", tmp_path / "in", "--output-prefix", tmp_path / "out"),
        "b.idx: tokens are int32",
        "uint16",
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_unpaired_file_and_empty_directory(tmp_path):
    (tmp_path / "in").mkdir()
    _expect_error(run("--input", tmp_path / "in", "--output-prefix", tmp_path / "out"), "no .bin/.idx pairs")
    (tmp_path / "in" / "x.idx").write_bytes(b"")
    _expect_error(
        run("--input", tmp_path / "in", "--output-prefix", tmp_path / "out"), "x.idx: no matching x.bin"
    )
    _expect_error(
        run("--input", tmp_path / "nope", "--output-prefix", tmp_path / "out"),
        "nope: --input directory not found",
    )
    _expect_error(
        run("--inputs", tmp_path / "in" / "y", "--output-prefix", tmp_path / "out"), "y.idx: not found"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]
