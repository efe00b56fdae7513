"""What the Dagster UI shows, read through its own GraphQL API against the project's code location.

The web UI renders asset partitions, their metadata and their check verdicts from Dagster's
GraphQL API; these tests query that API in-process (``dagster_graphql``'s schema over an
in-process workspace of ``lora_assets.definitions``) instead of the Python instance API, so a
run that records something the UI cannot link (a verdict without its materialization, a
partition-less verdict, a publication the asset graph does not know of) shows up here.

Runs are launched two ways: the sensors' batch job (``run_adapter_batch``), and the UI's own
"Materialize" mutation (``launchPipelineExecution`` on the implicit asset job with an asset and
check selection and the partition's tags), executed synchronously by the test instance.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from dagster import AssetKey, instance_for_test
from dagster_graphql.client.query import LAUNCH_PIPELINE_EXECUTION_MUTATION
from dagster_graphql.test.utils import execute_dagster_graphql, infer_job_selector

from lora_assets.data.ingest import ingest
from lora_assets.orchestration.internals import (
    IMPLICIT_ASSET_JOB_NAME,
    LoadableTargetOrigin,
    in_process_test_workspace,
)
from lora_assets.orchestration.partitions import adapter_partitions
from lora_assets.orchestration.resources import LoraAssetsHome
from lora_assets.orchestration.runs import register_users, run_adapter_batch, run_dataset_batch

BASE = "tiny-llama"
MODE = "mail_reply"
ADAPTER = {"path": [MODE, "adapter"]}
PUBLISHED = {"path": [MODE, "published"]}
GATE = "eval_gate"
SOURCES = ("mail", "contacts", "browsing")

# Runs launched through the (async) GraphQL mutation execute inside its event loop; Dagster then
# skips its own loop's cleanup on purpose (context_creation_job.py), leaving this coroutine unawaited.
pytestmark = pytest.mark.filterwarnings(
    "ignore:coroutine 'BaseEventLoop.shutdown_asyncgens' was never awaited:RuntimeWarning"
)

METADATA_FRAGMENT = """
fragment entry on MetadataEntry {
  __typename
  label
  ... on FloatMetadataEntry { floatValue }
  ... on IntMetadataEntry { intRepr }
  ... on BoolMetadataEntry { boolValue }
  ... on TextMetadataEntry { text }
  ... on PathMetadataEntry { path }
  ... on MarkdownMetadataEntry { mdStr }
  ... on JsonMetadataEntry { jsonString }
}
"""

# The asset page's partition panel: a partition's materializations, newest first, with metadata.
MATERIALIZATIONS_QUERY = METADATA_FRAGMENT + """
query PartitionMaterializations($assetKey: AssetKeyInput!, $partitions: [String!]) {
  assetOrError(assetKey: $assetKey) {
    __typename
    ... on Asset {
      assetMaterializations(partitions: $partitions) {
        runId
        partition
        timestamp
        stepKey
        metadataEntries { ...entry }
      }
    }
  }
}
"""

# The check's execution history (the asset's Checks tab and the check detail dialog).
CHECK_EXECUTIONS_QUERY = METADATA_FRAGMENT + """
query CheckExecutions($assetKey: AssetKeyInput!, $checkName: String!, $partition: String) {
  assetCheckExecutions(assetKey: $assetKey, checkName: $checkName, partition: $partition, limit: 100) {
    id
    runId
    status
    partition
    stepKey
    evaluation {
      success
      partition
      targetMaterialization { storageId runId timestamp }
      metadataEntries { ...entry }
    }
  }
}
"""


def _value(entry: Mapping[str, Any]) -> Any:
    kind = entry["__typename"]
    if kind == "IntMetadataEntry":
        return int(entry["intRepr"])
    field = {
        "FloatMetadataEntry": "floatValue", "BoolMetadataEntry": "boolValue", "TextMetadataEntry": "text",
        "PathMetadataEntry": "path", "MarkdownMetadataEntry": "mdStr", "JsonMetadataEntry": "jsonString",
    }.get(kind)
    return entry[field] if field else kind


def _metadata(entries) -> dict[str, Any]:
    return {e["label"]: _value(e) for e in entries}


def _gql(context, query: str, **variables) -> Mapping[str, Any]:
    result = execute_dagster_graphql(context, query, variables)
    assert not result.errors, result.errors
    return result.data


def materializations(context, asset_key: dict, partition: str) -> list[dict]:
    """The partition's materializations as the UI lists them, newest first."""
    data = _gql(context, MATERIALIZATIONS_QUERY, assetKey=asset_key, partitions=[partition])["assetOrError"]
    if data["__typename"] == "AssetNotFoundError":  # never materialized: the UI shows none
        return []
    assert data["__typename"] == "Asset", data
    return sorted(data["assetMaterializations"], key=lambda m: float(m["timestamp"]), reverse=True)


