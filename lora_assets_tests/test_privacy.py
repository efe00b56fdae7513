"""Privacy: a user can be forgotten everywhere, adapters whose data is gone are withdrawn from
devices, and one user's data never surfaces in another user's adapter or records."""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from dagster import instance_for_test

from lora_assets.adapters import job_for
from lora_assets.cli import main
from lora_assets.data.ingest import ingest
from lora_assets.definitions import defs
from lora_assets.modes import MODES, build_examples
from lora_assets.orchestration.resources import LoraAssetsHome
from lora_assets.orchestration.runs import register_users, run_adapter_batch, run_dataset_batch
from lora_assets.orchestration.sensors import adapter_retrain_sensor, change_feed_sensor
from lora_assets_tests.ticks import evaluate_tick
from lora_assets.training import train_adapters
from lora_assets.training.exposure import canary_exposure, random_secret

MAIL = MODES["mail_reply"]
TEMPLATE = "My door code is {secret}."


def _with_canary(tables: dict, secret: str, every: int = 6) -> dict:
    rows = tables["mail"].to_pylist()
    for row in rows[::every]:
        if row["reply"]:
            row["reply"] += " " + TEMPLATE.format(secret=secret)
    return {**tables, "mail": pa.Table.from_pylist(rows, schema=tables["mail"].schema)}


def test_a_canary_planted_in_one_users_mail_is_exposed_only_by_their_adapter(tiny_base, synthetic_tables, tmp_path):
    secret = random_secret(random.Random("canary"))
    a = build_examples(MAIL, _with_canary(synthetic_tables["user-000"], secret))
    b = build_examples(MAIL, synthetic_tables["user-001"])
    jobs = [replace(job_for(MAIL, u, df, tmp_path / u, steps=30), learning_rate=1e-2) for u, df in (("A", a), ("B", b))]
    train_adapters(jobs, tiny_base, progress=None)
    prompt = b.iloc[0]["prompt"]  # a mail of B's: the canary is asked for where it never appeared

    def exposure(adapter):
        return canary_exposure(tiny_base, adapter, prompt, TEMPLATE, secret, MAIL.system, candidates=1000)

    base, under_a, under_b = exposure(None), exposure(jobs[0].output_dir), exposure(jobs[1].output_dir)
    assert under_a >= 9.0, f"A's adapter memorized its canary: {under_a:.2f} of at most 9.97 bits"
    assert under_b <= max(base + 2.0, 5.0), f"B's adapter is at base level: {under_b:.2f} vs base {base:.2f} bits"


@pytest.fixture
def two_users(tmp_path, home, tiny_base, synthetic_tables):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "base_models").symlink_to(home / "base_models", target_is_directory=True)
    res = LoraAssetsHome(home=str(tmp_path / "data"), train_steps=3, gate_margin=0.0, gate_confidence=1.0)
    settings = res.settings()
    secret = random_secret(random.Random("canary"))
    tables = {"alice": _with_canary(synthetic_tables["user-000"], secret), "bob": synthetic_tables["user-001"]}
    for user, t in tables.items():
        for source in ("mail", "contacts", "browsing"):
            ingest(settings.store(), settings.feed(), user, source, t[source].to_pylist())
    with instance_for_test() as instance:
        register_users(res.settings(), ["alice", "bob"])
        instance.add_dynamic_partitions("base_models", ["tiny-llama"])
        yield instance, res, tables, secret


def _texts(tables: dict) -> set[str]:
    """Distinctive record text of one user: their replies and mail bodies."""
    rows = tables["mail"].to_pylist()
    return {r["reply"] for r in rows if r["reply"]} | {r["body"] for r in rows}


def test_no_file_metadata_or_log_line_of_bobs_runs_holds_alices_text(two_users, tmp_path):
    instance, res, tables, secret = two_users
    assert run_dataset_batch(instance, {"bob": ["mail", "contacts", "browsing"]}, res).success
    assert run_adapter_batch(instance, "tiny-llama", [("bob", "mail_reply"), ("bob", "search_suggest")], res).success
    alice = _texts(tables["alice"]) | {secret}
    data = Path(res.path)
    bob_files = [p for p in data.rglob("*") if p.is_file() and "bob" in p.parts and "base_models" not in p.parts]
    assert len(bob_files) > 10
    for path in bob_files:
        content = path.read_bytes()
        assert not any(text.encode() in content for text in alice), path
    for run in instance.get_runs():
        for entry in instance.all_logs(run.run_id):
            serialized = json.dumps(entry.to_json() if hasattr(entry, "to_json") else str(entry))
            assert not any(text in serialized for text in alice), run.run_id


