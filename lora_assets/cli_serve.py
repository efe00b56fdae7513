"""The serving commands of ``lora-assets``: ``serve`` (the OpenAI-compatible API) and ``serve-token``."""

from __future__ import annotations

import argparse
import sys


def _cmd_serve(args: argparse.Namespace) -> int:
    from lora_assets.serving.server import options_from, serve
    from lora_assets.settings import Settings

    settings = Settings.from_env()
    options = options_from(settings, args.base_model, max_adapters=args.max_adapters, max_batch=args.max_batch,
                           max_concurrent=args.max_concurrent, refresh_s=args.refresh_s,
                           retrieval=args.retrieval)
    serve(settings, options, args.host, args.port)
    return 0


def _cmd_serve_token(args: argparse.Namespace) -> int:
    from lora_assets.serving.auth import issue_token, revoke_user
    from lora_assets.settings import Settings

    source = Settings.from_env().serve_tokens()
    if args.revoke:
        if not args.user:
            print("error: --revoke needs --user USER", file=sys.stderr)
            return 2
        n = revoke_user(source, args.user)
        print(f"revoked {n} token(s) of {args.user} in {source.name}")
        return 0
    if bool(args.user) == bool(args.admin):
        print("error: give --user USER or --admin", file=sys.stderr)
        return 2
    print(issue_token(source, None if args.admin else args.user))
    print(f"(stored hashed in {source.name}; this is the only time the token is shown)", file=sys.stderr)
    return 0


def add_serve_commands(sub, default_base_model: str) -> None:
    sv = sub.add_parser("serve", help="serve users' adapters over an OpenAI-compatible HTTP API")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--base-model", default=default_base_model)
    sv.add_argument("--max-adapters", type=int, help="adapters resident at once (LORA_ASSETS_SERVE_MAX_ADAPTERS, 64)")
    sv.add_argument("--max-batch", type=int, help="requests decoded together (LORA_ASSETS_SERVE_MAX_BATCH, 16)")
    sv.add_argument("--max-concurrent", type=int, help="requests in flight before 429 (LORA_ASSETS_SERVE_MAX_CONCURRENT, 256)")
    sv.add_argument("--refresh-s", type=float, help="a moved CURRENT is served within this (LORA_ASSETS_SERVE_REFRESH_S, 2)")
    from lora_assets.settings import SERVE_RETRIEVAL_POLICIES

    sv.add_argument("--retrieval", choices=SERVE_RETRIEVAL_POLICIES,
                    help="add the user's most similar past replies to the prompt: where the gate found they help, "
                         "always or never (LORA_ASSETS_SERVE_RETRIEVAL, helps)")
    sv.set_defaults(func=_cmd_serve)

    tk = sub.add_parser("serve-token", help="issue (or --revoke) a bearer token for the serving API")
    tk.add_argument("--user", help="the user whose adapters the token may use")
    tk.add_argument("--admin", action="store_true", help="a token that may use every user's adapters")
    tk.add_argument("--revoke", action="store_true", help="with --user: remove every token of the user")
    tk.set_defaults(func=_cmd_serve_token)