def check_executions(context, partition: str | None = None) -> list[dict]:
    """``eval_gate`` executions on ``mail_reply/adapter``: all (None), unpartitioned only (""), or one
    partition's, newest first."""
    return _gql(context, CHECK_EXECUTIONS_QUERY, assetKey=ADAPTER, checkName=GATE,
                partition=partition)["assetCheckExecutions"]


def materialize_from_ui(context, partition: str, res: LoraAssetsHome) -> dict:
    """What the UI's "Materialize" on one adapter partition sends: a run of the implicit asset job
    with only ``mail_reply/adapter`` (and its check) selected, tagged with the partition. The test
    instance's synchronous launcher executes it before the mutation returns."""
    selector = infer_job_selector(
        context, IMPLICIT_ASSET_JOB_NAME,
        asset_selection=[ADAPTER],
        asset_check_selection=[{"assetKey": ADAPTER, "name": GATE}],
    )
    tags = adapter_partitions.get_tags_for_partition_key(partition)
    data = _gql(context, LAUNCH_PIPELINE_EXECUTION_MUTATION, executionParams={
        "selector": selector,
        "runConfigData": {"resources": {"lora_home": {"config": {
            "home": str(res.home), "train_steps": res.train_steps,
            "gate_margin": res.gate_margin, "gate_confidence": res.gate_confidence,
        }}}},
        "executionMetadata": {"tags": [{"key": k, "value": v} for k, v in tags.items()]},
    })["launchPipelineExecution"]
    assert data["__typename"] == "LaunchRunSuccess", data
    return data["run"]


