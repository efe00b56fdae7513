"""The evaluation gate: publish an adapter only if it is better than the base model, and not
worse than what the user's devices already run. No dagster here; the asset check reports it.

The loss is the held-out response loss for SFT modes and the held-out DPO loss for DPO modes
(the base scores ln 2 there). Every model is scored on the same *new* held-out set, example by
example, so comparisons are paired: the published adapter is re-scored on it, and the verdict
against it is a one-sided paired bootstrap over the examples at ``confidence``. The allowance is
``noise`` (a fraction of the published loss: what a retrain of the same data with another seed
moves) or ``noise_floor`` nats, whichever is larger (a user learned to a few thousandths of a nat
moves by a large fraction of a tiny loss between seeds). A candidate worse than the published
version on the mean is refused unless its upper bound is within the allowance: so it is refused
when it is worse by more than that with confidence, and also when it is too unlike the published
version, example by example, to say it is not. A retrain of the same data agrees with the
published version example by example: its interval is narrow, and it passes however few examples
there are. An adapter that learned other data (another user's, say) disagrees example by example:
where it is worse on the mean it is refused even when the mean alone is within the allowance. A
candidate better on the mean is never refused for the published version
(``benchmarks/personalization.py`` measures both on real writing). Against the base the candidate
must win by ``margin`` nats on the mean.

The retrieval baseline is scored beside it (SFT modes): the base shown the user's ``retrieval_k``
most similar training examples, and the candidate with them. A deployment may require the
adapter to beat the baseline; where adapter + retrieval beats the adapter alone with confidence,
the verdict says so (``retrieval_helps``), for serving to add the examples for that user.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from lora_assets.drive.publish import (
    FORMATS,
    CorruptVersion,
    adapter_prefix,
    current_manifest,
    fetch_verified,
    learned_deleted,
)
from lora_assets.storage import ObjectStore
from lora_assets.training.base_models import LoadedBaseModel
from lora_assets.training.core import METADATA_FILE
from lora_assets.training.jobs import TrainJob, TrainResult
from lora_assets.training.objectives import Scores, training_for

GATE_FILE = "gate.json"
RESAMPLES = 2000  # bootstrap resamples: the bound moves by < 0.5 % of its width between seeds
HELPS_CONFIDENCE = 0.95  # adapter + retrieval is recorded as better than the adapter alone at this level


@dataclass(frozen=True)
class GateConfig:
    """How strict the gate is: each field is a ``Settings`` field of the same name (``gate_*``)."""

    margin: float = 0.01  # nats the candidate must beat the base by (mean held-out loss)
    confidence: float = 0.95  # the one-sided level of the paired bounds against the published version; 1.0: never refused
    noise: float = 0.02  # worse on the mean: refused unless within this fraction of its loss (what a reseed moves) ...
    noise_floor: float = 0.01  # ... or this many nats, whichever is larger: near-zero losses differ by tiny amounts
    retrieval_k: int = 2  # examples the retrieval baseline shows; 0: not scored
    require_retrieval: bool = False  # refuse an adapter that does not beat the retrieval baseline


@dataclass(frozen=True)
class Paired:
    """Candidate minus other, token-weighted mean loss, with its one-sided bounds at the confidence."""

    difference: float
    lower: float
    upper: float

    def worse(self, by: float = 0.0) -> bool:
        """Worse by more than ``by`` with the confidence the bounds were drawn at."""
        return self.lower > by

    def within(self, by: float) -> bool:
        """Not worse by more than ``by``, with the confidence the bounds were drawn at."""
        return self.upper <= by

    @property
    def better(self) -> bool:
        return self.upper < 0


@dataclass(frozen=True)
class GateResult:
    passed: bool
    reason: str
    base_eval_loss: float | None
    adapter_eval_loss: float | None
    published_version: str | None
    published_eval_loss: float | None
    margin: float
    confidence: float = 0.95
    noise: float = 0.0
    noise_floor: float = 0.0
    vs_published: Paired | None = None
    retrieval_eval_loss: float | None = None  # the base with the user's retrieved examples in the prompt
    adapter_retrieval_eval_loss: float | None = None  # the candidate with them
    retrieval_k: int = 0
    retrieval_helps: bool = False  # adapter + retrieval beats the adapter alone with confidence
    eval_examples: int = 0


def paired(candidate: Scores, other: Scores, confidence: float, seed: int = 0) -> Paired:
    """The candidate's mean loss minus ``other``'s on the same examples, and a one-sided paired
    bootstrap bound each way at ``confidence`` (resampling examples, so a long example weighs as
    its tokens do). At confidence 1.0 the bounds are infinite: nothing is "worse with confidence"."""
    c, o = np.asarray(candidate.losses, dtype=float), np.asarray(other.losses, dtype=float)
    w = np.asarray(candidate.weights, dtype=float)
    if c.shape != o.shape or list(candidate.weights) != list(other.weights):
        raise ValueError("paired scores must be on the same examples")
    diff = float((c.sum() - o.sum()) / w.sum())
    if confidence >= 1.0:
        return Paired(diff, -math.inf, math.inf)
    idx = np.random.default_rng(seed).integers(0, len(c), size=(RESAMPLES, len(c)))
    boot = (c[idx].sum(axis=1) - o[idx].sum(axis=1)) / np.maximum(w[idx].sum(axis=1), 1.0)
    lower, upper = np.quantile(boot, [1.0 - confidence, confidence])
    return Paired(diff, float(lower), float(upper))


def allowed(config: GateConfig, published_loss: float) -> float:
    """How much worse than the published version a candidate may be, at its upper bound, and pass."""
    return max(config.noise * published_loss, config.noise_floor)


def refused_for_published(vs_published: Paired | None, config: GateConfig, published_loss: float | None) -> bool:
    """Worse than the published version on the mean and not within the allowance of it with
    confidence (which covers worse by more than the allowance with confidence)."""
    if vs_published is None or published_loss is None or config.confidence >= 1.0:
        return False
    return vs_published.difference > 0 and not vs_published.within(allowed(config, published_loss))


def decide(
    base_loss: float | None,
    adapter_loss: float | None,
    vs_published: Paired | None,
    config: GateConfig,
    published_loss: float | None = None,
    retrieval_loss: float | None = None,
) -> tuple[bool, str]:
    if base_loss is None or adapter_loss is None:
        return False, "no held-out examples to evaluate on"
    if adapter_loss > base_loss - config.margin:
        return False, f"adapter {adapter_loss:.4f} does not beat base {base_loss:.4f} by {config.margin}"
    if refused_for_published(vs_published, config, published_loss):
        allowance = f"{config.noise:.0%} (and {config.noise_floor} nats)"
        if vs_published.worse(allowed(config, published_loss)):
            return False, (f"adapter {adapter_loss:.4f} is worse than published {published_loss:.4f} by more than "
                           f"{allowance} with {config.confidence:.0%} confidence (paired difference "
                           f"{vs_published.difference:+.4f}, lower bound {vs_published.lower:+.4f})")
        return False, (f"adapter {adapter_loss:.4f} is worse than published {published_loss:.4f} on the mean and not "
                       f"within {allowance} of it with {config.confidence:.0%} confidence: too unlike it example by "
                       f"example (paired difference {vs_published.difference:+.4f}, upper bound "
                       f"{vs_published.upper:+.4f})")
    if config.require_retrieval and retrieval_loss is not None and adapter_loss >= retrieval_loss:
        return False, f"adapter {adapter_loss:.4f} does not beat the retrieval baseline {retrieval_loss:.4f}"
    reason = f"adapter {adapter_loss:.4f} < base {base_loss:.4f} - {config.margin}"
    if vs_published is not None:
        reason += (f", not worse than published {published_loss:.4f} on the mean or within {config.noise:.0%} of it "
                   f"with {config.confidence:.0%} confidence (paired difference {vs_published.difference:+.4f})")
    if config.require_retrieval and retrieval_loss is not None:
        reason += f", beats the retrieval baseline {retrieval_loss:.4f}"
    return True, reason


def evaluate_gate(
    base: LoadedBaseModel,
    job: TrainJob,
    result: TrainResult,
    drive: ObjectStore,
    user: str,
    mode: str,
    config: GateConfig,
    live_examples: frozenset[str] | None = None,
) -> GateResult:
    """Score the saved candidate, the base, the published CURRENT version and the retrieval
    baseline on the job's held-out set, example by example, and decide.

    The published version is not compared when it is unreadable (a damaged upload) or was
    trained on examples no longer in ``live_examples`` (the dataset's training ids): a delete
    removes it anyway.
    """
    published, unreadable, stale = None, None, None
    try:
        published = current_manifest(drive, user, base.ref.key, mode)
        if published is not None and job.eval:
            files = fetch_verified(drive, adapter_prefix(user, base.ref.key, mode), published, FORMATS["peft"])
    except (CorruptVersion, FileNotFoundError, ValueError, KeyError, TypeError) as exc:
        # A damaged published version is no bar to a good one: compare with the base only, and
        # publish over it.
        published, unreadable = None, f"{type(exc).__name__}: {exc}"
    if published is not None and job.eval and live_examples is not None:
        metadata = json.loads(files["lora_assets.json"])
        if learned_deleted(metadata, live_examples):
            # Trained on records the user deleted: it is removed whatever this gate says, so it
            # is no standard to hold the retrain without them to.
            gone = set(metadata["trained_examples"]) - live_examples
            published, stale = None, f"{len(gone)} of its training examples were deleted"
    training = training_for(job.objective)
    scores = {}
    if job.eval:
        # What is published is scored: the saved files (fp16 by default), not the fp32 in memory.
        if config.retrieval_k and training.retrieval:
            # Plain and with the retrieved examples, the candidate attached once for both.
            views = (0, config.retrieval_k)
            scores["base"], scores["retrieval"] = training.score_views(base, None, job, views)
            scores["adapter"], scores["adapter_retrieval"] = training.score_views(base, Path(job.output_dir), job, views)
        else:
            scores["base"] = training.scores(base, None, job)
            scores["adapter"] = training.scores(base, Path(job.output_dir), job)
        if published is not None:
            with tempfile.TemporaryDirectory() as tmp:
                for name, data in files.items():
                    (Path(tmp) / name).write_bytes(data)
                scores["published"] = training.scores(base, Path(tmp), job)
    mean = lambda key: scores[key].mean if key in scores else None  # noqa: E731
    vs_published = paired(scores["adapter"], scores["published"], config.confidence) if "published" in scores else None
    helps = ("adapter_retrieval" in scores
             and paired(scores["adapter_retrieval"], scores["adapter"], HELPS_CONFIDENCE).better)
    passed, reason = decide(mean("base"), mean("adapter"), vs_published, config, mean("published"), mean("retrieval"))
    if unreadable:
        reason += f" (the published version is unreadable and was not compared: {unreadable[:200]})"
    if stale:
        reason += f" (the published version was not compared: {stale})"
    gate = GateResult(
        passed=passed,
        reason=reason,
        base_eval_loss=mean("base"),
        adapter_eval_loss=mean("adapter"),
        published_version=published["version"] if published else None,
        published_eval_loss=mean("published"),
        margin=config.margin,
        confidence=config.confidence,
        noise=config.noise,
        noise_floor=config.noise_floor,
        vs_published=vs_published,
        retrieval_eval_loss=mean("retrieval"),
        adapter_retrieval_eval_loss=mean("adapter_retrieval"),
        retrieval_k=config.retrieval_k if "retrieval" in scores else 0,
        retrieval_helps=helps,
        eval_examples=len(job.eval),
    )
    (Path(job.output_dir) / GATE_FILE).write_text(json.dumps(asdict(gate), indent=2))
    _record_baseline(Path(job.output_dir), gate)
    return gate


def _record_baseline(folder: Path, gate: GateResult) -> None:
    """The held-out figures into the adapter's own ``lora_assets.json``, which is published with
    it: a device or a server reading a version learns whether retrieval helps this user."""
    path = folder / METADATA_FILE
    meta = json.loads(path.read_text())
    meta["held_out"] = {k: getattr(gate, k) for k in (
        "eval_examples", "base_eval_loss", "adapter_eval_loss", "retrieval_k", "retrieval_eval_loss",
        "adapter_retrieval_eval_loss", "retrieval_helps")}
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(meta, indent=2, default=str))
    tmp.replace(path)


def read_gate(adapter_dir: Path) -> GateResult | None:
    """The verdict saved beside an adapter (fields unknown to this version, e.g. an older
    ``tolerance``, are ignored)."""
    path = Path(adapter_dir) / GATE_FILE
    if not path.exists():
        return None
    raw = json.loads(path.read_text())
    known = {f.name for f in fields(GateResult)}
    values = {k: v for k, v in raw.items() if k in known}
    if isinstance(values.get("vs_published"), dict):
        values["vs_published"] = Paired(**values["vs_published"])
    values.setdefault("margin", 0.0)
    return GateResult(**values)
