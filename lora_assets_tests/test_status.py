"""``lora-assets status``: per base model x user x mode, fresh or stale and why, the gate and what
is published; one user answers from indexed reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from dagster import DagsterRunStatus, instance_for_test

from lora_assets.cli import main
from lora_assets.data.ingest import ingest
from lora_assets.drive.publish import read_current
from lora_assets.orchestration.batches import adapter_batch_job
from lora_assets.orchestration.resources import LoraAssetsHome
from lora_assets.orchestration.runs import register_users, run_adapter_batch, run_dataset_batch


@pytest.fixture
def deployment(tmp_path, home, tiny_base, synthetic_tables, monkeypatch):
    """Two users' data ingested, an instance, and the CLI pointed at both."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "base_models").symlink_to(home / "base_models", target_is_directory=True)
    res = LoraAssetsHome(home=str(tmp_path / "data"), train_steps=3, gate_margin=0.0, gate_confidence=1.0)
    for user, tables in (("alice", synthetic_tables["user-000"]), ("bob", synthetic_tables["user-001"])):
        for source in ("mail", "contacts", "browsing"):
            ingest(res.store(), res.feed(), user, source, tables[source].to_pylist())
    monkeypatch.setenv("LORA_ASSETS_HOME", res.home)
    with instance_for_test() as instance:
        monkeypatch.setattr("lora_assets.orchestration.instance.get_instance", lambda: instance)
        register_users(res.settings(), ["alice", "bob"])
        instance.add_dynamic_partitions("base_models", ["tiny-llama"])
        yield instance, res, synthetic_tables


