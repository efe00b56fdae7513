"""Batch runs: many users in one run; each user's outcome in the state table, one summary event
per asset in Dagster, and one user's failure only that user's."""

from __future__ import annotations

import json

import pytest
from dagster import AssetCheckKey, DagsterEventType, instance_for_test

from lora_assets.data.schemas import records_to_table as pa_table
from lora_assets.data.user_store import write_user
from lora_assets.drive.publish import read_current
from lora_assets.orchestration.keys import adapter_key, published_key
from lora_assets.orchestration.resources import LoraAssetsHome
from lora_assets.orchestration.runs import register_users, run_adapter_batch, run_dataset_batch

USERS = ("good", "nodata", "regress")


@pytest.fixture
def batch_env(tmp_path, home, tiny_base, synthetic_tables):
    (tmp_path / "base_models").symlink_to(home / "base_models", target_is_directory=True)
    # The strictest gate (any paired regression): a 3-step retrain against a 60-step adapter must fail it.
    res = LoraAssetsHome(home=str(tmp_path), train_steps=3, gate_margin=0.0, gate_confidence=0.5)
    store = res.store()
    write_user(store, "good", synthetic_tables["user-000"])
    write_user(store, "regress", synthetic_tables["user-001"])
    with instance_for_test() as instance:
        register_users(res.settings(), list(USERS))
        instance.add_dynamic_partitions("base_models", ["tiny-llama"])
        assert run_dataset_batch(instance, {u: ["browsing"] for u in ("good", "regress")}, res).success
        yield instance, res


def run_events(instance, run_id: str, kind: DagsterEventType) -> list:
    return [r.event_log_entry for r in instance.get_records_for_run(run_id, of_type=kind).records]


def test_a_bad_user_and_a_failed_gate_fail_only_their_own_rows(batch_env):
    instance, res = batch_env
    # "regress" already has a well-trained published adapter: a 3-step retrain regresses against it.
    strong = LoraAssetsHome(home=res.home, train_steps=60, gate_margin=0.0)
    assert run_adapter_batch(instance, "tiny-llama", [("regress", "search_suggest")], strong).success
    published_before = read_current(res.drive(), "regress", "tiny-llama", "search_suggest")[0]["version"]
    # A large change (a full retrain is due) that deletes nothing and keeps the held-out set.
    from lora_assets.modes import MODES

    visits = res.store().read("regress", "browsing").to_pylist()
    edited = [{**v, "query": v["query"] + " today"} for v in visits if MODES["search_suggest"].split_of(v["id"]) == "train"]
    res.store().write("regress", "browsing", pa_table("browsing", edited))
    assert run_dataset_batch(instance, {"regress": ["browsing"]}, res).success

    result = run_adapter_batch(instance, "tiny-llama", [(u, "search_suggest") for u in USERS], res)

    assert not result.success  # the run fails, naming both ...
    failure = result.get_step_failure_events()[0].step_failure_data.user_failure_data
    assert "search_suggest|tiny-llama|nodata" in failure.description
    assert "search_suggest|tiny-llama|regress" in failure.description
    # ... while the good user's adapter is trained, passes its gate and is published.
    drive = res.drive()
    assert read_current(drive, "good", "tiny-llama", "search_suggest") is not None
    assert read_current(drive, "regress", "tiny-llama", "search_suggest")[0]["version"] == published_before
    rows = res.state().rows("search_suggest", "tiny-llama", list(USERS))
    assert rows["good"]["reason"] == "fresh"
    assert rows["regress"]["reason"] == "gate_failed" and rows["regress"]["error"].startswith("eval gate failed")
    assert "nodata" not in rows  # no dataset at all ...
    (failed,) = [h for h in res.state().history("nodata") if h["event"] == "failed"]
    assert failed["run_id"] == result.run_id and "not trained" in failed["detail"]["error"]  # ... and said why

    # Dagster holds one summary per asset for the run, counting, and naming nobody.
    mats = {e.dagster_event.asset_key.to_user_string(): e.asset_materialization
            for e in run_events(instance, result.run_id, DagsterEventType.ASSET_MATERIALIZATION)}
    assert set(mats) == {"search_suggest/adapter", "search_suggest/published"}
    adapter = {k: v.value for k, v in mats["search_suggest/adapter"].metadata.items()}
    assert (adapter["users"], adapter["trained"], adapter["gate_failed"], adapter["not_trained"]) == (3, 1, 1, 1)
    assert mats["search_suggest/adapter"].partition == "tiny-llama"
    assert mats["search_suggest/published"].metadata["published"].value == 1
    (check,) = run_events(instance, result.run_id, DagsterEventType.ASSET_CHECK_EVALUATION)
    evaluation = check.dagster_event.event_specific_data
    assert not evaluation.passed and evaluation.partition == "tiny-llama"
    assert (evaluation.metadata["passed"].value, evaluation.metadata["failed"].value) == (1, 1)
    latest = instance.event_log_storage.get_asset_check_execution_history(
        AssetCheckKey(adapter_key("search_suggest"), "eval_gate"), limit=1)[0]
    assert latest.status.value == "FAILED"
    events = json.dumps([str(e) for e in instance.all_logs(result.run_id)
                         if e.dagster_event is not None and e.dagster_event.event_type_value.startswith("ASSET")])
    assert not any(u in events for u in USERS), "no user id in the run's asset events"


