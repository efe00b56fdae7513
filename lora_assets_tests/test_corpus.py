"""The development corpus (real replies by 24 authors, CC BY-SA) goes through the product like any
user's mail: ingest validates it, the dataset run builds mail_reply examples from it, the adapter
run trains and gates them, and status shows the retrieval baseline beside the base."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from dagster import instance_for_test

from lora_assets.cli import main
from lora_assets.data.schemas import records_to_table
from lora_assets.modes import MODES, build_examples
from lora_assets.orchestration.resources import LoraAssetsHome
from lora_assets.orchestration.runs import register_users, run_adapter_batch, run_dataset_batch
from lora_assets_tests.harness import lora_assets

CORPUS = Path(__file__).resolve().parents[1] / "benchmarks" / "corpus" / "history-meta"
HELD_OUT = CORPUS.parent / "history-meta-2023"  # later replies, none of them in CORPUS
SMALLEST = "hm-28734"  # 27 replies


def _ingested(path: Path) -> tuple[list[dict], object]:
    """An author's records and the table ingest makes of them (raises on what ingest refuses)."""
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return records, records_to_table("mail", records, f"{path.name}: ")


def _credited_authors(folder: Path, licence: str, authors: int, max_bytes: int) -> list[tuple[Path, list[dict], object]]:
    """Each author file of ``folder`` with its records and ingested table, once the folder holds at
    least ``authors`` of them in under ``max_bytes``, names ``licence`` and credits every file."""
    files = sorted(folder.glob("hm-*.jsonl"))
    credits = (folder / "ATTRIBUTION.md").read_text()
    assert len(files) >= authors and licence in credits
    assert sum(f.stat().st_size for f in files) < max_bytes
    for path in files:
        assert f"| {path.name} |" in credits, f"{path.name} is not credited"
    return [(path, *_ingested(path)) for path in files]


def test_the_corpus_has_twenty_authors_of_real_writing_each_credited():
    for path, records, table in _credited_authors(CORPUS, "CC BY-SA 3.0", 20, 4_000_000):
        words = sum(len(r.split()) for r in table.column("reply").to_pylist())
        examples = build_examples(MODES["mail_reply"], {"mail": table})
        assert words >= 1500 and len(examples) == len(records) and (examples.split == "eval").any(), path.name


def test_the_held_out_authors_share_no_reply_with_the_corpus_and_are_credited():
    """What checks a rule picked on the corpus must be text the picking never saw."""
    seen = {json.loads(line)["id"] for f in CORPUS.glob("hm-*.jsonl") for line in f.open()}
    for path, records, table in _credited_authors(HELD_OUT, "CC BY-SA 4.0", 15, 3_000_000):
        assert not {r["id"] for r in records} & seen, f"{path.name} repeats replies of the corpus"
        assert len(build_examples(MODES["mail_reply"], {"mail": table})) == len(records), path.name


def test_an_author_of_the_corpus_is_ingested_trained_and_gated_like_any_user(tmp_path, home, tiny_base, monkeypatch, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "base_models").symlink_to(home / "base_models", target_is_directory=True)
    env = {**os.environ, "LORA_ASSETS_HOME": str(data), "DAGSTER_HOME": str(tmp_path / "dagster")}
    done = lora_assets("ingest", "--user", SMALLEST, "--source", "mail", str(CORPUS / f"{SMALLEST}.jsonl"), env=env)
    assert f"user {SMALLEST} mail: 27 upserts" in done.stdout
    res = LoraAssetsHome(home=str(data), train_steps=3, gate_margin=0.0, gate_confidence=1.0)
    monkeypatch.setenv("LORA_ASSETS_HOME", str(data))
    with instance_for_test() as instance:
        monkeypatch.setattr("lora_assets.orchestration.instance.get_instance", lambda: instance)
        register_users(res.settings(), [SMALLEST])
        instance.add_dynamic_partitions("base_models", ["tiny-llama"])
        assert run_dataset_batch(instance, {SMALLEST: ["mail"]}, res).success
        assert run_adapter_batch(instance, "tiny-llama", [(SMALLEST, "mail_reply")], res).success
        capsys.readouterr()
        assert main(["status", "--json", "--user", SMALLEST, "--mode", "mail_reply"]) == 0
    (row,) = json.loads(capsys.readouterr().out)["adapters"]
    assert row["state"] == "fresh", row
    gate = row["gate"]
    assert gate["retrieval_eval_loss"] > 0 and gate["adapter_retrieval_eval_loss"] > 0
    assert gate["retrieval_eval_loss"] != pytest.approx(gate["base_eval_loss"], abs=1e-6)
