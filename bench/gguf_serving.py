"""The API evaluation through the transformers server and through llama.cpp (f16, q8_0, Q4_K_M), side by side.

    python bench/gguf_serving.py [--profile cpu] [--model merged] [--questions 100] [--concurrency 1 4]
                                 [--model-dir DIR --gguf-dir DIR --questions-file FILE]

For a run's model (``outputs/<profile>/models/<model>``) and the GGUF files notebook 04 exported from it
(``models/gguf/<model>-<quantization>.gguf``), one server after another on loopback — the transformers server
in the profile's ``model.dtype``, then llama-cpp-python's server for each GGUF — answers the first
``--questions`` eval questions through the OpenAI API exactly as notebook 07 asks them (the project's prompt,
greedy, ``eval.max_new_tokens`` tokens), at each ``--concurrency``. Nothing is cached: every answer is asked
now. Prints, per server and concurrency: questions per second, the p50 latency of a request, the server
process's peak resident memory (``VmHWM``), and the accuracy with its 95% interval; and per server, its
answers against the transformers server's at the first concurrency: the share of the same letter and the
paired difference in accuracy with its 95% interval and exact McNemar p. Machines here are noisy: compare the
rows of one run, not runs. ``--model-dir``, ``--gguf-dir`` (holding ``<model>-<quantization>.gguf``) and
``--questions-file`` (MedQA jsonl) point it at other files than the run's; the profile still gives the settings.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path


def peak_memory_mib(pid: int) -> float:
    """A process's peak resident memory so far (``VmHWM`` of ``/proc/<pid>/status``), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for process {pid}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--profile", default="cpu")
    p.add_argument("--model", default="merged", help="a model of the run that notebook 04 exported (default merged)")
    p.add_argument("--questions", type=int, default=100, help="the first N eval questions (default 100)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4], help="requests in flight (default 1 4)")
    p.add_argument("--model-dir", default=None, help="the model folder (default: the run's --model)")
    p.add_argument("--gguf-dir", default=None, help="where <model>-<quantization>.gguf lie (default: the run's, 04)")
    p.add_argument("--questions-file", default=None, help="MedQA jsonl to ask (default: the run's eval split)")
    a = p.parse_args(argv)

    import pandas as pd

    from medqa_zh import config, data, evaluate, export, models, serve

    cfg = config.load(a.profile)
    folder = a.model_dir or models.available(cfg).get(a.model)
    if folder is None:
        sys.exit(f"no {a.model} model in {cfg.out / 'models'}: run the series first (./run_all.sh --profile {a.profile})")
    questions = (data.read_questions(a.questions_file)[0] if a.questions_file else data.eval_questions(cfg))[: a.questions]
    servers = [("transformers", models.eval_dtype(cfg), folder)]  # model.dtype resolved (auto: this machine's)
    for q in export.QUANTIZATIONS:
        path = export.gguf_path(a.gguf_dir or export.folder(cfg), a.model, q)
        export.check_file(path)  # an error naming the file when 04 has not exported it
        servers.append(("llamacpp", q, str(path)))
    rows, answers = [], {}
    for backend, precision, location in servers:
        settings = {"backend": backend, "dtype": servers[0][1], "n_ctx": cfg["gguf.n_ctx"],
                    "extra_buffers": cfg["gguf.extra_buffers"], "startup_timeout": cfg["serve.startup_timeout"],
                    "max_queue": cfg["serve.max_queue"], "request_timeout": cfg["serve.request_timeout"], "quiet": True}
        with serve.serve(location, **settings) as server:
            for concurrency in a.concurrency:
                score = evaluate.api_scorer(server.base_url, server.model, server.api_key,
                                            max_new_tokens=cfg["eval.max_new_tokens"], concurrency=concurrency,
                                            timeout=cfg["eval.request_timeout"], retries=cfg["eval.retries"])
                t0 = time.perf_counter()
                got = score(questions)
                seconds = time.perf_counter() - t0
                acc = evaluate.accuracy(got)
                answers.setdefault((backend, precision), got)
                rows.append({"server": backend, "precision": precision, "concurrency": concurrency,
                             "questions/s": len(got) / seconds,
                             "p50 latency (s)": statistics.median(r["latency_s"] for r in got if "latency_s" in r),
                             "peak memory (MiB)": peak_memory_mib(server.process.pid),
                             "accuracy": acc["accuracy"], "ci_low": acc["ci_low"], "ci_high": acc["ci_high"],
                             "failed": acc["failed"]})
                print(rows[-1], flush=True)
    reference = answers[servers[0][0], servers[0][1]]
    paired = []
    for (backend, precision), got in answers.items():
        test = evaluate.mcnemar(reference, got)
        paired.append({"server": backend, "precision": precision, **evaluate.agreement(reference, got),
                       "difference": test["difference"], "diff_ci_low": test["diff_ci_low"],
                       "diff_ci_high": test["diff_ci_high"], "p": test["p_value"]})
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(f"\n{a.model} ({cfg.out}), {len(questions)} eval questions, {cfg['eval.max_new_tokens']} new tokens each")
        print(pd.DataFrame(rows).round(3).to_string(index=False))
        print("\nagainst the transformers server, at concurrency", a.concurrency[0])
        print(pd.DataFrame(paired).round(4).to_string(index=False))


if __name__ == "__main__":
    main()
