"""``lora-assets serve``: users' published adapters behind an OpenAI-compatible API, called with
the official ``openai`` client and plain HTTP (the server: ``serve_harness.served``)."""

from __future__ import annotations

import json
import threading
import time
import urllib.request

import pytest

from lora_assets_tests.harness import lora_assets
from lora_assets_tests.serve_harness import MODE, PROMPT, USERS, ask, serving


def test_the_openai_client_gets_a_users_adapter_plain_and_streaming(served):
    client = served.client("user-000")
    plain = ask(client, "user-000")
    choice = plain.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert plain.usage.completion_tokens <= 16 and plain.usage.prompt_tokens > 0
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens
    assert plain.system_fingerprint.endswith("/" + served.current("user-000")), "the drive's CURRENT answered"

    chunks = list(ask(client, "user-000", stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content, "greedy: streaming says what the plain call says"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens

    words = choice.message.content.split()
    if len(words) > 2:  # a stop string ends the text before it, with finish_reason "stop"
        stopped = ask(client, "user-000", stop=[words[2]])
        assert stopped.choices[0].finish_reason == "stop"
        assert stopped.choices[0].message.content == choice.message.content[: choice.message.content.index(words[2])]
    sampled = [ask(client, "user-000", temperature=1.0, seed=s).choices[0].message.content for s in (7, 7, 8)]
    assert sampled[0] == sampled[1] != sampled[2], "sampling follows the seed"

    base = client.chat.completions.create(model="base", messages=[{"role": "user", "content": PROMPT}], max_tokens=16)
    assert base.system_fingerprint.endswith("/base") and base.choices[0].message.content != choice.message.content


def test_where_retrieval_helps_is_decided_per_version_and_mode():
    from lora_assets.serving.retrieval import examples_to_show

    helps, not_helps = {"retrieval_helps": True, "retrieval_k": 3}, {"retrieval_helps": False, "retrieval_k": 2}
    assert examples_to_show("helps", helps, sft=True, default_k=2) == 3, "the version's own k"
    assert examples_to_show("helps", not_helps, sft=True, default_k=2) == 0
    assert examples_to_show("helps", {}, sft=True, default_k=2) == 0, "a version from before the baseline"
    assert examples_to_show("always", {}, sft=True, default_k=2) == 2
    assert examples_to_show("always", helps, sft=False, default_k=2) == 0, "DPO modes show none"
    assert examples_to_show("never", helps, sft=True, default_k=2) == 0
    with pytest.raises(ValueError, match="serve_retrieval must be one of"):
        examples_to_show("sometimes", helps, sft=True, default_k=2)


def test_retrieved_replies_come_from_the_users_current_dataset_and_a_deleted_one_leaves_the_prompt(served, tmp_path):
    """``--retrieval always``: the last user message is followed by the user's most similar past
    replies, as the gate scored them (the exact prompt length says which), read from the dataset
    the pipeline keeps; the module's server (``helps``) adds none for versions that record it does
    not help. A deleted mail leaves the prompts once its dataset is rebuilt."""
    from lora_assets.adapters import examples_from
    from lora_assets.datasets import read_dataset, refresh_dataset
    from lora_assets.modes import MODES
    from lora_assets.serving.api import with_instruction
    from lora_assets.settings import Settings
    from lora_assets.training import load_base_model
    from lora_assets.training.retrieval import Retriever, with_retrieved
    from lora_assets.training.text import chat_ids

    user, question = "user-004", "Could you send the zebra ledger for the quarterly xylophone audit?"
    settings = Settings.from_env(dict(served.env))
    tokenizer = load_base_model("tiny-llama", settings.home).tokenizer
    system = MODES[MODE].system

    def expected_prompt_tokens() -> tuple[int, list[str]]:
        df, _ = read_dataset(settings.datasets(), user, MODE)
        shown = Retriever(examples_from(df, "train")).similar(question, 2)
        text = with_retrieved(question, shown)
        return len(chat_ids(tokenizer, with_instruction([{"role": "user", "content": text}], system))), shown

    def served_with(client) -> tuple[str, int]:
        raw = client.chat.completions.with_raw_response.create(
            model=f"{user}/{MODE}", messages=[{"role": "user", "content": question}], max_tokens=2)
        return raw.headers["x-lora-assets-retrieved"], raw.parse().usage.prompt_tokens

    mail = tmp_path / "mail.jsonl"
    mail.write_text(json.dumps({"id": "zebra-1", "sender": "Quill", "subject": "zebra ledger",
                                "body": question, "reply": "PLANTED-zebra-7731: the ledger is attached."}) + "\n")
    lora_assets("ingest", "--user", user, "--source", "mail", str(mail), env=served.env)
    refresh_dataset(settings.store(), settings.datasets(), MODES[MODE], user)  # what the dataset asset runs
    with_planted, shown = expected_prompt_tokens()
    assert "PLANTED-zebra-7731" in shown[0].response, "its own mail is the most similar"

    version = served.current(user)
    meta = json.loads((served.data / "drive" / user / "adapters" / "tiny-llama" / MODE / version / "lora_assets.json")
                      .read_text())
    assert meta["held_out"]["retrieval_helps"] is False
    count, plain = served_with(served.client())
    assert count == "0", "the default serves retrieval only where the gate found it helps"
    assert plain == len(chat_ids(tokenizer, with_instruction([{"role": "user", "content": question}], system)))

    with serving(served.env, tmp_path / "serve.log", "--retrieval", "always", "--refresh-s", "0.5") as url:
        from openai import OpenAI

        client = OpenAI(base_url=f"{url}/v1", api_key=served.tokens[user], max_retries=0, timeout=60)
        assert served_with(client) == ("2", with_planted)
        streamed = client.chat.completions.with_raw_response.create(
            model=f"{user}/{MODE}", messages=[{"role": "user", "content": question}], max_tokens=2, stream=True)
        assert streamed.headers["x-lora-assets-retrieved"] == "2"
        list(streamed.parse())

        mail.write_text(json.dumps({"id": "zebra-1", "_deleted": True}) + "\n")
        lora_assets("ingest", "--user", user, "--source", "mail", str(mail), env=served.env)
        refresh_dataset(settings.store(), settings.datasets(), MODES[MODE], user)
        without, shown = expected_prompt_tokens()
        assert not any("PLANTED" in ex.response for ex in shown) and without != with_planted
        deadline = time.monotonic() + 30  # a liveness bound; the server's bound is --refresh-s 0.5
        while served_with(client) != ("2", without):
            assert time.monotonic() < deadline, "the deleted mail stayed in the served prompt"
            time.sleep(0.2)
        with urllib.request.urlopen(f"{url}/metrics", timeout=30) as resp:
            counted = [ln for ln in resp.read().decode().splitlines() if ln.startswith("lora_serve_retrieved_examples_total")]
        assert float(counted[0].split()[1]) >= 6


def test_a_served_adapter_says_what_plain_peft_says_on_the_synced_device(served, tmp_path):
    device = tmp_path / "device"
    lora_assets("sync", "--user", "user-001", "--device-dir", str(device), "--base-model", "tiny-llama", env=served.env)
    peft_says = lora_assets("generate", "--device-dir", str(device), "--mode", MODE, "--base-model", "tiny-llama",
                            "--max-new-tokens", "16", PROMPT, env=served.env).stdout.strip()
    assert ask(served.client(), "user-001").choices[0].message.content.strip() == peft_says


def test_a_mixed_batch_of_users_decodes_as_each_alone(served):
    client = served.client()
    models = [f"{u}/{MODE}" for u in USERS[:4]] + ["base"]

    def one(model: str) -> str:
        out = client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPT}],
                                             max_tokens=24)
        return out.choices[0].message.content

    alone = {m: one(m) for m in models}
    assert len(set(alone.values())) == len(models), "each adapter says something of its own"
    before = served.metrics()
    together: dict[str, str] = {}
    start = threading.Barrier(len(models))

    def concurrent(model: str) -> None:
        start.wait()
        together[model] = one(model)

    threads = [threading.Thread(target=concurrent, args=(m,)) for m in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == alone
    after = served.metrics()
    passes = after["lora_serve_batch_rows_count"] - before["lora_serve_batch_rows_count"]
    rows = after["lora_serve_batch_rows_sum"] - before["lora_serve_batch_rows_sum"]
    wide = passes - (after['lora_serve_batch_rows_bucket{le="2.0"}'] - before['lora_serve_batch_rows_bucket{le="2.0"}'])
    assert wide > 0 and rows > passes, "some decoding passes held more than two users' rows"

    assert ask(client, USERS[4]).choices  # a fifth adapter, four slots (--max-adapters 4)
    m = served.metrics()
    assert m["lora_serve_adapter_cache_evictions_total"] >= 1 and m["lora_serve_adapters_resident"] == 4
    assert m["lora_serve_adapter_cache_misses_total"] >= len(USERS) and m["lora_serve_adapter_cache_hits_total"] > 0


def test_a_token_may_use_only_its_users_adapters(served):
    from openai import AuthenticationError, NotFoundError

    mine = served.client("user-000")
    assert [m.id for m in mine.models.list()] == ["base", f"user-000/{MODE}"]
    answers = []
    for model in (f"user-001/{MODE}", f"nobody/{MODE}", "user-000/no_such_mode"):
        with pytest.raises(NotFoundError) as err:
            mine.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        answers.append(err.value.body["message"].replace(model, "M"))
    assert len(set(answers)) == 1, "another user's adapter looks exactly like a missing one"
    assert ask(served.client("admin"), "user-001", max_tokens=2).choices[0].message.content is not None

    for who in (None, "wrong"):
        served.tokens["wrong"] = "la-not-a-token"
        status, body = served.post({"model": "base", "messages": [{"role": "user", "content": "hi"}]}, who=who)
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
    with pytest.raises(AuthenticationError):
        served.client("wrong").models.list()


def test_bad_requests_get_openai_error_objects_never_a_500(served):
    from openai import BadRequestError

    msg = [{"role": "user", "content": "hi"}]
    cases = {
        b"{not json": (400, None),
        json.dumps({"model": "base"}).encode(): (400, None),  # no messages
        json.dumps({"model": "base", "messages": [{"role": "robot", "content": "x"}]}).encode(): (400, None),
        json.dumps({"model": "base", "messages": msg, "max_tokens": 10**6}).encode(): (400, "invalid_value"),
        json.dumps({"model": "base", "messages": msg, "temperature": "hot"}).encode(): (400, "invalid_value"),
        json.dumps({"model": "base", "messages": msg, "n": 3}).encode(): (400, None),
        json.dumps({"model": f"user-000/{MODE}", "messages": [{"role": "user", "content": "word " * 3000}],
                    "max_tokens": 8}).encode(): (400, "context_length_exceeded"),
        json.dumps({"model": "../../etc/mail_reply", "messages": msg}).encode(): (404, "model_not_found"),
        b'{"model": "base", "messages": ' + b"[" * 100000 + b"]" * 100000 + b"}": (400, None),
        json.dumps({"model": "base", "messages": msg, "temperature": 1, "seed": 2**64}).encode(): (400, "invalid_value"),
    }
    for body, (status, code) in cases.items():
        got, answer = served.post(body)
        assert (got, answer["error"]["code"]) == (status, code), body[:80]
        assert set(answer["error"]) == {"message", "type", "param", "code"} and answer["error"]["message"]
    tiny = served.post({"model": "base", "messages": msg, "max_tokens": 4, "temperature": 1e-40})
    assert tiny[0] == 200, "a vanishing temperature is greedy, not a failed batch"
    with pytest.raises(BadRequestError, match="maximum context length"):
        served.client().chat.completions.create(model="base", messages=[{"role": "user", "content": "word " * 3000}])

    pointer = served.data / "drive" / "user-004" / "adapters" / "tiny-llama" / MODE / "CURRENT"
    good = pointer.read_bytes()
    pointer.write_bytes(good[: len(good) // 2])  # a torn CURRENT: that user's trouble, a 503 naming it
    try:
        time.sleep(1.0)  # past --refresh-s
        got, answer = served.post({"model": f"user-004/{MODE}", "messages": msg, "max_tokens": 2})
        assert (got, answer["error"]["code"]) == (503, "adapter_unavailable") and "CURRENT" in answer["error"]["message"]
        assert served.post({"model": f"user-002/{MODE}", "messages": msg, "max_tokens": 2})[0] == 200
    finally:
        pointer.write_bytes(good)

    results: list[int] = []  # the server takes 6 requests in flight (--max-concurrent 6)
    start = threading.Barrier(16)

    def flood() -> None:
        start.wait()
        got, answer = served.post({"model": "base", "messages": msg, "max_tokens": 200})
        results.append(got)
        if got == 429:
            assert answer["error"]["type"] == "rate_limit_error"

    threads = [threading.Thread(target=flood) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert 429 in results and 200 in results and set(results) <= {200, 429}