@pytest.fixture
def ui(tmp_path: Path, home: Path, tiny_base, synthetic_tables) -> Iterator[tuple[Any, Any, LoraAssetsHome]]:
    """Two users' records ingested, a test instance that runs launched runs synchronously, and a
    GraphQL request context on the project's code location, as the webserver would hold."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "base_models").symlink_to(home / "base_models", target_is_directory=True)
    res = LoraAssetsHome(home=str(data), train_steps=3, gate_margin=0.0, gate_confidence=1.0)
    settings = res.settings()
    for user, generated in (("alice", "user-000"), ("bob", "user-001")):
        for source in SOURCES:
            ingest(settings.store(), settings.feed(), user, source, synthetic_tables[generated][source].to_pylist())
    with instance_for_test(synchronous_run_coordinator=True, synchronous_run_launcher=True) as instance:
        register_users(res.settings(), ["alice", "bob"])
        instance.add_dynamic_partitions("base_models", [BASE])
        origin = LoadableTargetOrigin(
            executable_path=sys.executable, module_name="lora_assets.definitions", attribute="defs"
        )
        with in_process_test_workspace(instance, origin) as context:
            yield instance, context, res


def test_the_ui_shows_a_batch_runs_summary_and_its_linked_gate_verdict_naming_no_user(ui):
    instance, context, res = ui
    assert run_dataset_batch(instance, {u: list(SOURCES) for u in ("alice", "bob")}, res).success
    result = run_adapter_batch(instance, BASE, [("alice", MODE), ("bob", MODE)], res)
    assert result.success
    run_id = result.run_id

    adapters = materializations(context, ADAPTER, BASE)
    assert len(adapters) == 1, adapters  # one event for the run, not one per user
    adapter = adapters[0]
    assert adapter["runId"] == run_id and adapter["partition"] == BASE
    meta = _metadata(adapter["metadataEntries"])
    assert (meta["users"], meta["trained"], meta["steps"]) == (2, 2, 6)
    assert isinstance(meta["mean_eval_loss_improvement"], float) and meta["mean_eval_loss_improvement"] > 0
    # The retrieval baseline beside the base's loss, as the UI shows the run.
    assert meta["mean_retrieval_eval_loss"] > 0 and meta["mean_base_eval_loss"] > meta["mean_adapter_eval_loss"]
    assert meta["retrieval_scored"] == 2 and 0 <= meta["beat_retrieval"] <= 2
    assert meta["train_tokens"] > 0 and meta["size_bytes"] > 0 and meta["versions_digest"]
    text = repr(adapters) + repr(materializations(context, PUBLISHED, BASE))
    assert "alice" not in text and "bob" not in text, "no user id in what the UI shows"

    executions = check_executions(context, BASE)
    assert len(executions) == 1, executions
    gate = executions[0]
    assert gate["status"] == "SUCCEEDED" and gate["runId"] == run_id and gate["partition"] == BASE
    evaluation = gate["evaluation"]
    assert evaluation["success"] is True and evaluation["partition"] == BASE
    target = evaluation["targetMaterialization"]
    assert target is not None, "the verdict is not linked to the materialization it judged"
    assert target["runId"] == run_id
    assert target["timestamp"] == pytest.approx(float(adapter["timestamp"]) / 1000.0, abs=1e-3)
    assert _metadata(evaluation["metadataEntries"])["passed"] == 2
    assert check_executions(context, "") == [], "partition-less eval_gate verdicts"

    published = materializations(context, PUBLISHED, BASE)
    assert len(published) == 1, published
    assert published[0]["runId"] == run_id and published[0]["partition"] == BASE
    assert _metadata(published[0]["metadataEntries"])["published"] == 2
    # Each user's adapter, verdict and version: the state table (`lora-assets status --user`).
    rows = res.state().rows(MODE, BASE, ["alice", "bob"])
    assert {r["reason"] for r in rows.values()} == {"fresh"}
    weights = Path(res.home) / "adapters" / BASE / "alice" / MODE / "adapter_model.safetensors"
    assert rows["alice"]["adapter_version"] == hashlib.sha256(weights.read_bytes()).hexdigest()


def test_materialize_from_the_ui_trains_every_stale_adapter_of_the_base_model_and_publishes_them(ui):
    instance, context, res = ui
    assert run_dataset_batch(instance, {u: list(SOURCES) for u in ("alice", "bob")}, res).success
    assert materializations(context, PUBLISHED, BASE) == []

    run = materialize_from_ui(context, BASE, res)  # a backfill of one base model from the UI
    finished = instance.get_run_by_id(run["runId"])
    assert finished.is_success, finished.status
    assert finished.asset_selection == {AssetKey(ADAPTER["path"])}  # published not selected

    (adapter,) = materializations(context, ADAPTER, BASE)
    assert adapter["runId"] == run["runId"] and _metadata(adapter["metadataEntries"])["trained"] == 2
    (published,) = materializations(context, PUBLISHED, BASE)
    assert published["runId"] == run["runId"], "the adapter-only run published what passed its gate"
    assert _metadata(published["metadataEntries"])["published"] == 2

    (execution,) = check_executions(context)
    assert execution["partition"] == BASE and execution["status"] == "SUCCEEDED"
    target = execution["evaluation"]["targetMaterialization"]
    assert target is not None and target["runId"] == run["runId"]
    assert target["timestamp"] == pytest.approx(float(adapter["timestamp"]) / 1000.0, abs=1e-3)
    assert check_executions(context, "") == [], "partition-less eval_gate verdicts"
    assert {r["reason"] for r in res.state().rows(MODE, BASE, ["alice", "bob"]).values()} == {"fresh"}
