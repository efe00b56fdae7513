"""Synthetic users are deterministic, schema-valid and stylistically distinct."""

from __future__ import annotations

import pyarrow as pa
import pytest

from lora_assets.data.schemas import (
    SOURCE_SCHEMAS,
    SOURCES,
    InvalidRecord,
    records_to_table,
)
from lora_assets.data.synthetic import generate_user, persona, user_ids


def test_every_source_is_generated_in_its_schema_with_unique_stable_ids():
    tables = generate_user("user-007")
    assert set(tables) == set(SOURCES)
    for source, table in tables.items():
        assert table.schema == SOURCE_SCHEMAS[source]
        ids = table["id"].to_pylist()
        assert len(ids) == len(set(ids)) > 0, source


def test_same_user_and_seed_give_identical_data_and_other_seeds_differ():
    assert generate_user("user-001") == generate_user("user-001")
    assert generate_user("user-001")["mail"] != generate_user("user-001", seed=1)["mail"]


def test_users_have_distinct_personal_style():
    styles = {u: persona(u) for u in user_ids(8)}
    traits = {(p.greeting, p.sign_off, p.pet_words, p.punct) for p in styles.values()}
    assert len(traits) == 8
    mail = generate_user("user-000")["mail"].to_pylist()
    p = styles["user-000"]
    replies = [m["reply"] for m in mail if m["reply"]]
    assert all(p.sign() in r and p.pet_words[0] in r.lower() for r in replies)


def test_feedback_carries_outcomes_and_edits():
    feedback = generate_user("user-002")["feedback"].to_pylist()
    outcomes = {f["outcome"] for f in feedback}
    assert outcomes == {"accepted", "rejected", "edited"}
    assert all((f["edit"] is not None) == (f["outcome"] == "edited") for f in feedback)


@pytest.mark.parametrize(
    "record, message",
    [
        ({"id": "m1", "subject": 3}, "mail record 'm1'"),
        ({"subject": "x"}, "missing string 'id'"),
        ({"id": "m2", "colour": "red"}, "unknown fields ['colour']"),
    ],
)
def test_bad_records_are_named_in_the_error(record, message):
    with pytest.raises(InvalidRecord, match=message.replace("[", r"\[").replace("]", r"\]")):
        ok = {"id": "ok", "sender": "Sam", "subject": "fine", "body": "Lunch?"}
        records_to_table("mail", [ok, {**ok, **record} if "id" in record else record], where="file x.jsonl: ")


def test_unknown_source_is_rejected():
    with pytest.raises(InvalidRecord, match="unknown source 'diary'"):
        records_to_table("diary", [])
    assert isinstance(records_to_table("mail", []), pa.Table)
