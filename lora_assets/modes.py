"""Mode declarations: what each per-user adapter learns, and from which sources.

A mode is declared once. Its ``primary`` source gives one example per record; its ``context``
sources are looked up while building (e.g. contacts, to know who a mail is from). Everything
downstream - the dataset and adapter assets, their graph edges, which changes retrain what - is
derived from these declarations. Adding a mode is adding one ``Mode(...)`` to ``MODES``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import pyarrow as pa

from lora_assets.data.schemas import SOURCES, InvalidRecord
from lora_assets.lora_spec import LearningRate, LoraSpec, StepBudget
from lora_assets.objective import DPO, SFT, Objective

Record = Mapping[str, Any]


@dataclass(frozen=True)
class Context:
    """Lookups from a user's context sources, handed to every example builder."""

    tables: Mapping[str, pd.DataFrame]

    def contact(self, name: str) -> Record | None:
        contacts = self.tables.get("contacts")
        if contacts is None or contacts.empty:
            return None
        hit = contacts[contacts["name"] == name]
        return None if hit.empty else hit.iloc[0].to_dict()

    def events_on(self, day: pd.Timestamp) -> list[str]:
        calendar = self.tables.get("calendar")
        if calendar is None or calendar.empty:
            return []
        same_day = calendar[calendar["start"].dt.date == day.date()]
        return sorted(same_day["title"].tolist())


@dataclass(frozen=True)
class ExampleDraft:
    """What a builder returns for one record; the dataset adds ids and the split."""

    prompt: str
    response: str


@dataclass(frozen=True)
class PairDraft:
    """A preference between two answers to one prompt, for DPO modes."""

    id: str
    prompt: str
    chosen: str
    rejected: str


Builder = Callable[[Record, Context], ExampleDraft | None]
PairBuilder = Callable[[list[Record], Context], list[PairDraft]]


@dataclass(frozen=True)
class UpdatePolicy:
    """When a retrain may continue from the user's published adapter instead of starting over.

    An update warm-starts from the published adapter and trains on the new and changed examples
    plus a replay sample of the others, for ``budget`` steps. It applies only while the change
    is small and the base model and LoRA settings are the ones the adapter was trained with; a
    deletion, a large change, ``max_streak`` updates in a row, or an update that fails the eval
    gate means a full retrain from scratch. Defaults chosen from ``benchmarks/incremental.py``.
    """

    max_change: float = 0.2  # share of training examples new or changed, at most
    max_streak: int = 3  # incremental updates in a row before a full retrain
    replay: float = 3.0  # unchanged examples replayed per new or changed one
    min_replay: int = 16
    budget: StepBudget = field(default_factory=lambda: StepBudget(epochs=2.0, min_steps=4, max_steps=40))
    learning_rate: float = 1e-3  # a few steps on a few new examples: the rate the update budget was measured at


@dataclass(frozen=True)
class Mode:
    """One behaviour of the base model, learned per user."""

    name: str
    description: str
    primary: str  # each record of this source becomes (at most) one example
    build: Builder | None  # SFT: one example per primary record
    system: str  # the instruction shown to the model as the system turn
    context: tuple[str, ...] = ()  # sources consulted while building every example
    objective: Objective = SFT()  # a pairwise objective (DPO) builds with build_pairs instead
    build_pairs: PairBuilder | None = None
    check: Callable[[Record], None] | None = None  # raises InvalidRecord for a record build_pairs cannot use
    lora: LoraSpec = field(default_factory=LoraSpec)
    eval_fraction: float = 0.2  # share of examples held out, chosen by hashing the example id
    budget: StepBudget = field(default_factory=StepBudget)  # a full (re)training
    # A full (re)training's rate, by the user's training examples: 3e-4 up to 45, rising with them;
    # 1e-3 from the budget's validate_below (60) on, where 2 epochs decide (benchmarks/personalization.py
    # on real writing: 1e-3 overfits small users before the first step kept, 3e-4 under-trains large ones).
    learning_rate: LearningRate = field(default_factory=LearningRate)
    update: UpdatePolicy = field(default_factory=lambda: UpdatePolicy())  # when and how to update incrementally

    @property
    def sources(self) -> tuple[str, ...]:
        return (self.primary, *self.context)

    def split_of(self, example_id: str) -> str:
        """``train`` or ``eval``, a pure function of the example id (stable across rebuilds)."""
        digest = hashlib.sha256(f"{self.name}:{example_id}".encode()).digest()
        return "eval" if int.from_bytes(digest[:8], "big") / 2**64 < self.eval_fraction else "train"


