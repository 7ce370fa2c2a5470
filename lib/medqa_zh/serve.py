"""Serve a model dir over an OpenAI-compatible HTTP API, and stop it again.

Two backends speak the same API (``/health``, ``/v1/models``, ``/v1/chat/completions``, streaming):

- ``vllm``: ``vllm serve`` on a GPU (paged attention, continuous batching), started with this
  Python (``python -m vllm.entrypoints.cli.main serve``, so no ``vllm`` on PATH is needed); it can
  also serve a LoRA adapter on top of its base (``--enable-lora``, ``--max-lora-rank`` = its rank);
- ``transformers``: ``transformers serve`` on a CPU (or any device), the same code as the
  ``transformers serve`` command, started in a child process. The child mends what it does
  differently from the OpenAI API (see "the transformers child" below): an API-key check on every
  path but ``/health``, its model-management endpoints turned off, errors in the OpenAI shape, and
  request fields it would silently ignore refused.

Either answers to a served model name (``served_name``; default the folder's name, ``merged``).

``auto`` picks vllm when CUDA and vllm are both present, else transformers.

    with serve.serve("outputs/cpu/models/merged") as server:
        client = server.client()                      # an openai.OpenAI pointed at the server
        client.chat.completions.create(model=server.model, messages=[...], temperature=0)

The server binds 127.0.0.1 on a free port unless told otherwise; binding any other address needs an
API key (one is generated and printed when none is given). The server runs in its own process
group: leaving the ``with`` block (normally, by an exception or by Ctrl-C / a kernel interrupt)
stops the whole group, an ``atexit`` hook stops servers still running when Python exits, and on
Linux the child also dies with the process that started it. Startup waits for ``/health``; when the
server dies or does not come up in time, the error shows the tail of its log.

Command line, to keep a server running for JupyterLab, the chat demo or any OpenAI client::

    python -m medqa_zh.serve outputs/cpu/models/merged --port 8000     # model id: merged
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import importlib.util
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pandas as pd

from . import answers, models, prompts

# torch and the Hugging Face stack (transformers, peft, trl, datasets, sentence-transformers, vLLM) are
# imported inside the functions that use them, so importing this module stays fast.

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
API_KEY_ENV = "MEDQA_SERVE_API_KEY"
_RUNNING: set["Server"] = set()


class ServerError(RuntimeError):
    """The server did not start, or stopped answering."""


def vllm_installed() -> bool:
    """Whether this interpreter can import vLLM (the ``gpu`` extra)."""
    return importlib.util.find_spec("vllm") is not None


def pick_backend(backend: str = "auto") -> str:
    """``vllm`` or ``transformers``; ``auto`` is vllm when CUDA and the vllm package are present."""
    if backend not in ("auto", "vllm", "transformers"):
        raise ValueError(f"serve backend must be auto, vllm or transformers, not {backend!r} (profile key serve.backend)")
    if backend != "auto":
        return backend
    import torch

    return "vllm" if torch.cuda.is_available() and vllm_installed() else "transformers"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


@dataclass(eq=False)
class Server:
    """A running server: where it listens, the model id it serves, and how to stop it."""

    backend: str
    host: str
    port: int
    model: str = ""                       # the id /v1/models lists, to send as ``model=``
    api_key: str | None = None
    log_path: Path | None = None
    command: list[str] = field(default_factory=list)
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """The server's root, e.g. ``http://127.0.0.1:8000``."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    @property
    def base_url(self) -> str:
        """What OpenAI clients call ``base_url``: the root + ``/v1``."""
        return f"{self.url}/v1"

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def client(self, **kwargs):
        """An ``openai.OpenAI`` client for this server."""
        return openai.OpenAI(base_url=self.base_url, api_key=self.api_key or "EMPTY", **kwargs)

    def async_client(self, **kwargs):
        """An ``openai.AsyncOpenAI`` client for this server."""
        return openai.AsyncOpenAI(base_url=self.base_url, api_key=self.api_key or "EMPTY", **kwargs)

    def healthy(self, timeout: float = 2.0) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=timeout).status_code == 200
        except httpx.HTTPError:
            return False

    def models(self) -> list[str]:
        """The model ids ``/v1/models`` lists."""
        r = httpx.get(f"{self.base_url}/models", headers=self.headers(), timeout=10)
        r.raise_for_status()
        return [m["id"] for m in r.json()["data"]]

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path or not self.log_path.is_file():
            return "(no log)"
        return "\n".join(self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the server's whole process group: SIGTERM, then SIGKILL after ``timeout`` seconds."""
        _RUNNING.discard(self)
        if self.process is None or self.process.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, sig)
            try:
                self.process.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        # the group may still hold children (vllm's engine workers) after the leader exits
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def __repr__(self):
        state = "running" if self.running() else "stopped"
        return f"Server({self.backend}, {self.base_url}, model={self.model!r}, {state})"


VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # what vLLM's --max-lora-rank accepts
VLLM_CLI = "vllm.entrypoints.cli.main"  # the module behind the `vllm` command


def lora_rank(adapters: dict) -> int:
    """``--max-lora-rank`` for these adapters (name -> folder): the smallest value vLLM accepts that
    holds the largest rank ``r`` in their ``adapter_config.json``. vLLM sizes its LoRA buffers by
    it, so a larger value only wastes GPU memory."""
    ranks = {}
    for name, folder in adapters.items():
        path = Path(folder) / "adapter_config.json"
        if not path.is_file():
            raise FileNotFoundError(f"adapter {name!r}: no {path}; train it first (notebook 02) or fix the path")
        ranks[name] = int(json.loads(path.read_text(encoding="utf-8"))["r"])
    largest = max(ranks.values())
    fits = [r for r in VLLM_LORA_RANKS if r >= largest]
    if not fits:
        raise ValueError(f"adapter rank {largest} ({ranks}) is above the largest vLLM serves ({VLLM_LORA_RANKS[-1]})")
    return fits[0]


# vLLM's engine settings a profile's serve section passes on (null: vLLM's default), as `vllm serve` flags
VLLM_SCALING = {
    "tensor_parallel_size": "--tensor-parallel-size",      # GPUs that split every layer: a model too big for one GPU
    "data_parallel_size": "--data-parallel-size",          # copies of the model, each on its own GPU(s), sharing requests
    "gpu_memory_utilization": "--gpu-memory-utilization",  # share of each GPU's memory vLLM may take
    "max_num_seqs": "--max-num-seqs",                      # requests batched together at most
    "max_model_len": "--max-model-len",                    # longest prompt + answer, in tokens
}


def vllm_scaling(settings: dict) -> list[str]:
    """``vllm serve`` flags for the :data:`VLLM_SCALING` keys of ``settings`` that are set."""
    unknown = sorted(set(settings) - set(VLLM_SCALING))
    if unknown:
        raise ValueError(f"unknown vLLM setting {unknown[0]!r}; known: {', '.join(VLLM_SCALING)}")
    return [arg for key, flag in VLLM_SCALING.items() if settings.get(key) is not None
            for arg in (flag, str(settings[key]))]


