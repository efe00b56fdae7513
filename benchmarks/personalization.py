"""Personalization on real writing: does each author's adapter help that author, more than
showing the base model their own similar past replies, and is the eval gate right about it?

    .venv/bin/python benchmarks/personalization.py                 # 6 authors of the corpus, SmolLM2
    .venv/bin/python benchmarks/personalization.py --authors 24    # all of them (hours on 2 CPU cores)
    .venv/bin/python benchmarks/personalization.py --sweep --authors 3 --variants new lr2e-3 r8 mlp
    .venv/bin/python benchmarks/personalization.py --sweep --only hm-65 hm-771 --variants old refit \
        --refit-steps '{"hm-65": 30, "hm-771": 80}'     # refit on the steps an earlier "new" run printed

The corpus is ``benchmarks/corpus/history-meta`` (real people's replies, CC BY-SA; see its
ATTRIBUTION.md; ``--corpus benchmarks/corpus/history-meta-2023``: replies tuning never saw),
read as ``mail`` records through the same validation ``lora-assets ingest`` applies, built into
``mail_reply`` datasets by the mode's own builder, and trained through ``job_for`` and
``train_adapters`` as the pipeline does. Per author, on the gate's held-out set:

1. held-out loss of the base, the base with the author's K most similar training replies in the
   prompt (the retrieval baseline), the author's adapter, and the adapter with retrieval;
2. step budgets: the new default (below 60 training examples a validation slice chooses the
   step, early stopping within [first_kept, max_steps], learning rate 3e-4 rising with the
   author's examples, then every example trains for that step; from 60 on 2 epochs at 1e-3)
   against the old default (2 epochs within [10, 120] at 1e-3 for every size), validation at
   every size keeping its own adapter (``validate``, the default to 2026-12-07; the best step's
   weights averaged with its scored neighbours where that scores better), the cut-over without
   the refit (``cutover``) and the old fixed 30 steps at 1e-3, and
   any ``--variants`` (learning rate and its decay, rank, target modules, the first step kept,
   the slice's size, the old formula on examples of 256 tokens (``old256``), ``noavg``: the best step
   alone; ``refit``: given steps (``--refit-steps``) on every example) for tuning, every
   variant scored on held-out examples of 128 tokens; each variant's mean held-out loss minus
   the first variant's, with a 95 % interval (held-out examples resampled per author);
3. the own-vs-other attribution matrix: each author's held-out replies under every author's
   adapter, and whether their own scores best;
4. the paired gate: how often it refuses a retrain of the same data with another seed (should be
   rare), how often it accepts another author's adapter in place of the author's own (should be
   never), and how often it refuses the adapter of all examples where one trained on a fifth
   fewer is published (an update as the user's data grows: should be rare); the same on
   ``--synthetic`` synthetic users.

Prints figures only; the README records them with the date. The tables are in
``personalization_tables.py``; ``--step-ceiling`` caps every adapter's steps for a quick run
(the test of this script runs it on tiny-llama so), never for the README's figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lora_assets.adapters import job_for, validation_slice  # noqa: E402
from lora_assets.data.schemas import records_to_table  # noqa: E402
from lora_assets.data.synthetic import generate_user  # noqa: E402
from lora_assets.lora_spec import StepBudget  # noqa: E402
from lora_assets.modes import MODES, build_examples  # noqa: E402
from lora_assets.training import load_base_model, train_adapters  # noqa: E402
from personalization_tables import attribution, budgets_table, gate_checks, retrieval_table  # noqa: E402

CORPUS = ROOT / "benchmarks" / "corpus" / "history-meta"
MODE = MODES["mail_reply"]
OLD_BUDGET = StepBudget(epochs=2.0, min_steps=10, max_steps=120)  # the default before validation chose the step
OLD_RATE = 1e-3  # ... and its learning rate
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def _all_train(job):
    """The job without a validation slice: every training example trained on."""
    return replace(job, train=[*job.train, *job.validation], validation=())


def _validated(job):
    """The job with a validation slice whatever the user's size (at the rate by examples)."""
    if job.validation or job.budget.validates(len(job.train)):
        return job
    always = replace(MODE, budget=replace(MODE.budget, validate_below=None))
    train, validation = validation_slice(always, list(job.train))
    return replace(job, train=train, validation=validation, learning_rate=MODE.learning_rate.for_examples(len(train)))


def _chosen_only(job):
    """The job keeping its validation pass's adapter: no refit on every example."""
    return replace(job, budget=replace(job.budget, refit=False))


def _smaller_slice(job, fraction: float = 0.10, most: int = 16):
    """The job with a validation slice of ``fraction`` (at most ``most``): the rest is trained on."""
    if not job.validation:
        return job
    n = len(job.train) + len(job.validation)
    keep = min(len(job.validation), most, max(job.budget.min_validation, round(fraction * n)))
    return replace(job, train=[*job.train, *job.validation[keep:]], validation=job.validation[:keep])


