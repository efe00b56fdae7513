"""The ``lora-assets`` command line."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from lora_assets.paths import data_home


def _cmd_demo(args: argparse.Namespace) -> int:
    from lora_assets.data.synthetic import generate_user, user_ids
    from lora_assets.data.user_store import write_user
    from lora_assets.modes import MODES, get_mode
    from lora_assets.orchestration.instance import ensure_dagster_home, get_instance
    from lora_assets.orchestration.resources import LoraAssetsHome
    from lora_assets.orchestration.runs import (
        register_base_model_partition,
        register_users,
        run_adapter_batch,
        run_dataset_batch,
    )
    from lora_assets.training.base_models import resolve_base_model

    resources = LoraAssetsHome(home=str(data_home()), train_steps=args.steps)
    settings = resources.settings()
    store = settings.store()
    users = user_ids(args.users)
    modes = [get_mode(m) for m in (args.modes or list(MODES))]
    print(f"data dir: {settings.home}\ndagster home: {ensure_dagster_home()}")
    instance = get_instance()
    print(f"seeding {len(users)} synthetic users: {', '.join(users)}")
    for user in users:
        if not store.head(user, "mail"):
            write_user(store, user, generate_user(user))
    register_users(settings, users)
    t0 = time.perf_counter()
    print(f"preparing base model {args.base_model} ...", flush=True)
    resolve_base_model(args.base_model, settings.home)  # one-off GGUF conversion happens here
    register_base_model_partition(instance, args.base_model)

    sources = sorted({s for m in modes for s in m.sources})
    print(f"run dataset_batch: sources -> datasets ({', '.join(m.name for m in modes)}) for {len(users)} users", flush=True)
    run_dataset_batch(instance, {u: sources for u in users}, resources)
    print(f"run adapter_batch: {len(users) * len(modes)} adapters on {args.base_model}", flush=True)
    result = run_adapter_batch(instance, args.base_model, [(u, m.name) for u in users for m in modes], resources)
    state = settings.state()
    rows = []
    for mode in modes:
        found = state.rows(mode.name, args.base_model, users)
        for user in users:
            row = found.get(user) or {}
            if row.get("run_id") != result.run_id or row.get("adapter_version") is None:
                rows.append([user, mode.name, args.base_model, "-", "-", "-", "-", row.get("error") or "not trained"])
                continue
            meta = state.training(args.base_model, user, mode.name) or {}
            published = row["published_version"] if row["reason"] == "fresh" else "gate failed"
            rows.append([
                user, mode.name, args.base_model, f"{row['base_eval_loss']:.3f}", f"{row['adapter_eval_loss']:.3f}",
                *_timing_cells(meta), published,
            ])
    rows.sort(key=lambda r: (r[0], r[1]))
    _print_table(
        ["user", "mode", "base model", "base loss", "adapter loss", "seconds", "tok/s", "published"], rows
    )
    print(f"adapters under {settings.home / 'adapters' / args.base_model}; total {time.perf_counter() - t0:.0f}s")
    print(f"published to the users' drives ({settings.backend} backend); sync a device with:")
    print(f"  lora-assets sync --user {users[0]} --device-dir /tmp/device-{users[0]} --base-model {args.base_model}")
    print("see the runs and the asset graph: make ui  (then open http://127.0.0.1:3000)")
    return 0


def _timing_cells(meta: dict) -> list[str]:
    """Seconds and tokens/s of one adapter, or of its fused group (marked with the group's size)."""
    if "group_seconds" in meta:
        return [f"{meta['group_seconds']:.1f} (group of {meta['fused_with']})", f"{meta['group_tokens_per_second']:.0f}"]
    return [f"{meta['train_seconds']:.1f}", f"{meta['tokens_per_second']:.0f}"]


def _cmd_ui(args: argparse.Namespace) -> int:
    import os
    import shutil
    import signal

    from lora_assets.orchestration.instance import ensure_dagster_home
    from lora_assets.paths import PROJECT_ROOT

    home = ensure_dagster_home()
    dagster = shutil.which("dagster", path=os.path.dirname(sys.executable)) or "dagster"
    workspace = PROJECT_ROOT / "workspace.yaml"
    target = ["-w", str(workspace)] if workspace.exists() else ["-m", "lora_assets.definitions"]
    cmd = [dagster, "dev", *target, "-h", args.host, "-p", str(args.port)]
    print(f"DAGSTER_HOME={home} {' '.join(cmd)}", flush=True)
    # A shell starts a background job with SIGINT ignored, and an ignored signal stays ignored
    # across exec and in every child: dagster dev, its webserver and daemon would then ignore
    # Ctrl-C and the SIGINT dagster dev sends them on SIGTERM. Default dispositions first.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)
    os.execv(cmd[0], cmd)  # dagster dev runs the webserver and the daemon (sensors, backfills)
    return 0  # pragma: no cover


def _cmd_ingest(args: argparse.Namespace) -> int:
    from lora_assets.data.ingest import ingest_file
    from lora_assets.settings import Settings

    settings = Settings.from_env()
    result = ingest_file(settings.store(), settings.feed(), args.user, args.source, Path(args.file), settings.limits())
    w = result.write
    if not result.announced:
        print(f"{args.file}: nothing to ingest")
    else:
        how = f"change event {result.event_id}" if result.event_id is not None else "announced by the bucket's S3 notification"
        print(f"user {w.user} {w.source}: {w.upserts} upserts, {w.deletes} deletes -> store segment {w.seq}, {how}")
    return 0


def _cmd_base_model(args: argparse.Namespace) -> int:
    from lora_assets.orchestration.instance import get_instance
    from lora_assets.orchestration.registry import (
        active_base_models,
        retired_base_models,
        set_base_model_retired,
    )
    from lora_assets.orchestration.runs import register_base_model_partition
    from lora_assets.settings import Settings
    from lora_assets.training.base_models import register_base_model, resolve_base_model

    if args.action != "list" and not args.key:
        raise ValueError(f"base-model {args.action} needs a KEY")
    instance = get_instance()
    settings = Settings.from_env()
    if args.action == "add":
        shared = settings.shared_base_models()
        if args.path:
            ref = register_base_model(args.key, args.path, settings.home)
        else:  # a built-in key, or one another machine shared (reactivating it, say)
            from lora_assets.base_model_store import ensure_local

            ref = (ensure_local(shared, args.key, settings.home) if shared is not None else None) or resolve_base_model(
                args.key, settings.home
            )
        if shared is not None:  # S3: every worker, including a fresh pod or task, finds it there
            from lora_assets.base_model_store import share

            address, uploaded = share(shared, ref.key, settings.home)
            print(f"shared with every worker at {shared.uri(f'{ref.key}/{address}')} "
                  f"({'uploaded' if uploaded else 'already there'})")
        added = register_base_model_partition(instance, args.key)
        set_base_model_retired(instance, args.key, retired=False)
        print(f"base model {ref.key} ({ref.revision}) at {ref.path}: {'registered' if added else 'already registered, active'}")
        print(f"train every user's adapters on it: lora-assets backfill --base-model {ref.key}")
    elif args.action == "retire":
        if args.key not in instance.get_dynamic_partitions("base_models"):
            raise ValueError(f"base model {args.key!r} is not registered")
        set_base_model_retired(instance, args.key, retired=True)
        print(f"base model {args.key} retired: its adapters are no longer retrained (history kept)")
    else:
        retired = retired_base_models(instance)
        for key in instance.get_dynamic_partitions("base_models"):
            print(f"{key}\t{'retired' if key in retired else 'active'}")
        if not active_base_models(instance):
            print("(no active base model: lora-assets base-model add smollm2-135m)")
    return 0


def _cmd_backfill(args: argparse.Namespace) -> int:
    from lora_assets.orchestration.instance import get_instance
    from lora_assets.orchestration.registry import request_backfill
    from lora_assets.settings import Settings

    backfill_id = request_backfill(get_instance(), Settings.from_env(), args.base_model)
    print(f"backfill {backfill_id} requested: adapter_retrain_sensor plans it (only users and modes with "
          f"training data) into adapter_batch runs while the daemon runs (make ui). Watch it under Runs, "
          f"filtered by the tag lora_assets/backfill={backfill_id}.")
    return 0


def _print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for row in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)))