def _command(backend: str, model_dir: str, host: str, port: int, dtype: str, device: str | None,
             continuous_batching: bool, lora: dict | None, served_name: str | None, extra_args,
             gpu_memory_utilization: float | None = None, public: bool = False, scaling: dict | None = None) -> list[str]:
    scaling = {**(scaling or {}), "gpu_memory_utilization": gpu_memory_utilization or None}
    if backend == "vllm":
        # through this interpreter, not a `vllm` found on PATH: a kernel or `.venv/bin/python -m ...`
        # started without activating the environment has the package but not its bin/ on PATH
        cmd = [sys.executable, "-m", VLLM_CLI, "serve", model_dir, "--host", host, "--port", str(port),
               "--dtype", dtype, "--seed", "0", "--served-model-name", served_name or model_dir]
        if public:  # vLLM's key check leaves its docs open: off on a server others can reach
            cmd += ["--disable-fastapi-docs"]
        cmd += vllm_scaling(scaling)
        if lora:
            rank = lora.get("max_rank") or lora_rank(lora["adapters"])
            cmd += ["--enable-lora", "--max-lora-rank", str(rank), "--lora-modules",
                    *(f"{name}={path}" for name, path in lora["adapters"].items())]
    else:
        if lora:
            raise ValueError("the transformers backend serves one model dir and no adapter on top of it: "
                             "serve the merged model (notebook 04) instead, or use the vllm backend on a GPU")
        parallel = {k: v for k, v in scaling.items() if k.endswith("parallel_size") and (v or 1) > 1}
        if parallel:
            key, value = next(iter(parallel.items()))
            raise ValueError(f"serve.{key} = {value} is for vLLM: the transformers backend serves one copy of the model "
                             "on one device. Set serve.backend to vllm (on GPUs), or the parallel sizes to 1")
        args = {"model": model_dir, "served_name": served_name, "host": host, "port": port, "dtype": dtype,
                "device": device, "continuous_batching": continuous_batching}
        cmd = [sys.executable, "-c", "import sys, medqa_zh.serve as s; s._transformers_main(sys.argv[1])",
               json.dumps(args)]
    return cmd + list(extra_args)


def _check_model(model_dir) -> None:
    """A local path (:func:`models.is_hub_id` decides) that does not exist or holds no model fails here, by
    name; a hub id passes."""
    text = str(model_dir)
    if models.is_hub_id(text):
        return
    path = Path(text).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"no model folder at {text}: train or merge it first (notebooks 02-04), "
                                "or give a hub id such as Qwen/Qwen2.5-0.5B-Instruct")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{text} holds no config.json, so it is not a model saved with save_pretrained: "
                                "give the folder of a model (e.g. outputs/cpu/models/merged)")


SERVED_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def served_name_for(model_dir) -> str:
    """The name a server answers to by default: a folder's own name (``merged`` for
    ``outputs/cpu/models/merged``), a hub id as it is."""
    text = str(model_dir)
    return text if models.is_hub_id(text) else Path(text).expanduser().resolve().name


def _check_served_name(name: str) -> None:
    if not SERVED_NAME.fullmatch(name) or ".." in name:
        raise ValueError(f"served model name {name!r}: use letters, digits and _ . - (at most one /), e.g. merged")


def _libc():
    if sys.platform != "linux":
        return None
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


LIBC = _libc()


def die_with_parent():
    """Runs in the child between fork and exec: SIGTERM it when the parent dies (Linux
    ``PR_SET_PDEATHSIG``), so a killed kernel leaves no server (or launched training) behind. No imports
    or locks here."""
    LIBC.prctl(1, signal.SIGTERM)


def _check_vllm() -> None:
    """vLLM importable by this interpreter, on a machine with a GPU; else a clear error."""
    import torch

    if not vllm_installed():
        raise ServerError(f"serve.backend is vllm but vLLM is not installed in this environment ({sys.executable}): "
                          "install the gpu extra on a CUDA machine (`pip install -e '.[gpu]'`; ./run_all.sh does it "
                          "when nvidia-smi works), or set serve.backend: transformers")
    if not torch.cuda.is_available():
        raise ServerError("serve.backend is vllm but PyTorch sees no GPU: set serve.backend to transformers (or auto), "
                          "or see README, Running on a GPU (driver and torch build)")


