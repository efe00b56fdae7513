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

Prints figures only; the README records them with the date.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lora_assets.adapters import job_for, validation_slice  # noqa: E402
from lora_assets.data.schemas import records_to_table  # noqa: E402
from lora_assets.data.synthetic import generate_user  # noqa: E402
from lora_assets.gate import HELPS_CONFIDENCE, GateConfig, decide, paired  # noqa: E402
from lora_assets.lora_spec import StepBudget  # noqa: E402
from lora_assets.modes import MODES, build_examples  # noqa: E402
from lora_assets.training import load_base_model, train_adapters  # noqa: E402
from lora_assets.training.objectives import SftTraining, attached  # noqa: E402
from lora_assets.training.text import eval_batches_for, eval_loss  # noqa: E402

CORPUS = ROOT / "benchmarks" / "corpus" / "history-meta"
MODE = MODES["mail_reply"]
OLD_BUDGET = StepBudget(epochs=2.0, min_steps=10, max_steps=120)  # the default before validation chose the step
OLD_RATE = 1e-3  # ... and its learning rate
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
SFT = SftTraining()
MEASURED_AT = 128  # tokens per held-out example in the budgets table, whatever length a variant trained at


def measured(job):
    """``job`` as the budgets table scores it: at the length every README table was measured at."""
    return replace(job, max_length=MEASURED_AT)


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


def train_variant(base, name: str, datasets: dict, out: Path, chosen: dict | None = None) -> dict[str, tuple]:
    """``chosen``: author -> the step "refit" trains for (what validation kept in "new")."""
    def variant(author: str, job):
        return refit(job, chosen[author]) if name == "refit" else VARIANTS[name](job)

    jobs = [variant(a, job_for(MODE, a, df, out / name / a, gguf_type="")) for a, df in datasets.items()]
    t0 = time.perf_counter()
    results = train_adapters(jobs, base, progress=None, fusion="sequential")
    print(f"  trained {name}: {len(jobs)} adapters in {time.perf_counter() - t0:.0f}s", flush=True)
    return {a: (job, r) for a, job, r in zip(datasets, jobs, results)}