def status_json(capsys, *args: str) -> dict:
    capsys.readouterr()
    assert main(["status", "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def rows(report: dict) -> dict[tuple[str, str], dict]:
    return {(a["user"], a["mode"]): a for a in report["adapters"]}


def test_status_tells_fresh_stale_updating_and_no_data_apart_with_the_reason(deployment, capsys):
    instance, res, tables = deployment
    users = {"alice": ["mail", "contacts", "browsing"], "bob": ["mail", "contacts", "browsing"]}
    assert run_dataset_batch(instance, users, res).success
    assert run_adapter_batch(instance, "tiny-llama", [("alice", "mail_reply"), ("bob", "mail_reply")], res).success

    report = status_json(capsys, "--user", "alice")
    assert report["schema"] == 1 and {a["user"] for a in report["adapters"]} == {"alice"}
    mine = rows(report)
    assert set(mine) == {("alice", m) for m in ("mail_reply", "message_reply", "search_suggest", "photo_caption", "tone_rewrite")}
    fresh = mine[("alice", "mail_reply")]
    pointer, _ = read_current(res.drive(), "alice", "tiny-llama", "mail_reply")
    assert fresh["state"] == "fresh" and fresh["published_version"] == pointer["version"]
    assert fresh["trained_on"] == fresh["dataset_version"] and fresh["gate"]["passed"] is True
    assert fresh["gate"]["adapter_eval_loss"] < fresh["gate"]["base_eval_loss"]
    assert fresh["gate"]["retrieval_eval_loss"] > 0, "the retrieval baseline, beside the base's loss"
    assert isinstance(fresh["gate"]["retrieval_helps"], bool)
    assert fresh["training"]["steps"] == 3 and fresh["training"]["training"] == "full"  # how, for a developer
    assert mine[("alice", "search_suggest")]["state"] == "stale"
    assert mine[("alice", "search_suggest")]["why"] == "never trained"
    assert mine[("alice", "message_reply")]["state"] == "no_data"  # contacts, but no messages
    assert report["totals"] == {"fresh": 1, "updating": 0, "stale": 1, "no_data": 3, "withdrawn": 0}
    assert report["feed"]["pending_events"] == 6 and report["feed"]["dead_letters"] == 0

    # New mail: the dataset moves on, the adapter is stale and says why ...
    ingest(res.store(), res.feed(), "alice", "mail", [{"id": "m-new", "sender": "Sam", "subject": "Hi",
                                                       "body": "Lunch?", "reply": "Sure!!"}])
    assert run_dataset_batch(instance, {"alice": ["mail"]}, res).success
    stale = rows(status_json(capsys, "--user", "alice", "--mode", "mail_reply"))[("alice", "mail_reply")]
    assert stale["state"] == "stale" and stale["why"].startswith("dataset changed since training")
    assert stale["published_version"] == pointer["version"], "devices keep the published version meanwhile"
    # ... and updating while a run for it is created and not started yet.
    queued = instance.create_run_for_job(
        adapter_batch_job, status=DagsterRunStatus.NOT_STARTED,
        run_config={"ops": {"train_adapters": {"config": {"base_model": "tiny-llama",
                                                          "items": [{"user": "alice", "mode": "mail_reply"}]}}}},
    )
    updating = status_json(capsys, "--user", "alice", "--mode", "mail_reply")
    (row,) = updating["adapters"]
    assert row["state"] == "updating" and row["run_in_flight"] == queued.run_id
    assert updating["live_adapter_runs"] == 1


def test_status_shows_a_failed_gate_and_the_last_failure_in_words(deployment, capsys):
    instance, res, _tables = deployment
    assert run_dataset_batch(instance, {"bob": ["browsing"]}, res).success
    strict = LoraAssetsHome(home=res.home, train_steps=3, gate_margin=100.0)
    assert not run_adapter_batch(instance, "tiny-llama", [("bob", "search_suggest")], strict).success

    capsys.readouterr()
    assert main(["status", "--user", "bob", "--mode", "search_suggest"]) == 0
    out = capsys.readouterr().out
    header, _rule, line, *rest = out.splitlines()
    assert header.split()[:4] == ["base", "model", "user", "mode"]
    assert "stale" in line and "FAIL" in line and "eval gate failed" in line and "does not beat base" in line
    assert any(r.startswith("last failure for bob: adapter_batch run ") and "not published" in r for r in rest)
    assert rest[-1].startswith("1 adapters: 1 stale; 0 adapter runs in flight; change feed:")


def test_status_of_every_user_and_bad_arguments(deployment, capsys):
    instance, res, _tables = deployment
    assert run_dataset_batch(instance, {"alice": ["browsing"], "bob": ["browsing"]}, res).success
    report = status_json(capsys, "--mode", "search_suggest", "--base-model", "tiny-llama")
    assert [(a["user"], a["state"]) for a in report["adapters"]] == [("alice", "stale"), ("bob", "stale")]

    assert main(["status", "--user", "carol"]) == 2
    assert "user 'carol' is not registered" in capsys.readouterr().err
    assert main(["status", "--mode", "haiku"]) == 2
    assert "unknown mode 'haiku'" in capsys.readouterr().err
    # Paging: counts for everyone, one user per page, and where to go on.
    first = status_json(capsys, "--mode", "search_suggest", "--base-model", "tiny-llama", "--limit", "1")
    assert [a["user"] for a in first["adapters"]] == ["alice"] and first["totals"]["stale"] == 2
    assert first["summary"] == [{"mode": "search_suggest", "base_model": "tiny-llama",
                                 "counts": {"fresh": 0, "updating": 0, "stale": 2, "no_data": 0, "withdrawn": 0}}]
    assert first["next_after"] == {"search_suggest|tiny-llama": "alice"}
    second = status_json(capsys, "--mode", "search_suggest", "--base-model", "tiny-llama", "--limit", "1",
                         "--after", "alice")
    assert [a["user"] for a in second["adapters"]] == ["bob"] and second["next_after"] == {}
    assert status_json(capsys, "--mode", "search_suggest", "--state", "fresh")["adapters"] == []
    assert Path(res.home).is_dir()


def test_a_state_table_from_before_the_retrieval_baseline_gets_its_columns(tmp_path):
    import sqlalchemy as db

    from lora_assets.state import StateStore

    url = f"sqlite:///{tmp_path / 'state.sqlite'}"
    StateStore(url)
    old = db.create_engine(url)
    with old.begin() as conn:  # the table as an earlier version created it
        for column in ("retrieval_eval_loss", "adapter_retrieval_eval_loss", "retrieval_helps"):
            conn.execute(db.text(f"ALTER TABLE lora_adapters DROP COLUMN {column}"))
    state = StateStore(url)
    state.register(["alice"])
    state.record_dataset("alice", "mail_reply", "d1", 10, 8, None)
    state.record_adapter("tiny-llama", "alice", "mail_reply", trained_on="d1", adapter_version="a1", steps=3,
                         training={}, gate={"passed": True, "reason": "ok", "base_eval_loss": 2.0,
                                            "adapter_eval_loss": 1.0, "retrieval_eval_loss": 1.5,
                                            "retrieval_helps": False}, run_id=None)
    row = state.rows("mail_reply", "tiny-llama", ["alice"])["alice"]
    assert row["retrieval_eval_loss"] == 1.5 and row["retrieval_helps"] is False