def start(model_dir, backend: str = "auto", host: str = "127.0.0.1", port: int | None = None,
          api_key: str | None = None, dtype: str = "auto", device: str | None = None,
          continuous_batching: bool = False, lora: dict | None = None, served_name: str | None = None,
          startup_timeout: float = 600.0, log_path=None, extra_args=(), quiet: bool = False,
          gpu_memory_utilization: float | None = None, **scaling) -> Server:
    """Start a server for ``model_dir`` (a local dir or a hub id) and wait until ``/health`` answers.

    The server answers to ``served_name`` (default :func:`served_name_for`: the folder's name, e.g.
    ``merged``), the ``model=`` clients send and ``/v1/models`` lists; :attr:`Server.model` holds it.

    ``lora={"adapters": {"lora": "outputs/cpu/models/lora"}}`` serves adapters on top of the model
    (vllm only); each adapter is then a model id of its own, and ``--max-lora-rank`` is the
    adapters' own rank (``"max_rank"`` overrides it). ``dtype`` bfloat16 is served as float16 on
    a GPU without native bf16 (T4, V100), which vLLM would refuse. ``gpu_memory_utilization``
    (vllm): the share of the GPU's memory vLLM may take (its default 0.9 fails while a notebook
    kernel still holds a model); ``scaling``: the other :data:`VLLM_SCALING` settings (vllm; a parallel size
    above 1 is an error on the transformers backend). Call :meth:`Server.stop` when done, or use :func:`serve` as a
    ``with`` block.
    """
    backend = pick_backend(backend)
    model_dir = models.fetch(model_dir, "the served model")  # a ModelScope id: its local folder
    _check_model(model_dir)
    served_name = served_name or served_name_for(model_dir)
    _check_served_name(served_name)
    if backend == "transformers" and served_name != str(model_dir) and models.is_hub_id(str(model_dir)):
        raise ValueError(f"the transformers backend serves a hub id under its own name: leave the served name out, "
                         f"or download {model_dir} to a folder and serve that")
    if backend == "vllm":
        _check_vllm()
    on = "cuda" if backend == "vllm" else models.best_device(device or "auto")
    served_dtype = models.inference_dtype(dtype, on)
    if served_dtype != dtype and models.DTYPES.get(dtype) != served_dtype and not quiet:
        print(f"dtype {dtype} served as {served_dtype}: this GPU has no native bfloat16 (compute capability below 8.0)")
    if host not in LOCAL_HOSTS and not api_key:
        api_key = secrets.token_urlsafe(24)
        print(f"binding {host} makes the server reachable from the network, so it needs an API key; "
              f"generated one: {api_key}")
    probe_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    if port and not _port_is_free(probe_host, port):  # else another server's /health could pass for ours
        raise ServerError(f"port {port} on {host} is already in use (another server?): stop it, pick another "
                          "--port, or leave the port out to get a free one")
    port = port or free_port(probe_host)
    if log_path is None:
        log_path = Path(tempfile.mkdtemp(prefix="medqa-serve-")) / "server.log"
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = _command(backend, str(model_dir), host, port, served_dtype, on, continuous_batching, lora, served_name,
                   extra_args, gpu_memory_utilization, public=host not in LOCAL_HOSTS, scaling=scaling)
    env = dict(os.environ)
    env.pop(API_KEY_ENV, None)
    env.pop("VLLM_API_KEY", None)
    if api_key:  # through the environment, so the key does not show in `ps`
        env[API_KEY_ENV if backend == "transformers" else "VLLM_API_KEY"] = api_key
    server = Server(backend=backend, host=host, port=port, api_key=api_key, log_path=log_path, command=cmd)
    log = open(log_path, "w", encoding="utf-8")
    log.write("$ " + " ".join(cmd) + "\n")
    log.flush()
    server.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                      start_new_session=True,
                                      preexec_fn=die_with_parent if LIBC is not None else None)
    log.close()
    _RUNNING.add(server)
    try:
        _wait_healthy(server, startup_timeout)
        ids = server.models()
        server.model = served_name if served_name in ids else ids[0]
    except BaseException:
        server.stop()
        raise
    if not quiet:
        print(f"serving {model_dir} with {backend} at {server.base_url} (model id {server.model!r}); log: {log_path}")
    return server


