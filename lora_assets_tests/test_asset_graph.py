"""The Dagster asset graph: its shape, and sources -> dataset -> adapter through real runs."""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import pytest
import torch
from dagster import AssetKey, DagsterInstance, instance_for_test, materialize

from lora_assets.drive.publish import adapter_prefix, current_manifest, fetch_verified
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
        LoraAssetsHome(home=str(data)).state().register(list(synthetic_tables))
        instance.add_dynamic_partitions("base_models", ["tiny-llama"])
        yield instance, data, store


def _run(instance: DagsterInstance, data: Path, keys: list[AssetKey], partition: str | None = None, **kw):
    return materialize(
        all_assets(),
        selection=keys,
        partition_key=partition,
        instance=instance,
        resources={"lora_home": LoraAssetsHome(home=str(data), train_steps=kw.pop("steps", 8),
                                               gate_margin=kw.pop("margin", 0.01))},
        raise_on_error=False,
        **kw,
    )


def _meta(materialization) -> dict:
    return {k: v.value for k, v in materialization.metadata.items()}


def test_sources_to_dataset_to_adapter_through_dagster_loads_with_peft(dagster_env):
    """Materializing from the UI brings every user up to date, recorded as one summary per asset."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    instance, data, _ = dagster_env
    upstream = [source_key("mail"), source_key("contacts"), dataset_key("mail_reply")]
    assert _run(instance, data, upstream).success
    dataset_mat = instance.get_latest_materialization_event(dataset_key("mail_reply")).asset_materialization
    dmeta = _meta(dataset_mat)
    assert dmeta["users"] == dmeta["full"] == 2 and dmeta["train_rows"] > 0
    assert dataset_mat.tags["dagster/data_version"] == dmeta["versions_digest"]

    result = _run(instance, data, [adapter_key("mail_reply")], "tiny-llama")
    assert result.success
    state = LoraAssetsHome(home=str(data)).state()
    rows = state.rows("mail_reply", "tiny-llama", ["user-000", "user-001"])
    assert {r["reason"] for r in rows.values()} == {"fresh"}, "trained, gated and published, both users"
    for user, row in rows.items():
        adapter = data / "adapters" / "tiny-llama" / user / "mail_reply"
        base = AutoModelForCausalLM.from_pretrained(data / "base_models" / "tiny-llama")
        model = PeftModel.from_pretrained(base, str(adapter))
        with torch.no_grad():
            assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.shape[-1] == base.config.vocab_size
        assert row["adapter_eval_loss"] < row["base_eval_loss"] and row["steps"] == 8
        # The retrieval baseline beside the base: the base shown the user's 2 most similar replies.
        assert row["retrieval_eval_loss"] > 0 and row["adapter_retrieval_eval_loss"] > 0
        assert row["retrieval_eval_loss"] != row["base_eval_loss"] and isinstance(row["retrieval_helps"], bool)
        drive = LoraAssetsHome(home=str(data)).settings().drive()
        manifest = current_manifest(drive, user, "tiny-llama", "mail_reply")
        files = fetch_verified(drive, adapter_prefix(user, "tiny-llama", "mail_reply"), manifest, ("lora_assets.json",))
        held_out = json.loads(files["lora_assets.json"])["held_out"]  # published with the adapter
        assert held_out["retrieval_eval_loss"] == pytest.approx(row["retrieval_eval_loss"], abs=1e-4)  # rounded there
        assert held_out["retrieval_helps"] == row["retrieval_helps"] and held_out["retrieval_k"] == 2
        assert state.training("tiny-llama", user, "mail_reply")["size_bytes"] > 0

    mats = {m.asset_key: m for m in result.asset_materializations_for_node("mail_reply__adapter")}
    adapter_mat, published_mat = mats[adapter_key("mail_reply")], mats[AssetKey(["mail_reply", "published"])]  # it published itself
    assert adapter_mat.partition == published_mat.partition == "tiny-llama"
    meta = _meta(adapter_mat)
    assert (meta["users"], meta["trained"], meta["steps"]) == (2, 2, 16)
    assert meta["mean_eval_loss_improvement"] > 0
    assert meta["mean_retrieval_eval_loss"] == pytest.approx(
        sum(r["retrieval_eval_loss"] for r in rows.values()) / 2, abs=1e-3), "the UI shows it beside the base's"
    assert meta["mean_base_eval_loss"] == pytest.approx(sum(r["base_eval_loss"] for r in rows.values()) / 2, abs=1e-3)
    assert meta["retrieval_scored"] == 2 and "beat_retrieval" in meta
    assert _meta(published_mat)["published"] == 2
    (verdict,) = result.get_asset_check_evaluations()
    assert verdict.passed and verdict.partition == "tiny-llama" and verdict.metadata["passed"].value == 2

    again = _run(instance, data, [adapter_key("mail_reply")], "tiny-llama")  # nothing is stale: nothing trains
    (mat,) = again.asset_materializations_for_node("mail_reply__adapter")
    assert _meta(mat)["users"] == 0
    assert state.rows("mail_reply", "tiny-llama", ["user-000", "user-001"]) == rows


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

    def built():
        result = _run(instance, data, keys)
        assert result.success
        warnings = [e.message for e in instance.all_logs(result.run_id) if "skipped" in (e.user_message or "")]
        return _meta(instance.get_latest_materialization_event(dataset_key("mail_reply")).asset_materialization), warnings

    meta, warnings = built()
    assert meta["skipped_records"] == 1 and meta["train_rows"] > 0
    assert any("mail_reply/user-001: skipped 1 unusable record(s): mail-broken-1" in w for w in warnings)
    # ... and stays reported on later, incremental builds, until the record is fixed or deleted.
    store.write("user-001", "mail", pa.Table.from_pylist(
        [{"id": "mail-new-1", "sender": "Sam", "subject": "hi", "body": "Lunch?", "reply": "Sure"}],
        schema=schema_for("mail")))
    meta, _ = built()
    assert meta["incremental"] == 2 and meta["skipped_records"] == 1  # both users: from the change log
    store.write("user-001", "mail", deletes=["mail-broken-1"])
    meta, _ = built()
    assert meta["skipped_records"] == 0


def test_an_adapter_materialized_alone_publishes_itself_once_its_gate_passes(dagster_env):
    """An adapter-only backfill or "Materialize" from the UI: devices get the adapter without a
    second action, a failed gate publishes nothing, and a later materialization retrains it."""
    from lora_assets.drive.publish import read_current

    instance, data, _ = dagster_env
    assert _run(instance, data, [source_key("browsing"), dataset_key("search_suggest")]).success
    drive, state = LoraAssetsHome(home=str(data)).drive(), LoraAssetsHome(home=str(data)).state()

    failed = _run(instance, data, [adapter_key("search_suggest")], "tiny-llama", steps=4, margin=100.0)
    (verdict,) = failed.get_asset_check_evaluations()
    assert not verdict.passed and verdict.metadata["failed"].value == 2
    assert verdict.severity.value == "WARN"
    assert read_current(drive, "user-000", "tiny-llama", "search_suggest") is None
    row = state.rows("search_suggest", "tiny-llama", ["user-000"])["user-000"]
    assert row["reason"] == "gate_failed" and "does not beat base" in row["gate_reason"]

    passed = _run(instance, data, [adapter_key("search_suggest")], "tiny-llama", steps=4, margin=0.0)
    (verdict,) = passed.get_asset_check_evaluations()
    assert verdict.passed and verdict.metadata["passed"].value == 2
    for user in ("user-000", "user-001"):
        row = state.rows("search_suggest", "tiny-llama", [user])[user]
        pointer, _ = read_current(drive, user, "tiny-llama", "search_suggest")
        assert row["reason"] == "fresh" and pointer["version"] == row["published_version"]
        assert [h["event"] for h in state.history(user, "search_suggest")][:3] == ["published", "trained", "gate_failed"]


def test_eval_gate_failures_publish_nothing_and_the_published_step_publishes_what_passed(dagster_env):
    from lora_assets.drive.publish import read_current
    from lora_assets.orchestration.assets import published_key

    instance, data, _ = dagster_env
    assert _run(instance, data, [source_key("browsing"), dataset_key("search_suggest")]).success
    keys = [adapter_key("search_suggest"), published_key("search_suggest")]
    drive = LoraAssetsHome(home=str(data)).drive()

    blocked = _run(instance, data, keys, "tiny-llama", steps=4, margin=100.0)  # no adapter beats the base by 100 nats
    (evaluation,) = blocked.get_asset_check_evaluations()
    assert not evaluation.passed and evaluation.partition == "tiny-llama"
    (published,) = blocked.asset_materializations_for_node("search_suggest__published")
    assert _meta(published)["users"] == 0
    assert read_current(drive, "user-000", "tiny-llama", "search_suggest") is None

    passed = _run(instance, data, keys, "tiny-llama", steps=4, margin=0.01)
    (evaluation,) = passed.get_asset_check_evaluations()
    assert evaluation.passed
    adapter, = passed.asset_materializations_for_node("search_suggest__adapter")
    assert "published" not in _meta(adapter)  # the published step publishes, once
    (published,) = passed.asset_materializations_for_node("search_suggest__published")
    assert _meta(published)["published"] == 2
    pointer, _ = read_current(drive, "user-000", "tiny-llama", "search_suggest")
    assert pointer["version"] == LoraAssetsHome(home=str(data)).state().rows(
        "search_suggest", "tiny-llama", ["user-000"])["user-000"]["published_version"]


def _dagster_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import of dagster or a dagster library in one source file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
            [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
        found += [(node.lineno, n) for n in names if n.split(".")[0].startswith("dagster")]
    return found


def test_only_the_dagster_layer_imports_dagster_and_only_internals_imports_its_private_modules():
    package = Path(__file__).parents[1] / "lora_assets"
    files = sorted(package.rglob("*.py")) + sorted(Path(__file__).parent.glob("*.py"))
    outside = [f"{p.relative_to(package.parent)}:{line} {m}" for p in package.rglob("*.py")
               for line, m in _dagster_imports(p)
               if "orchestration" not in p.parts and p.name != "definitions.py"]
    private = [f"{p.relative_to(package.parent)}:{line} {m}" for p in files for line, m in _dagster_imports(p)
               if any(part.startswith("_") for part in m.split(".")[1:]) and p.name != "internals.py"]
    assert outside == [], "the training core, data, serving and drive layers import no dagster"
    assert private == [], "private dagster modules are imported only by lora_assets/orchestration/internals.py"
