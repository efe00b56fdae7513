"""The personalization benchmark keeps working: CI runs it on tiny-llama, every adapter capped
at 10 steps. Its figures mean nothing on a random model; what is checked is that every table is
printed, from the corpus through the product's jobs, and that its summaries agree with its rows."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
AUTHORS = ("hm-1933", "hm-876")  # 37 training examples (a slice, then the refit) and 71 (the formula)


def _floats(line: str) -> list[float]:
    return [float(x) for x in re.findall(r"-?\d+\.\d+", line)]


def test_the_personalization_benchmark_prints_every_table_on_tiny_llama(home, tiny_base, tmp_path):
    env = {**os.environ, "LORA_ASSETS_HOME": str(tmp_path)}
    (tmp_path / "base_models").symlink_to(home / "base_models", target_is_directory=True)
    done = subprocess.run(
        [sys.executable, str(PROJECT / "benchmarks" / "personalization.py"), "--base-model", "tiny-llama",
         "--only", *AUTHORS, "--variants", "new", "old", "--synthetic", "2", "--step-ceiling", "10"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)  # 61-75 s here under pytest
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    lines = out.splitlines()

    # Held-out loss with and without retrieval: a row per author, and means that are the rows'.
    start = next(i for i, ln in enumerate(lines) if ln.startswith("held-out loss per author"))
    end = next(i for i, ln in enumerate(lines) if ln.startswith("  mean held-out loss: "))
    table = lines[start : end + 1]
    rows = {ln.split()[0]: _floats(ln) for ln in table if ln.split()[0] in AUTHORS}
    assert set(rows) == set(AUTHORS), out
    means = table[-1]
    base, retrieval, adapter, both = _floats(means)
    (gains,) = [ln for ln in lines if ln.startswith("  mean improvement over the base: ")]
    expected = [base - v for v in (retrieval, adapter, both)]
    assert all(abs(g - e) < 2e-4 for g, e in zip(_floats(gains), expected, strict=True)), (gains, expected)
    # ... and the adapter's mean is the mean of its column (base, base+2, adapter, ...: after train, held-out).
    assert abs(adapter - sum(r[2] for r in rows.values()) / 2) < 2e-4, (rows, adapter)

    # The attribution matrix says how many authors their own adapter scores best.
    assert re.search(r"own adapter scores best on its author's held-out replies for [0-2]/2 authors", out), out

    # Step budgets: the slice's author is a refit of what validation kept, the ceiling held.
    kept = json.loads(re.search(r"steps validation kept \(--refit-steps\): (\{.*\})", out).group(1))
    assert set(kept) == set(AUTHORS) and all(1 <= s <= 10 for s in kept.values()), kept
    assert re.search(r"hm-1933 .* refit of \d+", out), "the author with a slice was refit"
    low, mid, high = map(float, re.search(
        r"old minus new: ([-+][\d.]+) nats .* 95% interval \[([-+][\d.]+), ([-+][\d.]+)\]", out).group(2, 1, 3))
    assert low <= mid <= high, (low, mid, high)

    # The paired gate's checks, on the corpus and on synthetic users.
    for label in ("corpus", "synthetic"):
        assert re.search(rf"{label}: paired gate at 95% refused [0-2]/2 same-data retrains with a new seed and "
                         rf"accepted [0-2]/2 adapters of another user; refused [0-2]/2 updates", out), out
