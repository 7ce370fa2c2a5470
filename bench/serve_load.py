"""Does the CPU server hold under load? N concurrent clients for a bounded time, against a server started here.

    python bench/serve_load.py MODEL_DIR [--clients 64] [--seconds 120] [--max-tokens 16] [--profile smoke]
                                         [--backend transformers]

Starts ``medqa_zh.serve`` on loopback for ``MODEL_DIR`` with the profile's serve settings (``serve.max_queue``,
``serve.request_timeout``, ``serve.max_model_len``), then runs ``--clients`` clients, each sending one chat
request after another (the project's prompt on a fixed exam question, greedy, ``--max-tokens`` tokens) until
``--seconds`` have passed. Every reply is checked: a 200 must carry a completion of the served model, and its
``id`` must be new (no reply handed to two clients). Prints one line:

    answered, refused (by status: 429 is the queue doing its job), failed (a 5xx, a broken reply, a
    connection error), p50 / p99 latency of the answered, requests per second, and whether the server still
    answers /health and a plain request at the end.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import statistics
import sys
import time

QUESTION = {"question": "患者，男，45岁。反复上腹痛3年，餐后加重。最可能的诊断是", "options": {
    "A": "胃溃疡", "B": "十二指肠溃疡", "C": "慢性胃炎", "D": "胃癌", "E": "胆囊炎"}}


async def _client(http, url: str, body: dict, headers: dict, until: float, tally: dict) -> None:
    while time.monotonic() < until:
        start = time.perf_counter()
        try:
            r = await http.post(url, json=body, headers=headers)
        except Exception as e:  # noqa: BLE001 - counted and named: what a failed request is
            tally["failed"][type(e).__name__] += 1
            continue
        seconds = time.perf_counter() - start
        if r.status_code == 200:
            try:
                reply = r.json()
                ok = reply["model"] == body["model"] and reply["choices"][0]["message"]["content"] is not None
            except (ValueError, KeyError, IndexError, TypeError):
                ok = False
            if not ok or reply["id"] in tally["ids"]:
                tally["failed"]["broken or repeated reply"] += 1
                continue
            tally["ids"].add(reply["id"])
            tally["latency"].append(seconds)
        elif r.status_code < 500:
            tally["refused"][r.status_code] += 1
            if r.status_code == 429:  # as a client should: wait as told
                await asyncio.sleep(min(float(r.headers.get("retry-after", "1")), max(0.0, until - time.monotonic())))
        else:
            tally["failed"][f"HTTP {r.status_code}"] += 1


async def load(server, clients: int, seconds: float, max_tokens: int) -> dict:
    import httpx

    from medqa_zh import prompts

    body = {"model": server.model, "messages": prompts.build_messages(**QUESTION), "temperature": 0,
            "max_tokens": max_tokens}
    tally = {"latency": [], "ids": set(), "refused": collections.Counter(), "failed": collections.Counter()}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    start = time.monotonic()
    async with httpx.AsyncClient(timeout=httpx.Timeout(seconds + 300), limits=limits) as http:
        await asyncio.gather(*(_client(http, f"{server.base_url}/chat/completions", body, server.headers(),
                                       start + seconds, tally) for _ in range(clients)))
    tally["wall"] = time.monotonic() - start
    return tally


def summary(tally: dict, clients: int, alive: bool) -> str:
    latency = sorted(tally["latency"])
    p = lambda q: latency[min(len(latency) - 1, int(q * len(latency)))] if latency else float("nan")  # noqa: E731
    refused = ", ".join(f"{n} x {status}" for status, n in sorted(tally["refused"].items())) or "0"
    failed = ", ".join(f"{n} x {why}" for why, n in tally["failed"].most_common()) or "0"
    return (f"{clients} clients, {tally['wall']:.0f} s: answered {len(latency)}, refused {refused}, failed {failed}; "
            f"latency p50 {p(0.5):.2f} s, p99 {p(0.99):.2f} s (mean {statistics.fmean(latency) if latency else 0:.2f}); "
            f"{len(latency) / tally['wall']:.1f} requests/s; server alive at the end: {'yes' if alive else 'NO'}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model_dir", help="a model folder (the smoke model: outputs/smoke/assets/tiny-qwen2)")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--profile", default="smoke", help="whose serve settings (max_queue, request_timeout, ...)")
    parser.add_argument("--backend", default="transformers")
    parser.add_argument("--json", action="store_true", help="also print the tally as JSON")
    opts = parser.parse_args(argv)

    from medqa_zh import config, serve

    cfg = config.load(opts.profile)
    settings = {key: cfg[f"serve.{key}"] for key in ("max_queue", "request_timeout", "max_model_len", "startup_timeout")}
    with serve.start(opts.model_dir, backend=opts.backend, quiet=True, **settings) as server:
        print(f"serving {opts.model_dir} ({opts.backend}; max_queue {settings['max_queue']}, request_timeout "
              f"{settings['request_timeout']} s); {opts.clients} clients for {opts.seconds:.0f} s ...", flush=True)
        tally = asyncio.run(load(server, opts.clients, opts.seconds, opts.max_tokens))
        alive = server.healthy() and server.running()
        if alive:
            import httpx

            r = httpx.post(f"{server.base_url}/chat/completions", headers=server.headers(), timeout=120, json={
                "model": server.model, "messages": [{"role": "user", "content": "你好"}], "max_tokens": 2})
            alive = r.status_code == 200
        print(summary(tally, opts.clients, alive))
        if opts.json:
            print(json.dumps({"answered": len(tally["latency"]), "refused": dict(tally["refused"]),
                              "failed": dict(tally["failed"]), "wall_s": tally["wall"], "alive": alive,
                              "latency_s": tally["latency"]}))
    return 0 if alive and not tally["failed"] else 1


if __name__ == "__main__":
    sys.exit(main())
