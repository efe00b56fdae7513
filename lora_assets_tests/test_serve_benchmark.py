"""benchmarks/serve_load.py runs end to end (tiny-llama, seconds per scenario) and prints its figures."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]


def test_the_serving_load_benchmark_prints_every_scenario(home, tiny_base):
    env = {**os.environ, "LORA_ASSETS_HOME": str(home)}  # base models from the session's data dir
    done = subprocess.run(
        [sys.executable, str(PROJECT / "benchmarks" / "serve_load.py"), "--base-model", "tiny-llama", "--users", "9",
         "--cold", "1", "--seconds", "2", "--clients", "4", "--max-tokens", "8"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for scenario in ("1 adapter", "8 adapters", "9 adapters", "base"):
        assert re.search(rf"^{scenario}\s+[1-9]\d*\s+\d+\.\d", done.stdout, re.M), done.stdout
    assert "cold miss:" in done.stdout
    assert re.search(r"9 distinct adapters at \d+\.\d\dx the single-adapter throughput", done.stdout)
