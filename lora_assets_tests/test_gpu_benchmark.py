"""The prepared GPU benchmark keeps working without a GPU: CI runs it on CPU, quick."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]


def test_gpu_benchmark_runs_on_cpu_in_bf16_and_prints_every_figure(home, tiny_base, tmp_path):
    env = {**os.environ, "LORA_ASSETS_HOME": str(tmp_path)}
    (tmp_path / "base_models").symlink_to(home / "base_models", target_is_directory=True)
    done = subprocess.run([sys.executable, str(PROJECT / "benchmarks" / "gpu.py"), "--device", "cpu", "--quick"],
                          cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=1500)  # 85-88 s in bf16 on an AVX2-only CPU, 427 before (README: Tests)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "on cpu in bfloat16" in out
    rows = re.findall(r"^\s+(\d+)\s+(\d+)\s+(\d+)\s+([\d.]+)x", out, re.M)
    assert [int(k) for k, *_ in rows] == [1, 4], out
    assert all(int(seq) > 0 and int(fused) > 0 for _k, seq, fused, _r in rows)
    assert re.search(r"8 adapters, \d+ adapters/hour with the load", out), out
    assert "(24 mails, [10] steps)" in out, "the quick form's ceiling of 10 steps held the formula's 30"
    assert re.search(r"gate passed \d/8", out) and "ready after: first" in out
    assert len(re.findall(r"reload max \|logit diff\| ", out)) == 2
    assert out.rstrip().endswith("GPU BENCHMARK OK")
