"""``lora-assets serve``: the users' adapters behind an OpenAI-compatible HTTP API.

Starlette routes run under uvicorn (both already installed with dagster-webserver). The event loop
only parses, authorizes and relays; drive reads and tokenizing run in the thread pool; the model
belongs to the engine's thread (``engine.py``), which decodes all requests in flight together.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, replace

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from lora_assets.data.user_store import InvalidUserId, validate_user_id
from lora_assets.drive.publish import CorruptVersion
from lora_assets.serving import api
from lora_assets.serving.adapters import Unservable, load_weights, read_pointer
from lora_assets.serving.auth import Principal, TokenFile
from lora_assets.serving.cache import BASE_LEASE, AdapterCache, Lease, NoAdapter, SlotsBusy
from lora_assets.serving.engine import Busy, Engine, Job
from lora_assets.serving.metrics import CONTENT_TYPE, ServeMetrics
from lora_assets.serving.retrieval import HEADER as RETRIEVED_HEADER
from lora_assets.serving.retrieval import UserRetrievers, examples_to_show
from lora_assets.serving.slots import AdapterSlots
from lora_assets.settings import Settings
from lora_assets.storage import storage_errors

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeOptions:
    base_model: str
    max_adapters: int  # adapters resident at once (LRU)
    max_batch: int  # rows decoded together
    max_concurrent: int  # requests queued or decoding; more get 429
    max_tokens: int  # the largest max_tokens a request may ask for
    max_context: int  # prompt + max_tokens, in tokens (at most the base model's own)
    refresh_s: float  # a moved CURRENT is served within this
    retrieval: str = "helps"  # the user's retrieved examples in the prompt (``serving.retrieval``)
    retrieval_k: int = 2  # how many, for a version that does not record its own


def options_from(settings: Settings, base_model: str, **overrides) -> ServeOptions:
    values = dict(base_model=base_model, max_adapters=settings.serve_max_adapters, max_batch=settings.serve_max_batch,
                  max_concurrent=settings.serve_max_concurrent, max_tokens=settings.serve_max_tokens,
                  max_context=settings.serve_max_context, refresh_s=settings.serve_refresh_s,
                  retrieval=settings.serve_retrieval, retrieval_k=settings.gate_retrieval_k or 2)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return ServeOptions(**values)


class Server:
    """The loaded base model, its adapter slots and cache, the engine, tokens and metrics."""

    def __init__(self, settings: Settings, options: ServeOptions) -> None:
        from lora_assets.modes import MODES
        from lora_assets.training import load_base_model

        self.options = options
        self.modes = MODES
        shared = settings.shared_base_models()
        if shared is not None:  # on S3, a fresh serving replica fetches the base as a run worker does
            from lora_assets.base_model_store import ensure_local

            ensure_local(shared, options.base_model, settings.home)
        base = load_base_model(options.base_model, settings.home, settings.device, settings.dtype)
        self.base = base
        self.tokenizer = base.tokenizer
        self.max_context = min(options.max_context, int(getattr(base.model.config, "max_position_embeddings", 2048)))
        targets = {t for m in MODES.values() for t in m.lora.target_modules}
        self.slots = AdapterSlots(base.model, targets, options.max_adapters + 1, max(m.lora.r for m in MODES.values()))
        drive = settings.drive()
        self.drive = drive
        key, revision, device = options.base_model, base.ref.revision, str(base.device)
        self.metrics: ServeMetrics | None = None

        def load(user: str, mode: str, pointer):
            started = time.perf_counter()
            weights = load_weights(drive, user, key, mode, pointer, revision, device)
            self.metrics.adapter_load.observe(time.perf_counter() - started)
            return weights

        self.retrievers = UserRetrievers(settings.datasets(), options.refresh_s, options.max_adapters)
        self.cache = AdapterCache(self.slots, lambda u, m: read_pointer(drive, u, key, m), load, options.refresh_s)
        self.engine = Engine(base.model, base.tokenizer, self.slots, options.max_batch, options.max_concurrent,
                             on_step=lambda n: self.metrics.batch_rows.observe(n))
        self.metrics = ServeMetrics(self.cache, lambda: self.engine.in_flight)
        tokens = settings.serve_tokens()
        self.tokens = TokenFile(tokens, options.refresh_s if tokens.name.startswith("s3://") else 0.0)
        self._sweeper = threading.Thread(target=self._sweep, name="lora-assets-sweep", daemon=True)
        self._stopping = threading.Event()

    def start(self) -> None:
        self.engine.start()
        self._sweeper.start()

    def stop(self) -> None:
        self._stopping.set()
        self.engine.stop()

    def _sweep(self) -> None:
        while not self._stopping.wait(max(self.options.refresh_s, 0.5)):
            self.cache.sweep()

    def fingerprint(self, lease: Lease) -> str:
        """``system_fingerprint``: the base revision and the adapter version that answered."""
        return f"{self.base.ref.revision[:12]}/{lease.version or api.BASE}"

    def lease_for(self, principal: Principal, chat: api.ChatRequest) -> Lease:
        if chat.user is None:
            return BASE_LEASE
        try:
            validate_user_id(chat.user)
        except InvalidUserId:
            raise api.model_not_found(chat.model) from None
        if not principal.may_use(chat.user):
            raise api.model_not_found(chat.model)  # the same answer as a missing adapter
        try:
            return self.cache.lease(chat.user, chat.mode)
        except NoAdapter:
            raise api.model_not_found(chat.model) from None
        except SlotsBusy as exc:
            raise api.ApiError(429, str(exc), "rate_limit_error", code="rate_limit_exceeded") from None
        except (Unservable, CorruptVersion) as exc:  # CorruptVersion: an unreadable CURRENT
            log.warning("cannot serve %s: %s", chat.model, exc)
            raise api.ApiError(503, f"the adapter '{chat.model}' cannot be served now: {exc}", "server_error",
                               code="adapter_unavailable") from None
        except (OSError, *storage_errors()) as exc:
            log.warning("drive unreadable for %s: %s", chat.model, exc)
            raise api.ApiError(503, f"the drive could not be read for '{chat.model}'; try again", "server_error",
                               code="drive_unavailable") from None

    def prompt_ids(self, chat: api.ChatRequest) -> list[int]:
        from lora_assets.training.text import chat_ids

        messages = chat.messages if chat.mode is None else api.with_instruction(chat.messages,
                                                                                self.modes[chat.mode].system)
        try:
            ids = chat_ids(self.tokenizer, messages)
        except Exception as exc:  # the model's chat template refuses the conversation (jinja2 TemplateError)
            raise api.ApiError(400, f"messages: the model's chat template refused them ({exc})",
                               param="messages") from None
        if len(ids) + chat.sampling.max_tokens > self.max_context:
            raise api.ApiError(400, f"This model's maximum context length is {self.max_context} tokens. However, "
                               f"you requested {len(ids) + chat.sampling.max_tokens} tokens ({len(ids)} in the "
                               f"messages, {chat.sampling.max_tokens} in the completion).", param="messages",
                               code="context_length_exceeded")
        return ids

    def with_retrieved(self, chat: api.ChatRequest, lease: Lease, prompt: list[int]) -> tuple[list[int], int]:
        """The prompt with the user's most similar past replies in its last user message, where the
        version is served with them (``serving.retrieval``), and how many it shows. No data problem
        fails the request (it already holds its lease): without them is always an answer."""
        from lora_assets.training.objectives import training_for
        from lora_assets.training.retrieval import with_retrieved

        last = chat.messages[-1] if chat.messages else None
        if lease.version is None or chat.mode is None or last is None or last["role"] != "user":
            return prompt, 0
        mode = self.modes[chat.mode]
        k = examples_to_show(self.options.retrieval, lease.held_out, training_for(mode.objective).retrieval,
                             self.options.retrieval_k)
        shown = self.retrievers.similar(chat.user, chat.mode, last["content"], k) if k else []
        if not shown:
            return prompt, 0
        messages = [*chat.messages[:-1], {**last, "content": with_retrieved(last["content"], shown)}]
        try:
            ids = self.prompt_ids(replace(chat, messages=messages))
        except api.ApiError:  # too long for the context with them: answered without
            return prompt, 0
        return ids, len(shown)

    def models(self, principal: Principal) -> list[dict]:
        """``base`` and, for a user's token, each mode with a live adapter (admins: the resident ones)."""
        from lora_assets.drive.sync import published_modes

        entries = [{"id": api.BASE, "object": "model", "created": 0, "owned_by": "lora-assets"}]
        if principal.user is None:
            names = sorted({f"{u}/{m}" for u, m, _ in self.cache.resident_keys()})
        else:
            names = [f"{principal.user}/{m}" for m in published_modes(self.drive, principal.user, self.options.base_model)
                     if m in self.modes and self._live(principal.user, m)]
        return entries + [{"id": n, "object": "model", "created": 0, "owned_by": n.partition("/")[0]} for n in names]


    def _live(self, user: str, mode: str) -> bool:
        try:
            return self.cache.pointer(user, mode).version is not None
        except (CorruptVersion, OSError, *storage_errors()):
            return False


