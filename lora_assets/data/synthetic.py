"""Deterministic synthetic users whose data carries a distinct, learnable personal style.

Each user gets a ``Persona`` (greeting, sign-off, pet words, punctuation habit, interests, people
they know) drawn from a seeded RNG, and every source is written in that persona's voice. The same
``(seed, user_id)`` always gives the same records, so tests and benchmarks are repeatable, and two
users differ in ways a small adapter can pick up (and a test can measure).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import pyarrow as pa

from lora_assets.data.schemas import records_to_table

_FIRST = [
    "Ada", "Ben", "Chloe", "Dev", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kemi",
    "Liam", "Maya", "Noor", "Oscar", "Priya", "Quinn", "Rosa", "Sami", "Tara", "Uma", "Victor",
    "Wen", "Ximena", "Yusuf", "Zoe",
]
_LAST = ["Okafor", "Lindqvist", "Moreau", "Tanaka", "Silva", "Novak", "Haddad", "Reyes", "Kowalski"]
_GREETINGS = ["Hey {n}!", "Dear {n},", "Hi {n} -", "Yo {n}", "Hello {n},", "Morning {n}!", "{n}!!"]
_SIGNOFFS = [
    "Cheers, {me}", "Best regards, {me}", "Talk soon! {me}", "xx {me}", "Thanks! -{me}",
    "Warmly, {me}", "Later, {me}",
]
_PET_WORDS = [
    ("totally", "awesome"), ("indeed", "splendid"), ("super", "rad"), ("quite", "lovely"),
    ("honestly", "brilliant"), ("absolutely", "fab"), ("really", "neat"), ("so", "wicked"),
]
_PUNCT = ["!!", "...", ".", " :)", "!"]
_INTERESTS = {
    "hiking": ["trail maps", "boots", "summit"], "jazz": ["vinyl", "saxophone", "gig"],
    "baking": ["sourdough", "oven", "croissants"], "chess": ["openings", "endgame", "blitz"],
    "cycling": ["gravel bike", "tyres", "climb"], "astronomy": ["telescope", "nebula", "eclipse"],
    "gardening": ["tomatoes", "compost", "seedlings"], "photography": ["lens", "film", "tripod"],
    "football": ["match", "league", "striker"], "sushi": ["nigiri", "wasabi", "omakase"],
}
_RELATIONS = ["friend", "colleague", "family", "neighbour", "manager"]
_PLACES = ["the park", "Lisbon", "the office", "grandma's", "the lake", "Kyoto", "the market"]
_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
_EPOCH = datetime(2026, 1, 1, tzinfo=timezone.utc)


@dataclass(frozen=True)
class Persona:
    """The stable traits that make one synthetic user's writing theirs."""

    user_id: str
    name: str
    greeting: str
    sign_off: str
    pet_words: tuple[str, str]
    punct: str
    interests: tuple[str, ...]
    contacts: tuple[tuple[str, str, str], ...]  # (full name, relation, nickname)

    def say(self, text: str) -> str:
        """End a sentence the way this user does."""
        return text.rstrip(".!") + self.punct

    def greet(self, who: str) -> str:
        return self.greeting.format(n=who)

    def sign(self) -> str:
        return self.sign_off.format(me=self.name)


def persona(user_id: str, seed: int = 0) -> Persona:
    """The persona of ``user_id``; a pure function of ``(seed, user_id)``."""
    rng = random.Random(f"persona:{seed}:{user_id}")
    people = rng.sample(_FIRST, 6)
    contacts = tuple(
        (f"{p} {rng.choice(_LAST)}", rng.choice(_RELATIONS), p[:3].lower() if rng.random() < 0.5 else p)
        for p in people[1:]
    )
    return Persona(
        user_id=user_id,
        name=people[0],
        greeting=rng.choice(_GREETINGS),
        sign_off=rng.choice(_SIGNOFFS),
        pet_words=rng.choice(_PET_WORDS),
        punct=rng.choice(_PUNCT),
        interests=tuple(rng.sample(sorted(_INTERESTS), 3)),
        contacts=contacts,
    )


def _ts(rng: random.Random) -> datetime:
    return _EPOCH + timedelta(minutes=rng.randrange(0, 60 * 24 * 300))


def _mail(p: Persona, rng: random.Random, n: int) -> list[dict]:
    out = []
    for i in range(n):
        full, _rel, nick = rng.choice(p.contacts)
        first = full.split()[0]
        topic = rng.choice(p.interests)
        thing = rng.choice(_INTERESTS[topic])
        day, place = rng.choice(_DAYS), rng.choice(_PLACES)
        kind = i % 3
        if kind == 0:
            subject = f"{topic.title()} on {day}?"
            body = f"Hi {p.name}, want to join me for some {topic} at {place} on {day}? Let me know."
            core = p.say(f"{p.pet_words[0].capitalize()} up for {topic} on {day}, {place} sounds {p.pet_words[1]}")
        elif kind == 1:
            subject = f"Question about {thing}"
            body = f"Hey {p.name}, you know a lot about {topic}. Any tips on {thing}? Thanks, {first}"
            core = p.say(f"For {thing} I'd {p.pet_words[0]} start small, it's a {p.pet_words[1]} part of {topic}")
        else:
            subject = f"Notes from {day}"
            body = f"Hi {p.name}, attached are the notes from {day}'s meeting at {place}. Can you review?"
            core = p.say(f"Thanks, will review before {_DAYS[(_DAYS.index(day) + 1) % 7]}, {p.pet_words[0]} {p.pet_words[1]} notes")
        reply = f"{p.greet(nick)} {core} {p.sign()}"
        out.append(
            {
                "id": f"mail-{i:05d}",
                "sender": full,
                "sender_email": f"{full.lower().replace(' ', '.')}@example.com",
                "subject": subject,
                "body": body,
                "reply": reply if rng.random() < 0.9 else None,
                "received_at": _ts(rng),
            }
        )
    return out


