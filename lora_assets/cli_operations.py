"""The operator's commands of ``lora-assets``: status, feed, forget, migrate, prune."""

from __future__ import annotations

import argparse
import sys
import time

from lora_assets.cli import _print_table


def _cmd_feed(args: argparse.Namespace) -> int:
    from lora_assets.settings import Settings

    feed = Settings.from_env().feed()
    print(f"pending events: {feed.pending_count()}")
    for event_id, payload, error in feed.dead_letters():
        print(f"dead letter {event_id}: {error}\n    payload: {payload[:200]}")
    return 0


def _cmd_forget(args: argparse.Namespace) -> int:
    from lora_assets.orchestration.erasure import forget_user
    from lora_assets.orchestration.instance import get_instance
    from lora_assets.settings import Settings

    report = forget_user(get_instance(), Settings.from_env(), args.user, wait_s=args.wait)
    print(f"forgot user {report.user}:")
    for kind, n in report.erased.counts.items():
        print(f"  {n:>6}  {kind}")
    if report.waited_for:
        print(f"  waited for {len(report.waited_for)} run(s) in flight: {', '.join(report.waited_for)}"
              + (f" (terminated: {', '.join(report.terminated)})" if report.terminated else ""))
    if report.remaining:
        print(f"error: still stored for {report.user}: {'; '.join(report.remaining[:10])}", file=sys.stderr)
        return 1
    print(f"nothing of {report.user} is left in the stores, the drive, the feed or the event log; "
          "their later changes are dropped (see README: Privacy for what else to purge)")
    return 0


def _cmd_migrate(args: argparse.Namespace) -> int:
    from lora_assets.orchestration.instance import get_instance
    from lora_assets.orchestration.migrate import migrate_event_log
    from lora_assets.settings import Settings

    n = migrate_event_log(get_instance(), Settings.from_env(), progress=lambda n: print(f"  {n} users read", flush=True))
    print(f"state table filled from the event log for {n} users; nobody was retrained")
    return 0


def _cmd_prune(args: argparse.Namespace) -> int:
    from lora_assets.orchestration.instance import get_instance
    from lora_assets.orchestration.retention import prune
    from lora_assets.settings import Settings

    settings = Settings.from_env()
    done = prune(get_instance(), settings, args.runs_older_than_days)
    print(f"pruned {done.state_rows} state-table history rows older than {settings.history_retention_days:g} days"
          + (f" and {done.runs} finished runs older than {args.runs_older_than_days:g} days"
             if args.runs_older_than_days is not None else ""))
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    import json

    from lora_assets.data.user_store import validate_user_id
    from lora_assets.modes import MODES
    from lora_assets.orchestration.instance import get_instance
    from lora_assets.orchestration.status import FRESH, status
    from lora_assets.settings import Settings
    from lora_assets.state import STATES

    instance, settings = get_instance(), Settings.from_env()
    if args.user is not None:
        validate_user_id(args.user)
        if not settings.state().is_registered(args.user):
            print(f"error: user {args.user!r} is not registered (nothing ingested for them, or forgotten)", file=sys.stderr)
            return 2
    if args.mode is not None and args.mode not in MODES:
        print(f"error: unknown mode {args.mode!r}; modes: {', '.join(MODES)}", file=sys.stderr)
        return 2
    states = args.state.split(",") if args.state else None
    if states and (bad := [s for s in states if s not in STATES]):
        print(f"error: unknown state {bad[0]!r}; states: {', '.join(STATES)}", file=sys.stderr)
        return 2
    report = status(instance, settings, settings.feed(), args.user, args.mode, args.base_model,
                    after=args.after, limit=args.limit, states=states)
    if args.json:
        out = report.to_json()
        if args.history and args.user:
            out["history"] = settings.state().history(args.user, args.mode, args.base_model)
        print(json.dumps(out, indent=2, sort_keys=True))
        return 0

    def when(ts: float | None) -> str:
        return time.strftime("%Y-%m-%d %H:%M", time.gmtime(ts)) if ts else "-"

    if report.summaries:
        _print_table(["mode", "base model", *report.totals()],
                     [[s.mode, s.base_model, *(str(n) for n in s.counts.values())] for s in report.summaries])
        print()
    rows = []
    for a in report.adapters:
        gate = "-" if a.gate is None else (
            f"{'pass' if a.gate.passed else 'FAIL'} {_loss(a.gate.base_eval_loss)} / "
            f"{_loss(a.gate.retrieval_eval_loss)} -> {_loss(a.gate.adapter_eval_loss)}")
        published = f"{a.published_version} {when(a.published_at)}" if a.published_version else "-"
        rows.append([a.base_model, a.user, a.mode, a.state, (a.dataset_version or "-")[:12],
                     (a.trained_on or "-")[:12], published, gate, "" if a.state == FRESH else a.why])
    if rows:
        _print_table(["base model", "user", "mode", "state", "dataset", "trained on", "published (UTC)",
                      "gate (base / retrieval -> adapter loss)", "why"], rows)
    for a in report.adapters:
        if a.last_failure and a.state != FRESH:
            f = a.last_failure
            print(f"last failure for {a.user}: {f['job']} run {f['run_id']} at {when(f['at'])}: {f['error']}")
            break
    if args.history and args.user:
        print()
        _print_table(["at (UTC)", "base model", "mode", "event", "run", "detail"],
                     [[when(h["at"]), h["base_model"], h["mode"], h["event"], (h["run_id"] or "-")[:8],
                       json.dumps(h["detail"], sort_keys=True)[:120]]
                      for h in settings.state().history(args.user, args.mode, args.base_model)])
    for key, user in sorted(report.next_after.items()):
        print(f"more {key.split('|')[0]} users: --after {user}")
    totals = ", ".join(f"{n} {state}" for state, n in report.totals().items() if n)
    count = sum(report.totals().values())
    print(f"{count} adapters: {totals or 'none'}; {report.live_runs} adapter runs in flight; "
          f"change feed: {report.pending_events} pending events, {report.dead_letters} dead letters")
    return 0


def _loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
