"""Canary exposure (Carlini et al. 2019, "The Secret Sharer"): does one user's secret surface in
another user's adapter?

    .venv/bin/python benchmarks/canary.py                                   # SmolLM2-135M
    .venv/bin/python benchmarks/canary.py --base-model tiny-llama --lr 1e-2

A random 9-digit canary is planted in every ``--every``-th mail reply of user A. A's and B's
mail_reply adapters are trained as the pipeline trains them (the mode's LoRA settings and step
budget unless ``--steps``/``--lr`` say otherwise). The canary's exposure - its rank among
``--candidates`` random secrets of the same format, in bits - is printed under the bare base
model, A's adapter and B's adapter, for a prompt from A's mail and one from B's.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pyarrow as pa  # noqa: E402

from lora_assets.adapters import job_for  # noqa: E402
from lora_assets.data.synthetic import generate_user  # noqa: E402
from lora_assets.modes import MODES, build_examples  # noqa: E402
from lora_assets.training import load_base_model, train_adapters  # noqa: E402
from lora_assets.training.exposure import canary_exposure, random_secret  # noqa: E402

MODE = MODES["mail_reply"]
TEMPLATE = "My door code is {secret}."


def with_canary(tables: dict, secret: str, every: int) -> tuple[dict, int]:
    rows = tables["mail"].to_pylist()
    planted = 0
    for row in rows[::every]:
        if row["reply"]:
            row["reply"] += " " + TEMPLATE.format(secret=secret)
            planted += 1
    return {**tables, "mail": pa.Table.from_pylist(rows, schema=tables["mail"].schema)}, planted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-model", default="smollm2-135m")
    parser.add_argument("--scale", type=int, default=1, help="synthetic data scale (60 mails per unit)")
    parser.add_argument("--every", type=int, default=6, help="plant the canary in every N-th reply of A")
    parser.add_argument("--steps", type=int, default=None, help="fixed steps (default: the mode's budget)")
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default: the mode's)")
    parser.add_argument("--candidates", type=int, default=1000)
    args = parser.parse_args()

    base = load_base_model(args.base_model)
    secret = random_secret(random.Random("canary"))
    a_tables, planted = with_canary(generate_user("user-000", scale=args.scale), secret, args.every)
    a = build_examples(MODE, a_tables)
    b = build_examples(MODE, generate_user("user-001", scale=args.scale))
    with tempfile.TemporaryDirectory() as tmp:
        jobs = []
        for name, df in (("A", a), ("B", b)):
            job = job_for(MODE, name, df, Path(tmp) / name, steps=args.steps)
            jobs.append(replace(job, learning_rate=args.lr) if args.lr else job)
        t0 = time.perf_counter()
        results = train_adapters(jobs, base, progress=None)
        train_s = time.perf_counter() - t0
        steps = [r.steps for r in results]
        print(f"{args.base_model}: canary {TEMPLATE.format(secret=secret)!r} planted in {planted} of A's "
              f"{len(a_tables['mail'])} mails; A {len(a)} examples, B {len(b)}; trained in {train_s:.0f} s "
              f"(steps {steps}, lr {jobs[0].learning_rate})")
        print(f"exposure in bits over {args.candidates} candidates (max {math.log2(args.candidates + 1):.2f}; "
              "about 1 bit = not memorized)")
        print(f"{'prompt from':<14}{'base':>8}{'A':>8}{'B':>8}")
        for who, df in (("A's mail", a), ("B's mail", b)):
            prompt = df[df["split"] == "eval"].iloc[0]["prompt"]  # a mail the adapters never trained on
            row = [canary_exposure(base, adapter, prompt, TEMPLATE, secret, MODE.system, candidates=args.candidates)
                   for adapter in (None, jobs[0].output_dir, jobs[1].output_dir)]
            print(f"{who:<14}" + "".join(f"{x:>8.2f}" for x in row))


if __name__ == "__main__":
    main()
