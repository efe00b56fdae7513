"""Continuous batching: one forward pass of the base model per decoding step for every request.

A single thread owns the model. Each iteration it admits waiting requests (up to ``max_batch``
rows in flight), runs their prompts as one left-padded prefill, merges their KV cache into the
running batch's (left-padding the shorter), and then decodes one token for every row in one pass,
each row through its own adapter slot (``slots.AdapterSlots``). A finished row leaves the batch at
once; a new request waits at most one step to join, not for the batch to drain.

Rows are independent: each has its own positions (from its own attention mask), so a row decodes
to the same tokens in a mixed batch as alone (greedy; up to float reduction order).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lora_assets.serving.slots import AdapterSlots

log = logging.getLogger(__name__)

# (text delta, finish_reason or None, completion tokens so far); called on the engine's thread.
Emit = Callable[[str, "str | None", int], None]


GREEDY_BELOW = 1e-3  # a temperature this small is greedy (dividing by it would overflow)


class Busy(RuntimeError):
    """More requests than ``max_concurrent`` are in flight."""


@dataclass(frozen=True)
class Sampling:
    max_tokens: int
    temperature: float = 0.0  # 0: greedy, so the same adapter always says the same thing
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(eq=False)
class Job:
    """One chat completion: its prompt, the slot of its adapter, how to sample, where text goes."""

    prompt_ids: list[int]
    slot: int
    sampling: Sampling
    emit: Emit
    on_done: Callable[[], None] = lambda: None  # releases the adapter lease
    cancelled: bool = False  # the client went away: the row leaves at the next step
    finished: bool = False  # counted out of in-flight and its lease released (once)


@dataclass(eq=False)
class _Row:
    job: Job
    pos: int  # position id of the next token fed
    generated: list[int] = field(default_factory=list)
    sent: int = 0  # characters of the decoded text already emitted
    next_token: int = 0
    done: bool = False
    generator: torch.Generator | None = None


class Engine:
    def __init__(self, model: torch.nn.Module, tokenizer, slots: AdapterSlots, max_batch: int,
                 max_concurrent: int, on_step: Callable[[int], None] = lambda n: None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.slots = slots
        self.max_batch = max_batch
        self.max_concurrent = max_concurrent
        self.on_step = on_step  # rows in each decoding pass (the batch-size metric)
        self.device = next(model.parameters()).device
        eos = model.generation_config.eos_token_id if model.generation_config else None
        self.eos = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
        self.eos.discard(None)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._queue: queue.Queue[Job] = queue.Queue()
        self._lock = threading.Lock()
        self._in_flight = 0
        self._rows: list[_Row] = []
        self._cache = None
        self._mask: torch.Tensor | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="lora-assets-engine", daemon=True)

    # --- the request side (any thread) ---------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def submit(self, job: Job) -> None:
        with self._lock:
            if self._in_flight >= self.max_concurrent:
                raise Busy(f"{self._in_flight} requests in flight (the limit is {self.max_concurrent})")
            self._in_flight += 1
        self._queue.put(job)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    # --- the engine thread ---------------------------------------------------------------------

    def _loop(self) -> None:
        with torch.inference_mode():
            while not self._stop.is_set():
                try:
                    self._admit()
                    if self._rows:
                        self._decode()
                except Exception:  # a failed pass fails the requests in it, not the server
                    log.exception("decoding pass failed")
                    try:
                        self._fail(self._rows)
                        self._rows, self._cache, self._mask = [], None, None
                    except Exception:
                        log.exception("could not fail the requests of a failed pass")

    def _fail(self, rows: list[_Row]) -> None:
        for row in rows:
            if not row.job.finished:
                row.job.emit("", "error", len(row.generated))
                self._finish(row.job)

    def _admit(self) -> None:
        if len(self._rows) >= self.max_batch:
            return  # waiting requests join as rows finish
        jobs: list[Job] = []
        try:
            jobs.append(self._queue.get(timeout=0.05) if not self._rows else self._queue.get_nowait())
            while len(self._rows) + len(jobs) < self.max_batch:
                jobs.append(self._queue.get_nowait())
        except queue.Empty:
            pass
        for job in [j for j in jobs if j.cancelled]:
            self._finish(job)
        jobs = [j for j in jobs if not j.cancelled]
        if not jobs:
            return
        try:
            self._prefill(jobs)
        except Exception:
            self._fail([_Row(job=j, pos=0) for j in jobs if not any(r.job is j for r in self._rows)])
            raise

    def _prefill(self, jobs: list[Job]) -> None:
        width = max(len(j.prompt_ids) for j in jobs)
        ids = torch.tensor([[self.pad] * (width - len(j.prompt_ids)) + j.prompt_ids for j in jobs], device=self.device)
        mask = torch.tensor([[0] * (width - len(j.prompt_ids)) + [1] * len(j.prompt_ids) for j in jobs],
                            device=self.device)
        rows = [_Row(job=j, pos=len(j.prompt_ids), generator=_generator(j.sampling)) for j in jobs]
        self.slots.select([j.slot for j in jobs])
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                         use_cache=True, logits_to_keep=1)
        if self._cache is None:
            self._cache, self._mask = out.cache, mask
        else:
            self._cache, self._mask = _merge(self._cache, self._mask, out.cache, mask)
        self._rows.extend(rows)
        self._accept(rows, out.logits[:, -1])
        self._drop_finished()

    def _decode(self) -> None:
        rows = self._rows
        tokens = torch.tensor([[r.next_token] for r in rows], device=self.device)
        positions = torch.tensor([[r.pos] for r in rows], device=self.device)
        self._mask = F.pad(self._mask, (0, 1), value=1)
        self.slots.select([r.job.slot for r in rows])
        out = self.model(input_ids=tokens, attention_mask=self._mask, position_ids=positions, cache=self._cache,
                         use_cache=True, logits_to_keep=1)
        self._cache = out.cache
        self.on_step(len(rows))
        for r in rows:
            r.pos += 1
        self._accept(rows, out.logits[:, -1])
        self._drop_finished()

    def _accept(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """Pick each row's next token, emit the text it completes, finish rows at eos/stop/length."""
        greedy = logits.argmax(-1).tolist()
        for i, row in enumerate(rows):
            s = row.job.sampling
            try:
                token = greedy[i] if row.generator is None else _sample(logits[i].float(), s, row.generator)
            except RuntimeError:  # this row's sampling failed (non-finite probabilities): only this row
                row.job.emit("", "error", len(row.generated))
                row.done = True
                continue
            row.next_token = token
            if token in self.eos:
                self._emit(row, "stop")
                continue
            row.generated.append(token)
            self._emit(row, "length" if len(row.generated) >= s.max_tokens else None)

    def _emit(self, row: _Row, finish: str | None) -> None:
        # No clean-up of spaces: each step's text must extend the last one (streamed deltas).
        text = self.tokenizer.decode(row.generated, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        stops = row.job.sampling.stop
        for stop in stops:
            at = text.find(stop)
            if at >= 0:
                text, finish = text[:at], "stop"
        end = len(text)
        if finish is None:  # hold back what may be half a character or the start of a stop string
            end -= max((len(s) - 1 for s in stops), default=0)
            while end > row.sent and text[end - 1] == "\ufffd":
                end -= 1
        delta = text[row.sent : max(end, row.sent)]
        row.sent += len(delta)
        if delta or finish:
            row.job.emit(delta, finish, len(row.generated))
        row.done = finish is not None

    def _drop_finished(self) -> None:
        """Rows that finished (or whose client left) leave the batch and its cache."""
        gone = [r for r in self._rows if r.done or r.job.cancelled]
        if not gone:
            return
        for r in gone:
            self._finish(r.job)
        keep = [i for i, r in enumerate(self._rows) if r not in gone]
        self._rows = [self._rows[i] for i in keep]
        if not keep:
            self._cache = self._mask = None
            return
        index = torch.tensor(keep, device=self.device)
        mask = self._mask.index_select(0, index)
        lead = int((mask.sum(0) == 0).long().cumprod(0).sum())  # columns now padding in every row
        self._mask = mask[:, lead:]
        for layer in self._cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, lead:]
            layer.values = layer.values.index_select(0, index)[:, :, lead:]

    def _finish(self, job: Job) -> None:
        if job.finished:
            return
        job.finished = True
        with self._lock:
            self._in_flight -= 1
        job.on_done()


