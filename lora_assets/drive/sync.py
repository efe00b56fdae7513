"""Device sync: pull every mode's CURRENT adapter from the user's drive into a device folder.

Device layout::

    <device_dir>/<base_model>/<mode>/<version>/{adapter files, manifest.json}
    <device_dir>/<base_model>/<mode>/CURRENT        the installed version id

A device takes the files of its format (``--format``): ``peft`` (safetensors + config, for
transformers/peft), ``gguf`` (``adapter.gguf``, for llama.cpp on the quantized base) or ``all``.
The manifest always comes along, so every installed file is checked against it.

A version is downloaded into a staging folder, verified file by file against the manifest (whose
own hash the drive's pointer carries), renamed into place, and only then does the device's
CURRENT move. Anything wrong leaves the previous version installed and current. The previous
version is kept on the device for rollback; older ones are removed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from lora_assets.drive.publish import (
    CURRENT,
    FORMATS,
    MANIFEST,
    CorruptVersion,
    adapter_prefix,
    fetch_pointed,
    read_current,
)
from lora_assets.storage import ObjectStore


@dataclass
class SyncReport:
    changed: list[tuple[str, str | None, str]] = field(default_factory=list)  # (mode, old, new)
    unchanged: list[tuple[str, str]] = field(default_factory=list)
    repaired: list[tuple[str, str, str]] = field(default_factory=list)  # (mode, version, what was wrong)
    withdrawn: list[tuple[str, str | None]] = field(default_factory=list)  # (mode, uninstalled version)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (mode, reason)

    @property
    def ok(self) -> bool:
        return not self.failed


def published_modes(drive: ObjectStore, user: str, base_model: str) -> list[str]:
    """Modes that have a CURRENT pointer in the user's drive for this base model."""
    prefix = f"{user}/adapters/{base_model}/"
    modes = set()
    for key in drive.list(prefix.rstrip("/")):
        parts = key[len(prefix) :].split("/")
        if len(parts) == 2 and parts[1] == CURRENT:
            modes.add(parts[0])
    return sorted(modes)


def installed_version(device_dir: Path, base_model: str, mode: str) -> str | None:
    """The device's installed version of a mode; None when nothing (usable) is installed."""
    path = Path(device_dir) / base_model / mode / CURRENT
    try:
        version = path.read_text().strip()
    except (FileNotFoundError, IsADirectoryError, UnicodeDecodeError):
        return None
    return version if version and version.replace("-", "").isalnum() else None


def installed_adapter_dir(device_dir: Path, base_model: str, mode: str) -> Path:
    """The folder of the installed CURRENT version of a mode on the device."""
    version = installed_version(device_dir, base_model, mode)
    if version is None:
        raise FileNotFoundError(
            f"no {mode} adapter for {base_model} installed in {device_dir} (none published, or withdrawn); "
            "run lora-assets sync"
        )
    return Path(device_dir) / base_model / mode / version


DEFAULT_FORMAT = "all"


def format_files(manifest: dict, fmt: str, where: str) -> tuple[str, ...]:
    """The files of ``manifest`` a device of format ``fmt`` installs; a version published before
    its format existed (no ``adapter.gguf``) cannot serve a ``gguf`` device."""
    names = tuple(n for n in manifest["files"] if n in FORMATS[fmt])
    missing = [] if fmt == "all" else [n for n in FORMATS[fmt] if n not in manifest["files"]]
    if missing:
        raise CorruptVersion(f"{where}: version {manifest.get('version')} has no {', '.join(missing)} "
                             f"(published before the {fmt} format); sync --format peft, or wait for the next publish")
    return names


