"""The ``lora-assets`` command line."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from lora_assets.paths import data_home


def _cmd_demo(args: argparse.Namespace) -> int:
    from lora_assets.adapters import adapter_dir, job_for
    from lora_assets.data.synthetic import generate_user, user_ids
    from lora_assets.data.user_store import UserStore, write_user
    from lora_assets.modes import MODES, build_examples, get_mode
    from lora_assets.training import load_base_model, train_adapters

    home = data_home()
    store = UserStore(home / "users")
    users = user_ids(args.users)
    modes = [get_mode(m) for m in (args.modes or list(MODES))]
    print(f"data dir: {home}")
    print(f"seeding {len(users)} synthetic users: {', '.join(users)}")
    for user in users:
        if not store.head(user, "mail"):
            write_user(store, user, generate_user(user))
    jobs = []
    for user in users:
        tables = {s: store.read(user, s) for s in {s for m in modes for s in m.sources}}
        for mode in modes:
            dataset = build_examples(mode, tables, user)
            out = adapter_dir(home, args.base_model, user, mode.name)
            jobs.append(job_for(mode, user, dataset, out, steps=args.steps))
    t0 = time.perf_counter()
    print(f"loading base model {args.base_model} ...", flush=True)
    base = load_base_model(args.base_model, home)
    print(f"loaded in {time.perf_counter() - t0:.1f}s on {base.device}; training {len(jobs)} adapters")
    results = train_adapters(jobs, base)
    _print_table(
        ["user", "mode", "base model", "base loss", "adapter loss", "seconds", "tok/s"],
        [
            [
                r.name.split("/")[0],
                r.name.split("/")[1],
                r.base_model,
                f"{r.base_eval_loss:.3f}",
                f"{r.adapter_eval_loss:.3f}",
                f"{r.seconds:.1f}",
                f"{r.tokens_per_second:.0f}",
            ]
            for r in results
        ],
    )
    print(f"adapters under {home / 'adapters' / args.base_model}; total {time.perf_counter() - t0:.0f}s")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from lora_assets.adapters import adapter_dir
    from lora_assets.data.user_store import validate_user_id
    from lora_assets.modes import get_mode
    from lora_assets.training import load_base_model
    from lora_assets.training.inference import generate, load_adapter

    mode = get_mode(args.mode)
    home = data_home()
    base = load_base_model(args.base_model, home)
    model = base.model
    if not args.no_adapter:
        path = adapter_dir(home, args.base_model, validate_user_id(args.user), mode.name)
        if not path.exists():
            print(f"error: no {mode.name} adapter for user {args.user!r} on {args.base_model} at {path}", file=sys.stderr)
            return 1
        model = load_adapter(base, path)
    print(generate(model, base.tokenizer, args.prompt, system=mode.system, max_new_tokens=args.max_new_tokens))
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
    from lora_assets.training.base_models import DEFAULT_BASE_MODEL

    parser = argparse.ArgumentParser(prog="lora-assets", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="seed synthetic users and train their adapters")
    demo.add_argument("--users", type=int, default=2, help="number of synthetic users (default 2)")
    demo.add_argument("--base-model", default=DEFAULT_BASE_MODEL)
    demo.add_argument("--modes", nargs="*", help="modes to train (default: all)")
    demo.add_argument(
        "--steps", type=int, default=12, help="steps per adapter (default 12: SmolLM2 demo < 10 min on 2 CPU cores)"
    )
    demo.set_defaults(func=_cmd_demo)

    gen = sub.add_parser("generate", help="complete a prompt with a user's adapter")
    gen.add_argument("--user", required=True)
    gen.add_argument("--mode", required=True)
    gen.add_argument("--base-model", default=DEFAULT_BASE_MODEL)
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--no-adapter", action="store_true", help="use the bare base model")
    gen.add_argument("prompt")
    gen.set_defaults(func=_cmd_generate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from lora_assets.training.base_models import BaseModelError

    args = build_parser().parse_args(argv)
    _quiet_libraries()
    try:
        return args.func(args)
    except (ValueError, KeyError, BaseModelError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
