"""The device commands of ``lora-assets``: ``sync`` (drive -> device folder) and ``generate``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lora_assets.paths import data_home


def _cmd_generate(args: argparse.Namespace) -> int:
    from lora_assets.adapters import adapter_dir
    from lora_assets.data.user_store import validate_user_id
    from lora_assets.drive.publish import FORMATS
    from lora_assets.drive.sync import installed_adapter_dir, verify_installed
    from lora_assets.modes import get_mode

    mode = get_mode(args.mode)
    if args.runtime == "llama-cpp":
        return _generate_llama_cpp(args, mode)
    home = data_home()
    if args.no_adapter:
        path = None
    elif args.device_dir:
        path = installed_adapter_dir(Path(args.device_dir), args.base_model, mode.name)
        verify_installed(path, FORMATS["peft"])
    else:
        if not args.user:
            raise ValueError("--user is required unless --device-dir is given")
        path = adapter_dir(home, args.base_model, validate_user_id(args.user), mode.name)
        if not path.exists():
            print(f"error: no {mode.name} adapter for user {args.user!r} on {args.base_model} at {path}", file=sys.stderr)
            return 1
    from lora_assets.settings import Settings
    from lora_assets.training import load_base_model
    from lora_assets.training.inference import generate, load_adapter

    settings = Settings.from_env()
    base = load_base_model(args.base_model, home, settings.device, settings.dtype)
    model = load_adapter(base, path) if path is not None else base.model
    print(generate(model, base.tokenizer, args.prompt, system=mode.system, max_new_tokens=args.max_new_tokens))
    return 0


def _generate_llama_cpp(args: argparse.Namespace, mode) -> int:
    """As a device does: llama.cpp on the quantized base GGUF with the synced ``adapter.gguf``."""
    from lora_assets.drive.llama_cpp import chat, open_llama
    from lora_assets.drive.publish import FORMATS
    from lora_assets.drive.sync import installed_adapter_dir, verify_installed
    from lora_assets.settings import Settings
    from lora_assets.training.base_models import device_base_gguf

    adapter = None
    if not args.no_adapter:
        if not args.device_dir:
            raise ValueError("--runtime llama-cpp runs what a device has: give --device-dir (or --no-adapter)")
        folder = installed_adapter_dir(Path(args.device_dir), args.base_model, mode.name)
        verify_installed(folder, FORMATS["gguf"])
        (adapter,) = (folder / name for name in FORMATS["gguf"])
    base_gguf = Path(args.base_gguf) if args.base_gguf else device_base_gguf(args.base_model)
    llm = open_llama(base_gguf, adapter, n_ctx=1024, threads=Settings.from_env().torch_threads or None)
    print(chat(llm, args.prompt, system=mode.system, max_new_tokens=args.max_new_tokens))
    return 0


def _cmd_sync(args: argparse.Namespace) -> int:
    from lora_assets.drive.sync import sync_device
    from lora_assets.settings import Settings

    drive = Settings.from_env().drive()
    report = sync_device(drive, args.user, Path(args.device_dir), args.base_model, args.format)
    for mode, old, new in report.changed:
        print(f"{mode}: {old or '(none)'} -> {new}")
    for mode, version in report.unchanged:
        print(f"{mode}: {version} (up to date)")
    for mode, version in report.withdrawn:
        print(f"{mode}: {version or '(none)'} -> withdrawn (removed from this device: the data it learned from is gone)")
    for mode, version, damage in report.repaired:
        print(f"{mode}: {version} (repaired: the installed copy was damaged: {damage})")
    for mode, reason in report.failed:
        print(f"error: {mode}: kept the installed version: {reason}", file=sys.stderr)
    if not (report.changed or report.unchanged or report.repaired or report.withdrawn or report.failed):
        print(f"nothing published for user {args.user!r} on {args.base_model}")
    return 0 if report.ok else 1


def add_device_commands(sub, default_base_model: str) -> None:
    sy = sub.add_parser("sync", help="install a user's CURRENT adapters from their drive into a device folder")
    sy.add_argument("--user", required=True)
    sy.add_argument("--device-dir", required=True)
    sy.add_argument("--base-model", default=default_base_model)
    sy.add_argument("--format", choices=("all", "peft", "gguf"), default="all",
                    help="files to install: peft (transformers/peft), gguf (llama.cpp), all (default)")
    sy.set_defaults(func=_cmd_sync)

    gen = sub.add_parser("generate", help="complete a prompt with a user's adapter")
    gen.add_argument("--user", help="use the user's adapter from the data dir")
    gen.add_argument("--device-dir", help="use the adapter installed on a synced device folder")
    gen.add_argument("--mode", required=True)
    gen.add_argument("--base-model", default=default_base_model)
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--no-adapter", action="store_true", help="use the bare base model")
    gen.add_argument("--runtime", choices=("transformers", "llama-cpp"), default="transformers",
                     help="llama-cpp: the device's adapter.gguf on the quantized base GGUF (needs --device-dir)")
    gen.add_argument("--base-gguf", help="llama-cpp: the quantized base model file (default: the shipped one)")
    gen.add_argument("prompt")
    gen.set_defaults(func=_cmd_generate)
