"""Build the development corpus from the History Meta Stack Exchange data dump (CC BY-SA 3.0).

Why this corpus: it is real writing by real people, several hundred to tens of thousands of
words each, and every piece of it *answers* something (an answer replies to a question, a
comment to a post), so it maps onto the ``mail`` source as it is: the question or post is the
incoming mail, the author's own text is their reply. Its licence allows shipping it here with
attribution (``ATTRIBUTION.md``); no licensed corpus of personal mail was found.

Input: ``Posts.xml``, ``Users.xml``, ``Comments.xml`` of history.meta.stackexchange.com as
published in the Stack Exchange data dump (the copy used is the one in
github.com/GonzaloHirsch/TP-XML, dump of 2018-08-30). Output: one JSONL file of ``mail``
records per author, ``hm-<Stack Exchange user id>.jsonl``, ready for ``lora-assets ingest``.

    python benchmarks/corpus/build_history_meta.py DUMP_DIR benchmarks/corpus/history-meta

The held-out authors (``history-meta-2023``: what tuning never saw) come from a later dump of the
same site, with every reply already in the development corpus left out (``--unseen``):

    python benchmarks/corpus/build_history_meta.py DUMP2023_DIR benchmarks/corpus/history-meta-2023 \
        --unseen benchmarks/corpus/history-meta --max-authors 100
"""

from __future__ import annotations

import argparse
import csv
import html
import json
import re
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

MIN_RECORDS = 25  # answers + comments: enough for a held-out split and a validation slice
MIN_WORDS = 1500  # "several hundred words or more" with room to spare
MAX_AUTHORS = 24
MAX_BODY_CHARS = 600  # the incoming text is context only: the trainer keeps 128 tokens of prompt and response


def plain(markup: str | None) -> str:
    """Post HTML to plain text, paragraphs kept as blank lines."""
    text = re.sub(r"</p>|<br\s*/?>|</li>|</h\d>|</blockquote>", "\n\n", markup or "")
    text = html.unescape(re.sub(r"<[^>]+>", "", text))
    return re.sub(r"\n{3,}", "\n\n", re.sub(r"[ \t]+", " ", text)).strip()


def _posts(dump: Path) -> dict[str, dict]:
    """Posts by id, from ``Posts.xml`` or (as in the 2023 copy, whose XML is missing) ``Posts.csv``."""
    if (dump / "Posts.xml").exists():
        return {r.get("Id"): r.attrib for r in ET.parse(dump / "Posts.xml").getroot()}
    csv.field_size_limit(1 << 30)
    with open(dump / "Posts.csv", encoding="utf-8-sig", newline="") as f:
        return {r["Id"]: {k: v for k, v in r.items() if v} for r in csv.DictReader(f)}


def build(dump: Path, unseen: set[str] = frozenset(), max_authors: int = MAX_AUTHORS) -> dict[str, list[dict]]:
    """Authors' replies as ``mail`` records; ``unseen``: record ids to leave out (another corpus's)."""
    posts = _posts(dump)
    users = {r.get("Id"): r.attrib for r in ET.parse(dump / "Users.xml").getroot()}
    name = lambda uid: users.get(uid or "", {}).get("DisplayName") or "someone"  # noqa: E731

    def thread_title(post: dict) -> str:
        question = post if post.get("PostTypeId") == "1" else posts.get(post.get("ParentId"), {})
        return plain(question.get("Title")) or "(no subject)"

    by_author: dict[str, list[dict]] = defaultdict(list)
    for p in posts.values():
        question = posts.get(p.get("ParentId") or "")
        if p.get("PostTypeId") != "2" or not p.get("OwnerUserId") or question is None:
            continue
        by_author[p["OwnerUserId"]].append({
            "id": f"a{p['Id']}", "sender": name(question.get("OwnerUserId")), "sender_email": None,
            "subject": thread_title(question), "body": plain(question.get("Body"))[:MAX_BODY_CHARS] or "(no text)",
            "reply": plain(p["Body"]), "received_at": question["CreationDate"][:19] + "Z",
        })
    for c in ET.parse(dump / "Comments.xml").getroot():
        post = posts.get(c.get("PostId"))
        if post is None or not c.get("UserId"):
            continue
        by_author[c.get("UserId")].append({
            "id": f"c{c.get('Id')}", "sender": name(post.get("OwnerUserId")), "sender_email": None,
            "subject": "Re: " + thread_title(post), "body": plain(post.get("Body"))[:MAX_BODY_CHARS] or "(no text)",
            "reply": plain(c.get("Text")), "received_at": c.get("CreationDate")[:19] + "Z",
        })
    by_author = {u: [r for r in recs if r["id"] not in unseen] for u, recs in by_author.items()}
    words = lambda recs: sum(len(r["reply"].split()) for r in recs)  # noqa: E731
    keep = [u for u, recs in by_author.items()
            if u != "-1" and len(recs) >= MIN_RECORDS and words(recs) >= MIN_WORDS]
    keep = sorted(keep, key=lambda u: -words(by_author[u]))[:max_authors]
    return {u: sorted((r for r in by_author[u] if r["reply"]), key=lambda r: r["id"]) for u in keep} | {
        "_names": {u: name(u) for u in keep}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dump", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--unseen", type=Path, help="leave out every reply already in this corpus folder")
    parser.add_argument("--max-authors", type=int, default=MAX_AUTHORS)
    args = parser.parse_args()
    seen = {json.loads(line)["id"] for p in sorted(args.unseen.glob("hm-*.jsonl")) for line in p.open()} if args.unseen else set()
    corpus = build(args.dump, seen, args.max_authors)
    names = corpus.pop("_names")
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for uid, recs in corpus.items():
        with open(args.out / f"hm-{uid}.jsonl", "w") as f:
            for r in recs:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        rows.append((f"hm-{uid}", names[uid], uid, len(recs), sum(len(r["reply"].split()) for r in recs)))
    for row in rows:
        print("\t".join(map(str, row)))


if __name__ == "__main__":
    main()
