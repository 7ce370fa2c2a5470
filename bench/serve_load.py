"""Does the CPU server hold under load? N concurrent clients for a bounded time, against a server started here.

    python bench/serve_load.py MODEL_DIR [--clients 64] [--seconds 120] [--max-tokens 16] [--profile smoke]
                                         [--backend transformers] [--dtype float32]
                                         [--baseline REF --baseline-path DIR] [--rounds 2]

Starts ``medqa_zh.serve`` on loopback for ``MODEL_DIR`` with the profile's serve settings (``serve.max_queue``,
``serve.request_timeout``, ``serve.max_model_len``), then runs ``--clients`` clients, each sending one chat
request after another (the project's prompt on a fixed exam question, greedy, ``--max-tokens`` tokens) until
``--seconds`` have passed. Every reply is checked: a 200 must carry a completion of the served model, and its
``id`` must be new (no reply handed to two clients). Prints one line:

    answered, refused (by status: 429 is the queue doing its job), failed (a 5xx, a broken reply, a
    connection error), p50 / p99 latency of the answered, requests per second, the server's peak memory
    (its process's peak resident set), and whether the server still answers /health and a plain request at the end.

``--baseline REF`` also measures the transformers server as it was at git commit ``REF`` (its
``lib/medqa_zh/serve_child.py``, run from a temporary folder), side by side: ``--rounds`` rounds, each the
current server then the baseline, and a table of both with the ratios current / baseline. ``--baseline-path DIR``
goes first on the baseline's ``PYTHONPATH``: an older transformers it needs, e.g. one installed with
``pip install --target DIR --no-deps transformers==5.24.0`` for a server written against ``transformers serve`` (commits before it was the project's own).
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


def peak_memory(pid: int) -> int:
    """The peak resident set of process ``pid`` in bytes (``VmHWM``; 0 where /proc has none)."""
    try:
        for line in open(f"/proc/{pid}/status", encoding="ascii"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def start_baseline(ref: str, pythonpath: str | None, model_dir: str, dtype: str, settings: dict):
    """The transformers server of git commit ``ref``, started as ``serve.start`` started it then."""
    import os
    import subprocess
    import tempfile
    from pathlib import Path

    from medqa_zh import children, serve

    folder = Path(tempfile.mkdtemp(prefix="serve-baseline-"))
    source = subprocess.run(["git", "show", f"{ref}:lib/medqa_zh/serve_child.py"], capture_output=True, text=True,
                            check=True, cwd=Path(__file__).resolve().parent).stdout
    (folder / "baseline_serve_child.py").write_text(source, encoding="utf-8")
    port = serve.free_port()
    args = {"model": str(Path(model_dir).resolve()), "served_name": serve.served_name_for(model_dir),
            "host": "127.0.0.1", "port": port, "dtype": dtype, "device": "cpu", "continuous_batching": False,
            "max_model_len": settings["max_model_len"], "max_queue": settings["max_queue"],
            "request_timeout": settings["request_timeout"]}
    cmd = [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(folder)!r}); import baseline_serve_child as s; "
           "s.main(sys.argv[1])", json.dumps(args)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (pythonpath, os.environ.get("PYTHONPATH")) if p)}
    server = serve.Server(backend=f"transformers@{ref}", host="127.0.0.1", port=port, log_path=folder / "server.log",
                          command=cmd)
    with open(server.log_path, "w", encoding="utf-8") as log:
        server.process = children.start(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    try:
        serve._wait_healthy(server, settings["startup_timeout"])
        server.model = server.models()[0]
    except BaseException:
        server.stop()
        raise
    return server


def measure(server, opts) -> dict:
    """One load run against a started server; stops it at the end."""
    import httpx

    try:
        tally = asyncio.run(load(server, opts.clients, opts.seconds, opts.max_tokens))
        alive = server.healthy() and server.running()
        if alive:
            r = httpx.post(f"{server.base_url}/chat/completions", headers=server.headers(), timeout=120, json={
                "model": server.model, "messages": [{"role": "user", "content": "你好"}], "max_tokens": 2})
            alive = r.status_code == 200
        tally["alive"], tally["peak_bytes"] = alive, peak_memory(server.process.pid)
    finally:
        server.stop()
    return tally


def row(name: str, tally: dict) -> dict:
    latency = sorted(tally["latency"])
    p = lambda q: latency[min(len(latency) - 1, int(q * len(latency)))] if latency else float("nan")  # noqa: E731
    return {"server": name, "answered": len(latency), "failed": sum(tally["failed"].values()),
            "requests/s": len(latency) / tally["wall"], "p50 s": p(0.5), "p99 s": p(0.99),
            "peak GiB": tally["peak_bytes"] / 2**30, "alive": tally["alive"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model_dir", help="a model folder (the smoke model: outputs/smoke/assets/tiny-qwen2)")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--profile", default="smoke", help="whose serve settings (max_queue, request_timeout, ...)")
    parser.add_argument("--backend", default="transformers")
    parser.add_argument("--dtype", default=None, help="the served dtype (default: the profile's model.dtype)")
    parser.add_argument("--baseline", default=None, metavar="REF", help="also measure the transformers server of "
                        "this git commit, side by side")
    parser.add_argument("--baseline-path", default=None, metavar="DIR", help="first on the baseline's PYTHONPATH")
    parser.add_argument("--rounds", type=int, default=2, help="with --baseline: rounds of (current, baseline)")
    parser.add_argument("--json", action="store_true", help="also print the tally as JSON")
    opts = parser.parse_args(argv)

    from medqa_zh import config, models, serve

    cfg = config.load(opts.profile)
    dtype = opts.dtype or models.eval_dtype(cfg)  # the profile's model.dtype as this machine runs it
    settings = {key: cfg[f"serve.{key}"] for key in ("max_queue", "request_timeout", "max_model_len", "startup_timeout")}
    print(f"serving {opts.model_dir} ({opts.backend}, {dtype}; max_queue {settings['max_queue']}, request_timeout "
          f"{settings['request_timeout']} s); {opts.clients} clients for {opts.seconds:.0f} s ...", flush=True)
    rows, ok = [], True
    for _ in range(opts.rounds if opts.baseline else 1):
        servers = [("current", lambda: serve.start(opts.model_dir, backend=opts.backend, dtype=dtype, quiet=True,
                                                   **settings))]
        if opts.baseline:
            servers.append((f"baseline {opts.baseline}", lambda: start_baseline(
                opts.baseline, opts.baseline_path, opts.model_dir, dtype, settings)))
        for name, start in servers:
            tally = measure(start(), opts)
            print(f"{name}: {summary(tally, opts.clients, tally['alive'])}; peak memory "
                  f"{tally['peak_bytes'] / 2**30:.2f} GiB", flush=True)
            rows.append(row(name, tally))
            ok = ok and tally["alive"] and not tally["failed"]
            if opts.json:
                print(json.dumps({"server": name, "answered": len(tally["latency"]), "refused": dict(tally["refused"]),
                                  "failed": dict(tally["failed"]), "wall_s": tally["wall"], "alive": tally["alive"],
                                  "peak_bytes": tally["peak_bytes"], "latency_s": tally["latency"]}))
    if opts.baseline:
        import pandas as pd

        table = pd.DataFrame(rows)
        means = table.groupby("server", sort=False)[["requests/s", "p50 s", "p99 s", "peak GiB"]].mean()
        print(table.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
        current, baseline = means.iloc[0], means.iloc[1]
        print("current / baseline (mean of the rounds): " + ", ".join(
            f"{k} x{current[k] / baseline[k]:.2f}" for k in means.columns))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
