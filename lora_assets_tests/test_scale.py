"""Scale: the benchmark of every operator operation keeps working (SQLite and Postgres), the event
log stays small per retrained adapter, and a deployment from before the state table upgrades
with one command, without retraining anyone."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from dagster import AssetMaterialization, instance_for_test

from lora_assets.cli import main
from lora_assets.orchestration.keys import adapter_key, dataset_key, published_key
from lora_assets.orchestration.resources import LoraAssetsHome

PROJECT = Path(__file__).resolve().parents[1]
OPERATIONS = [
    "UI: asset graph", "UI: asset page (mail_reply/adapter)", "UI: partition health (mail_reply/adapter)",
    "UI: checks tab (eval_gate)", "UI: dataset page (mail_reply/dataset)", "UI: run list (25 newest)",
    "lora-assets status --user", "lora-assets status --mode mail_reply (counts", "--state stale",
    "backfill planning", "change_feed_sensor tick", "adapter_retrain_sensor tick",
]


def _benchmark(tmp_path: Path, *args: str) -> str:
    env = {"PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin", "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, str(PROJECT / "benchmarks" / "scale.py"), *args], env=env,
                          capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "SCALE BENCHMARK OK" in done.stdout
    for operation in OPERATIONS:
        assert re.search(re.escape(operation) + r".* \d+\.\d{3} s$", done.stdout, re.M), operation
    return done.stdout


def test_a_retrained_adapter_writes_under_3_event_rows_and_2_kb_at_the_default_batch_size(tmp_path):
    """The sensors' jobs on 32 users (users_per_run's default) x 2 modes: every event both runs
    wrote (summaries, plans, checks, run and step events, log lines), divided by the adapters."""
    out = _benchmark(tmp_path, "--users", "300")
    rows, kb = map(float, re.search(r"event log per retrained adapter: ([\d.]+) rows, ([\d.]+) KB", out).groups())
    assert rows <= 3.0 and kb <= 2.0, out
    totals = json.loads(re.search(r"totals: (\{.*\})", out).group(1).replace("'", '"'))
    assert totals["fresh"] == 300 + 32, "every copied user's adapter is counted, by one aggregate query"


def test_the_scale_benchmark_runs_on_postgres(tmp_path, postgres_url):
    import sqlalchemy as db

    engine = db.create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:  # its own database: the daemon tests share the server
        conn.execute(db.text("DROP DATABASE IF EXISTS scale_bench"))
        conn.execute(db.text("CREATE DATABASE scale_bench"))
    engine.dispose()
    _benchmark(tmp_path, "--users", "200", "--template-users", "4",
               "--postgres-url", postgres_url.rsplit("/", 1)[0] + "/scale_bench")


def test_lora_assets_migrate_fills_the_state_table_from_per_user_partitions(tmp_path, monkeypatch, capsys):
    """An event log of the per-user-partition era: alice fresh, bob's gate failed, carol withdrawn."""
    from dagster import AssetCheckEvaluation

    res = LoraAssetsHome(home=str(tmp_path))
    monkeypatch.setenv("LORA_ASSETS_HOME", str(tmp_path))
    with instance_for_test() as instance:
        monkeypatch.setattr("lora_assets.orchestration.instance.get_instance", lambda: instance)
        instance.add_dynamic_partitions("users", ["alice", "bob", "carol"])
        instance.add_dynamic_partitions("base_models", ["tiny-llama"])

        def old(key, partition, data_version, **metadata):
            tags = {"dagster/data_version": data_version}
            instance.report_runless_asset_event(AssetMaterialization(key, partition=partition, metadata=metadata, tags=tags))

        for user in ("alice", "bob", "carol"):
            old(dataset_key("mail_reply"), user, f"d-{user}", rows=12, train_rows=0 if user == "carol" else 10)
        old(adapter_key("mail_reply"), "tiny-llama|alice", "sha-a", dataset_version="d-alice", steps=20)
        old(published_key("mail_reply"), "tiny-llama|alice", "v-a", version="v-a")
        old(adapter_key("mail_reply"), "tiny-llama|bob", "sha-b", dataset_version="d-bob", steps=20)
        instance.report_runless_asset_event(AssetCheckEvaluation(
            asset_key=adapter_key("mail_reply"), check_name="eval_gate", passed=False, partition="tiny-llama|bob",
            metadata={"reason": "does not beat base"}))
        old(adapter_key("mail_reply"), "tiny-llama|carol", "withdrawn:d-carol", withdrawn=True,
            reason="no training examples left", dataset_version="d-carol")
        old(published_key("mail_reply"), "tiny-llama|carol", "withdrawn:d-carol", version="withdrawn")

        assert main(["migrate"]) == 0
        assert "state table filled from the event log for 3 users; nobody was retrained" in capsys.readouterr().out
        rows = res.state().rows("mail_reply", "tiny-llama", ["alice", "bob", "carol"])
        assert {u: r["reason"] for u, r in rows.items()} == {"alice": "fresh", "bob": "gate_failed", "carol": "withdrawn"}
        assert rows["alice"]["published_version"] == "v-a" and rows["bob"]["gate_reason"] == "does not beat base"
        assert res.state().user_page(None, 10) == ["alice", "bob", "carol"]
        # Only what the old sensor had not trained yet is announced to the new one: nothing here.
        assert [c["user"] for c in res.state().changes_after(0, 10)] == []
        assert main(["migrate"]) == 0  # idempotent
        assert res.state().rows("mail_reply", "tiny-llama", ["alice", "bob", "carol"]).keys() == rows.keys()
        capsys.readouterr()
        assert main(["status", "--mode", "mail_reply", "--base-model", "tiny-llama"]) == 0
        out = capsys.readouterr().out
        assert re.search(r"mail_reply\s+tiny-llama\s+1\s+0\s+1\s+0\s+1", out), out


