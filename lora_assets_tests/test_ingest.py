"""Ingest through the CLI: every kind of bad input gets one clear line naming what to fix, and
nothing is written; good input in every documented format is accepted; a killed ingest is still
announced."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lora_assets.cli import main
from lora_assets.settings import Settings

MAIL = {"id": "m1", "sender": "Sam", "subject": "Lunch?", "body": "Lunch on Friday?", "reply": "Sure!"}
PHOTO = {"id": "p1", "location": "Lisbon", "caption": "Sunset!!", "people": ["Sam"], "tags": ["sea"]}
FEEDBACK = {"id": "f1", "mode": "tone_rewrite", "prompt": "Rewrite: hi", "suggestion": "Hello.", "outcome": "accepted"}


def lines(*records) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r, default=str).encode()) + b"\n" for r in records)


# (name, source, file content, expected fragments of the error besides the file name)
BAD_FILES = [
    ("not json", "mail", b"{not json\n", [":1:", "not valid JSON"]),
    ("truncated line", "mail", lines(MAIL) + b'{"id": "m2", "sender": "Sa\n', [":2:", "not valid JSON"]),
    ("array instead of object", "mail", b"[1, 2]\n", [":1:", "expected a JSON object"]),
    ("bare string", "mail", b'"hello"\n', [":1:", "expected a JSON object"]),
    ("null line", "mail", b"null\n", [":1:", "expected a JSON object"]),
    ("recursion bomb", "mail", b"[" * 30_000 + b"]" * 30_000 + b"\n", [":1:", "nested deeper than 3"]),
    ("nested too deep", "mail", lines({**MAIL, "subject": [[["x"]]]}), [":1:", "nested deeper than 3"]),
    ("undecodable bytes", "mail", lines(MAIL) + b'{"id": "m2", "body": "caf\xe9"}\n', [":2:", "not UTF-8", "0xe9"]),
    ("utf-16 file", "mail", json.dumps(MAIL).encode("utf-16") + b"\n", [":1:", "not UTF-8"]),
    ("64 KiB record", "mail", lines({**MAIL, "body": "x" * 70_000}), [":1:", "longer than the limit of 65536 bytes"]),
    ("field too long", "mail", lines({**MAIL, "body": "x" * 20_000}), [":1:", "'body'", "more than the limit of 16384"]),
    ("list too long", "photos", lines({**PHOTO, "people": [f"p{i}" for i in range(100)]}), [":1:", "'people'", "100 items"]),
    ("missing id", "mail", lines({k: v for k, v in MAIL.items() if k != "id"}), [":1:", "missing string 'id'"]),
    ("numeric id", "mail", lines({**MAIL, "id": 7}), [":1:", "missing string 'id'"]),
    ("empty id", "mail", lines({**MAIL, "id": ""}), [":1:", "missing string 'id'"]),
    ("id too long", "mail", lines({**MAIL, "id": "m" * 300}), [":1:", "'id' is 300 characters"]),
    ("unknown field", "mail", lines({**MAIL, "sendr": "Sam"}), [":1:", "'m1'", "unknown fields ['sendr']"]),
    ("missing required field", "mail", lines({k: v for k, v in MAIL.items() if k != "body"}), [":1:", "'m1'", "missing 'body'"]),
    ("blank required field", "mail", lines({**MAIL, "sender": "   "}), [":1:", "missing 'sender'"]),
    ("int for a string", "mail", lines(MAIL, {**MAIL, "id": "m4", "subject": 12}), [":2:", "'m4'", "field 'subject'", "must be a string, got int 12"]),
    ("bool for a string", "mail", lines({**MAIL, "reply": True}), [":1:", "field 'reply'", "got bool True"]),
    ("object for a string", "mail", lines({**MAIL, "body": {"text": "hi"}}), [":1:", "field 'body'", "got dict"]),
    ("string for a list", "photos", lines({**PHOTO, "people": "Sam"}), [":1:", "field 'people'", "must be a list of strings"]),
    ("numbers in a list", "photos", lines({**PHOTO, "tags": [1, 2]}), [":1:", "field 'tags'", "must be a string, got int 1"]),
    ("unparseable timestamp", "mail", lines({**MAIL, "received_at": "yesterday"}), [":1:", "field 'received_at'", "not an ISO-8601"]),
    ("bool timestamp", "mail", lines({**MAIL, "received_at": True}), [":1:", "field 'received_at'", "epoch seconds or an ISO-8601"]),
    ("milliseconds timestamp", "mail", lines({**MAIL, "received_at": 1_773_600_000_000}), [":1:", "field 'received_at'", "milliseconds"]),
    ("duplicate id", "mail", lines(MAIL, MAIL), [":2:", "'m1'", "duplicate id"]),
    ("delete without id", "mail", lines({"_deleted": True}), [":1:", "delete without a string 'id'"]),
    ("delete with numeric id", "mail", lines({"id": 3, "_deleted": True}), [":1:", "delete without a string 'id'"]),
    ("unknown feedback outcome", "feedback", lines({**FEEDBACK, "outcome": "maybe"}), [":1:", "'f1'", "field 'outcome'", "'maybe'"]),
    ("edited without edit", "feedback", lines({**FEEDBACK, "outcome": "edited"}), [":1:", "'f1'", "missing 'edit'"]),
]


@pytest.fixture
def cli(tmp_path, monkeypatch):
    data = tmp_path / "data"
    monkeypatch.setenv("LORA_ASSETS_HOME", str(data))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))
    return Settings.from_env()


def _nothing_written(settings: Settings, user: str = "alice") -> None:
    for source in ("mail", "photos", "feedback"):
        assert settings.store().head(user, source) == 0
    assert settings.feed().pending_count() == 0


@pytest.mark.parametrize("name, source, content, expected", BAD_FILES, ids=[c[0] for c in BAD_FILES])
def test_bad_input_gets_one_clear_line_and_nothing_is_written(cli, tmp_path, capsys, name, source, content, expected):
    path = tmp_path / "batch.jsonl"
    path.write_bytes(content)
    assert main(["ingest", "--user", "alice", "--source", source, str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith(f"error: {path}"), err
    for fragment in expected:
        assert fragment in err, (fragment, err)
    _nothing_written(cli)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--user", "../etc", "--source", "mail"], "invalid user id '../etc'"),
        (["--user", "a,b", "--source", "mail"], "invalid user id 'a,b'"),
        (["--user", "alice", "--source", "smells"], "unknown source 'smells'"),
    ],
)
def test_bad_user_or_source_is_named(cli, tmp_path, capsys, args, expected):
    path = tmp_path / "batch.jsonl"
    path.write_bytes(lines(MAIL))
    assert main(["ingest", *args, str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and "\n" not in err
    _nothing_written(cli)


def test_a_directory_or_a_missing_file_is_named(cli, tmp_path, capsys):
    assert main(["ingest", "--user", "alice", "--source", "mail", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path}: is a directory, not a JSONL file"
    missing = tmp_path / "nope.jsonl"
    assert main(["ingest", "--user", "alice", "--source", "mail", str(missing)]) == 2
    assert capsys.readouterr().err.strip() == f"error: {missing}: no such file"
    _nothing_written(cli)


def test_limits_are_settings(cli, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LORA_ASSETS_MAX_FIELD_CHARS", "10")
    path = tmp_path / "batch.jsonl"
    path.write_bytes(lines(MAIL))
    assert main(["ingest", "--user", "alice", "--source", "mail", str(path)]) == 2
    err = capsys.readouterr().err
    assert "field 'body'" in err and "more than the limit of 10" in err


def test_timestamps_are_epoch_seconds_or_iso_8601(cli, tmp_path, capsys):
    path = tmp_path / "batch.jsonl"
    path.write_bytes(lines(
        {**MAIL, "id": "a", "received_at": 1773600000},
        {**MAIL, "id": "b", "received_at": 1773600000.5},
        {**MAIL, "id": "c", "received_at": "2026-03-15T18:58:00+00:00"},
        {**MAIL, "id": "d", "received_at": "2026-03-15T18:58:00Z"},
        {**MAIL, "id": "e", "received_at": "2026-03-15T20:58:00+02:00"},
        {**MAIL, "id": "f", "received_at": "2026-03-15 18:58:00"},
    ))
    assert main(["ingest", "--user", "alice", "--source", "mail", str(path)]) == 0
    assert "6 upserts, 0 deletes -> store segment 1, change event" in capsys.readouterr().out
    stamps = {r["id"]: r["received_at"] for r in cli.store().read("alice", "mail").to_pylist()}
    assert {stamps[k].isoformat() for k in "cdef"} == {"2026-03-15T18:58:00+00:00"}
    assert stamps["a"].isoformat() == "2026-03-15T18:40:00+00:00"


def kill_ingest_after_the_segment(env: dict, path: Path, user: str = "alice") -> int:
    """Run the real ``lora-assets ingest`` in a process that kill -9s itself right after the store
    wrote the segment, before the change event is confirmed: the worst moment."""
    code = (
        "import os, signal, sys\n"
        "import lora_assets.data.user_store as us\n"
        "real = us.UserStore.write\n"
        "def write(self, *a, **k):\n"
        "    result = real(self, *a, **k)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "us.UserStore.write = write\n"
        "from lora_assets.cli import main\n"
        f"sys.exit(main(['ingest', '--user', {user!r}, '--source', 'mail', {str(path)!r}]))\n"
    )
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=120).returncode


def test_an_ingest_killed_between_the_segment_and_the_event_is_still_announced(tmp_path, monkeypatch):
    env = {**os.environ, "LORA_ASSETS_HOME": str(tmp_path / "data"), "LORA_ASSETS_STAGED_GRACE_S": "1"}
    path = tmp_path / "batch.jsonl"
    path.write_bytes(lines(MAIL))
    assert kill_ingest_after_the_segment(env, path) == -signal.SIGKILL
    settings = Settings.from_env(env)
    assert settings.store().head("alice", "mail") == 1, "the segment was written"
    feed = settings.feed()
    deliveries, _cursor = feed.consume(None, 10)
    assert deliveries == [], "not announced before the grace period: the ingest might still be running"
    time.sleep(1.2)
    deliveries, _cursor = feed.consume(None, 10)
    (delivery,) = deliveries
    (event,) = delivery.events
    assert (event.user, event.source) == ("alice", "mail")
    assert not list((tmp_path / "data" / "users").rglob("*.lock")), "no lock file per segment"
