"""Mutation fuzz of every checkpoint and dataset file, the YAML config and the JSONL input (issue 16).

One small real checkpoint (a tiny GPT after 2 Adam steps) and one preprocessed dataset are built once; each
example mutates a copy of one file (truncated, bytes flipped, emptied, made non-UTF-8, JSON of another
shape, names with `..`) and calls the loader in this process. The property: it loads, or raises the
project's UserError with one line naming the file; never another exception; the originals never change.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from file_fuzz_support import (
    ITER_DIR,
    JSONL_TEXT,
    TRACKER,
    YAML_TEXT,
    assert_user_error_or_success,
    build_model,
    byte_mutation,
    copy_tree,
    json_mutation,
    make_checkpoint,
    make_dataset,
    resign,
    tracker_mutation,
    tree_hashes,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megatron_lite.arguments import parse_config
from megatron_lite.core.datasets.indexed_dataset import IndexedDataset
from megatron_lite.core.datasets.preprocessing import preprocess_main
from megatron_lite.training.checkpointing import load_checkpoint

# Default suite: ~20 examples per file kind (about 200 in all); `pytest -m slow`: 500 per kind.
DEFAULT_EXAMPLES = 20
SLOW_EXAMPLES = 500

CHECKPOINT_FILES = {
    ".metadata": byte_mutation,
    "__0_0.distcp": byte_mutation,
    "common.pt": byte_mutation,
    "rng_state_0.pt": byte_mutation,
    "metadata.json": json_mutation,
    "checksums.json": json_mutation,
}
KINDS = [*CHECKPOINT_FILES, TRACKER, "dataset.idx", "dataset.bin", "yaml", "jsonl"]


@pytest.fixture(scope="module")
def material(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz_material")
    make_checkpoint(root / "ckpt")
    jsonl, prefix = make_dataset(root / "data")
    (root / "config.yaml").write_text(YAML_TEXT, encoding="utf-8")
    before = tree_hashes(root)
    state = {"root": root, "prefix": prefix, "jsonl": jsonl, "work": tmp_path_factory.mktemp("fuzz_work")}
    state["model"] = build_model()
    yield state
    assert tree_hashes(root) == before, "a loader changed an original file"


def _check_checkpoint(material, name: str, mutate, data) -> None:
    source = material["root"] / "ckpt"
    with tempfile.TemporaryDirectory(dir=material["work"]) as work:
        load_dir = copy_tree(source, Path(work) / "ckpt")
        target = load_dir / TRACKER if name == TRACKER else load_dir / ITER_DIR / name
        target.write_bytes(data.draw(mutate(target.read_bytes()), label=name))
        if name not in (TRACKER, "checksums.json") and data.draw(st.booleans(), label="resign"):
            resign(load_dir / ITER_DIR)
        cfg, model, optimizer, scheduler = material["model"]
        assert_user_error_or_success(
            lambda: load_checkpoint(load_dir, model, optimizer, scheduler, cfg, None), target, target.parent
        )


def _check_dataset(material, suffix: str, data) -> None:
    source = Path(material["prefix"])
    with tempfile.TemporaryDirectory(dir=material["work"]) as work:
        prefix = Path(work) / source.name
        for ext in (".idx", ".bin"):
            (Path(f"{prefix}{ext}")).write_bytes(Path(f"{source}{ext}").read_bytes())
        target = Path(f"{prefix}{suffix}")
        target.write_bytes(data.draw(byte_mutation(target.read_bytes()), label=suffix))

        def open_and_read() -> None:
            dataset = IndexedDataset(str(prefix))
            for i in range(len(dataset)):
                dataset[i]
            dataset.max_token_id()

        assert_user_error_or_success(open_and_read, prefix)


def _check_yaml(material, data) -> None:
    with tempfile.TemporaryDirectory(dir=material["work"]) as work:
        path = Path(work) / "config.yaml"
        path.write_bytes(data.draw(byte_mutation(YAML_TEXT.encode()), label="yaml"))
        assert_user_error_or_success(lambda: parse_config(["--yaml-cfg", str(path)]), path)


def _check_jsonl(material, data) -> None:
    with tempfile.TemporaryDirectory(dir=material["work"]) as work:
        path = Path(work) / "input.jsonl"
        path.write_bytes(data.draw(byte_mutation(JSONL_TEXT.encode()), label="jsonl"))
        argv = ["--input", str(path), "--output-prefix", str(Path(work) / "out"), "--workers", "1"]
        argv += ["--tokenizer-type", "ByteTokenizer", "--log-interval", "1000000"]
        assert_user_error_or_success(lambda: preprocess_main(argv), path)


def _fuzz(material, kind: str, examples: int, *, derandomize: bool) -> None:
    @settings(
        max_examples=examples,
        database=None,
        deadline=None,
        derandomize=derandomize,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(data=st.data())
    def run(data) -> None:
        if kind in CHECKPOINT_FILES:
            _check_checkpoint(material, kind, CHECKPOINT_FILES[kind], data)
        elif kind == TRACKER:
            _check_checkpoint(material, kind, tracker_mutation, data)
        elif kind.startswith("dataset"):
            _check_dataset(material, kind[len("dataset") :], data)
        elif kind == "yaml":
            _check_yaml(material, data)
        else:
            _check_jsonl(material, data)

    run()


@pytest.mark.parametrize("kind", KINDS)
def test_mutated_file_loads_or_is_one_user_error(material, kind, capsys):
    _fuzz(material, kind, DEFAULT_EXAMPLES, derandomize=True)


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_mutated_file_loads_or_is_one_user_error_thousands(material, kind, capsys):
    _fuzz(material, kind, SLOW_EXAMPLES, derandomize=False)


def test_the_unmutated_material_loads(material, capsys):
    """The control: the checkpoint, the dataset and the YAML file as built all load."""
    cfg, model, optimizer, scheduler = material["model"]
    progress = load_checkpoint(material["root"] / "ckpt", model, optimizer, scheduler, cfg, None)
    assert progress.iteration == 2 and progress.consumed_train_samples == 4
    dataset = IndexedDataset(material["prefix"])
    assert len(dataset) == 3 and dataset.num_tokens == 12 + 20 + 6  # UTF-8 bytes and one EOD each
    assert parse_config(["--yaml-cfg", str(material["root"] / "config.yaml")]).hidden_size == 16