def verify_installed(folder: Path, needed: tuple[str, ...] = ()) -> None:
    """Re-check an installed version against its manifest before trusting its tensors: every
    manifest file present in ``folder``, and each of ``needed`` must be present."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        raise CorruptVersion(f"{folder / MANIFEST}: missing") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptVersion(f"{folder / MANIFEST}: not a valid manifest ({exc})") from None
    for name in needed:
        if name not in manifest["files"] or not (folder / name).is_file():
            raise CorruptVersion(f"{folder / name}: not installed (sync with a --format that has it)")
    for name, meta in manifest["files"].items():
        if not (folder / name).exists():
            continue  # a file of another format
        data = (folder / name).read_bytes()
        if len(data) != meta["size"] or hashlib.sha256(data).hexdigest() != meta["sha256"]:
            raise CorruptVersion(f"{folder / name}: does not match its manifest")


def sync_device(drive: ObjectStore, user: str, device_dir: Path, base_model: str,
                fmt: str = DEFAULT_FORMAT) -> SyncReport:
    """Install every mode's CURRENT adapter in format ``fmt``; a mode that fails leaves the others
    unaffected."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown device format {fmt!r}: choose {', '.join(FORMATS)}")
    report = SyncReport()
    device_dir = Path(device_dir)
    if device_dir.exists() and not device_dir.is_dir():
        raise NotADirectoryError(f"device dir {device_dir} is a file, not a directory")
    published = published_modes(drive, user, base_model)
    for mode in published:
        try:
            _sync_mode(drive, user, device_dir, base_model, mode, fmt, report)
        except (CorruptVersion, OSError, ValueError, KeyError) as exc:
            report.failed.append((mode, str(exc)))
    # A mode installed here with no CURRENT left on the drive: the user was erased (forget).
    # Treated as a tombstone: the adapter learned from data that no longer exists anywhere.
    installed = device_dir / base_model
    for mode_dir in sorted(installed.iterdir()) if installed.is_dir() else ():
        if mode_dir.is_dir() and mode_dir.name not in published and not mode_dir.name.startswith("."):
            old = installed_version(device_dir, base_model, mode_dir.name)
            try:
                shutil.rmtree(mode_dir)
            except OSError as exc:
                report.failed.append((mode_dir.name, f"could not remove the withdrawn adapter: {exc}"))
                continue
            report.withdrawn.append((mode_dir.name, old))
    return report


def _sync_mode(drive: ObjectStore, user: str, device_dir: Path, base_model: str, mode: str, fmt: str,
               report: SyncReport) -> None:
    prefix = adapter_prefix(user, base_model, mode)
    found = read_current(drive, user, base_model, mode)
    if found is None:
        return
    pointer = found[0]
    mode_dir = device_dir / base_model / mode
    old = installed_version(device_dir, base_model, mode)
    if pointer.get("withdrawn"):  # the data it learned from is gone: uninstall the mode
        if mode_dir.exists():
            shutil.rmtree(mode_dir)
            report.withdrawn.append((mode, old))
        return
    version = pointer["version"]
    damage = None
    if old == version:
        try:
            manifest = json.loads((mode_dir / version / MANIFEST).read_text())
            needed = format_files(manifest, fmt, str(mode_dir / version))
            if any(not (mode_dir / version / n).exists() for n in needed):
                old = None  # installed in another format: install this one (reported as a change)
            else:
                verify_installed(mode_dir / version, needed)
        except (CorruptVersion, OSError, ValueError, KeyError) as exc:
            damage = str(exc)  # the installed copy is damaged: download it again
        else:
            if old is not None:
                report.unchanged.append((mode, version))
                return
    manifest_bytes, manifest, files = fetch_pointed(drive, prefix, pointer, only=FORMATS[fmt])
    format_files(manifest, fmt, f"{prefix}/{version}")  # refuses a version without the device's format

    mode_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{version}-", dir=mode_dir))
    try:
        for name, data in files.items():
            (staging / name).write_bytes(data)
        (staging / MANIFEST).write_bytes(manifest_bytes)
        target = mode_dir / version
        if target.exists():
            shutil.rmtree(target)  # an earlier, interrupted install of the same version
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    tmp = mode_dir / f".{CURRENT}.tmp"
    tmp.write_text(version + "\n")
    os.replace(tmp, mode_dir / CURRENT)
    for stale in mode_dir.iterdir():  # keep the new and the previous version only
        if stale.is_dir() and stale.name not in (version, old) and not stale.name.startswith("."):
            shutil.rmtree(stale, ignore_errors=True)
    if damage is not None:
        report.repaired.append((mode, version, damage))
    else:
        report.changed.append((mode, old, version))
