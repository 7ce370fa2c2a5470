"""Serve a model dir over an OpenAI-compatible HTTP API, and stop it again.

Three backends speak the same API (``/health``, ``/v1/models``, ``/v1/chat/completions``, streaming):

- ``vllm``: ``vllm serve`` on a GPU (paged attention, continuous batching), started with this
  Python (``python -m vllm.entrypoints.cli.main serve``, so no ``vllm`` on PATH is needed); it can
  also serve a LoRA adapter on top of its base (``--enable-lora``, ``--max-lora-rank`` = its rank);
- ``transformers``: the project's own small server on a CPU (or any device), in a child process
  (``serve_child.main``): transformers' ``generate`` behind FastAPI, one request at a time, with an
  API-key check on every path but ``/health``, requests checked as vLLM checks them, and errors in the
  OpenAI shape. It uses public transformers APIs only, so a new transformers release does not break it.

- ``llamacpp``: llama-cpp-python's OpenAI-compatible server for a GGUF file (notebook 04's export) on a
  CPU, in a child process with the same checks as the transformers server (``serve_child.llamacpp_main``).
  ``from_profile`` serves a run's model as its ``gguf.serve`` file (``models/gguf/merged-q8_0.gguf``).

Each answers to a served model name (``served_name``; default the folder's name, ``merged``).

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
import shlex
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

from . import children, models, runs
from .serve_child import API_KEY_ENV

# torch and the Hugging Face stack (transformers, peft, trl, datasets, sentence-transformers, vLLM) are
# imported inside the functions that use them, so importing this module stays fast.

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
_RUNNING: set["Server"] = set()


class ServerError(RuntimeError):
    """The server did not start, or stopped answering."""


def vllm_installed() -> bool:
    """Whether this interpreter can import vLLM (the ``gpu`` extra)."""
    return importlib.util.find_spec("vllm") is not None


BACKENDS = ("auto", "vllm", "transformers", "llamacpp")


def pick_backend(backend: str = "auto") -> str:
    """``vllm``, ``transformers`` or ``llamacpp``; ``auto`` is vllm when CUDA and the vllm package are present,
    else transformers (llamacpp only when asked for: it serves a GGUF file, not a model folder)."""
    if backend not in BACKENDS:
        raise ValueError(f"serve backend must be one of {', '.join(BACKENDS)}, not {backend!r} (profile key serve.backend)")
    if backend != "auto":
        return backend
    import torch

    return "vllm" if torch.cuda.is_available() and vllm_installed() else "transformers"


def local_address(host: str) -> str:
    """Where this machine reaches a server bound to ``host``: a wildcard (0.0.0.0, ::) is reached at 127.0.0.1."""
    return "127.0.0.1" if host in ("0.0.0.0", "::") else host


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
    command: list[str] = field(default_factory=list)  # the argv its process started with (shlex.join: a shell line)
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """The server's root, e.g. ``http://127.0.0.1:8000``."""
        host = local_address(self.host)
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
        children.stop(self.process, timeout)

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
        path = Path(folder) / runs.ADAPTER_CONFIG
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


def _one_copy(backend: str, lora: dict | None, scaling: dict, fix: str) -> None:
    """The CPU backends serve one model, once, on one device: an adapter on top (``fix`` says what to do instead)
    or a parallel size above 1 is an error naming the setting."""
    if lora:
        raise ValueError(f"the {backend} backend serves one model and no adapter on top of it: {fix}")
    parallel = {k: v for k, v in scaling.items() if k.endswith("parallel_size") and (v or 1) > 1}
    if parallel:
        key, value = next(iter(parallel.items()))
        raise ValueError(f"serve.{key} = {value} is for vLLM: the {backend} backend serves one copy of the model on one "
                         "device. Set serve.backend to vllm (on GPUs), or the parallel sizes to 1")


