"""Load on ``lora-assets serve``: throughput and latency by how many distinct adapters are asked for.

    .venv/bin/python benchmarks/serve_load.py                       # SmolLM2-135M, 64 users
    .venv/bin/python benchmarks/serve_load.py --base-model tiny-llama --users 8 --seconds 5

Gives ``--users`` users a published ``mail_reply`` adapter on their drive (``--steps 0``: a peft
LoRA of the mode's shape, peft's random A and a small random B, not trained - what a request
costs does not depend on what the adapter learned; ``--steps N``: trained N steps on the
user's synthetic mail by the training core), all published with ``publish_adapter``. Starts the
real server on 127.0.0.1 (``--max-adapters`` = users + the cold ones), then for ``--seconds``
per scenario keeps ``--clients`` concurrent clients busy, each sending a request of
``--max-tokens`` greedy tokens as soon as its last one is answered:

- ``1 adapter``: every request on one user's adapter
- ``8 adapters`` / ``64 adapters``: each client walks its own rotation of 8 / 64 users
- ``base``: the bare base model
- ``cold miss``: one request for a user never asked before (drive read, verify, load) against the
  same request once resident, with no other load.

Prints generated tokens/s, p50/p99 latency, and the mean rows per decoding pass (from
``/metrics``), then the 64-adapter throughput as a ratio of the 1-adapter one (goal >= 0.8).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lora_assets.paths import data_home  # noqa: E402

MODE = "mail_reply"
PROMPT = "Hi, can we move Thursday's planning meeting to Friday morning? Thanks, Ana"


def publish_users(home: Path, base_model: str, users: list[str], steps: int) -> None:
    import torch

    from lora_assets.adapters import job_for
    from lora_assets.data.synthetic import generate_user
    from lora_assets.drive.publish import publish_adapter
    from lora_assets.modes import MODES, build_examples
    from lora_assets.storage import LocalObjectStore
    from lora_assets.training import load_base_model, train_adapters
    from lora_assets.training.peft_models import new_lora

    mode = MODES[MODE]
    base = load_base_model(base_model, home, "cpu", "fp32")
    drive = LocalObjectStore(home / "drive")
    work = home / "adapters"
    if steps > 0:
        jobs = [job_for(mode, u, build_examples(mode, generate_user(u)), work / u, steps=steps) for u in users]
        train_adapters(jobs, base, progress=None, home=home)
    else:
        from peft.tuners.lora import LoraLayer

        for i, user in enumerate(users):
            torch.manual_seed(i)
            model = new_lora(base.model, mode.lora.to_peft())
            for module in model.modules():  # peft's A, and a small random B: distinct and non-zero,
                if isinstance(module, LoraLayer):  # of the size a few training steps give
                    torch.nn.init.normal_(module.lora_B["default"].weight, std=2e-3)
            model.save_pretrained(work / user)
            base.model = model.unload()
            (work / user / "lora_assets.json").write_text(json.dumps(
                {"base_model_revision": base.ref.revision, "trained_examples": [], "note": "untrained (load test)"}))
    for user in users:
        publish_adapter(drive, user, base_model, MODE, work / user)


def post(url: str, token: str, model: str, max_tokens: int) -> tuple[float, int]:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens})
    req = urllib.request.Request(f"{url}/v1/chat/completions", data=body.encode(),
                                 headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    started = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as resp:
        out = json.loads(resp.read())
    return time.perf_counter() - started, out["usage"]["completion_tokens"]


def metrics(url: str) -> dict[str, float]:
    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as resp:
        lines = resp.read().decode().splitlines()
    return {k: float(v) for k, _, v in (ln.rpartition(" ") for ln in lines if ln and not ln.startswith("#"))}


def drive_load(url: str, token: str, models: list[str], clients: int, seconds: float, max_tokens: int) -> dict:
    results: list[tuple[float, int]] = []
    stop_at = time.perf_counter() + seconds

    def client(k: int) -> None:
        i = k
        while time.perf_counter() < stop_at:
            results.append(post(url, token, models[i % len(models)], max_tokens))
            i += clients  # clients walk interleaved rotations: a batch holds distinct adapters

    before = metrics(url)
    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    after = metrics(url)
    latencies = sorted(r[0] for r in results)
    passes = after["lora_serve_batch_rows_count"] - before["lora_serve_batch_rows_count"]
    rows = after["lora_serve_batch_rows_sum"] - before["lora_serve_batch_rows_sum"]
    return {"requests": len(results), "tokens_per_s": sum(r[1] for r in results) / wall,
            "p50": statistics.median(latencies), "p99": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
            "rows_per_pass": rows / passes if passes else 0.0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-model", default="smollm2-135m")
    p.add_argument("--users", type=int, default=64)
    p.add_argument("--cold", type=int, default=3, help="users kept unasked for the cold-miss measurement")
    p.add_argument("--steps", type=int, default=0, help="train each adapter this many steps (0: untrained)")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--seconds", type=float, default=30.0, help="per scenario")
    p.add_argument("--max-tokens", type=int, default=32)
    args = p.parse_args()

    from lora_assets.serving.auth import LocalTokens, issue_token

    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        home = Path(tmp)
        (home / "base_models").symlink_to(data_home() / "base_models", target_is_directory=True)
        users = [f"user-{i:03d}" for i in range(args.users + args.cold)]
        t0 = time.perf_counter()
        publish_users(home, args.base_model, users, args.steps)
        print(f"{len(users)} adapters published in {time.perf_counter() - t0:.0f}s "
              f"({'untrained' if args.steps == 0 else f'{args.steps} steps each'})", flush=True)
        token = issue_token(LocalTokens(home / "serve_tokens.json"), None)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {**os.environ, "LORA_ASSETS_HOME": str(home)}
        exe = Path(sys.executable).with_name("lora-assets")
        proc = subprocess.Popen([str(exe), "serve", "--base-model", args.base_model, "--port", str(port),
                                 "--max-adapters", str(len(users)), "--max-batch", str(args.max_batch),
                                 "--max-concurrent", str(max(256, args.clients))], env=env, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        try:
            while True:
                try:
                    urllib.request.urlopen(f"{url}/healthz", timeout=5).read()
                    break
                except OSError:
                    if proc.poll() is not None:
                        raise SystemExit("the server did not start")
                    time.sleep(0.5)
            hot = [f"{u}/{MODE}" for u in users[: args.users]]
            for model in hot:  # resident before timing: the scenarios measure decoding, not loading
                post(url, token, model, 1)
            scenarios = {"1 adapter": hot[:1], "8 adapters": hot[:8], f"{len(hot)} adapters": hot, "base": ["base"]}
            if len(hot) <= 8:
                scenarios = {k: v for k, v in scenarios.items() if k != "8 adapters" or len(hot) == 8}
            print(f"{args.base_model}, {args.clients} clients, max_tokens {args.max_tokens}, max batch "
                  f"{args.max_batch}, {args.seconds:.0f}s per scenario, {os.cpu_count()} cores")
            print(f"{'scenario':<14} {'requests':>8} {'tokens/s':>9} {'p50 s':>7} {'p99 s':>7} {'rows/pass':>9}")
            figures = {}
            for name, models in scenarios.items():
                r = drive_load(url, token, models, args.clients, args.seconds, args.max_tokens)
                figures[name] = r
                print(f"{name:<14} {r['requests']:>8} {r['tokens_per_s']:>9.1f} {r['p50']:>7.2f} {r['p99']:>7.2f} "
                      f"{r['rows_per_pass']:>9.1f}", flush=True)
            cold, warm = [], []
            for user in users[args.users:]:
                cold.append(post(url, token, f"{user}/{MODE}", args.max_tokens)[0])
                warm.append(post(url, token, f"{user}/{MODE}", args.max_tokens)[0])
            m = metrics(url)
            load = m["lora_serve_adapter_load_seconds_sum"] / max(1.0, m["lora_serve_adapter_load_seconds_count"])
            print(f"cold miss: {statistics.median(cold):.2f}s vs {statistics.median(warm):.2f}s resident "
                  f"(median of {len(cold)}); mean adapter load {load * 1000:.0f} ms")
            ratio = figures[f"{len(hot)} adapters"]["tokens_per_s"] / figures["1 adapter"]["tokens_per_s"]
            print(f"{len(hot)} distinct adapters at {ratio:.2f}x the single-adapter throughput (goal >= 0.8)")
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(60)


if __name__ == "__main__":
    main()