def _wait_healthy(server: Server, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise ServerError(f"the {server.backend} server exited with code {server.process.returncode} while starting."
                              f" Log tail ({server.log_path}):\n{server.log_tail()}")
        if server.healthy(timeout=1.0):
            return
        time.sleep(0.5)
    raise ServerError(f"the {server.backend} server did not answer {server.url}/health within {timeout:.0f} s "
                      f"(raise serve.startup_timeout if the model is large). Log tail ({server.log_path}):\n"
                      f"{server.log_tail()}")


@contextlib.contextmanager
def serve(model_dir, **kwargs):
    """:func:`start` as a ``with`` block: the server stops when the block ends, however it ends."""
    server = start(model_dir, **kwargs)
    try:
        yield server
    finally:
        server.stop()


def from_profile(cfg, model_dir, **kwargs) -> Server:
    """:func:`start` with the profile's ``serve`` settings, ``model.dtype`` and ``model.device``; the
    log goes to ``outputs/<profile>/logs/``. Pass ``served_name="merged"`` (a name of
    :func:`models.available`) to serve a run's model under its name there."""
    settings = {"backend": cfg["serve.backend"], "dtype": cfg["model.dtype"], "device": cfg.get("model.device"),
                "continuous_batching": cfg["serve.continuous_batching"],
                **{key: cfg.get(f"serve.{key}") for key in VLLM_SCALING},
                "startup_timeout": cfg["serve.startup_timeout"]}
    name = kwargs.get("served_name") or Path(str(model_dir)).name
    settings["log_path"] = cfg.out / "logs" / f"serve-{name}-{time.strftime('%Y%m%d-%H%M%S')}.log"
    return start(model_dir, **{**settings, **kwargs})


def measure_latency(server: Server, questions, max_tokens: int = 16):
    """Ask each question twice, one request at a time: streamed, for the time to the first token,
    and plain, for the whole answer's time and token count. A DataFrame, one row per question."""
    client, rows = server.client(), []
    for q in questions:
        messages = prompts.build_messages(q.question, q.options)
        start, first = time.perf_counter(), None
        for chunk in client.chat.completions.create(model=server.model, messages=messages, temperature=0,
                                                    max_tokens=max_tokens, stream=True):
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - start
        start = time.perf_counter()
        reply = client.chat.completions.create(model=server.model, messages=messages, temperature=0,
                                               max_tokens=max_tokens)
        total = time.perf_counter() - start
        text, tokens = reply.choices[0].message.content or "", reply.usage.completion_tokens
        rows.append({"id": q.id, "first_token_s": first, "total_s": total, "completion_tokens": tokens,
                     "tokens_per_s": tokens / total, "answer": text, "pred": answers.extract_letter(text, "".join(q.options)),
                     "gold": q.answer_idx})
    return pd.DataFrame(rows)


@atexit.register
def _stop_all():
    for server in list(_RUNNING):
        server.stop(timeout=5)


# --------------------------------------------------------------------------- the transformers child


OPEN_PATHS = ("/health",)                 # answered without the key, as vLLM does
REFUSED_PATHS = ("/load_model", "/reset")  # transformers serve's model management: this server serves one model
ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError",
               404: "NotFoundError", 422: "UnprocessableEntityError"}


def openai_error(status: int, message: str) -> dict:
    """An error body in the OpenAI API's shape (as vLLM sends it), which OpenAI clients read."""
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "APIError"), "param": None, "code": status}}


def unsupported(body: dict) -> list[str]:
    """The request fields the transformers backend would silently ignore although they change the reply:
    ``n`` > 1, ``logprobs``/``top_logprobs``, ``presence_penalty``, a ``response_format`` other than text."""
    checks = {"n": lambda v: v not in (None, 1), "logprobs": bool, "top_logprobs": bool,
              "presence_penalty": lambda v: v not in (None, 0), "response_format": lambda v: v not in (None, {"type": "text"})}
    return [key for key, bad in checks.items() if key in body and bad(body[key])]


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """``text`` up to the first of the ``stops`` (which OpenAI's API leaves out), and whether one was found."""
    ends = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[:min(ends)], True) if ends else (text, False)


def _name_by_link(model: str, name: str) -> str:
    """transformers serve answers to the name it loaded its model by. To answer to ``name``, load the
    folder through a link called ``name`` in a fresh working folder (only this child process moves there)."""
    if name == model:
        return model
    work = Path(tempfile.mkdtemp(prefix="medqa-serve-name-"))
    link = work / name
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(Path(model).expanduser().resolve(), target_is_directory=True)
    os.chdir(work)
    return name