def test_a_retried_batch_does_not_retrain_what_is_already_published(batch_env):
    instance, res = batch_env
    items = [("good", "search_suggest"), ("regress", "search_suggest")]
    assert run_adapter_batch(instance, "tiny-llama", items, res).success
    before = res.state().rows("search_suggest", "tiny-llama", ["good", "regress"])
    assert {r["reason"] for r in before.values()} == {"fresh"}
    again = run_adapter_batch(instance, "tiny-llama", items, res)  # e.g. the daemon's retry of a run that died late
    assert again.success
    assert res.state().rows("search_suggest", "tiny-llama", ["good", "regress"]) == before
    assert not run_events(instance, again.run_id, DagsterEventType.ASSET_MATERIALIZATION)
    planned = run_events(instance, again.run_id, DagsterEventType.ASSET_MATERIALIZATION_PLANNED)
    assert not planned, "nothing left to do is not announced as in progress"
    assert instance.fetch_materializations(published_key("search_suggest"), limit=10).records


def _publish(instance, res, users, mode="search_suggest"):
    result = run_adapter_batch(instance, "tiny-llama", [(u, mode) for u in users], res)
    return result


def test_a_corrupt_published_version_fails_nobody_and_is_published_over(batch_env, synthetic_tables):
    instance, _ = batch_env
    res = LoraAssetsHome(home=batch_env[1].home, train_steps=3, gate_margin=0.0, gate_confidence=1.0)
    write_user(res.store(), "third", synthetic_tables["user-000"])
    register_users(res.settings(), ["third"])
    assert run_dataset_batch(instance, {"third": ["browsing"]}, res).success
    users = ["good", "regress", "third"]
    assert _publish(instance, res, users).success
    drive, root = res.drive(), "tiny-llama/search_suggest"
    good = read_current(drive, "good", "tiny-llama", "search_suggest")[0]["version"]
    weights = f"good/adapters/{root}/{good}/adapter_model.safetensors"
    drive.put(weights, drive.get(weights)[:1000])  # truncated in transit
    drive.put(f"regress/adapters/{root}/CURRENT", b"\x00garbage")  # a torn pointer
    for user in users:  # new data for everyone: a retrain is due
        res.store().write(user, "browsing", pa_table("browsing", [{"id": "visit-new", "query": "rye flour"}]))
    assert run_dataset_batch(instance, {u: ["browsing"] for u in users}, res).success

    result = _publish(instance, res, users)

    assert result.success, "one user's damaged drive folder fails nobody"
    from lora_assets.drive.publish import adapter_prefix, current_manifest, fetch_verified

    for user in users:
        manifest = current_manifest(drive, user, "tiny-llama", "search_suggest")
        fetch_verified(drive, adapter_prefix(user, "tiny-llama", "search_suggest"), manifest)  # good again
    rows = res.state().rows("search_suggest", "tiny-llama", users)
    assert {u: r["reason"] for u, r in rows.items()} == dict.fromkeys(users, "fresh")
    assert "published version is unreadable" in rows["good"]["gate_reason"]


def test_a_user_too_small_for_a_held_out_example_waits_without_failing_the_run(batch_env):
    from lora_assets.modes import MODES
    from lora_assets.orchestration.status import to_status

    instance, res = batch_env
    train_ids = [i for i in (f"visit-{n}" for n in range(50)) if MODES["search_suggest"].split_of(i) == "train"][:3]
    res.store().write("tiny", "browsing", pa_table("browsing", [{"id": i, "query": f"q {i}"} for i in train_ids]))
    register_users(res.settings(), ["tiny"])
    assert run_dataset_batch(instance, {"tiny": ["browsing"]}, res).success

    result = _publish(instance, res, ["tiny", "good"])

    assert result.success, "too few examples is no failure"
    rows = res.state().rows("search_suggest", "tiny-llama", ["tiny", "good"])
    assert rows["good"]["reason"] == "fresh" and rows["tiny"]["reason"] == "too_few_examples"
    shown = to_status("tiny-llama", "search_suggest", rows["tiny"])
    assert shown.state == "no_data" and "3 training example(s) and none held out" in shown.why
    assert [h["event"] for h in res.state().history("tiny")] == ["waiting"]
    assert read_current(res.drive(), "tiny", "tiny-llama", "search_suggest") is None


def test_a_run_that_stops_before_a_gate_says_so_in_its_materialization_and_check(batch_env, monkeypatch):
    import lora_assets.training as training

    instance, res = batch_env
    real = training.train_adapters

    def stops_after_the_first_adapter(jobs, base, **kw):
        def saved(job, result):
            kw["on_saved"](job, result)
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real(jobs, base, **{**kw, "on_saved": saved})

    monkeypatch.setattr(training, "train_adapters", stops_after_the_first_adapter)
    result = _publish(instance, res, ["good", "regress"])

    assert not result.success
    (mat,) = [e.asset_materialization for e in run_events(instance, result.run_id, DagsterEventType.ASSET_MATERIALIZATION)
              if e.dagster_event.asset_key == adapter_key("search_suggest")]
    assert mat.metadata["not_gated"].value == 1 and mat.metadata["trained"].value == 1
    (check,) = run_events(instance, result.run_id, DagsterEventType.ASSET_CHECK_EVALUATION)
    evaluation = check.dagster_event.event_specific_data
    assert not evaluation.passed and "1 adapter(s) were not gated" in evaluation.description