def _require(record: Record, *fields: str) -> None:
    for f in fields:
        value = record.get(f)
        if value is None or (isinstance(value, str) and not value.strip()):
            raise InvalidRecord(f"record {record.get('id')!r}: missing {f!r}")


def _who(name: str, ctx: Context) -> str:
    c = ctx.contact(name)
    return f"{name} ({c['relation']}, you call them {c['nickname']})" if c else name


def _mail_reply(rec: Record, ctx: Context) -> ExampleDraft | None:
    _require(rec, "sender", "subject", "body")
    if rec.get("reply") is None:
        return None  # mail the user never answered teaches nothing about their replies
    _require(rec, "reply")
    return ExampleDraft(
        prompt=f"From: {_who(rec['sender'], ctx)}\nSubject: {rec['subject']}\n\n{rec['body']}",
        response=rec["reply"],
    )


def _message_reply(rec: Record, ctx: Context) -> ExampleDraft | None:
    _require(rec, "contact", "text")
    if rec.get("reply") is None:
        return None
    _require(rec, "reply")
    return ExampleDraft(prompt=f"{_who(rec['contact'], ctx)}: {rec['text']}", response=rec["reply"])


def _search_suggest(rec: Record, ctx: Context) -> ExampleDraft | None:
    _require(rec, "query")
    first = rec["query"].split()[0]
    return ExampleDraft(prompt=f"Complete my search: {first}", response=rec["query"])


def _as_list(value: Any) -> list[str]:
    """List columns arrive as lists or numpy arrays (from Arrow); None means empty."""
    return [] if value is None else [str(v) for v in value]


def _photo_caption(rec: Record, ctx: Context) -> ExampleDraft | None:
    _require(rec, "caption", "location")
    people = []
    for name in _as_list(rec.get("people")):
        c = ctx.contact(name)
        people.append(c["nickname"] if c else name)
    tags = _as_list(rec.get("tags"))
    taken = pd.Timestamp(rec["taken_at"]) if rec.get("taken_at") is not None else None
    events = ctx.events_on(taken) if taken is not None else []
    lines = [f"Location: {rec['location']}"]
    if taken is not None:
        lines.append(f"Date: {taken.date().isoformat()}")
    if people:
        lines.append("People: " + ", ".join(people))
    if tags:
        lines.append("Tags: " + ", ".join(tags))
    if events:
        lines.append("Calendar: " + "; ".join(events))
    return ExampleDraft(prompt="\n".join(lines), response=rec["caption"])


def _tone_rewrite_check(rec: Record) -> None:
    """A feedback record tone_rewrite can pair (feedback on other modes is simply not its own)."""
    if rec.get("mode") not in (None, "tone_rewrite"):
        return
    _require(rec, "prompt", "suggestion", "outcome")
    if rec["outcome"] not in ("accepted", "rejected", "edited"):
        raise InvalidRecord(f"record {rec['id']!r}: unknown outcome {rec['outcome']!r}")
    if rec["outcome"] == "edited":
        _require(rec, "edit")


def _tone_rewrite_pairs(records: list[Record], ctx: Context) -> list[PairDraft]:
    """An edit beats the suggestion it edited; an accepted suggestion beats a rejected one for
    the same prompt (each rejected one paired with the first three accepted ones, in id order).

    Pairs are stable as feedback arrives: a new record only adds pairs (ids grow), so a pair
    disappears only when a record it was made of is deleted, and an adapter that learned from
    it is then retrained without it.
    """
    by_prompt: dict[str, dict[str, list[Record]]] = {}
    for rec in sorted(records, key=lambda r: r["id"]):
        if rec.get("mode") not in (None, "tone_rewrite"):
            continue
        by_prompt.setdefault(rec["prompt"], {}).setdefault(rec["outcome"], []).append(rec)
    pairs = []
    for prompt, groups in sorted(by_prompt.items()):
        for rec in groups.get("edited", []):
            if rec["edit"].strip() != rec["suggestion"].strip():
                pairs.append(PairDraft(f"{rec['id']}:edit", prompt, rec["edit"], rec["suggestion"]))
        accepted, rejected = groups.get("accepted", []), groups.get("rejected", [])
        for rej in rejected:
            for acc in accepted[:3]:
                if acc["suggestion"].strip() != rej["suggestion"].strip():
                    pairs.append(PairDraft(f"{acc['id']}>{rej['id']}", prompt, acc["suggestion"], rej["suggestion"]))
    return pairs