def build_app(server: Server) -> Starlette:
    def error(exc: api.ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    def authorize(request: Request) -> Principal:
        principal = server.tokens.principal(request.headers.get("authorization"))
        if principal is None:
            raise api.unauthorized()
        return principal

    async def models(request: Request) -> Response:
        try:
            principal = authorize(request)
            data = await run_in_threadpool(server.models, principal)
        except api.ApiError as exc:
            return error(exc)
        return JSONResponse({"object": "list", "data": data})

    async def chat(request: Request) -> Response:
        started = time.perf_counter()
        kind = "unknown"  # until the request names a model
        try:
            principal = authorize(request)
            chat_ = api.parse_chat(api.parse_body(await request.body()), set(server.modes), server.options.max_tokens)
            kind = "base" if chat_.user is None else "adapter"
            prompt = await run_in_threadpool(server.prompt_ids, chat_)
            lease = await run_in_threadpool(server.lease_for, principal, chat_)
        except api.ApiError as exc:
            server.metrics.requests.labels(kind, str(exc.status)).inc()
            return error(exc)
        try:
            prompt, shown = await run_in_threadpool(server.with_retrieved, chat_, lease, prompt)
        except BaseException:
            server.cache.release(lease)
            raise
        return await _complete(server, request, chat_, prompt, lease, kind, started, shown)

    async def metrics(request: Request) -> Response:
        return Response(server.metrics.render(), media_type=CONTENT_TYPE)

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "base_model": server.options.base_model})

    routes = [Route("/v1/chat/completions", chat, methods=["POST"]), Route("/v1/models", models, methods=["GET"]),
              Route("/metrics", metrics, methods=["GET"]), Route("/healthz", health, methods=["GET"])]
    return Starlette(routes=routes, exception_handlers={Exception: _internal_error})


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error serving %s", request.url.path, exc_info=exc)
    return JSONResponse(api.ApiError(500, "The server had an error while processing your request.",
                                     "server_error").body(), status_code=500)