def _command(backend: str, model_dir: str, host: str, port: int, dtype: str, device: str | None,
             lora: dict | None, served_name: str | None, extra_args,
             gpu_memory_utilization: float | None = None, public: bool = False, scaling: dict | None = None,
             queue: dict | None = None, llama: dict | None = None) -> list[str]:
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
    elif backend == "llamacpp":
        _one_copy(backend, lora, scaling, "export the merged model (notebook 04) and serve its GGUF")
        args = {"model": model_dir, "served_name": served_name, "host": host, "port": port, **llama}
        cmd = [sys.executable, "-c", "import sys, medqa_zh.serve_child as s; s.llamacpp_main(sys.argv[1])",
               json.dumps(args)]
    else:
        _one_copy(backend, lora, scaling, "serve the merged model (notebook 04) instead, or use the vllm backend on a GPU")
        args = {"model": model_dir, "served_name": served_name, "host": host, "port": port, "dtype": dtype,
                "device": device, "max_model_len": scaling.get("max_model_len"), "max_queue": None, "request_timeout": None,
                **(queue or {})}  # None: no limit (serve_child)
        cmd = [sys.executable, "-c", "import sys, medqa_zh.serve_child as s; s.main(sys.argv[1])",
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
    ``outputs/cpu/models/merged``), a GGUF file's without ``.gguf`` (``merged-q8_0``), a hub id as it is."""
    text = str(model_dir)
    if models.is_hub_id(text):
        return text
    path = Path(text).expanduser().resolve()
    return path.stem if path.suffix == ".gguf" else path.name


def _check_served_name(name: str) -> None:
    if not SERVED_NAME.fullmatch(name) or ".." in name:
        raise ValueError(f"served model name {name!r}: use letters, digits and _ . - (at most one /), e.g. merged")


def _check_vllm() -> None:
    """vLLM importable by this interpreter, on a machine with a GPU; else a clear error."""
    import torch

    if not vllm_installed():
        raise ServerError(f"serve.backend is vllm but vLLM is not installed in this environment ({sys.executable}): "
                          "install the gpu extra on a CUDA machine (`pip install -e '.[gpu]'`; ./run_all.sh does it "
                          "when nvidia-smi works), or set serve.backend: transformers")
    if not torch.cuda.is_available():
        raise ServerError("serve.backend is vllm but PyTorch sees no GPU: set serve.backend to transformers (or auto), "
                          "or see docs/gpu.md, Running on a GPU (driver and torch build)")