def _quiet_libraries() -> None:
    """Keep the terminal for our own progress lines, not library bars and deprecation notes."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def build_parser() -> argparse.ArgumentParser:
    from lora_assets.cli_operations import _cmd_feed, _cmd_forget, _cmd_migrate, _cmd_prune, _cmd_status
    from lora_assets.training.base_models import DEFAULT_BASE_MODEL

    parser = argparse.ArgumentParser(prog="lora-assets", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="seed synthetic users and train their adapters")
    demo.add_argument("--users", type=int, default=2, help="number of synthetic users (default 2)")
    demo.add_argument("--base-model", default=DEFAULT_BASE_MODEL)
    demo.add_argument("--modes", nargs="*", help="modes to train (default: all)")
    demo.add_argument(
        "--steps", type=int, default=None,
        help="fixed steps per adapter (default: each mode's step budget, as in sensor and backfill runs)"
    )
    demo.set_defaults(func=_cmd_demo)

    ui = sub.add_parser("ui", help="run the Dagster UI and daemon (dagster dev) on this project")
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=3000)
    ui.set_defaults(func=_cmd_ui)

    ing = sub.add_parser("ingest", help="write a JSONL batch to the user store and the change feed")
    ing.add_argument("--user", required=True)
    ing.add_argument("--source", required=True)
    ing.add_argument("file", help='JSONL: one record per line; {"id": ..., "_deleted": true} deletes')
    ing.set_defaults(func=_cmd_ingest)

    bm = sub.add_parser("base-model", help="register, retire or list base models")
    bm.add_argument("action", choices=["add", "retire", "list"])
    bm.add_argument("key", nargs="?", default="")
    bm.add_argument("--path", help="a local Hugging Face model directory to register under KEY")
    bm.set_defaults(func=_cmd_base_model)

    bf = sub.add_parser("backfill", help="train every user's adapters on a base model (a Dagster backfill)")
    bf.add_argument("--base-model", required=True)
    bf.set_defaults(func=_cmd_backfill)

    fd = sub.add_parser("feed", help="change feed status: pending events and dead letters")
    fd.set_defaults(func=_cmd_feed)

    st = sub.add_parser("status", help="per base model x user x mode: fresh or stale and why, gate, published version")
    st.add_argument("--user", help="one user (fast: indexed reads, whatever the number of users)")
    st.add_argument("--mode", help="one mode")
    st.add_argument("--base-model", help="one base model (default: every active one)")
    st.add_argument("--after", help="list users after this one (paging; the last line says where to go on)")
    st.add_argument("--limit", type=int, default=50, help="users listed per mode and base model (default 50)")
    st.add_argument("--state", help="list only these states, comma-separated (fresh,updating,stale,no_data,withdrawn)")
    st.add_argument("--history", action="store_true", help="with --user: what happened to each adapter, newest first")
    st.add_argument("--json", action="store_true", help="machine-readable output (schema: README, Status)")
    st.set_defaults(func=_cmd_status)

    mg = sub.add_parser("migrate", help="upgrade: fill the per-user state table from the event log (no retraining)")
    mg.set_defaults(func=_cmd_migrate)

    pr = sub.add_parser("prune", help="retention: drop old adapter history and (with --runs-older-than-days) old runs")
    pr.add_argument("--runs-older-than-days", type=float, help="also delete finished Dagster runs older than this")
    pr.set_defaults(func=_cmd_prune)

    fg = sub.add_parser("forget", help="erase a user everywhere (GDPR art. 17): data, adapters, drive, feed, Dagster records")
    fg.add_argument("--user", required=True)
    fg.add_argument("--wait", type=float, default=120.0, help="seconds to let runs in flight for the user finish (default 120)")
    fg.set_defaults(func=_cmd_forget)

    from lora_assets.cli_device import add_device_commands
    from lora_assets.cli_serve import add_serve_commands

    add_device_commands(sub, DEFAULT_BASE_MODEL)

    add_serve_commands(sub, DEFAULT_BASE_MODEL)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from lora_assets.storage import storage_errors
    from lora_assets.drive.llama_cpp import LlamaCppUnavailable
    from lora_assets.training.base_models import BaseModelError

    args = build_parser().parse_args(argv)
    _quiet_libraries()
    try:
        return args.func(args)
    except (ValueError, KeyError, BaseModelError, LlamaCppUnavailable, OSError, *storage_errors()) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