def show(rows: list[list], header: list[str]) -> None:
    cells = [header, *[[c if isinstance(c, str) else f"{c:.4f}" if isinstance(c, float) else str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for r in cells:
        print("  " + "  ".join(c.rjust(w) for c, w in zip(r, widths)), flush=True)


def rel(loss: float, base: float) -> str:
    return f"{100 * (loss - base) / base:+.1f}%"


def retrieval_table(base, trained: dict, k: int) -> dict[str, list[float]]:
    rows, cols = [], {"base": [], "retrieval": [], "adapter": [], "adapter+retrieval": []}
    helps = 0
    for author, (job, result) in trained.items():
        b, r = (s.mean for s in SFT.score_views(base, None, job, (0, k)))
        plain, with_k = SFT.score_views(base, job.output_dir, job, (0, k))
        a, ar = plain.mean, with_k.mean
        helped = paired(with_k, plain, HELPS_CONFIDENCE).better  # what the gate records for serving
        helps += helped
        for key, v in zip(cols, (b, r, a, ar)):
            cols[key].append(v)
        trained = len(job.train) + len(job.validation)  # training examples, slice included, as below
        rows.append([author, trained, len(job.eval), b, r, a, ar, rel(r, b), rel(a, b), rel(ar, b),
                     "adapter" if a < r else "retrieval", "yes" if helped else "no"])
    show(rows, ["author", "train", "held-out", "base", f"base+{k}", "adapter", f"adapter+{k}",
                "retrieval", "adapter", "both", "better", "retrieval_helps"])
    means = {key: statistics.mean(v) for key, v in cols.items()}
    print("  mean held-out loss: " + ", ".join(f"{key} {v:.4f}" for key, v in means.items()))
    print(f"  mean improvement over the base: retrieval {means['base'] - means['retrieval']:.4f} nats, adapter "
          f"{means['base'] - means['adapter']:.4f}, adapter+retrieval {means['base'] - means['adapter+retrieval']:.4f}; "
          f"adapter beats retrieval for {sum(a < r for a, r in zip(cols['adapter'], cols['retrieval']))}/{len(rows)}, "
          f"adapter+retrieval beats adapter for "
          f"{sum(ar < a for ar, a in zip(cols['adapter+retrieval'], cols['adapter']))}/{len(rows)} "
          f"(with {HELPS_CONFIDENCE:.0%} confidence, retrieval_helps: {helps}/{len(rows)})", flush=True)
    return cols


def _per_example(base, variant: dict) -> dict:
    """Each author's held-out scores under the variant's adapter (the same held-out set and
    length for every variant)."""
    return {author: SFT.scores(base, result.output_dir, measured(job)) for author, (job, result) in variant.items()}


def _difference_interval(variant: dict, reference: dict, resamples: int = 2000) -> tuple[float, float, float]:
    """Mean over authors of (variant - reference) held-out loss (``_per_example`` scores), with a
    95 % interval from resampling each author's held-out examples (paired: the same examples)."""
    rng = np.random.default_rng(0)
    per_author = []
    for author, v in variant.items():
        r = reference[author]
        per_author.append((np.asarray(v.losses) - np.asarray(r.losses), np.asarray(v.weights, dtype=float)))
    mid = statistics.mean(float(d.sum() / w.sum()) for d, w in per_author)
    boot = np.zeros(resamples)
    for d, w in per_author:
        idx = rng.integers(0, len(d), size=(resamples, len(d)))
        boot += d[idx].sum(axis=1) / np.maximum(w[idx].sum(axis=1), 1.0)
    low, high = np.quantile(boot / len(per_author), [0.025, 0.975])
    return float(low), mid, float(high)


def budgets_table(base, variants: dict[str, dict]) -> None:
    names = list(variants)
    authors = list(next(iter(variants.values())))
    scores = {n: _per_example(base, variants[n]) for n in names}  # each scored once
    bases = {a: SFT.scores(base, None, measured(variants[names[0]][a][0])).mean for a in authors}
    rows = []
    for a in authors:
        job = variants[names[0]][a][0]
        row = [a, len(job.train) + len(job.validation), bases[a]]
        for n in names:
            r = variants[n][a][1]
            row += [scores[n][a].mean, f"{r.steps}" + (f"/best {r.best_step}" if r.best_step else "")
                    + (" avg" if r.averaged else "") + (f" refit of {r.validation_steps}" if r.refit else "")]
        rows.append(row)
    print(f"  (held-out examples of {MEASURED_AT} tokens for every variant)")
    show(rows, ["author", "train", "base", *[h for n in names for h in (n, "steps")]])
    # Each variant against the first, and the default against validation at every size (what it replaced).
    pairs = [(n, names[0]) for n in names[1:]]
    if {"new", "validate"} <= set(names[1:]):
        pairs.append(("new", "validate"))
    for n, ref in pairs:  # whether a difference in the mean is more than the held-out sets' noise
        low, mid, high = _difference_interval(scores[n], scores[ref])
        print(f"  {n} minus {ref}: {mid:+.4f} nats mean held-out loss over the authors, 95% interval "
              f"[{low:+.4f}, {high:+.4f}] (examples resampled within each author)", flush=True)
    for n in names:
        gains = [bases[a] - scores[n][a].mean for a in authors]
        steps = [variants[n][a][1].steps for a in authors]
        print(f"  {n}: mean improvement {statistics.mean(gains):.4f} nats "
              f"({100 * statistics.mean(g / bases[a] for g, a in zip(gains, authors)):.1f}% of base), "
              f"mean steps {statistics.mean(steps):.0f}", flush=True)


def attribution(base, trained: dict, per_author: int) -> None:
    """Row: whose held-out replies; column: whose adapter. Own adapter best on the diagonal?"""
    authors = list(trained)
    batches = {a: eval_batches_for(base.tokenizer, base.device, list(trained[a][0].eval)[:per_author])
               for a in authors}
    matrix = {a: {} for a in authors}
    for col in authors:
        with attached(base, trained[col][0].output_dir) as model:
            for row in authors:
                matrix[row][col] = eval_loss(model, batches[row])
    own_best = sum(min(matrix[r], key=matrix[r].get) == r for r in authors)
    gaps = [statistics.mean(v for c, v in matrix[r].items() if c != r) - matrix[r][r] for r in authors]
    show([[r, *[matrix[r][c] for c in authors]] for r in authors], ["held-out \\ adapter", *authors])
    print(f"  own adapter scores best on its author's held-out replies for {own_best}/{len(authors)} authors; "
          f"own vs mean other: {statistics.mean(gaps):.4f} nats better (min {min(gaps):.4f})", flush=True)


def _bounds(verdict, published: float) -> str:
    """A paired verdict's lower and upper bounds in % of the published loss."""
    return f"{100 * verdict.lower / published:+.2f}% {100 * verdict.upper / published:+.2f}%"


def gate_checks(base, trained: dict, reseeded: dict, label: str, earlier: dict | None = None) -> None:
    """Same data, new seed: refused? Another author's adapter in place of the own: accepted? And
    with ``earlier`` (adapters of a fifth fewer examples published): the update to all refused?"""
    config = GateConfig()
    authors = list(trained)
    refused_seed, accepted_other, refused_update, rows = 0, 0, 0, []
    for i, a in enumerate(authors):
        job = trained[a][0]
        own = SFT.scores(base, job.output_dir, job)
        base_scores = SFT.scores(base, None, job)
        again = SFT.scores(base, reseeded[a][0].output_dir, job)
        seed_verdict = paired(again, own, config.confidence)
        seed_ok = decide(base_scores.mean, again.mean, seed_verdict, config, own.mean)[0]
        other = authors[(i + 1) % len(authors)]
        theirs = SFT.scores(base, trained[other][0].output_dir, job)
        other_verdict = paired(theirs, own, config.confidence)
        other_ok = decide(base_scores.mean, theirs.mean, other_verdict, config, own.mean)[0]
        refused_seed += not seed_ok
        accepted_other += other_ok
        rows.append([a, len(job.eval), own.mean, again.mean, _bounds(seed_verdict, own.mean),
                     "pass" if seed_ok else "REFUSED", other, theirs.mean, _bounds(other_verdict, own.mean),
                     "ACCEPTED" if other_ok else "refused"])
        if earlier is not None:  # the earlier adapter published, the own (all examples) the candidate
            before = SFT.scores(base, earlier[a][0].output_dir, job)
            update = paired(own, before, config.confidence)
            update_ok = decide(base_scores.mean, own.mean, update, config, before.mean)[0]
            refused_update += not update_ok
            rows[-1] += [before.mean, _bounds(update, before.mean), "pass" if update_ok else "REFUSED"]
    show(rows, ["user", "held-out", "published", "seed 1", "bounds", "gate", "other's", "loss", "bounds", "gate",
                *(["earlier", "update bounds", "gate"] if earlier is not None else [])])
    print(f"  (bounds: the {config.confidence:.0%} one-sided lower and upper bounds of the paired difference, % of the "
          f"published loss; refused when worse on the mean and the upper bound is above {config.noise:.0%} and "
          f"{config.noise_floor} nats)")
    print(f"  {label}: paired gate at {config.confidence:.0%} refused {refused_seed}/{len(authors)} same-data "
          f"retrains with a new seed and accepted {accepted_other}/{len(authors)} adapters of another user"
          + (f"; refused {refused_update}/{len(authors)} updates of an adapter trained on a fifth fewer examples"
             if earlier is not None else ""), flush=True)


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
    parser.add_argument("--refit-steps", type=json.loads, default=None, metavar="JSON",
                        help='refit\'s steps per author, as "new" printed them ({"hm-65": 30, ...}): no "new" run needed')
    args = parser.parse_args()
    v = args.variants
    if "refit" in v and args.refit_steps is None and ("new" not in v or v.index("refit") < v.index("new")):
        parser.error("refit takes its steps from new: list new before it, or give --refit-steps")
    if args.synthetic == 1:
        parser.error("--synthetic needs 2 or more users: each is checked against another's adapter")

    base = load_base_model(args.base_model)
    if args.synthetic_only:
        with tempfile.TemporaryDirectory() as tmp:
            synthetic_gate(base, args.synthetic, Path(tmp))
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
        variants = {args.variants[0]: train_variant(base, args.variants[0], datasets, out, chosen=args.refit_steps)}
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
            variants[name] = train_variant(base, name, datasets, out, chosen=steps)
        if "new" in variants:
            print(f"  steps validation kept (--refit-steps): {json.dumps(kept_steps(variants['new']))}", flush=True)
        print("\nstep budgets and settings: held-out loss (steps trained / step kept; a refit also says what its choosing pass trained)")
        budgets_table(base, variants)
        if args.sweep:
            return
        print("\npaired gate on the corpus")
        gate_checks(base, trained, train_variant(base, "seed1", datasets, out), "corpus",
                    train_variant(base, "earlier", datasets, out))
        if args.synthetic:
            synthetic_gate(base, args.synthetic, out / "synthetic")


def synthetic_gate(base, users: int, out: Path) -> None:
    synthetic = {f"user-{i:03d}": build_examples(MODE, generate_user(f"user-{i:03d}")) for i in range(users)}
    own = train_variant(base, "new", synthetic, out)
    print("\npaired gate on synthetic users")
    gate_checks(base, own, train_variant(base, "seed1", synthetic, out), "synthetic",
                train_variant(base, "earlier", synthetic, out))


if __name__ == "__main__":
    main()