@pytest.mark.parametrize("args, error", [(["--state", "rotten"], "unknown state 'rotten'")])
def test_status_rejects_an_unknown_state(tmp_path, monkeypatch, capsys, args, error):
    monkeypatch.setenv("LORA_ASSETS_HOME", str(tmp_path))
    with instance_for_test() as instance:
        monkeypatch.setattr("lora_assets.orchestration.instance.get_instance", lambda: instance)
        assert main(["status", *args]) == 2
        assert error in capsys.readouterr().err


def test_prune_drops_old_history_and_old_finished_runs_and_keeps_what_is_current(tmp_path, monkeypatch, capsys):
    import time

    from dagster import DagsterRunStatus
    from lora_assets.orchestration.internals import create_run_for_test

    from lora_assets.state_schema import history

    monkeypatch.setenv("LORA_ASSETS_HOME", str(tmp_path))
    res = LoraAssetsHome(home=str(tmp_path))
    state = res.state()
    state.record_dataset("alice", "mail_reply", "d1", 10, 8)
    state.record_adapter("tiny-llama", "alice", "mail_reply", trained_on="d1", adapter_version="sha", steps=3,
                         training={}, gate={"passed": True}, run_id=None)
    state.record_published("tiny-llama", "alice", "mail_reply", "v1", None)
    with state.engine.begin() as conn:  # the training happened 100 days ago
        conn.execute(history.update().where(history.c.event == "trained").values(at=time.time() - 100 * 86400))
    with instance_for_test() as instance:
        monkeypatch.setattr("lora_assets.orchestration.instance.get_instance", lambda: instance)
        old = create_run_for_test(instance, job_name="adapter_batch", status=DagsterRunStatus.SUCCESS)
        live = create_run_for_test(instance, job_name="adapter_batch", status=DagsterRunStatus.STARTED)
        assert main(["prune", "--runs-older-than-days", "0"]) == 0
        assert "pruned 1 state-table history rows older than 90 days and 1 finished runs" in capsys.readouterr().out
        assert instance.get_run_by_id(old.run_id) is None and instance.get_run_by_id(live.run_id) is not None
    assert [h["event"] for h in state.history("alice")] == ["published"]
    assert state.rows("mail_reply", "tiny-llama", ["alice"])["alice"]["reason"] == "fresh", "current state stays"
