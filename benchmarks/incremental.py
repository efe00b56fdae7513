"""Learning from each change: step budgets, incremental updates, and the gate's noise floor.

    .venv/bin/python benchmarks/incremental.py                       # tiny-llama
    .venv/bin/python benchmarks/incremental.py --base-model smollm2-135m --users 2

Three measurements, all on synthetic users' mail_reply data, through the same ``plan_update``
and ``job_for`` the pipeline uses:

1. Run-to-run noise: one user's adapter trained on the same data with ``--seeds`` seeds (and
   the data order that goes with each); the spread of held-out loss is the noise the eval gate
   must not mistake for a regression (its paired test: ``benchmarks/personalization.py``).
2. Incremental vs full after a 5 % change: per user, an adapter trained on 95 % of their mail
   (as published), then the last 5 % arrives; the update (warm start, new examples plus a replay
   sample, the update budget) against a full retrain from scratch, on the same held-out set:
   held-out loss and tokens trained.
3. Budget by data size: users with 20, 200 and 1,000 examples trained with the mode's step
   budget (epochs within bounds) and with the old fixed 30 steps: held-out loss and steps.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pyarrow as pa  # noqa: E402

from lora_assets.adapters import job_for, plan_update  # noqa: E402
from lora_assets.data.synthetic import generate_user  # noqa: E402
from lora_assets.modes import MODES, build_examples  # noqa: E402
from lora_assets.training import load_base_model, read_adapter_metadata, train_adapters  # noqa: E402
from lora_assets.training.core import evaluate_adapter  # noqa: E402

MODE = MODES["mail_reply"]


def dataset(user: str, mails: slice | None = None, scale: int = 1):
    tables = generate_user(user, scale=scale)
    if mails is not None:
        tables = {**tables, "mail": pa.Table.from_pylist(tables["mail"].to_pylist()[mails], schema=tables["mail"].schema)}
    return build_examples(MODE, tables)


def noise(base, out: Path, seeds: int, lr: float) -> tuple[float, float, float]:
    df = dataset("user-000")
    jobs = [replace(job_for(MODE, "user-000", df, out / f"seed{s}"), seed=s, learning_rate=lr) for s in range(seeds)]
    losses = [r.adapter_eval_loss for r in train_adapters(jobs, base, progress=None)]
    return statistics.mean(losses), statistics.stdev(losses), max(losses) - min(losses)


def incremental_vs_full(base, out: Path, user: str, lr: float, scale: int) -> dict[str, float]:
    full_mail = generate_user(user, scale=scale)["mail"].num_rows
    cut = round(full_mail * 0.95)
    before, after = dataset(user, slice(0, cut), scale), dataset(user, slice(0, full_mail), scale)
    (first,) = train_adapters([replace(job_for(MODE, user, before, out / "v1"), learning_rate=lr)], base, progress=None)
    published = {**read_adapter_metadata(out / "v1"), "version": "v1"}
    plan = plan_update(MODE, after, published, base.ref.revision)
    update = replace(job_for(MODE, user, after, out / "inc", plan=plan, warm_start_from=out / "v1"), learning_rate=lr)
    full = replace(job_for(MODE, user, after, out / "full"), learning_rate=lr)
    inc_result, full_result = train_adapters([update, full], base, progress=None)
    return {
        "plan": plan.path, "new": len(after) - len(before), "examples": len(update.train),
        "full_loss": full_result.adapter_eval_loss, "inc_loss": inc_result.adapter_eval_loss,
        "published_loss": evaluate_adapter(base, out / "v1", full.eval),
        "full_tokens": full_result.train_tokens, "inc_tokens": inc_result.train_tokens,
        "full_steps": full_result.steps, "inc_steps": inc_result.steps,
    }


def budget_by_size(base, out: Path, lr: float) -> list[tuple[int, int, float, float, int]]:
    rows = []
    for n, scale in ((20, 1), (200, 5), (1000, 22)):
        df = dataset(f"size-{n}", scale=scale)
        train_ids = sorted(df[df["split"] == "train"]["example_id"])[:n]
        df = df[(df["split"] == "eval") | df["example_id"].isin(train_ids)].reset_index(drop=True)
        budget = replace(job_for(MODE, f"size-{n}", df, out / f"budget{n}"), learning_rate=lr)
        fixed = replace(job_for(MODE, f"size-{n}", df, out / f"fixed{n}", steps=30), learning_rate=lr)
        b, f = train_adapters([budget, fixed], base, progress=None)
        rows.append((len(budget.train), b.steps, b.adapter_eval_loss, f.adapter_eval_loss, len(budget.eval)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-model", default="tiny-llama")
    parser.add_argument("--users", type=int, default=4, help="users for the incremental comparison")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--scale", type=int, default=4, help="synthetic data scale of those users (4: 240 mails)")
    args = parser.parse_args()
    base = load_base_model(args.base_model)
    lr = 1e-3  # the jobs' own learning rate, as the pipeline trains them
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        mean, std, spread = noise(base, out / "noise", args.seeds, lr)
        print(f"noise: {args.seeds} seeds, same data: held-out loss {mean:.4f} +- {std:.4f} (max-min {spread:.4f}, "
              f"{spread / mean:.2%} of the loss)")

        print(f"\nincremental update vs full retrain after 5 % new mail, users of {60 * args.scale} mails "
              "(held-out loss on the same eval set):")
        ratios, token_ratios = [], []
        for i in range(args.users):
            r = incremental_vs_full(base, out / f"inc{i}", f"user-{i:03d}", lr, args.scale)
            ratios.append(r["inc_loss"] / r["full_loss"])
            token_ratios.append(r["inc_tokens"] / r["full_tokens"])
            print(f"  user-{i:03d}: {r['plan']} on {r['examples']} examples ({r['new']} new), {r['inc_steps']} steps: "
                  f"loss {r['inc_loss']:.4f} vs full {r['full_loss']:.4f} ({r['full_steps']} steps; published "
                  f"{r['published_loss']:.4f}); tokens {r['inc_tokens']} vs {r['full_tokens']}")
        print(f"  mean: loss {statistics.mean(ratios) - 1:+.2%} vs full, tokens {statistics.mean(token_ratios):.0%} of full")

        print("\nstep budget by data size (mode budget vs the old fixed 30 steps):")
        for n, steps, budget_loss, fixed_loss, n_eval in budget_by_size(base, out / "budget", lr):
            print(f"  {n:>5} training examples: budget {steps:>3} steps, held-out loss {budget_loss:.4f}; "
                  f"fixed 30 steps {fixed_loss:.4f} ({n_eval} held-out examples)")


if __name__ == "__main__":
    main()
