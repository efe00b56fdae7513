"""The user store's append log and incremental datasets that equal a full rebuild."""

from __future__ import annotations

import pandas as pd
import pyarrow as pa
import pytest

from lora_assets.data.schemas import schema_for
from lora_assets.data.user_store import InvalidUserId, UserStore, write_user
from lora_assets.datasets import (
    build_dataset,
    content_hash,
    dataset_object_key,
    full_build,
    read_dataset,
    write_dataset,
)
from lora_assets.modes import MODES
from lora_assets.storage import LocalObjectStore

MAIL = MODES["mail_reply"]


def _mail(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=schema_for("mail"))


def _row(i: str, reply: str = "Thanks!", subject: str = "Hello") -> dict:
    return {"id": i, "sender": "Sam Reyes", "subject": subject, "body": "Are you around?", "reply": reply}


def test_upserts_replace_and_deletes_remove_by_id(tmp_path):
    store = UserStore(tmp_path)
    store.write("alice", "mail", _mail([_row("m1"), _row("m2")]))
    store.write("alice", "mail", _mail([_row("m2", reply="Updated")]), deletes=["m1"])
    current = store.read("alice", "mail").to_pylist()
    assert [r["id"] for r in current] == ["m2"]
    assert current[0]["reply"] == "Updated"
    assert store.head("alice", "mail") == 2


def test_compaction_keeps_content_and_fingerprint(tmp_path):
    store = UserStore(tmp_path)
    for i in range(4):
        store.write("alice", "mail", _mail([_row(f"m{i}"), _row("m0", reply=f"v{i}")][: 1 if i == 0 else 2]))
    store.write("alice", "mail", deletes=["m2"])
    before, fp = store.read("alice", "mail"), store.fingerprint("alice", "mail")
    store.compact("alice", "mail")
    assert store.read("alice", "mail") == before
    assert store.fingerprint("alice", "mail") == fp
    assert len(list((tmp_path / "alice" / "mail").glob("*.parquet"))) == 1
    assert store.write("alice", "mail", _mail([_row("m9")])).seq == 6


def test_same_content_gives_same_fingerprint_whatever_the_history(tmp_path):
    a, b = UserStore(tmp_path / "a"), UserStore(tmp_path / "b")
    a.write("u", "mail", _mail([_row("m1"), _row("m2")]))
    b.write("u", "mail", _mail([_row("m2"), _row("x")]))
    b.write("u", "mail", _mail([_row("m1")]), deletes=["x"])
    assert a.fingerprint("u", "mail") == b.fingerprint("u", "mail")


@pytest.mark.parametrize("bad", ["../evil", "a/b", "a,b", "a|b", "..", "", ".hidden", "x" * 200, "a b"])
def test_invalid_user_ids_are_rejected_before_touching_disk(tmp_path, bad):
    store = UserStore(tmp_path / "users")
    with pytest.raises(InvalidUserId, match="invalid user id"):
        store.write(bad, "mail", _mail([_row("m1")]))
    with pytest.raises(InvalidUserId):
        dataset_object_key(bad, "mail_reply")
    assert not (tmp_path / "users").exists()
    assert list(tmp_path.iterdir()) == []


def test_incremental_dataset_equals_full_rebuild_after_upserts_and_deletes(tmp_path, synthetic_tables):
    store = UserStore(tmp_path / "users")
    write_user(store, "user-000", synthetic_tables["user-000"])
    datasets = LocalObjectStore(tmp_path / "datasets")
    df, state, report = build_dataset(store, MAIL, "user-000", None)
    assert report.how == "full"
    write_dataset(datasets, "user-000", "mail_reply", df, state)
    mail = synthetic_tables["user-000"]["mail"].to_pylist()
    answered = [m for m in mail if m["reply"]]
    deleted, edited = answered[0]["id"], answered[1]["id"]

    store.write("user-000", "mail", _mail([{**answered[1], "reply": "Brand new reply"}, _row("mail-new")]))
    store.write("user-000", "mail", deletes=[deleted])
    store.write("user-000", "mail", _mail([{**answered[2], "reply": None}]))  # no reply: no example

    incremental, inc_state, report = build_dataset(store, MAIL, "user-000", read_dataset(datasets, "user-000", "mail_reply"))
    assert report.how == "incremental" and report.changed_records == 4
    full, full_state = full_build(store, MAIL, "user-000")
    pd.testing.assert_frame_equal(incremental, full, check_dtype=False)
    assert content_hash(incremental) == content_hash(full)
    assert inc_state == full_state

    ids = set(incremental["example_id"])
    assert deleted not in ids and answered[2]["id"] not in ids and "mail-new" in ids
    assert incremental.set_index("example_id").loc[edited, "response"] == "Brand new reply"


def test_context_change_rebuilds_in_full(tmp_path, synthetic_tables):
    store = UserStore(tmp_path / "users")
    write_user(store, "user-000", synthetic_tables["user-000"])
    df, state, _ = build_dataset(store, MAIL, "user-000", None)
    contact = synthetic_tables["user-000"]["contacts"].to_pylist()[0]
    store.write("user-000", "contacts", pa.Table.from_pylist([{**contact, "nickname": "Boss"}], schema=schema_for("contacts")))
    rebuilt, _, report = build_dataset(store, MAIL, "user-000", (df, state))
    assert report.how == "full"
    assert rebuilt["prompt"].str.contains("you call them Boss").any()


def test_no_changes_keeps_the_same_content_hash(tmp_path, synthetic_tables):
    store = UserStore(tmp_path / "users")
    write_user(store, "user-000", synthetic_tables["user-000"])
    df, state, _ = build_dataset(store, MAIL, "user-000", None)
    again, _, report = build_dataset(store, MAIL, "user-000", (df, state))
    assert report.changed_records == 0 and content_hash(again) == content_hash(df)


def test_eval_split_is_stable_per_example_id():
    assert MAIL.split_of("mail-00001") == MAIL.split_of("mail-00001")
    splits = [MAIL.split_of(f"mail-{i:05d}") for i in range(1000)]
    assert 0.15 < splits.count("eval") / 1000 < 0.25