def start(model_dir, backend: str = "auto", host: str = "127.0.0.1", port: int | None = None,
          api_key: str | None = None, dtype: str = "auto", device: str | None = None,
          lora: dict | None = None, served_name: str | None = None,
          startup_timeout: float = 600.0, log_path=None, extra_args=(), quiet: bool = False,
          gpu_memory_utilization: float | None = None, max_queue: int | None = None,
          request_timeout: float | None = None, n_ctx: int = 4096, extra_buffers: bool = False,
          threads: int | None = None, **scaling) -> Server:
    """Start a server for ``model_dir`` (a local dir or a hub id) and wait until ``/health`` answers.

    The server answers to ``served_name`` (default :func:`served_name_for`: the folder's name, e.g.
    ``merged``), the ``model=`` clients send and ``/v1/models`` lists; :attr:`Server.model` holds it.

    ``lora={"adapters": {"lora": "outputs/cpu/models/lora"}}`` serves adapters on top of the model
    (vllm only); each adapter is then a model id of its own, and ``--max-lora-rank`` is the
    adapters' own rank (``"max_rank"`` overrides it). ``dtype`` bfloat16 is served as float16 on
    a GPU without native bf16 (T4, V100), which vLLM would refuse. ``gpu_memory_utilization``
    (vllm): the share of the GPU's memory vLLM may take (its default 0.9 fails while a notebook
    kernel still holds a model); ``scaling``: the other :data:`VLLM_SCALING` settings (vllm; a parallel size
    above 1 is an error on the transformers backend, whose requests must fit ``max_model_len`` too). The
    transformers backend lets at most ``max_queue`` requests wait (beyond: 429), each for at most
    ``request_timeout`` seconds (then: 503); None: no limit (``medqa_zh.serve_child``). The llamacpp backend serves
    the GGUF file ``model_dir`` with a context of ``n_ctx`` tokens (``max_model_len`` when given), on ``threads``
    cores (None: every core this process may use), with llama.cpp's repacked weights when ``extra_buffers`` (``gguf`` settings).
    Call :meth:`Server.stop` when done, or use :func:`serve` as a ``with`` block.
    """
    backend = pick_backend(backend)
    if backend == "llamacpp":
        from . import export, steps  # the GGUF checks; only for this backend

        if why := steps.llama_cpp_missing():  # no runtime (a machine without a C++ compiler): say so, not a traceback
            raise ServerError(f"serve backend llamacpp: {why}")
        export.check_file(model_dir)  # a GGUF, whole
        model_dir = str(Path(model_dir).expanduser().resolve())
    else:
        model_dir = models.fetch(model_dir, "the served model")  # a ModelScope id: its local folder
        _check_model(model_dir)
    served_name = served_name or served_name_for(model_dir)
    _check_served_name(served_name)
    if backend == "vllm":
        _check_vllm()
    on = "cuda" if backend == "vllm" else "cpu" if backend == "llamacpp" else models.best_device(device or "auto")
    served_dtype = models.inference_dtype(dtype, on)
    if backend != "llamacpp" and not quiet and (models.DTYPES.get(dtype) != served_dtype  # auto, or bf16 on a T4
                                                or models.emulated_bf16(dtype, on)):  # bf16 on a CPU without it
        print(models.dtype_line(dtype, on))
    if host not in LOCAL_HOSTS and not api_key:
        api_key = secrets.token_urlsafe(24)
        print(f"binding {host} makes the server reachable from the network, so it needs an API key; "
              f"generated one: {api_key}")
    probe_host = local_address(host)
    if port and not _port_is_free(probe_host, port):  # else another server's /health could pass for ours
        raise ServerError(f"port {port} on {host} is already in use (another server?): stop it, pick another "
                          "--port, or leave the port out to get a free one")
    port = port or free_port(probe_host)
    if log_path is None:
        log_path = Path(tempfile.mkdtemp(prefix="medqa-serve-")) / "server.log"
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = _command(backend, str(model_dir), host, port, served_dtype, on, lora, served_name,
                   extra_args, gpu_memory_utilization, public=host not in LOCAL_HOSTS, scaling=scaling,
                   queue={"max_queue": max_queue, "request_timeout": request_timeout},
                   llama={"n_ctx": scaling.get("max_model_len") or n_ctx, "extra_buffers": extra_buffers,
                          "threads": threads})
    env = dict(os.environ)
    env.pop(API_KEY_ENV, None)
    env.pop("VLLM_API_KEY", None)
    if api_key:  # through the environment, so the key does not show in `ps`
        env["VLLM_API_KEY" if backend == "vllm" else API_KEY_ENV] = api_key
    server = Server(backend=backend, host=host, port=port, api_key=api_key, log_path=log_path, command=cmd)
    log = open(log_path, "w", encoding="utf-8")
    log.write("$ " + shlex.join(cmd) + "\n")  # the command line as a shell takes it (Server.command)
    log.flush()
    server.process = children.start(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
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
    settings = {"backend": cfg["serve.backend"], "dtype": cfg["model.dtype"], "device": cfg["model.device"],
                "n_ctx": cfg["gguf.n_ctx"], "extra_buffers": cfg["gguf.extra_buffers"],
                **{key: cfg[f"serve.{key}"] for key in VLLM_SCALING},
                "startup_timeout": cfg["serve.startup_timeout"], "max_queue": cfg["serve.max_queue"],
                "request_timeout": cfg["serve.request_timeout"]}
    name = kwargs.get("served_name") or Path(str(model_dir)).name
    settings["log_path"] = cfg.out / "logs" / f"serve-{name}-{time.strftime('%Y%m%d-%H%M%S')}.log"
    if pick_backend(kwargs.get("backend", settings["backend"])) == "llamacpp" and not str(model_dir).endswith(".gguf"):
        from . import export  # a run's model as its exported GGUF (04)

        model_dir = export.gguf_path(export.folder(cfg), name, cfg["gguf.serve"])
    return start(model_dir, **{**settings, **kwargs})


def backend_tag(cfg, backend: str | None = None) -> str:
    """The profile's backend (or ``backend``) as answers cached from it are named: ``vllm`` and ``transformers``
    round differently, and a GGUF's answers depend on its quantization (``llamacpp-q8_0``)."""
    backend = pick_backend(backend or cfg["serve.backend"])
    return f"{backend}-{cfg['gguf.serve']}" if backend == "llamacpp" else backend


@atexit.register
def _stop_all():
    for server in list(_RUNNING):
        server.stop(timeout=5)


# --------------------------------------------------------------------------- command line


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def typed_command(cfg, model_dir, served_name: str | None = None, port: int = 8000) -> list[str]:
    """The command a person types in a terminal to start the server :func:`from_profile` starts for ``cfg``:
    ``python -m medqa_zh.serve`` (:func:`main`) with the model (for llamacpp its GGUF, as :func:`from_profile`
    serves it), the profile and its backend and dtype."""
    backend = pick_backend(cfg["serve.backend"])
    if backend == "llamacpp" and not str(model_dir).endswith(".gguf"):
        from . import export

        model_dir = export.gguf_path(export.folder(cfg), served_name or Path(str(model_dir)).name, cfg["gguf.serve"])
    cmd = ["python", "-m", "medqa_zh.serve", str(model_dir), "--profile", Path(cfg.source).stem,
           "--backend", backend, "--dtype", str(cfg["model.dtype"]), "--port", str(port)]
    return cmd + (["--served-model-name", served_name] if served_name else [])


def vllm_command(server: Server) -> list[str] | None:
    """vLLM's own ``vllm serve …`` line for a vLLM server (what it runs, as a person types it); None for another."""
    return ["vllm", *server.command[3:]] if server.command[1:3] == ["-m", VLLM_CLI] else None


def parser() -> argparse.ArgumentParser:
    """``python -m medqa_zh.serve``'s arguments."""
    p = argparse.ArgumentParser(prog="python -m medqa_zh.serve", description=(
        "Serve a model dir over an OpenAI-compatible API until Ctrl-C (vLLM on a GPU; on a CPU, transformers or "
        "llama.cpp)."))
    p.add_argument("model_dir", help="a model folder (e.g. outputs/cpu/models/merged), a hub id, or a GGUF file (llamacpp)")
    p.add_argument("--port", type=int, default=8000, help="default 8000 (0: any free port)")
    p.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1; any other address needs an API key")
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV), help=f"bearer token clients must send "
                   f"(default: ${API_KEY_ENV}; generated when binding a non-local address without one)")
    p.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="the model id clients send and /v1/models lists (default: the folder's name, e.g. merged)")
    p.add_argument("--backend", default="auto", choices=list(BACKENDS),
                   help="llamacpp serves a GGUF file (MODEL_DIR: e.g. outputs/cpu/models/gguf/merged-q8_0.gguf)")
    p.add_argument("--dtype", default="auto", help="e.g. bfloat16, float32; auto: as the weights are stored")
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
                   help="longest prompt + answer (default: the profile's serve.max_model_len, else the model's own); "
                        "vllm: less saves KV-cache memory; transformers: a longer request is refused (400)")
    p.add_argument("--max-queue", type=int, default=None, metavar="N",
                   help="transformers only: requests that may wait for the model; beyond, 429 (default: the profile's "
                        "serve.max_queue)")
    p.add_argument("--request-timeout", type=float, default=None, metavar="SECONDS",
                   help="transformers only: how long a request may wait for the model, then 503 (default: the "
                        "profile's serve.request_timeout)")
    p.add_argument("--startup-timeout", type=float, default=None, metavar="SECONDS",
                   help="how long to wait for /health (default: the profile's serve.startup_timeout)")
    p.add_argument("--profile", default=None, help="where the defaults above come from: profiles/<profile>.yaml "
                   "(default: $MEDQA_PROFILE or smoke)")
    return p


def main(argv=None) -> None:
    p = parser()
    a = p.parse_args(argv)
    from . import config  # the defaults' one home: the profile's serve section (profiles/base.yaml)

    profile = config.load(a.profile)
    for flag in ("max_model_len", "max_queue", "request_timeout", "startup_timeout"):
        if getattr(a, flag) is None:
            setattr(a, flag, profile[f"serve.{flag}"])
    backend = "llamacpp" if a.backend == "auto" and a.model_dir.endswith(".gguf") else a.backend
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
        server = start(a.model_dir, backend=backend, host=a.host, port=a.port or None, api_key=a.api_key,
                       dtype=a.dtype, lora=lora,
                       served_name=a.served_model_name, startup_timeout=a.startup_timeout,
                       gpu_memory_utilization=a.gpu_memory_utilization, tensor_parallel_size=a.tensor_parallel_size,
                       data_parallel_size=a.data_parallel_size, max_num_seqs=a.max_num_seqs,
                       max_model_len=a.max_model_len, max_queue=a.max_queue, request_timeout=a.request_timeout,
                       n_ctx=profile["gguf.n_ctx"], extra_buffers=profile["gguf.extra_buffers"])
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
