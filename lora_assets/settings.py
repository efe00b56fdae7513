"""Every knob of a deployment in one place, read from the environment when asked (no Dagster).

The plain CLI verbs (``ingest``, ``sync``, ``feed``, ``status``) and the Dagster resource build
their storage through the same ``Settings``: the embedded default (folders and a SQLite feed
under ``$LORA_ASSETS_HOME``) or the scale-out backend (S3 user store, datasets and drives, an
SQS change feed) when ``LORA_ASSETS_BACKEND=s3``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from lora_assets.paths import data_home

# serve_retrieval's values (serving/retrieval.py says what each does)
SERVE_RETRIEVAL_POLICIES = ("helps", "always", "never")

# Field -> environment variable. Defaults are the dataclass defaults below.
ENV_VARS: dict[str, str] = {
    "home": "LORA_ASSETS_HOME",
    "backend": "LORA_ASSETS_BACKEND",
    "s3_bucket": "LORA_ASSETS_S3_BUCKET",
    "s3_endpoint_url": "LORA_ASSETS_S3_ENDPOINT_URL",
    "region": "AWS_REGION",
    "sqs_queue_url": "LORA_ASSETS_SQS_QUEUE_URL",
    "sqs_dead_letter_url": "LORA_ASSETS_SQS_DLQ_URL",
    "drive_root": "LORA_ASSETS_DRIVE_ROOT",
    "keep_versions": "LORA_ASSETS_KEEP_VERSIONS",
    "gate_margin": "LORA_ASSETS_GATE_MARGIN",
    "gate_confidence": "LORA_ASSETS_GATE_CONFIDENCE",
    "gate_noise": "LORA_ASSETS_GATE_NOISE",
    "gate_noise_floor": "LORA_ASSETS_GATE_NOISE_FLOOR",
    "gate_retrieval_k": "LORA_ASSETS_GATE_RETRIEVAL_K",
    "gate_require_retrieval": "LORA_ASSETS_GATE_REQUIRE_RETRIEVAL",
    "train_steps": "LORA_ASSETS_TRAIN_STEPS",
    "max_train_steps": "LORA_ASSETS_MAX_TRAIN_STEPS",
    "users_per_run": "LORA_ASSETS_USERS_PER_RUN",
    "sensor_interval_s": "LORA_ASSETS_SENSOR_INTERVAL_S",
    "feed_events_per_tick": "LORA_ASSETS_FEED_EVENTS_PER_TICK",
    "dataset_changes_per_tick": "LORA_ASSETS_DATASET_CHANGES_PER_TICK",
    "fuse": "LORA_ASSETS_FUSE",
    "fusion": "LORA_ASSETS_FUSION",
    "device": "LORA_ASSETS_DEVICE",
    "dtype": "LORA_ASSETS_DTYPE",
    "torch_threads": "LORA_ASSETS_TORCH_THREADS",
    "max_attempts": "LORA_ASSETS_MAX_ATTEMPTS",
    "max_record_bytes": "LORA_ASSETS_MAX_RECORD_BYTES",
    "max_field_chars": "LORA_ASSETS_MAX_FIELD_CHARS",
    "max_list_items": "LORA_ASSETS_MAX_LIST_ITEMS",
    "max_depth": "LORA_ASSETS_MAX_DEPTH",
    "staged_grace_s": "LORA_ASSETS_STAGED_GRACE_S",
    "state_url": "LORA_ASSETS_STATE_URL",
    "history_retention_days": "LORA_ASSETS_HISTORY_RETENTION_DAYS",
    "training_max_runtime_s": "LORA_ASSETS_TRAINING_MAX_RUNTIME_S",
    "serve_tokens_file": "LORA_ASSETS_SERVE_TOKENS_FILE",
    "serve_max_adapters": "LORA_ASSETS_SERVE_MAX_ADAPTERS",
    "serve_max_batch": "LORA_ASSETS_SERVE_MAX_BATCH",
    "serve_max_concurrent": "LORA_ASSETS_SERVE_MAX_CONCURRENT",
    "serve_max_tokens": "LORA_ASSETS_SERVE_MAX_TOKENS",
    "serve_max_context": "LORA_ASSETS_SERVE_MAX_CONTEXT",
    "serve_refresh_s": "LORA_ASSETS_SERVE_REFRESH_S",
    "serve_retrieval": "LORA_ASSETS_SERVE_RETRIEVAL",
    "gguf_type": "LORA_ASSETS_GGUF_TYPE",
    "adapter_dtype": "LORA_ASSETS_ADAPTER_DTYPE",
}


@dataclass(frozen=True)
class Settings:
    """A deployment's settings; ``Settings.from_env()`` reads ``ENV_VARS`` over these defaults."""

    home: Path = Path(".lora_assets")  # data dir: base-model cache, local stores, adapter working copies
    backend: str = "local"  # "local" (folders + SQLite feed) or "s3" (S3 stores + SQS feed)
    s3_bucket: str = ""
    s3_endpoint_url: str = ""  # an S3-compatible store or a local test server; also used for SQS
    region: str = "us-east-1"
    sqs_queue_url: str = ""
    sqs_dead_letter_url: str = ""
    drive_root: str = ""  # local backend: users' drives; empty means <home>/drive
    keep_versions: int = 3  # published versions kept per adapter
    gate_margin: float = 0.01  # publish only if held-out loss beats the base model's by this (nats)
    gate_confidence: float = 0.95  # ... and, if worse than the published version on the mean, within the allowance at this one-sided level (paired bootstrap); 1.0: never refused for that
    gate_noise: float = 0.02  # the allowance: this fraction of the published loss (what a reseeded retrain moves) ...
    gate_noise_floor: float = 0.01  # ... or this many nats, whichever is larger (near-zero losses move by tiny amounts)
    gate_retrieval_k: int = 2  # the retrieval baseline shows this many of the user's similar examples; 0: not scored
    gate_require_retrieval: bool = False  # publish only adapters that beat the retrieval baseline
    train_steps: int = 0  # steps per adapter; 0: each mode's own budget
    max_train_steps: int = 0  # a ceiling on each mode's budget (GPU time per adapter); 0: the mode's own (mail_reply: 120)
    users_per_run: int = 32  # users a sensor or backfill puts in one dataset or adapter run
    sensor_interval_s: int = 5  # seconds between a sensor's ticks (read when the code location loads)
    feed_events_per_tick: int = 1000  # change events one change-sensor tick reads; the rest wait for the next
    dataset_changes_per_tick: int = 1000  # dataset versions one retrain-sensor tick reads; the rest wait
    fuse: int = 8  # at most this many adapters in one fused group (where the training variant fuses)
    fusion: str = "auto"  # training variant: auto (batched on a GPU, sequential on a CPU), sequential, interleaved, batched
    device: str = "auto"  # where training runs: auto (CUDA if present), cpu, cuda
    dtype: str = "auto"  # base model dtype: auto (bf16 on CUDA, fp32 on CPU), fp32, bf16, fp16
    torch_threads: int = 0  # torch threads of a training run; 0: every core the run is given
    max_attempts: int = 3  # times a lost (crashed, killed) piece of work is requested before it is quarantined
    max_record_bytes: int = 64 * 1024  # ingest: one JSONL line
    max_field_chars: int = 16 * 1024  # ingest: one text field
    max_list_items: int = 64  # ingest: items of a list field (people, tags, attendees)
    max_depth: int = 3  # ingest: JSON nesting (record object, list, string)
    staged_grace_s: float = 60.0  # a change staged this long by an ingest that died is announced anyway
    state_url: str = ""  # per-user state table (SQLAlchemy URL); empty: SQLite at <home>/state.sqlite
    history_retention_days: float = 90.0  # per-adapter history rows older than this are pruned
    training_max_runtime_s: int = 7200  # a training batch run still going after this is failed and its work requested again
    serve_tokens_file: str = ""  # serving API tokens (hashed): a path or s3://bucket/key; empty: <home>/serve_tokens.json
    serve_max_adapters: int = 64  # adapters resident in a server at once (least recently used out)
    serve_max_batch: int = 16  # requests decoded together in one forward pass
    serve_max_concurrent: int = 256  # requests queued or decoding; more are answered 429
    serve_max_tokens: int = 1024  # the largest max_tokens a request may ask for
    serve_max_context: int = 4096  # prompt + completion tokens (capped by the base model's own)
    serve_refresh_s: float = 2.0  # a moved CURRENT (publish, withdrawal, forget) is served within this
    serve_retrieval: str = "helps"  # the user's retrieved examples in the prompt: helps (where the gate found so), always, never
    # The published files, chosen by benchmarks/device.py (the smallest within 0.5 % of fp32's held-out loss):
    gguf_type: str = "q8_0"  # adapter.gguf for llama.cpp devices: q8_0, f16, f32; "none" publishes PEFT files only
    adapter_dtype: str = "fp16"  # tensors of the published adapter_model.safetensors: fp16, bf16, fp32

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Defaults, then the environment, then explicit ``overrides`` (None means "not set")."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(ENV_VARS[f.name], "")
            if f.name == "region" and not raw:
                raw = env.get("AWS_DEFAULT_REGION", "")
            if raw != "":
                values[f.name] = _parse(f, raw)
        values.update({k: v for k, v in overrides.items() if v is not None and v != ""})
        if "home" not in values:
            values["home"] = data_home()
        values["home"] = Path(values["home"]).expanduser().resolve()
        values["home"].mkdir(parents=True, exist_ok=True)
        settings = cls(**values)
        settings.validate()
        return settings

    @classmethod
    def one_from_env(cls, name: str, env: Mapping[str, str] | None = None) -> Any:
        """One setting, from the environment or its default, without building the others (no
        data dir is created): for what a Dagster definition needs when the code location loads."""
        f = next(f for f in fields(cls) if f.name == name)
        raw = (os.environ if env is None else env).get(ENV_VARS[name], "")
        value = f.default if raw == "" else _parse(f, raw)
        if name in _AT_LEAST_ONE:
            _check_at_least_one(name, value)
        return value

    def validate(self) -> None:
        if self.backend not in ("local", "s3"):
            raise ValueError(f"LORA_ASSETS_BACKEND must be 'local' or 's3', not {self.backend!r}")
        for name, allowed in (("fusion", ("auto", "sequential", "interleaved", "batched")),
                              ("device", ("auto", "cpu", "cuda")), ("dtype", ("auto", "fp32", "bf16", "fp16")),
                              ("gguf_type", ("f16", "q8_0", "f32", "none")), ("adapter_dtype", ("fp32", "fp16", "bf16")),
                              ("serve_retrieval", SERVE_RETRIEVAL_POLICIES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{ENV_VARS[name]} must be one of {', '.join(allowed)}, not {getattr(self, name)!r}")
        if not 0.5 <= self.gate_confidence <= 1.0:
            raise ValueError(f"{ENV_VARS['gate_confidence']} must be between 0.5 and 1.0, not {self.gate_confidence}")
        for name in ("gate_noise", "gate_noise_floor", "gate_retrieval_k", "train_steps", "max_train_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{ENV_VARS[name]} must be >= 0, not {getattr(self, name)}")
        for name in _AT_LEAST_ONE:
            _check_at_least_one(name, getattr(self, name))

    def gate(self):
        """The eval gate's configuration (``lora_assets.gate.GateConfig``)."""
        from lora_assets.gate import GateConfig

        return GateConfig(self.gate_margin, self.gate_confidence, self.gate_noise, self.gate_noise_floor,
                          self.gate_retrieval_k, self.gate_require_retrieval)

    @property
    def step_budget(self) -> dict[str, int | None]:
        """How many steps trainers take (``job_for``'s ``steps`` and ``step_ceiling``): fixed, capped,
        or each mode's own budget."""
        return {"steps": self.train_steps or None, "step_ceiling": self.max_train_steps or None}

    @property
    def adapter_files(self) -> dict[str, str]:
        """How trainers write an adapter's files (``TrainJob.gguf_type``, ``.peft_dtype``)."""
        return {"gguf_type": "" if self.gguf_type == "none" else self.gguf_type, "peft_dtype": self.adapter_dtype}

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    # --- storage ----------------------------------------------------------------------------

    def s3_client(self, need_bucket: bool = True):
        import boto3
        from botocore.config import Config

        if need_bucket and not self.s3_bucket:
            raise ValueError("backend 's3' needs a bucket: set LORA_ASSETS_S3_BUCKET")
        return boto3.client(
            "s3", endpoint_url=self.s3_endpoint_url or None, region_name=self.region,
            config=Config(retries={"max_attempts": 5, "mode": "standard"}),
        )

    def _objects(self, prefix: str, local: Path):
        from lora_assets.storage import LocalObjectStore, S3ObjectStore

        if self.backend == "s3":
            return S3ObjectStore(self.s3_client(), self.s3_bucket, prefix)
        return LocalObjectStore(local)

    def drive(self):
        """Users' drives: ``<drive_root>/<user>/...`` locally, ``s3://bucket/drive/<user>/...``."""
        return self._objects("drive", Path(self.drive_root).expanduser() if self.drive_root else self.home / "drive")

    def shared_base_models(self):
        """Base models shared with every worker: ``s3://bucket/base_models/`` on S3; None on the
        embedded default, where the one data dir already holds them (``lora_assets.base_model_store``)."""
        return self._objects("base_models", self.home / "base_models") if self.backend == "s3" else None

    def datasets(self):
        """Per-mode datasets: ``<home>/datasets/`` locally, ``s3://bucket/datasets/`` on S3."""
        return self._objects("datasets", self.home / "datasets")

    def store(self):
        """The user store: ``<home>/users/`` locally, ``s3://bucket/users/`` on S3."""
        from lora_assets.data.user_store import UserStore

        return UserStore(self._objects("users", self.home / "users"))

    def feed(self):
        """The change feed: SQLite in the data dir, or S3 notifications on SQS."""
        if self.backend == "s3":
            import boto3

            from lora_assets.data.sqs_feed import SqsChangeFeed

            if not (self.sqs_queue_url and self.sqs_dead_letter_url):
                raise ValueError("backend 's3' needs LORA_ASSETS_SQS_QUEUE_URL and LORA_ASSETS_SQS_DLQ_URL")
            client = boto3.client("sqs", endpoint_url=self.s3_endpoint_url or None, region_name=self.region)
            return SqsChangeFeed(client, self.sqs_queue_url, self.sqs_dead_letter_url, key_prefix="users")
        from lora_assets.data.change_feed import ChangeFeed

        return ChangeFeed(self.home / "change_feed.sqlite", staged_grace_s=self.staged_grace_s)

    def state(self):
        """The per-user state table (``lora_assets.state``): ``LORA_ASSETS_STATE_URL``; else the
        Dagster instance's Postgres where ``DAGSTER_PG_HOST`` is set (the ECS and K8s configs);
        else SQLite in the data dir (the embedded default)."""
        from lora_assets.state import open_state

        return open_state(self.state_url or _dagster_postgres_url() or f"sqlite:///{self.home / 'state.sqlite'}")

    def serve_tokens(self):
        """Where the serving API's hashed tokens live (``lora_assets.serving.auth``)."""
        from lora_assets.serving.auth import LocalTokens, S3Tokens

        if self.serve_tokens_file.startswith("s3://"):
            return S3Tokens(self.s3_client(need_bucket=False), self.serve_tokens_file)
        return LocalTokens(Path(self.serve_tokens_file).expanduser() if self.serve_tokens_file
                           else self.home / "serve_tokens.json")

    def limits(self):
        """What ingest accepts (``lora_assets.data.schemas.Limits``)."""
        from lora_assets.data.schemas import Limits

        return Limits(self.max_record_bytes, self.max_field_chars, self.max_list_items, self.max_depth)


def _dagster_postgres_url() -> str:
    """The Postgres the deploy configs give Dagster (``DAGSTER_PG_*``), as a SQLAlchemy URL."""
    from urllib.parse import quote

    env = os.environ
    if not env.get("DAGSTER_PG_HOST"):
        return ""
    auth = quote(env.get("DAGSTER_PG_USERNAME", "postgres"), safe="")
    if env.get("DAGSTER_PG_PASSWORD"):
        auth += ":" + quote(env["DAGSTER_PG_PASSWORD"], safe="")
    # SQLAlchemy 2.1 maps plain postgresql:// to psycopg 3; dagster-postgres ships psycopg2.
    return (f"postgresql+psycopg2://{auth}@{env['DAGSTER_PG_HOST']}:{env.get('DAGSTER_PG_PORT', '5432')}"
            f"/{env.get('DAGSTER_PG_DB', 'dagster')}")


_AT_LEAST_ONE = (
    "users_per_run", "sensor_interval_s", "feed_events_per_tick", "dataset_changes_per_tick", "fuse",
    "keep_versions", "max_attempts", "max_record_bytes", "max_field_chars", "max_list_items", "max_depth",
    "training_max_runtime_s", "serve_max_adapters", "serve_max_batch", "serve_max_concurrent",
    "serve_max_tokens", "serve_max_context",
)


def _check_at_least_one(name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"{name} ({ENV_VARS[name]}) must be >= 1, not {value}")


def _parse(f: dataclasses.Field, raw: str) -> Any:
    kind = f.type if isinstance(f.type, str) else f.type.__name__
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind == "bool":
            if raw.strip().lower() not in ("1", "true", "yes", "0", "false", "no"):
                raise ValueError
            return raw.strip().lower() in ("1", "true", "yes")
    except ValueError:
        raise ValueError(f"{ENV_VARS[f.name]}={raw!r} is not a valid {kind}") from None
    return raw