VARIANTS = {
    "new": lambda job: job,  # the product's defaults
    # (the examples in the order it was measured in: a would-be slice's last, as before validate_below)
    "old": lambda job: replace(_all_train(_validated(job)), budget=OLD_BUDGET, learning_rate=OLD_RATE),
    "fixed30": lambda job: replace(_all_train(job), max_steps=30, learning_rate=OLD_RATE),
    "seed1": lambda job: replace(job, seed=1),
    # What the user had before a fifth of their training examples (the last by id) arrived.
    "earlier": lambda job: replace(job, train=job.train[: len(job.train) - len(job.train) // 5]),
    "lr5e-4": lambda job: replace(job, learning_rate=5e-4),
    "lr2e-3": lambda job: replace(job, learning_rate=2e-3),
    "lr3e-4": lambda job: replace(job, learning_rate=3e-4),  # the default before the rate rose with examples
    "lr1e-3": lambda job: replace(job, learning_rate=1e-3),
    "delta0": lambda job: replace(job, budget=replace(job.budget, min_improvement=0.0)),  # stop on no improvement only
    "decay": lambda job: replace(job, decay_to=0.1),  # the rate falls linearly to a tenth over the budget
    "slice16": _smaller_slice,  # a validation slice of 10 %, at most 16 examples
    # The validation pass's best step alone, no averaging and no refit.
    "noavg": lambda job: _chosen_only(replace(job, budget=replace(job.budget, average=False))),
    # The formula's floor at 10 steps too (for authors without a slice): measured 2026-12-06.
    "min10": lambda job: replace(job, budget=replace(job.budget, min_steps=10, first_kept=10)),
    "first30": lambda job: replace(job, budget=replace(job.budget, first_kept=30)),  # the default before 2026-12-07
    "r8": lambda job: replace(job, lora=replace(job.lora, r=8, alpha=16)),
    "r32": lambda job: replace(job, lora=replace(job.lora, r=32, alpha=64)),
    "mlp": lambda job: replace(job, lora=replace(job.lora, target_modules=ATTENTION + MLP)),
    "attention": lambda job: replace(job, lora=replace(job.lora, target_modules=ATTENTION)),
    # Examples of 256 tokens (more of each reply: 66 % of the corpus's reply tokens against 46 %).
    "old256": lambda job: replace(VARIANTS["old"](job), max_length=256),
    # Every example (the slice too) for given steps (--refit-steps, or what "new" kept): the refit
    # put together from two runs, as measured before the product refit (2026-12-07).
    "refit": None,
    # Validation chooses the step at every size and its adapter is kept, as the default did to
    # 2026-12-07 (before ``validate_below`` and the refit).
    "validate": lambda job: _chosen_only(_validated(job)),
    # The default of 2026-12-07 before the refit: below 60 the validation pass's adapter is kept.
    "cutover": _chosen_only,
}


def refit(job, steps: int) -> object:
    """``job`` again on all its examples, for the ``steps`` validation chose."""
    return replace(_all_train(job), max_steps=steps)


def kept_steps(results: dict) -> dict[str, int]:
    """author -> the step validation kept (all the steps trained where there was no slice)."""
    return {a: r.best_step or r.steps for a, (_job, r) in results.items()}


def corpus_datasets(corpus: Path = CORPUS) -> dict[str, object]:
    """Every author's mail_reply dataset, through ingest's record validation and the mode's builder."""
    out = {}
    for path in sorted(corpus.glob("hm-*.jsonl")):
        records = [json.loads(line) for line in path.read_text().splitlines()]
        labels = [f"line {i + 1}: " for i in range(len(records))]
        out[path.stem] = build_examples(MODE, {"mail": records_to_table("mail", records, f"{path.name}: ", labels)})
    return out


def spread(datasets: dict, n: int) -> list[str]:
    """``n`` authors evenly spread over the corpus's sizes, smallest and largest included."""
    by_size = sorted(datasets, key=lambda a: (len(datasets[a]), a))
    if n >= len(by_size):
        return by_size
    return [by_size[round(i * (len(by_size) - 1) / (n - 1))] for i in range(n)] if n > 1 else by_size[:1]


def within(job, ceiling: int | None):
    """``job`` trained for at most ``ceiling`` steps, as ``LORA_ASSETS_MAX_TRAIN_STEPS`` caps a
    deployment's (quick runs and the test of this script; never for the README's figures)."""
    if not ceiling:
        return job
    return replace(job, budget=job.budget.capped(ceiling), max_steps=job.max_steps and min(job.max_steps, ceiling))


def train_variant(base, name: str, datasets: dict, out: Path, chosen: dict | None = None,
                  ceiling: int | None = None) -> dict[str, tuple]:
    """``chosen``: author -> the step "refit" trains for (what validation kept in "new")."""
    def variant(author: str, job):
        return refit(job, chosen[author]) if name == "refit" else VARIANTS[name](job)

    jobs = [within(variant(a, job_for(MODE, a, df, out / name / a, gguf_type="")), ceiling)
            for a, df in datasets.items()]
    t0 = time.perf_counter()
    results = train_adapters(jobs, base, progress=None, fusion="sequential")
    print(f"  trained {name}: {len(jobs)} adapters in {time.perf_counter() - t0:.0f}s", flush=True)
    return {a: (job, r) for a, job, r in zip(datasets, jobs, results)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-model", default="smollm2-135m")
    parser.add_argument("--corpus", type=Path, default=CORPUS,
                        help="a folder of hm-*.jsonl authors (benchmarks/corpus/history-meta-2023: held out from tuning)")
    parser.add_argument("--authors", type=int, default=6, help="authors, spread over the corpus's sizes")
    parser.add_argument("--only", nargs="*", default=None, help="these authors (hm-<id>) instead")
    parser.add_argument("--variants", nargs="*", default=["new", "old", "fixed30"], choices=list(VARIANTS))
    parser.add_argument("--sweep", action="store_true", help="only the step-budget table of --variants (tuning)")
    parser.add_argument("--retrieved", type=int, default=2, help="K: similar training replies shown")
    parser.add_argument("--matrix-examples", type=int, default=8, help="held-out replies per author in the matrix")
    parser.add_argument("--synthetic", type=int, default=3, help="synthetic users for the gate check (0, or 2 or more)")
    parser.add_argument("--synthetic-only", action="store_true", help="only the gate check on --synthetic users")
    parser.add_argument("--step-ceiling", type=int, default=None, metavar="N",
                        help="train every adapter at most N steps (quick runs; not for the README's figures)")
    parser.add_argument("--refit-steps", type=json.loads, default=None, metavar="JSON",
                        help='refit\'s steps per author, as "new" printed them ({"hm-65": 30, ...}): no "new" run needed')
    args = parser.parse_args()
    v = args.variants
    if "refit" in v and args.refit_steps is None and ("new" not in v or v.index("refit") < v.index("new")):
        parser.error("refit takes its steps from new: list new before it, or give --refit-steps")
    if args.synthetic == 1:
        parser.error("--synthetic needs 2 or more users: each is checked against another's adapter")

    base = load_base_model(args.base_model)
    train = partial(train_variant, base, ceiling=args.step_ceiling)
    if args.synthetic_only:
        with tempfile.TemporaryDirectory() as tmp:
            synthetic_gate(base, train, args.synthetic, Path(tmp))
        return
    everyone = corpus_datasets(args.corpus)
    chosen = args.only or spread(everyone, args.authors)
    datasets = {a: everyone[a] for a in chosen}
    missing = sorted(set(chosen) - set(args.refit_steps or chosen))
    if "refit" in v and missing:
        parser.error(f"--refit-steps has no steps for {', '.join(missing)}")
    print(f"corpus: {len(everyone)} authors, {sum(len(d) for d in everyone.values())} replies; "
          f"benchmarking {len(chosen)}: {', '.join(f'{a} ({len(datasets[a])})' for a in chosen)}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        # Each table as soon as what it needs is trained: the product's defaults first.
        variants = {args.variants[0]: train(args.variants[0], datasets, out, chosen=args.refit_steps)}
        if not args.sweep:
            trained = variants[args.variants[0]]
            print(f"\nheld-out loss per author (retrieval: the author's {args.retrieved} most similar training replies)")
            retrieval_table(base, trained, args.retrieved)
            print(f"\nattribution matrix (first {args.matrix_examples} held-out replies of each author)")
            attribution(base, trained, args.matrix_examples)
        steps = args.refit_steps
        for name in args.variants[1:]:
            if steps is None and "new" in variants:
                steps = kept_steps(variants["new"])
            variants[name] = train(name, datasets, out, chosen=steps)
        if "new" in variants:
            print(f"  steps validation kept (--refit-steps): {json.dumps(kept_steps(variants['new']))}", flush=True)
        print("\nstep budgets and settings: held-out loss (steps trained / step kept; a refit also says what its choosing pass trained)")
        budgets_table(base, variants)
        if args.sweep:
            return
        print("\npaired gate on the corpus")
        gate_checks(base, trained, train("seed1", datasets, out), "corpus", train("earlier", datasets, out))
        if args.synthetic:
            synthetic_gate(base, train, args.synthetic, out / "synthetic")


def synthetic_gate(base, train, users: int, out: Path) -> None:
    """The paired gate's checks on ``users`` synthetic users (``train``: ``train_variant`` bound to the base)."""
    synthetic = {f"user-{i:03d}": build_examples(MODE, generate_user(f"user-{i:03d}")) for i in range(users)}
    own = train("new", synthetic, out)
    print("\npaired gate on synthetic users")
    gate_checks(base, own, train("seed1", synthetic, out), "synthetic", train("earlier", synthetic, out))


if __name__ == "__main__":
    main()
