"""What ``lora-assets serve`` reads, and keeps reading while it runs: new publishes, forgotten
and withdrawn adapters on the drive, adapters and tokens on S3, and a bf16 base (the GPU's dtype)
batching several users' adapters. Runs after ``test_serve.py`` on the same server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from lora_assets_tests.harness import lora_assets
from lora_assets_tests.serve_harness import MODE, PROMPT, ask, serving


def test_a_new_publish_is_served_and_a_forgotten_user_is_not(served, tmp_path):
    client = served.client()
    old = served.current("user-000")
    assert ask(client, "user-000").system_fingerprint.endswith(old)
    mail = tmp_path / "mail.jsonl"
    mail.write_text(json.dumps({"id": "new-1", "sender": "Ana", "subject": "Friday", "body": "Lunch on Friday?",
                                "reply": "Friday works, see you at noon."}) + "\n")
    lora_assets("ingest", "--user", "user-000", "--source", "mail", str(mail), env=served.env)
    lora_assets("demo", "--base-model", "tiny-llama", "--users", "1", "--modes", MODE, "--steps", "10", env=served.env)
    new = served.current("user-000")
    assert new and new != old, "the retrain on the new mail was published"
    deadline = time.monotonic() + 30  # a liveness bound; the server's bound is --refresh-s 0.5
    while not ask(client, "user-000").system_fingerprint.endswith(new):
        assert time.monotonic() < deadline, "the new version was never served"
        time.sleep(0.2)

    assert ask(client, "user-003", max_tokens=2).choices
    lora_assets("forget", "--user", "user-003", "--wait", "5", env=served.env)
    assert served.current("user-003") is None
    deadline = time.monotonic() + 30
    while (status := served.post({"model": f"user-003/{MODE}", "messages": [{"role": "user", "content": "hi"}],
                                  "max_tokens": 2})[0]) == 200:
        assert time.monotonic() < deadline, "a forgotten user's adapter was still served"
        time.sleep(0.2)
    assert status == 404
    # A withdrawal (the pipeline's tombstone when a user's data for the mode is gone) reads the same.
    from lora_assets.drive.publish import withdraw_adapter
    from lora_assets.settings import Settings

    assert ask(client, "user-002", max_tokens=2).choices
    withdraw_adapter(Settings.from_env(dict(served.env)).drive(), "user-002", "tiny-llama", MODE, "no data left")
    deadline = time.monotonic() + 30
    while served.post({"model": f"user-002/{MODE}", "messages": [{"role": "user", "content": "hi"}],
                       "max_tokens": 2})[0] == 200:
        assert time.monotonic() < deadline, "a withdrawn adapter was still served"
        time.sleep(0.2)
    assert served.metrics()["lora_serve_adapters_resident"] <= 2, "old, forgotten and withdrawn versions left memory"


def test_adapters_and_tokens_are_read_from_s3(served, aws, tmp_path):
    from lora_assets.settings import Settings

    creds = {k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    env = {**served.env, **creds, "LORA_ASSETS_BACKEND": "s3", "LORA_ASSETS_S3_BUCKET": aws["bucket"],
           "LORA_ASSETS_S3_ENDPOINT_URL": aws["endpoint"],
           "LORA_ASSETS_SERVE_TOKENS_FILE": f"s3://{aws['bucket']}/serving/tokens.json",
           "LORA_ASSETS_HOME": str(tmp_path / "data")}
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "base_models").symlink_to(served.data / "base_models", target_is_directory=True)
    local = Settings.from_env(dict(served.env)).drive()
    drive = Settings.from_env(env).drive()
    for key in local.list("user-001"):  # the user's drive, as the S3 backend publishes it
        drive.put(key, local.get(key))
    token = lora_assets("serve-token", "--user", "user-001", env=env).stdout.strip()
    with serving(env, tmp_path / "serve.log", "--refresh-s", "0.5") as url:
        from openai import AuthenticationError, OpenAI

        client = OpenAI(base_url=f"{url}/v1", api_key=token, max_retries=0)
        out = ask(client, "user-001")
        assert out.system_fingerprint.endswith("/" + served.current("user-001"))
        assert out.choices[0].message.content == ask(served.client(), "user-001").choices[0].message.content

        later = OpenAI(base_url=f"{url}/v1", api_key=lora_assets("serve-token", "--user", "user-002", env=env)
                       .stdout.strip(), max_retries=0)
        deadline = time.monotonic() + 30  # a token issued while serving works within --refresh-s
        while True:
            try:
                assert [m.id for m in later.models.list()] == ["base"]
                break
            except AuthenticationError:
                assert time.monotonic() < deadline
                time.sleep(0.2)

    # A token URL with no key is a one-line error that names the variable, not a traceback.
    bad = subprocess.run([str(Path(sys.executable).with_name("lora-assets")), "serve-token", "--user", "user-001"],
                         env={**env, "LORA_ASSETS_SERVE_TOKENS_FILE": f"s3://{aws['bucket']}/"},
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr, bad.stderr
    assert bad.stderr.strip().splitlines() == [
        f"error: LORA_ASSETS_SERVE_TOKENS_FILE='s3://{aws['bucket']}/': expected s3://bucket/key"
    ], bad.stderr


def test_bf16_mixed_batches_route_each_row_through_its_own_adapter(served):
    """The GPU's dtype on this CPU: the fp32 LoRA product on a bf16 base, batched and alone.

    bf16 is not batch-invariant (a row's rounding depends on the batch shape), so greedy tokens may
    part after a while; the check is on the logits instead: a mixed batch gives each row what it
    gets alone within bf16 rounding, and that is far from what another adapter (or none) gives.
    Then the engine decodes the bf16 mixed batch to the end.
    """
    import torch

    from lora_assets.serving.adapters import load_weights, read_pointer
    from lora_assets.serving.engine import Engine, Job, Sampling
    from lora_assets.serving.slots import AdapterSlots
    from lora_assets.settings import Settings
    from lora_assets.training import load_base_model
    from lora_assets.training.text import chat_prompt_ids

    base = load_base_model("tiny-llama", served.data, "cpu", "bf16")
    slots = AdapterSlots(base.model, {"q_proj", "k_proj", "v_proj", "o_proj"}, 5, 16)
    drive = Settings.from_env(dict(served.env)).drive()
    for slot, user in enumerate(["user-001", "user-000", "user-004"], start=1):  # still published
        pointer = read_pointer(drive, user, "tiny-llama", MODE)
        slots.write(slot, load_weights(drive, user, "tiny-llama", MODE, pointer, base.ref.revision))
    prompts = [chat_prompt_ids(base.tokenizer, p) for p in (PROMPT, "hi", "Please send the report by noon", "Lunch?")]
    routes = [1, 2, 3, 0]  # three users and the base model

    def last_logits(rows: list[list[int]], slot_of_rows: list[int]) -> torch.Tensor:
        width = max(map(len, rows))
        ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        slots.select(slot_of_rows)
        with torch.inference_mode():
            out = base.model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                             logits_to_keep=1)
        return out.logits[:, -1].float()

    mixed = last_logits(prompts, routes)
    for row, (prompt, slot) in enumerate(zip(prompts, routes)):
        alone = last_logits([prompt], [slot])[0]
        assert (mixed[row] - alone).abs().max() <= 0.05, "a mixed row is what it is alone, up to bf16 rounding"
        for other in {0, 1, 2, 3} - {slot}:
            assert (last_logits([prompt], [other])[0] - alone).abs().max() > 0.1, "each row has its own adapter"

    passes: list[int] = []
    engine = Engine(base.model, base.tokenizer, slots, max_batch=3, max_concurrent=8, on_step=passes.append)
    engine.start()
    finished: list[tuple[str, int]] = []
    done = threading.Barrier(len(prompts) + 1)

    def emit(delta, finish, n):
        if finish:
            finished.append((finish, n))
            threading.Thread(target=done.wait).start()

    try:
        for prompt, slot in zip(prompts, routes):
            engine.submit(Job(prompt, slot, Sampling(max_tokens=12), emit))
        done.wait(timeout=120)
        assert len(finished) == len(prompts) and {f for f, _ in finished} <= {"stop", "length"}
        assert max(passes) == 3, "four requests, at most --max-batch 3 rows per pass; the fourth joins later"
    finally:
        engine.stop()
