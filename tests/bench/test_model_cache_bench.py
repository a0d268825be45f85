"""bench/model_cache.py: a CPU smoke run (tiny model, fetch only) keeps the script working."""

from __future__ import annotations

import importlib
import json


def test_model_cache_bench_smoke(capsys):
    bench = importlib.import_module("bench.model_cache")
    assert bench.main(["--hidden-size", "64", "--layers", "2", "--repeats", "1", "--no-serve"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out[out.index("{\n") :])  # after any library's warning lines
    assert result["model_bytes"] > 0 and result["serve_included"] is False
    assert result["second_replica_with_cache"]["fetch_s"] > 0  # it ran, with S3 unreachable
    assert set(result["runs"]) == {"without_cache", "with_cache"}