async def _complete(server: Server, request: Request, chat: api.ChatRequest, prompt: list[int], lease: Lease,
                    kind: str, started: float, shown: int = 0) -> Response:
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    released = threading.Event()

    def release() -> None:
        if not released.is_set():
            released.set()
            server.cache.release(lease)

    job = Job(prompt, lease.slot, chat.sampling,
              emit=lambda delta, finish, n: loop.call_soon_threadsafe(events.put_nowait, (delta, finish, n)),
              on_done=release)
    try:
        server.engine.submit(job)
    except Busy as exc:
        release()
        server.metrics.requests.labels(kind, "429").inc()
        return JSONResponse(api.ApiError(429, f"Too many requests: {exc}", "rate_limit_error",
                                         code="rate_limit_exceeded").body(), status_code=429)
    completion = api.Completion(chat.model, server.fingerprint(lease))
    m = server.metrics
    headers = {RETRIEVED_HEADER: str(shown)}
    if shown:
        m.retrieved.inc(shown)

    def finished(status: str, tokens: int) -> None:
        m.requests.labels(kind, status).inc()
        m.prompt_tokens.inc(len(prompt))
        m.completion_tokens.inc(tokens)
        m.latency.observe(time.perf_counter() - started)

    if not chat.stream:
        parts, first = [], True

        async def watch() -> None:  # a plain response is not cancelled when its client leaves
            while (await request.receive())["type"] != "http.disconnect":
                pass
            job.cancelled = True

        watcher = asyncio.create_task(watch())
        try:
            while True:
                delta, finish, n = await events.get()
                if first:
                    m.first_token.observe(time.perf_counter() - started)
                    first = False
                parts.append(delta)
                if finish is not None:
                    break
        finally:
            watcher.cancel()
            job.cancelled = True  # no-op once finished
        if finish == "error":
            finished("503", n)
            return JSONResponse(api.ApiError(503, "decoding failed; try again", "server_error").body(), status_code=503)
        finished("200", n)
        return JSONResponse(completion.whole("".join(parts), finish, len(prompt), n), headers=headers)

    async def stream():
        first, n, status = True, 0, "200"
        try:
            yield completion.chunk({"role": "assistant", "content": ""})
            while True:
                delta, finish, n = await events.get()
                if first:
                    m.first_token.observe(time.perf_counter() - started)
                    first = False
                if finish == "error":
                    status = "503"
                    yield api.sse(api.ApiError(503, "decoding failed; try again", "server_error").body())
                    break
                if delta:
                    yield completion.chunk({"content": delta})
                if finish is not None:
                    yield completion.chunk({}, finish)
                    if chat.include_usage:
                        yield completion.chunk({}, usage_=api.usage(len(prompt), n), choices=False)
                    break
            yield api.sse("[DONE]")
        finally:
            job.cancelled = True
            finished(status, n)

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", **headers})


def serve(settings: Settings, options: ServeOptions, host: str, port: int) -> None:
    """Load, then serve until interrupted (SIGINT/SIGTERM stop uvicorn, then the engine)."""
    import uvicorn

    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)
    server = Server(settings, options)
    server.start()
    print(f"serving {options.base_model} on http://{host}:{port}/v1 "
          f"(tokens: {server.tokens.source.name}, up to {options.max_adapters} adapters resident)", flush=True)
    try:
        uvicorn.run(build_app(server), host=host, port=port, log_level="warning", access_log=False)
    finally:
        server.stop()


__all__ = ["ServeOptions", "Server", "build_app", "options_from", "serve"]
