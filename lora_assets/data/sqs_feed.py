"""The change feed at scale: S3 event notifications from the user-store bucket, read from SQS.

Every object the user store writes or removes under ``<prefix>/<user>/<source>/`` produces an
S3 event; S3 sends it to an SQS queue; this consumer turns messages into ``ChangeEvent``s.

- Keys arrive URL-encoded (``user%40example.com``): they are decoded before parsing.
- ``s3:TestEvent`` (sent when notifications are configured) is acknowledged and ignored.
- Delivery is at-least-once and unordered. Events are coalesced per (user, source) and datasets
  are rebuilt from the store's current state, so neither a duplicate nor a late older event can
  change the outcome; S3's ``sequencer`` is kept on the event for diagnosis, not needed to order.
- A message is deleted only on the tick *after* the one that consumed it, i.e. once Dagster has
  committed that tick's runs together with its cursor, which holds the receipt handles. If a
  tick dies, the messages reappear after the visibility timeout.
- An undecodable message goes to the dead-letter queue (with the error) and is deleted, so it
  cannot block the queue.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote_plus, unquote_plus

from lora_assets.data.change_feed import ChangeEvent, Delivery

_SEGMENT_RE = re.compile(r"^(log|snapshot)-(\d{12})\.parquet$")


def parse_s3_message(body: str, prefix: str) -> list[ChangeEvent]:
    """The change events an S3 notification announces ([] for a test event).

    Raises ValueError naming what is wrong with an undecodable message.
    """
    try:
        message = json.loads(body)
    except json.JSONDecodeError as exc:
        raise ValueError(f"undecodable SQS message {body[:200]!r}: {exc.msg}") from None
    if isinstance(message, dict) and "Message" in message and "Records" not in message:
        return parse_s3_message(message["Message"], prefix)  # delivered through SNS
    if not isinstance(message, dict):
        raise ValueError(f"undecodable SQS message {body[:200]!r}: not an object")
    if message.get("Event") == "s3:TestEvent":
        return []
    records = message.get("Records")
    if not isinstance(records, list):
        raise ValueError(f"undecodable SQS message {body[:200]!r}: no Records")
    events = []
    for record in records:
        try:
            name = record["eventName"]
            key = unquote_plus(record["s3"]["object"]["key"])
        except (KeyError, TypeError) as exc:
            raise ValueError(f"undecodable S3 event record in {body[:200]!r}: missing {exc}") from None
        if not (name.startswith("ObjectCreated") or name.startswith("ObjectRemoved")):
            continue
        rel = key[len(prefix) + 1 :] if prefix and key.startswith(prefix + "/") else None if prefix else key
        parts = rel.split("/") if rel else []
        if len(parts) != 3:
            raise ValueError(f"S3 event for key {key!r} outside the user store layout {prefix}/<user>/<source>/")
        user, source, filename = parts
        match = _SEGMENT_RE.match(filename)
        if not match:
            raise ValueError(f"S3 event for key {key!r}: not a user store segment")
        # A created log segment is new data and can be checked; anything else (a snapshot, a
        # removed segment) is announced with seq 0: "look again", nothing specific to check.
        created_log = name.startswith("ObjectCreated") and match.group(1) == "log"
        events.append(
            ChangeEvent(
                user=user,
                source=source,
                seq=int(match.group(2)) if created_log else 0,
                sequencer=record["s3"]["object"].get("sequencer", ""),
            )
        )
    return events


@dataclass
class SqsChangeFeed:
    """Consumes S3 notifications from SQS; ``dead_letter_url`` receives undecodable messages."""

    client: Any  # boto3 SQS client
    queue_url: str
    dead_letter_url: str
    key_prefix: str = "users"
    visibility_timeout_s: int = 900

    def announce(self, event: ChangeEvent) -> int | None:
        """Nothing to do: S3 itself notifies SQS when the user store writes a segment."""
        return None

    def stage(self, user: str, source: str) -> None:
        """Nothing to stage: the segment's own S3 event announces it the moment it exists."""
        return None

    def confirm(self, staged: None, event: ChangeEvent) -> None:
        return None

    def consume(self, cursor: str | None, limit: int) -> tuple[list[Delivery], str]:
        """Acknowledge what the committed cursor holds, then receive up to ``limit`` messages."""
        self._delete(json.loads(cursor)["handles"] if cursor else [])
        deliveries: list[Delivery] = []
        handles: list[str] = []
        while len(deliveries) < limit:
            response = self.client.receive_message(
                QueueUrl=self.queue_url,
                MaxNumberOfMessages=min(10, limit - len(deliveries)),
                VisibilityTimeout=self.visibility_timeout_s,
                WaitTimeSeconds=0,
            )
            messages = response.get("Messages", [])
            if not messages:
                break
            for msg in messages:
                handles.append(msg["ReceiptHandle"])
                try:
                    events = parse_s3_message(msg["Body"], self.key_prefix)
                except ValueError as exc:
                    deliveries.append(Delivery(ref=msg["ReceiptHandle"], payload=msg["Body"], events=[], error=str(exc)))
                    continue
                deliveries.append(Delivery(ref=msg["ReceiptHandle"], payload=msg["Body"], events=events))
        return deliveries, json.dumps({"handles": handles})

    def set_aside(self, delivery: Delivery, error: str) -> None:
        """Send to the dead-letter queue with the reason, and off the main queue for good."""
        self.client.send_message(
            QueueUrl=self.dead_letter_url,
            MessageBody=delivery.payload,
            MessageAttributes={"error": {"DataType": "String", "StringValue": error[:1000]}},
        )
        self._delete([delivery.ref])

    def _delete(self, handles: list[str]) -> None:
        for i in range(0, len(handles), 10):
            batch = [{"Id": str(n), "ReceiptHandle": h} for n, h in enumerate(handles[i : i + 10])]
            self.client.delete_message_batch(QueueUrl=self.queue_url, Entries=batch)

    def forget(self, user: str) -> tuple[int, int]:
        """Delete the queued messages and dead letters about ``user`` (S3 keys under their prefix).

        Messages are received with a visibility timeout and the others released as they are
        seen; a message the sensor holds in flight is not seen here, and the sensor drops it
        when it reads it, because the user is forgotten by then.
        """
        marker = f"{self.key_prefix}/{quote_plus(user)}/"  # the user's folder, not a source named like them
        return self._forget(self.queue_url, marker), self._forget(self.dead_letter_url, marker)

    def _forget(self, url: str, marker: str) -> int:
        deleted, seen, keep, empty = 0, set(), [], 0
        while empty < 2:  # SQS may answer empty once while messages remain: ask twice
            messages = self.client.receive_message(
                QueueUrl=url, MaxNumberOfMessages=10, VisibilityTimeout=300, WaitTimeSeconds=1,
            ).get("Messages", [])
            fresh = [m for m in messages if m["MessageId"] not in seen]
            empty = 0 if fresh else empty + 1
            for m in fresh:
                seen.add(m["MessageId"])
                if marker in m["Body"] or marker in unquote_plus(m["Body"]):
                    self.client.delete_message(QueueUrl=url, ReceiptHandle=m["ReceiptHandle"])
                    deleted += 1
                else:
                    keep.append(m["ReceiptHandle"])  # hidden until the scan is done, so it sees each once
        for handle in keep:  # back on the queue for the sensor
            try:
                self.client.change_message_visibility(QueueUrl=url, ReceiptHandle=handle, VisibilityTimeout=0)
            except Exception:  # noqa: BLE001 - an expired receipt: the message is visible again anyway
                pass
        return deleted

    def pending_count(self) -> int:
        """Messages waiting or being processed (SQS's approximate counts)."""
        attrs = self.client.get_queue_attributes(
            QueueUrl=self.queue_url,
            AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
        )["Attributes"]
        return int(attrs["ApproximateNumberOfMessages"]) + int(attrs["ApproximateNumberOfMessagesNotVisible"])

    def dead_letters(self, limit: int = 100) -> list[tuple[str, str, str]]:
        """(message id, body, error) of dead letters, peeked: they stay on the dead-letter queue."""
        out: list[tuple[str, str, str]] = []
        seen: set[str] = set()
        while len(out) < limit:
            messages = self.client.receive_message(
                QueueUrl=self.dead_letter_url, MaxNumberOfMessages=10, VisibilityTimeout=0,
                MessageAttributeNames=["error"], WaitTimeSeconds=0,
            ).get("Messages", [])
            fresh = [m for m in messages if m["MessageId"] not in seen]
            if not fresh:
                break
            for m in fresh:
                seen.add(m["MessageId"])
                error = m.get("MessageAttributes", {}).get("error", {}).get("StringValue", "")
                out.append((m["MessageId"], m["Body"], error))
        return out[:limit]
