"""bench_moe.py runs end to end on a tiny layer and finds the loop and the grouped GEMM equal."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_moe.py"


def test_bench_moe_runs(capsys):
    spec = importlib.util.spec_from_file_location("bench_moe", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = ["--tokens", "64", "--hidden", "32", "--ffn", "16", "--experts", "4", "--rounds", "1"]
    assert bench.main(args) == 0
    out = capsys.readouterr().out
    first = out.split("\n")[0]
    assert first.startswith("max |loop - grouped| = ") and float(first.split("= ")[1]) < 1e-5
    assert out.count("tokens/s") == 3