def _all_files(root: Path, user: str) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*") if p.is_file() and user in p.parts
    }


def test_forget_erases_a_user_everywhere_and_nothing_of_anyone_else(two_users, monkeypatch, capsys):
    instance, res, tables, secret = two_users
    data = Path(res.path)
    both = {"alice": ["mail", "contacts", "browsing"], "bob": ["mail", "contacts", "browsing"]}
    assert run_dataset_batch(instance, both, res).success  # a run shared by both users
    assert run_adapter_batch(instance, "tiny-llama", [(u, "mail_reply") for u in both], res).success
    assert run_adapter_batch(instance, "tiny-llama", [("alice", "search_suggest")], res).success  # alice's alone
    feed = res.feed()
    feed.dead_letter(feed.append(json.dumps({"user": "alice", "source": "mail", "seq": 99})), "segment 99 does not exist")
    feed.dead_letter(feed.append(json.dumps({"user": "bob", "source": "mail", "seq": 99})), "segment 99 does not exist")
    monkeypatch.setenv("LORA_ASSETS_HOME", str(data))
    device = data.parent / "alices-phone"
    sync = ["sync", "--user", "alice", "--device-dir", str(device), "--base-model", "tiny-llama"]
    assert main(sync) == 0 and (device / "tiny-llama" / "mail_reply").is_dir()
    bob_before = _all_files(data, "bob")
    assert res.state().count_user_rows("alice") and _all_files(data, "alice")

    monkeypatch.setenv("LORA_ASSETS_HOME", str(data))
    monkeypatch.setattr("lora_assets.orchestration.instance.get_instance", lambda: instance)
    for key in ("LORA_ASSETS_TRAIN_STEPS",):
        monkeypatch.delenv(key, raising=False)
    assert main(["forget", "--user", "alice", "--wait", "5"]) == 0
    out = capsys.readouterr().out
    assert "forgot user alice" in out and "store objects (records)" in out and "nothing of alice is left" in out

    assert _all_files(data, "alice") == {}  # store, datasets, drive, working copies
    assert res.state().count_user_rows("alice") == 0  # her datasets, adapters, history, registration
    assert not res.state().is_registered("alice")
    dead = [payload for _i, payload, _e in feed.dead_letters()]
    assert len(dead) == 1 and "\"bob\"" in dead[0] and feed.pending_count() == 3  # bob's 3 events stay
    from dagster import serialize_value

    for run in instance.get_runs():  # the shared runs keep bob's events and lose every one of alice's
        events = [serialize_value(entry) for entry in instance.all_logs(run.run_id)]
        assert events and not [e for e in events if "alice" in e], run.run_id
        assert any("bob" in e for e in events), "bob's events of the shared runs stay"
    assert _all_files(data, "bob") == bob_before, "other users' files stay byte-identical"
    assert res.state().rows("mail_reply", "tiny-llama", ["bob"])["bob"]["reason"] == "fresh"  # bob's rows stay
    assert res.state().count_user_rows("bob") >= 8

    capsys.readouterr()
    assert main(sync) == 0  # her phone drops what was learned from her data
    synced = capsys.readouterr().out
    assert "mail_reply: " in synced and "-> withdrawn" in synced
    assert not any((device / "tiny-llama").iterdir())
    # Idempotent: a second forget finds nothing and says so.
    assert main(["forget", "--user", "alice", "--wait", "5"]) == 0
    assert all(line.strip().startswith("0 ") for line in capsys.readouterr().out.splitlines()[1:-1])
    # Later changes for alice are dropped, and what they carried is erased, not learned.
    ingest(res.store(), res.feed(), "alice", "mail", [tables["alice"]["mail"].to_pylist()[0]])
    tick = evaluate_tick(change_feed_sensor, instance, res, None, defs)
    assert all("alice" not in json.dumps(r.run_config) for r in tick.run_requests)
    assert res.store().objects.list("alice") == []