def _messages(p: Persona, rng: random.Random, n: int) -> list[dict]:
    openers = [
        ("are you free {day}?", "{w0} free on {day}, let's do {topic}"),
        ("did you see the {thing} thing?", "yes, {w0} {w1}, {thing} is my jam"),
        ("running late, 10 min", "no worries, {w0} fine"),
        ("how was {place}?", "{place} was {w0} {w1}"),
    ]
    out = []
    for i in range(n):
        full, _rel, nick = rng.choice(p.contacts)
        topic = rng.choice(p.interests)
        q, a = rng.choice(openers)
        fill = dict(
            day=rng.choice(_DAYS), topic=topic, thing=rng.choice(_INTERESTS[topic]),
            place=rng.choice(_PLACES), w0=p.pet_words[0], w1=p.pet_words[1],
        )
        out.append(
            {
                "id": f"msg-{i:05d}",
                "contact": full,
                "text": q.format(**fill),
                "reply": p.say(f"{nick}, {a.format(**fill)}"),
                "sent_at": _ts(rng),
            }
        )
    return out


def _contacts(p: Persona) -> list[dict]:
    return [
        {
            "id": f"contact-{i:03d}",
            "name": full,
            "email": f"{full.lower().replace(' ', '.')}@example.com",
            "relation": rel,
            "nickname": nick,
        }
        for i, (full, rel, nick) in enumerate(p.contacts)
    ]


def _calendar(p: Persona, rng: random.Random, n: int) -> list[dict]:
    out = []
    for i in range(n):
        topic = rng.choice(p.interests)
        people = [c[0] for c in rng.sample(p.contacts, 2)]
        out.append(
            {
                "id": f"event-{i:04d}",
                "title": f"{topic.title()} with {people[0].split()[0]}",
                "start": _ts(rng),
                "location": rng.choice(_PLACES),
                "attendees": people,
            }
        )
    return out


def _browsing(p: Persona, rng: random.Random, n: int) -> list[dict]:
    patterns = ["best {thing} for {topic}", "{thing} {w1} tips", "{topic} near me", "how to {topic} {thing}"]
    out = []
    for i in range(n):
        topic = rng.choice(p.interests)
        thing = rng.choice(_INTERESTS[topic])
        query = rng.choice(patterns).format(topic=topic, thing=thing, w1=p.pet_words[1])
        out.append(
            {
                "id": f"visit-{i:05d}",
                "query": query,
                "page_title": f"{thing.title()} - a {topic} guide",
                "page_url": f"https://{topic}.example.org/{thing.replace(' ', '-')}",
                "visited_at": _ts(rng),
            }
        )
    return out


def _photos(p: Persona, rng: random.Random, n: int) -> list[dict]:
    out = []
    for i in range(n):
        topic = rng.choice(p.interests)
        who = [c for c in rng.sample(p.contacts, rng.randint(0, 2))]
        names = [c[0] for c in who]
        place = rng.choice(_PLACES)
        with_ = (" with " + " & ".join(c[2] for c in who)) if who else ""
        out.append(
            {
                "id": f"photo-{i:05d}",
                "taken_at": _ts(rng),
                "location": place,
                "people": names,
                "tags": [topic, rng.choice(_INTERESTS[topic])],
                "caption": p.say(f"{p.pet_words[0].capitalize()} {p.pet_words[1]} {topic} at {place}{with_}"),
            }
        )
    return out


def _feedback(p: Persona, rng: random.Random, n: int) -> list[dict]:
    generic = ["Sounds good.", "Thank you for your message.", "Noted, will do.", "OK."]
    out = []
    for i in range(n):
        full, _rel, nick = rng.choice(p.contacts)
        topic = rng.choice(p.interests)
        # Few distinct prompts, many reactions to each: accepted and rejected suggestions for the
        # same prompt are what preference pairs are made of.
        prompt = f"Rewrite in my tone: I can come to {topic}."
        mine = f"{p.greet(nick)} {p.say(f'{p.pet_words[0]} up for {topic}')}"
        outcome = rng.choice(["accepted", "rejected", "edited"])
        suggestion = mine if outcome == "accepted" else rng.choice(generic)
        out.append(
            {
                "id": f"fb-{i:05d}",
                "mode": "tone_rewrite",
                "prompt": prompt,
                "suggestion": suggestion,
                "outcome": outcome,
                "edit": mine if outcome == "edited" else None,
                "at": _ts(rng),
            }
        )
    return out


def user_ids(n: int) -> list[str]:
    """Stable ids of the first ``n`` synthetic users: user-000, user-001, ..."""
    return [f"user-{i:03d}" for i in range(n)]


def generate_user(user_id: str, seed: int = 0, scale: int = 1) -> dict[str, pa.Table]:
    """All sources of one synthetic user, as tables in the source schemas."""
    p = persona(user_id, seed)
    rng = random.Random(f"records:{seed}:{user_id}")
    raw = {
        "mail": _mail(p, rng, 60 * scale),
        "messages": _messages(p, rng, 60 * scale),
        "contacts": _contacts(p),
        "calendar": _calendar(p, rng, 20 * scale),
        "browsing": _browsing(p, rng, 80 * scale),
        "photos": _photos(p, rng, 40 * scale),
        "feedback": _feedback(p, rng, 60 * scale),
    }
    return {source: records_to_table(source, rows, where=f"user {user_id!r}: ") for source, rows in raw.items()}