def _merge(cache, mask: torch.Tensor, other, other_mask: torch.Tensor):
    """One cache for two row groups: left-pad the shorter to the longer, stack the rows."""
    width = max(mask.shape[1], other_mask.shape[1])

    def pad(t: torch.Tensor, have: int, dim_from_end: int) -> torch.Tensor:
        return F.pad(t, (0, 0) * (dim_from_end - 1) + (width - have, 0)) if width > have else t

    for layer, new in zip(cache.layers, other.layers, strict=True):
        layer.keys = torch.cat([pad(layer.keys, mask.shape[1], 2), pad(new.keys, other_mask.shape[1], 2)])
        layer.values = torch.cat([pad(layer.values, mask.shape[1], 2), pad(new.values, other_mask.shape[1], 2)])
    return cache, torch.cat([pad(mask, mask.shape[1], 1), pad(other_mask, other_mask.shape[1], 1)])


def _generator(sampling: Sampling) -> torch.Generator | None:
    if sampling.temperature < GREEDY_BELOW:
        return None
    generator = torch.Generator()
    if sampling.seed is not None:
        generator.manual_seed(sampling.seed)
    else:
        generator.seed()
    return generator


def _sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> int:
    probs = torch.softmax(logits / sampling.temperature, dim=-1).cpu()
    if sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > sampling.top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))
