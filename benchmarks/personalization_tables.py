"""The tables ``personalization.py`` prints: held-out loss with and without retrieval, the step
budgets with paired intervals, the attribution matrix and the paired gate's checks.

Each takes trained variants as ``{author: (job, TrainResult)}`` and the loaded base model, and
scores through the same ``SftTraining`` views the eval gate uses.
"""

from __future__ import annotations

import statistics
from dataclasses import replace

import numpy as np

from lora_assets.gate import HELPS_CONFIDENCE, GateConfig, decide, paired
from lora_assets.training.objectives import SftTraining, attached
from lora_assets.training.text import eval_batches_for, eval_loss

SFT = SftTraining()
MEASURED_AT = 128  # tokens per held-out example in the budgets table, whatever length a variant trained at


def measured(job):
    """``job`` as the budgets table scores it: at the length every README table was measured at."""
    return replace(job, max_length=MEASURED_AT)


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
        examples = len(job.train) + len(job.validation)  # training examples, slice included, as below
        rows.append([author, examples, len(job.eval), b, r, a, ar, rel(r, b), rel(a, b), rel(ar, b),
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