def _openai_handlers(name: str) -> None:
    """What transformers serve's chat endpoint does differently from the OpenAI API, mended in place: another
    model name gets a 404, fields it would ignore get a 400 (:func:`unsupported`), ``temperature`` > 0 samples,
    a ``stop`` string is left out of a (non-streamed) reply, and a stream ends with ``data: [DONE]``."""
    from fastapi import HTTPException
    from fastapi.responses import JSONResponse
    from transformers.cli.serving.chat_completion import ChatCompletionHandler
    from transformers.cli.serving.utils import BaseHandler

    build_config = BaseHandler._build_generation_config

    def build_generation_config(self, body, *args, **kwargs):
        config = build_config(self, body, *args, **kwargs)
        if body.get("temperature") is not None and float(body["temperature"]) > 0:
            config.do_sample = True  # else a model whose generation config lacks do_sample stays greedy
        return config

    handle = ChatCompletionHandler.handle_request

    async def handle_request(self, body, request_id):
        if body.get("model") not in (None, name):
            raise HTTPException(404, f"The model `{body['model']}` does not exist; this server serves `{name}`.")
        # one list of non-empty strings; none at all (lm-evaluation-harness sends []) would fail transformers' setup
        stops = [s for s in ([body["stop"]] if isinstance(body.get("stop"), str) else body.get("stop") or []) if s]
        body.pop("stop", None)
        if stops:
            body["stop"] = stops
        ignored = unsupported(body)
        if ignored:
            raise HTTPException(400, f"not supported by this server (transformers backend): {', '.join(ignored)}; "
                                     "leave them out, or serve with vLLM on a GPU")
        response = await handle(self, body, request_id)
        if body.get("stream"):
            response.body_iterator = _then_done(response.body_iterator)
        elif body.get("stop") and isinstance(response, JSONResponse):
            reply = json.loads(response.body)
            for choice in reply.get("choices", []):
                text, found = cut_at_stop(choice["message"].get("content") or "", body["stop"])
                choice["message"]["content"] = text
                if found:
                    choice["finish_reason"] = "stop"
            response = JSONResponse(reply, status_code=response.status_code)
        return response

    BaseHandler._build_generation_config = build_generation_config
    ChatCompletionHandler.handle_request = handle_request


async def _then_done(chunks):
    try:
        async for chunk in chunks:
            yield chunk
        yield "data: [DONE]\n\n"
    finally:
        if hasattr(chunks, "aclose"):
            await chunks.aclose()  # a client that hung up stops the generation


def _guarded(app, key: str | None):
    """The app with every path but ``/health`` behind the key (when one is set), the model-management
    endpoints refused, and errors in the OpenAI API's shape."""
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    @app.middleware("http")
    async def check_key(request, call_next):
        path = request.url.path
        given = request.headers.get("authorization", "")
        if key and path not in OPEN_PATHS and not secrets.compare_digest(given.encode(), f"Bearer {key}".encode()):
            return JSONResponse(openai_error(401, "missing or wrong API key"), status_code=401)
        if path in REFUSED_PATHS:
            return JSONResponse(openai_error(403, f"{path} is turned off: this server serves one model"), status_code=403)
        return await call_next(request)

    @app.exception_handler(HTTPException)
    async def as_openai_error(request, exc):
        return JSONResponse(openai_error(exc.status_code, str(exc.detail)), status_code=exc.status_code)

    return app


def _transformers_main(args_json: str) -> None:
    """Runs in the child: ``transformers serve``'s own server (``transformers.cli.serve.Serve``), pinned
    to one model under its served name, with the key check, refusals and fixes above."""
    args = json.loads(args_json)
    key = os.environ.pop(API_KEY_ENV, None)
    from transformers.cli import serve as cli_serve
    from transformers.cli.serving import server as serving

    name = _name_by_link(args["model"], args.get("served_name") or args["model"])
    build = serving.build_server
    serving.build_server = lambda *a, **kw: _guarded(build(*a, **kw), key)
    _openai_handlers(name)
    cli_serve.Serve(force_model=name, host=args["host"], port=args["port"], device=args["device"],
                    dtype=args["dtype"], continuous_batching=args["continuous_batching"], log_level="info")


