"""The Dagster asset graph: its shape, and sources -> dataset -> adapter through real runs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from dagster import AssetKey, DagsterInstance, instance_for_test, materialize

from lora_assets.data.user_store import UserStore, write_user
from lora_assets.definitions import defs
from lora_assets.orchestration.assets import (
    adapter_key,
    all_assets,
    dataset_key,
    source_key,
)
from lora_assets.orchestration.resources import LoraAssetsHome

SNAPSHOT = Path(__file__).parent / "snapshots" / "asset_graph.json"


def graph_snapshot() -> dict:
    graph = defs.resolve_asset_graph()
    out = {}
    for key in sorted(graph.get_all_asset_keys(), key=lambda k: k.to_user_string()):
        node = graph.get(key)
        pdef = node.partitions_def
        out[key.to_user_string()] = {
            "deps": sorted(p.to_user_string() for p in node.parent_keys),
            "partitions": type(pdef).__name__ if pdef else None,
            "dimensions": (
                {d.name: d.partitions_def.name for d in pdef.partitions_defs}
                if hasattr(pdef, "partitions_defs")
                else getattr(pdef, "name", None)
            ),
            "group": node.group_name,
            "pools": sorted(node.pools or []),
        }
    return out


def test_definitions_load_and_graph_matches_snapshot():
    """Graph changes must show up in review: refresh with UPDATE_SNAPSHOTS=1 when intended."""
    current = graph_snapshot()
    if os.environ.get("UPDATE_SNAPSHOTS"):
        SNAPSHOT.parent.mkdir(exist_ok=True)
        SNAPSHOT.write_text(json.dumps(current, indent=2, sort_keys=True) + "\n")
    assert current == json.loads(SNAPSHOT.read_text())


def test_graph_edges_are_the_declared_mode_dependencies():
    from lora_assets.modes import MODES

    graph = defs.resolve_asset_graph()
    for mode in MODES.values():
        assert graph.get(dataset_key(mode.name)).parent_keys == {source_key(s) for s in mode.sources}
        assert graph.get(adapter_key(mode.name)).parent_keys == {dataset_key(mode.name)}


@pytest.fixture
def dagster_env(tmp_path, home, tiny_base, synthetic_tables):
    """A temp Dagster instance and data dir with two seeded users and the tiny base model."""
    data = tmp_path / "data"
    # Share the session's base-model cache so the tiny llama is built once.
    (data).mkdir()
    (data / "base_models").symlink_to(home / "base_models", target_is_directory=True)
    store = UserStore(data / "users")
    for user, tables in synthetic_tables.items():
        write_user(store, user, tables)
    with instance_for_test() as instance:
        instance.add_dynamic_partitions("users", list(synthetic_tables))
        instance.add_dynamic_partitions("base_models", ["tiny-llama"])
        yield instance, data, store


def _run(instance: DagsterInstance, data: Path, keys: list[AssetKey], partition: str, **kw):
    return materialize(
        all_assets(),
        selection=keys,
        partition_key=partition,
        instance=instance,
        resources={"lora_home": LoraAssetsHome(home=str(data), train_steps=8)},
        **kw,
    )


def test_sources_to_dataset_to_adapter_through_dagster_loads_with_peft(dagster_env):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    instance, data, _ = dagster_env
    upstream = [source_key("mail"), source_key("contacts"), dataset_key("mail_reply")]
    assert _run(instance, data, upstream, "user-000").success
    result = _run(instance, data, [adapter_key("mail_reply")], "tiny-llama|user-000")
    assert result.success

    adapter = data / "adapters" / "tiny-llama" / "user-000" / "mail_reply"
    base = AutoModelForCausalLM.from_pretrained(data / "base_models" / "tiny-llama")
    model = PeftModel.from_pretrained(base, str(adapter))
    with torch.no_grad():
        assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.shape[-1] == base.config.vocab_size

    adapter_mat, published_mat = result.asset_materializations_for_node("mail_reply__adapter")
    assert published_mat.asset_key == AssetKey(["mail_reply", "published"])  # it published itself
    mat = adapter_mat
    meta = {k: v.value for k, v in mat.metadata.items()}
    assert mat.partition == "tiny-llama|user-000"
    assert meta["base_model"] == "tiny-llama"
    assert meta["adapter_eval_loss"] < meta["base_eval_loss"]
    assert meta["steps"] == 8 and meta["size_bytes"] > 0
    assert "training loss" in meta["loss_curve"]
    record = instance.get_latest_materialization_event(adapter_key("mail_reply"))
    assert record.asset_materialization.tags["dagster/data_version"] == meta["sha256"]

    dataset_mat = instance.get_latest_materialization_event(dataset_key("mail_reply")).asset_materialization
    dmeta = {k: v.value for k, v in dataset_mat.metadata.items()}
    assert dmeta["rows"] == dmeta["train_rows"] + dmeta["eval_rows"] > 0
    assert dmeta["build"] == "full"
    assert dataset_mat.tags["dagster/data_version"] == dmeta["content_hash"]


def test_a_stored_record_no_mode_can_use_is_skipped_and_reported(dagster_env):
    """A poison record (written around ingest's checks) never fails the user's dataset again."""
    import pyarrow as pa

    from lora_assets.data.schemas import schema_for

    instance, data, store = dagster_env
    bad = pa.Table.from_pylist(
        [{"id": "mail-broken-1", "sender": "Sam", "subject": "hi", "body": None, "reply": "ok"}],
        schema=schema_for("mail"),
    )
    store.write("user-001", "mail", bad)
    keys = [source_key("mail"), source_key("contacts"), dataset_key("mail_reply")]

    result = _run(instance, data, keys, "user-001")
    assert result.success
    meta = instance.get_latest_materialization_event(dataset_key("mail_reply")).asset_materialization.metadata
    assert meta["skipped_records"].value == 1 and meta["skipped_ids"].value == "mail-broken-1"
    assert meta["train_rows"].value > 0
    # ... and stays reported on later, incremental builds, until the record is fixed or deleted.
    store.write("user-001", "mail", deletes=["mail-00001"])
    assert _run(instance, data, keys, "user-001").success
    meta = instance.get_latest_materialization_event(dataset_key("mail_reply")).asset_materialization.metadata
    assert meta["build"].value == "incremental" and meta["skipped_ids"].value == "mail-broken-1"
    store.write("user-001", "mail", deletes=["mail-broken-1"])
    assert _run(instance, data, keys, "user-001").success
    meta = instance.get_latest_materialization_event(dataset_key("mail_reply")).asset_materialization.metadata
    assert meta["skipped_records"].value == 0


def test_an_adapter_materialized_alone_publishes_itself_once_its_gate_passes(dagster_env):
    """An adapter-only backfill or "Materialize" from the UI: devices get the adapter without a
    second action, the verdict is linked to its materialization, and a failed gate publishes nothing."""
    from lora_assets.drive.publish import read_current
    from lora_assets.orchestration.assets import published_key
    from lora_assets.orchestration.recording import latest_materialization

    instance, data, _ = dagster_env
    assert _run(instance, data, [source_key("browsing"), dataset_key("search_suggest")], "user-000").success
    partition, drive = "tiny-llama|user-000", LoraAssetsHome(home=str(data)).drive()

    def adapter_only(margin: float):
        return materialize(
            all_assets(), selection=[adapter_key("search_suggest")], partition_key=partition, instance=instance,
            resources={"lora_home": LoraAssetsHome(home=str(data), train_steps=4, gate_margin=margin)},
            raise_on_error=False,
        )

    failed = adapter_only(margin=100.0)
    (verdict,) = failed.get_asset_check_evaluations()
    assert not verdict.passed and read_current(drive, "user-000", "tiny-llama", "search_suggest") is None
    assert latest_materialization(instance, published_key("search_suggest"), partition) is None

    passed = adapter_only(margin=0.0)
    (verdict,) = passed.get_asset_check_evaluations()
    adapter = latest_materialization(instance, adapter_key("search_suggest"), partition)
    assert verdict.passed and verdict.partition == partition
    assert verdict.target_materialization_data.storage_id == adapter.storage_id
    published = latest_materialization(instance, published_key("search_suggest"), partition)
    assert published is not None and published.run_id == passed.run_id
    pointer, _ = read_current(drive, "user-000", "tiny-llama", "search_suggest")
    assert pointer["version"] == published.asset_materialization.metadata["version"].value


def test_eval_gate_blocks_publication_and_shows_as_a_failed_check(dagster_env):
    from lora_assets.drive.publish import read_current
    from lora_assets.orchestration.assets import published_key

    instance, data, _ = dagster_env
    assert _run(instance, data, [source_key("browsing"), dataset_key("search_suggest")], "user-000").success
    keys = [adapter_key("search_suggest"), published_key("search_suggest")]

    def run(margin: float):
        return materialize(
            all_assets(), selection=keys, partition_key="tiny-llama|user-000", instance=instance,
            resources={"lora_home": LoraAssetsHome(home=str(data), train_steps=4, gate_margin=margin)},
            raise_on_error=False,
        )

    blocked = run(margin=100.0)  # no adapter beats the base by 100 nats
    (evaluation,) = blocked.get_asset_check_evaluations()
    assert not evaluation.passed and evaluation.partition == "tiny-llama|user-000"
    assert "does not beat base" in evaluation.metadata["reason"].value
    assert evaluation.metadata["adapter_eval_loss"].value < evaluation.metadata["base_eval_loss"].value
    assert not blocked.asset_materializations_for_node("search_suggest__published")
    drive = LoraAssetsHome(home=str(data)).drive()
    assert read_current(drive, "user-000", "tiny-llama", "search_suggest") is None

    passed = run(margin=0.01)
    (evaluation,) = passed.get_asset_check_evaluations()
    assert evaluation.passed
    (published,) = passed.asset_materializations_for_node("search_suggest__published")
    pointer, _ = read_current(drive, "user-000", "tiny-llama", "search_suggest")
    assert pointer["version"] == published.metadata["version"].value

    # The same adapter again is not a regression: the gate compares against the published one.
    again = run(margin=0.01)
    (evaluation,) = again.get_asset_check_evaluations()
    assert evaluation.passed and evaluation.metadata["published_version"].value == pointer["version"]
