"""A small run of the ingest benchmark: its ratios follow from its own timings, and its CPU accounting adds up."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import requires_data

REPO = Path(__file__).resolve().parents[1]
CLOCK_TICK = 0.01  # os.times() counts whole clock ticks, for user and system time apart


@pytest.mark.slow
@requires_data
def test_bench_ingest_small_run_is_consistent(tmp_path):
    out = tmp_path / "ingest.json"
    command = [sys.executable, "scripts/bench_ingest.py", "--images", "100", "--naive-images", "30",
               "--repeat", "2", "--breakdown", "--rss-sizes", "", "--json", str(out)]
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(out.read_text())
    raw, rows = result["raw"], {row["contender"].split(" (")[0]: row for row in result["results"]}

    ingest_s, bare_s = raw["ingest_s"], raw["bare_s"]
    assert len(ingest_s) == len(bare_s) == 2
    assert raw["bare / ingest per round"] == pytest.approx([b / i for b, i in zip(bare_s, ingest_s)])
    ingest_row, bare_row = rows["mediret ingest"], rows["bare forward"]
    assert ingest_row["seconds"] == min(ingest_s) and bare_row["seconds"] == min(bare_s)
    assert ingest_row["img/s"] == pytest.approx(100 / min(ingest_s))
    assert bare_row["ingest / this"] == pytest.approx(min(bare_s) / min(ingest_s))
    goals = {goal["goal"]: goal for goal in result["goals"]}
    median = goals["ingest vs bare forward (median of 2 paired rounds)"]
    assert median["value"] == pytest.approx(statistics.median(raw["bare / ingest per round"]))
    assert median["met"] == (median["value"] >= 0.9)
    assert raw["ingest_report"] == {"added": 100, "duplicates": 0, "problems": 0}
    naive = rows["naive loop"]  # the goal's baseline: the library's PIL transforms
    assert naive["seconds"] == min(raw["naive_s (both passes)"]) and naive["images"] == 30
    assert goals["ingest vs naive loop"]["value"] == pytest.approx((100 / min(ingest_s)) / (30 / naive["seconds"]))
    assert rows["(for reference) the naive loop with mediret's per-image preprocessing"]["seconds"] == min(
        raw["naive_mediret_preprocess_s (both passes)"])

    parts = {row["part of the ingest"].split(" (")[0]: row for row in raw["breakdown"]}
    whole = parts["whole ingest"]
    threads = [parts[name] for name in
               ("forward passes", "normalising batches", "decoding: read, hash, decode, resize")]
    # Each thread's CPU time is at most its wall time in the part, and the process's CPU time
    # (measured apart, by os.times) holds the threads' parts.
    for part in threads:
        assert 0 < part["CPU s"] <= part["seconds"] + CLOCK_TICK
    assert sum(part["CPU s"] for part in threads) <= whole["CPU s"] + 4 * CLOCK_TICK
    bare_threads, bare = parts["bare forward's own forward passes"], parts["bare forward, same images"]
    assert bare_threads["CPU s"] <= bare["CPU s"] + 4 * CLOCK_TICK
    # and no more cores than the machine has were busy
    assert whole["CPU s"] <= whole["seconds"] * result["machine"]["affinity_cpus"] + 4 * CLOCK_TICK