# --------------------------------------------------------------------------- command line


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m medqa_zh.serve", description=(
        "Serve a model dir over an OpenAI-compatible API until Ctrl-C (vLLM on a GPU, transformers serve on a CPU)."))
    p.add_argument("model_dir", help="a model folder (e.g. outputs/cpu/models/merged) or a hub id")
    p.add_argument("--port", type=int, default=8000, help="default 8000 (0: any free port)")
    p.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1; any other address needs an API key")
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV), help=f"bearer token clients must send "
                   f"(default: ${API_KEY_ENV}; generated when binding a non-local address without one)")
    p.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="the model id clients send and /v1/models lists (default: the folder's name, e.g. merged)")
    p.add_argument("--backend", default="auto", choices=["auto", "vllm", "transformers"])
    p.add_argument("--dtype", default="auto", help="e.g. bfloat16, float32; auto: as the weights are stored")
    p.add_argument("--continuous-batching", action="store_true", help="transformers backend: batch concurrent requests")
    p.add_argument("--lora", action="append", default=[], metavar="NAME=DIR",
                   help="vllm only: also serve this adapter on top of MODEL_DIR as model id NAME (repeatable)")
    p.add_argument("--gpu-memory-utilization", type=float, default=None, metavar="SHARE",
                   help="vllm only: share of the GPU's memory vLLM may take (vLLM's default: 0.9; a 0.5B model needs ~0.3)")
    p.add_argument("--tensor-parallel-size", type=int, default=None, metavar="N",
                   help="vllm only: split every layer over N GPUs (a model too big for one)")
    p.add_argument("--data-parallel-size", type=int, default=None, metavar="N",
                   help="vllm only: N copies of the model, each on its own GPU(s), sharing the requests")
    p.add_argument("--max-num-seqs", type=int, default=None, metavar="N", help="vllm only: requests batched together at most")
    p.add_argument("--max-model-len", type=int, default=None, metavar="TOKENS",
                   help="vllm only: longest prompt + answer (less than the model's own saves KV-cache memory)")
    p.add_argument("--startup-timeout", type=float, default=600.0)
    a = p.parse_args(argv)
    # Ctrl-C and `kill` both stop the server cleanly, even when this process was started with SIGINT
    # ignored (as a shell's background job is)
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    lora = None
    if a.lora:
        bad = [x for x in a.lora if "=" not in x]
        if bad:
            p.error(f"--lora takes NAME=DIR, got {bad[0]!r}")
        lora = {"adapters": dict(x.split("=", 1) for x in a.lora)}
    try:
        server = start(a.model_dir, backend=a.backend, host=a.host, port=a.port or None, api_key=a.api_key,
                       dtype=a.dtype, continuous_batching=a.continuous_batching, lora=lora,
                       served_name=a.served_model_name, startup_timeout=a.startup_timeout,
                       gpu_memory_utilization=a.gpu_memory_utilization, tensor_parallel_size=a.tensor_parallel_size,
                       data_parallel_size=a.data_parallel_size, max_num_seqs=a.max_num_seqs,
                       max_model_len=a.max_model_len)
    except (ServerError, ValueError, FileNotFoundError) as e:
        p.exit(2, f"error: {e}\n")
    key = f"  api key: {server.api_key}\n" if server.api_key else ""
    print(f"\nOpenAI-compatible endpoint: {server.base_url}\n  model id: {server.model}\n{key}"
          f"  log: {server.log_path}\nCtrl-C stops it.", flush=True)
    try:
        while server.running():
            time.sleep(1)
        sys.exit(f"error: the server exited with code {server.process.returncode}. Log tail:\n{server.log_tail()}")
    except KeyboardInterrupt:
        print("stopping the server")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