def test_an_adapter_whose_data_is_all_deleted_is_withdrawn_from_the_device(two_users, tmp_path, monkeypatch, capsys):
    instance, res, tables, _secret = two_users
    data, device = Path(res.path), tmp_path / "device"
    assert run_dataset_batch(instance, {"bob": ["browsing"]}, res).success
    assert run_adapter_batch(instance, "tiny-llama", [("bob", "search_suggest")], res).success
    monkeypatch.setenv("LORA_ASSETS_HOME", str(data))
    sync = ["sync", "--user", "bob", "--device-dir", str(device), "--base-model", "tiny-llama"]
    assert main(sync) == 0 and "search_suggest: (none) ->" in capsys.readouterr().out

    res.store().write("bob", "browsing", deletes=[r["id"] for r in tables["bob"]["browsing"].to_pylist()])
    primed = evaluate_tick(adapter_retrain_sensor, instance, res, None, defs)
    assert run_dataset_batch(instance, {"bob": ["browsing"]}, res).success
    (request,) = evaluate_tick(adapter_retrain_sensor, instance, res, primed.cursor, defs).run_requests
    config = request.run_config["ops"]["train_adapters"]["config"]
    assert run_adapter_batch(instance, config["base_model"], [(i["user"], i["mode"]) for i in config["items"]], res).success

    pointer = json.loads((data / "drive" / "bob" / "adapters" / "tiny-llama" / "search_suggest" / "CURRENT").read_text())
    assert pointer["withdrawn"] is True and pointer["version"] is None
    assert sorted(p.name for p in (data / "drive" / "bob" / "adapters" / "tiny-llama" / "search_suggest").iterdir()) == ["CURRENT"]
    assert main(sync) == 0
    assert "search_suggest: " in capsys.readouterr().out and not (device / "tiny-llama" / "search_suggest").exists()
    assert main(["generate", "--device-dir", str(device), "--mode", "search_suggest", "--base-model", "tiny-llama", "best"]) == 2
    assert "no search_suggest adapter for tiny-llama installed" in capsys.readouterr().err
    monkeypatch.setattr("lora_assets.orchestration.instance.get_instance", lambda: instance)
    assert main(["status", "--user", "bob", "--mode", "search_suggest", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)["adapters"]
    assert row["state"] == "withdrawn" and row["published_version"] is None


def _trained_on(path: Path) -> set[str]:
    return set(json.loads(path.read_text())["trained_examples"])


def test_a_delete_removes_every_version_and_copy_trained_on_the_record(two_users):
    from lora_assets.data.schemas import records_to_table
    from lora_assets.drive.publish import list_versions, read_current

    instance, res, tables, _secret = two_users
    mode, data, drive = "search_suggest", Path(res.path), res.drive()
    visits = tables["bob"]["browsing"].to_pylist()
    gone = next(v for v in visits if MODES[mode].split_of(v["id"]) == "train")

    def retrain(resources=res) -> None:
        assert run_dataset_batch(instance, {"bob": ["browsing"]}, resources).success
        run_adapter_batch(instance, "tiny-llama", [("bob", mode)], resources)

    retrain()  # v1
    res.store().write("bob", "browsing", records_to_table("browsing", [{"id": "visit-new", "query": "rye flour"}]))
    retrain()  # v2, an incremental update from v1 (a warm-start copy of v1 is in the data dir)
    assert len(list_versions(drive, "bob", "tiny-llama", mode)) == 2

    res.store().write("bob", "browsing", deletes=[gone["id"]])
    retrain()  # v3, without the record

    (kept,) = list_versions(drive, "bob", "tiny-llama", mode)  # keep_versions is 3: v1 and v2 went for the delete
    assert read_current(drive, "bob", "tiny-llama", mode)[0]["version"] == kept[0]
    copies = [p for p in data.rglob("lora_assets.json") if "bob" in p.parts and mode in p.parts]
    assert copies and all(gone["id"] not in _trained_on(p) for p in copies), "no copy trained on it, anywhere"
    segments = res.store().objects.list("bob/browsing")
    assert [k.rsplit("/", 1)[1].split("-")[0] for k in segments] == ["snapshot"], "the store compacted the delete away"
    stored = pa.concat_tables([pq.read_table(pa.BufferReader(res.store().objects.get(k))) for k in segments])
    assert gone["id"] not in stored.column("id").to_pylist()

    # A delete whose retrain cannot pass the gate: the version trained on it is withdrawn, not kept.
    strict = LoraAssetsHome(home=res.home, train_steps=3, gate_margin=100.0)
    second = next(v for v in visits[1:] if MODES[mode].split_of(v["id"]) == "train" and v["id"] != gone["id"])
    res.store().write("bob", "browsing", deletes=[second["id"]])
    retrain(strict)
    pointer = read_current(drive, "bob", "tiny-llama", mode)[0]
    assert pointer["withdrawn"] is True and list_versions(drive, "bob", "tiny-llama", mode) == []
    row = res.state().rows(mode, "tiny-llama", ["bob"])["bob"]
    assert row["reason"] == "withdrawn" and "trained on records the user deleted" in row["withdrawn_reason"]