MODES: dict[str, Mode] = {
    m.name: m
    for m in [
        Mode(
            name="mail_reply",
            description="Reply to an email in the user's voice.",
            primary="mail",
            context=("contacts",),
            build=_mail_reply,
            system="Reply to this email as me.",
        ),
        Mode(
            name="message_reply",
            description="Reply to a chat message in the user's voice.",
            primary="messages",
            context=("contacts",),
            build=_message_reply,
            system="Reply to this message as me.",
        ),
        Mode(
            name="search_suggest",
            description="Suggest the user's next search from its first word.",
            primary="browsing",
            build=_search_suggest,
            system="Suggest my search.",
        ),
        Mode(
            name="photo_caption",
            description="Caption a photo the way the user does, from its metadata.",
            primary="photos",
            context=("contacts", "calendar"),
            build=_photo_caption,
            system="Caption this photo as I would.",
        ),
        Mode(
            name="tone_rewrite",
            description="Rewrite a text in the user's tone, learned from their feedback (DPO).",
            primary="feedback",
            build=None,
            build_pairs=_tone_rewrite_pairs,
            check=_tone_rewrite_check,
            objective=DPO(beta=0.1),
            system="Rewrite this in my tone.",
            # DPO on feedback pairs: not re-tuned on the corpus (it has no preferences), so neither
            # is its budget: validation chooses the step at every size, and keeps that adapter
            learning_rate=LearningRate(base=1e-3, maximum=1e-3),
            budget=StepBudget(validate_below=None, refit=False),
        ),
    ]
}

for _m in MODES.values():
    assert set(_m.sources) <= set(SOURCES), _m


def modes_reading(sources: set[str]) -> list[Mode]:
    """The modes whose dataset depends on any of ``sources``, in declaration order."""
    return [m for m in MODES.values() if sources & set(m.sources)]


def get_mode(name: str) -> Mode:
    try:
        return MODES[name]
    except KeyError:
        raise KeyError(f"unknown mode {name!r}; modes are {', '.join(MODES)}") from None


# One schema for every mode: SFT rows leave `rejected` empty; DPO rows hold chosen in `response`.
DATASET_COLUMNS = ("example_id", "system", "prompt", "response", "rejected", "split")


@dataclass(frozen=True)
class Examples:
    """A mode's dataset rows, and the stored records it could not use (id -> why)."""

    df: pd.DataFrame
    skipped: dict[str, str]


def build_examples(mode: Mode, tables: Mapping[str, pa.Table]) -> pd.DataFrame:
    """The mode's full dataset for one user: one row per usable primary record, sorted by id."""
    return examples_from_tables(mode, tables).df


def examples_from_tables(mode: Mode, tables: Mapping[str, pa.Table]) -> Examples:
    """The mode's full dataset for one user, and the records skipped as unusable.

    A record the mode cannot use (say a mail without a body, written around ingest's checks)
    is skipped and reported, never a failure of the user's whole dataset.
    """
    ctx = context_for(mode, tables)
    primary = tables.get(mode.primary)
    records = primary.to_pylist() if primary is not None else []
    if not mode.objective.pairwise:
        return examples_for_records(mode, ctx, records)
    usable, skipped = [], {}
    for rec in records:
        try:
            if mode.check is not None:
                mode.check(rec)
        except InvalidRecord as exc:
            skipped[rec["id"]] = str(exc)
            continue
        usable.append(rec)
    rows = [
        {"example_id": d.id, "system": mode.system, "prompt": d.prompt, "response": d.chosen,
         "rejected": d.rejected, "split": mode.split_of(d.id)}
        for d in mode.build_pairs(usable, ctx)
    ]
    df = pd.DataFrame(rows, columns=list(DATASET_COLUMNS))
    return Examples(df.sort_values("example_id", kind="stable").reset_index(drop=True), skipped)


def context_for(mode: Mode, tables: Mapping[str, pa.Table]) -> Context:
    """The lookups a mode's builder needs, from the user's context-source tables."""
    return Context({s: tables[s].to_pandas() for s in mode.context if s in tables})


def examples_for_records(mode: Mode, ctx: Context, records: list[dict[str, Any]]) -> Examples:
    """Dataset rows for some primary records (records as Arrow gives them: None for nulls)."""
    rows, skipped = [], {}
    for rec in records:
        try:
            draft = mode.build(rec, ctx)
        except InvalidRecord as exc:
            skipped[rec["id"]] = str(exc)
            continue
        if draft is not None:
            rows.append(
                {
                    "example_id": rec["id"],
                    "system": mode.system,
                    "prompt": draft.prompt,
                    "response": draft.response,
                    "rejected": "",
                    "split": mode.split_of(rec["id"]),
                }
            )
    df = pd.DataFrame(rows, columns=list(DATASET_COLUMNS))
    return Examples(df.sort_values("example_id", kind="stable").reset_index(drop=True), skipped)
