"""Profiles: every knob of a run, plus the run manifest.

``profiles/base.yaml`` holds every path, split spec, size and setting, with what it means;
``profiles/<name>.yaml`` holds only what that profile changes (a key the base lacks is an error).
On top of the two, in this order (later wins):

1. the environment: ``MEDQA_BASE_MODEL`` -> ``model.base`` (a hub id or a local dir),
   ``MEDQA_DIR`` -> ``data.medqa_dir`` (a folder in MedQA's ``data_clean`` layout) and
   ``MEDQA_EMBEDDER`` -> ``rag.embedder`` (a sentence-transformers hub id or local dir);
2. the notebook's papermill parameter ``overrides``, by dotted key:
   ``papermill 01_data.ipynb out.ipynb -y 'overrides: {data.splits.eval: "dev[:100]"}'``.

Relative paths are relative to the project root, wherever the notebook runs. Everything a run
writes goes under ``outputs/<profile>/``.
"""
from __future__ import annotations

import copy
import datetime as dt
import hashlib
import html
import json
import os
import platform
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import yaml

from . import files, models, tiny

# torch and the Hugging Face stack (transformers, peft, trl, datasets, sentence-transformers, vLLM) are
# imported inside the functions that use them, so importing this module stays fast.

DEFAULT_PROFILE = "smoke"
DEFAULT_BASE_MODEL = "Qwen/Qwen2.5-0.5B-Instruct"
ENV_OVERRIDES = {"MEDQA_BASE_MODEL": "model.base", "MEDQA_DIR": "data.medqa_dir", "MEDQA_EMBEDDER": "rag.embedder"}
PACKAGES = (
    "medqa-zh", "torch", "transformers", "tokenizers", "peft", "trl", "datasets", "sentence-transformers",
    "bm25s", "rank-bm25", "pandas", "matplotlib", "papermill", "vllm",
)
SMOKE_WARNING = (
    "SMOKE PROFILE: a tiny model and synthetic questions, built locally in seconds: a planted world whose effects "
    "were built in and written down before the run (planted.json), which the report must find. "
    "Its numbers say nothing about medicine: for real results run the cpu or gpu profile."
)


def project_root() -> Path:
    """The folder holding ``profiles/`` (the lib lives in ``<root>/lib/medqa_zh``)."""
    env = os.environ.get("MEDQA_ROOT")
    candidates = [Path(env)] if env else []
    candidates += [Path(__file__).resolve().parents[2], *Path.cwd().resolve().parents, Path.cwd().resolve()]
    for c in candidates:
        if (c / "profiles").is_dir() and (c / "pyproject.toml").is_file():
            return c
    raise FileNotFoundError(
        "cannot find the project root (a folder with profiles/ and pyproject.toml); "
        "install the project with `pip install -e .` from its clone, or set MEDQA_ROOT"
    )


def _get(d: dict, dotted: str):
    node = d
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(dotted)
        node = node[part]
    return node


def _set(d: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    node = d
    for part in parents:
        node = node[part]
    node[last] = value


def _leaf_keys(d: dict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in d.items():
        keys += _leaf_keys(v, f"{prefix}{k}.") if isinstance(v, dict) and v else [f"{prefix}{k}"]
    return keys


@dataclass
class Config:
    """A loaded profile: ``cfg["data.splits"]``, ``cfg.path("data.medqa_dir")``, ``cfg.out``."""

    name: str
    values: dict
    root: Path
    source: Path
    overrides: dict = field(default_factory=dict)  # dotted key -> {"value", "from"}

    def __getitem__(self, dotted: str):
        try:
            return _get(self.values, dotted)
        except KeyError:
            raise KeyError(f"profile {self.source.name} has no setting {dotted!r}") from None

    def get(self, dotted: str, default=None):
        try:
            return _get(self.values, dotted)
        except KeyError:
            return default

    def path(self, dotted: str) -> Path:
        """A path setting, absolute (relative ones are relative to the project root)."""
        p = Path(self[dotted]).expanduser()
        return (p if p.is_absolute() else self.root / p).resolve()

    @property
    def smoke(self) -> bool:
        return bool(self["smoke"])

    @property
    def out(self) -> Path:
        """``outputs/<profile>/``: everything this profile's runs write."""
        return self.root / "outputs" / self.name

    def out_dir(self, kind: str) -> Path:
        """``outputs/<profile>/<kind>/``, created (kind: data, models, runs, reports, tables, figures)."""
        d = self.out / kind
        d.mkdir(parents=True, exist_ok=True)
        return d

    @property
    def base_model(self) -> str:
        """A hub id, a ModelScope id (``modelscope:owner/name``), or an absolute local dir."""
        return self._model("model.base")

    @property
    def embedder(self) -> str:
        """The sentence-transformers model for dense retrieval: a hub id, a ModelScope id, or an absolute local dir."""
        return self._model("rag.embedder")

    def _model(self, key: str) -> str:
        value = str(self[key])
        if models.modelscope_id(value) or models.is_hub_id(value, self.root):
            return value
        return str(self.path(key))

    @property
    def questions_dir(self) -> Path:
        return self.path("data.medqa_dir") / self["data.questions_dir"]

    @property
    def textbooks_dir(self) -> Path:
        return self.path("data.medqa_dir") / self["data.textbooks_dir"]

    @property
    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.values, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


BASE_PROFILE = "base"  # profiles/base.yaml: every setting; the other profiles change some of them
# settings that were renamed: the old name is an error that names the new one (and why)
RENAMED = {
    "train.gradient_checkpointing": ("train.activation_checkpointing",
                                     "SFTConfig's name since transformers 5, which removes the old one in v6"),
    "train.num_train_epochs": ("train.epochs", "SFTConfig's num_train_epochs is always 1 here: one pass over the "
                               "stream the project lays the epochs out in"),
    "train.packing": ("train.padding_free", "what SFTConfig calls it: trl's packing reorders examples, and the "
                      "project's never did"),
}


def _renamed(dotted: str) -> str:
    """The error's hint for a setting's old name: its new one, and why."""
    new, why = RENAMED[dotted]
    return f"it was renamed: write {new!r} ({why})"


def _read_profile(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: every profile is read on top of it")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path}: a profile is a mapping of settings, not {type(values).__name__}")
    return values


def _merge(values: dict, changes: dict, source: Path, prefix: str = "") -> None:
    """Put ``changes`` (a profile) into ``values`` (the base), key by key; groups merge, other values replace."""
    for key, value in changes.items():
        dotted = f"{prefix}{key}"
        if key not in values:
            if dotted in RENAMED:
                raise KeyError(f"{source}: {dotted!r} is not a setting of profiles/{BASE_PROFILE}.yaml; {_renamed(dotted)}")
            raise KeyError(f"{source}: {dotted!r} is not a setting of profiles/{BASE_PROFILE}.yaml, which names every "
                           "setting (a typo? a new setting goes into the base first)")
        if isinstance(values[key], dict) and isinstance(value, dict):
            _merge(values[key], value, source, f"{dotted}.")
        elif isinstance(values[key], dict):
            raise ValueError(f"{source}: {dotted!r} is a group of settings ({', '.join(values[key])}); set one of them")
        else:
            values[key] = copy.deepcopy(value)


def load(profile: str | None = None, overrides: dict | None = None, environ: dict | None = None) -> Config:
    """Load ``profiles/base.yaml`` and the changes of ``profiles/<profile>.yaml`` (default:
    ``$MEDQA_PROFILE`` or ``smoke``), then apply the environment overrides and ``overrides``
    (dotted keys). Unknown keys are errors."""
    environ = os.environ if environ is None else environ
    root = project_root()
    name = profile or environ.get("MEDQA_PROFILE") or DEFAULT_PROFILE
    source = root / "profiles" / f"{name}.yaml"
    if name == BASE_PROFILE or not source.is_file():
        known = ", ".join(sorted(p.stem for p in (root / "profiles").glob("*.yaml") if p.stem != BASE_PROFILE))
        raise FileNotFoundError(f"no profile {name!r} ({source} is missing); known profiles: {known}")
    values = _read_profile(root / "profiles" / f"{BASE_PROFILE}.yaml")
    _merge(values, _read_profile(source), source)
    cfg = Config(name, values, root, source)

    layers = [({k: environ[e] for e, k in ENV_OVERRIDES.items() if environ.get(e)}, "environment")]
    layers.append((overrides or {}, "papermill parameter 'overrides'"))
    known = _leaf_keys(values)
    for layer, origin in layers:
        for key, value in layer.items():
            try:
                current = _get(cfg.values, key)
            except KeyError:
                if key in RENAMED:
                    raise KeyError(f"{origin}: {source.name} has no setting {key!r}; {_renamed(key)}") from None
                raise KeyError(
                    f"{origin}: {source.name} has no setting {key!r}. Known settings: {', '.join(known)}"
                ) from None
            if isinstance(current, dict) and not isinstance(value, dict):
                raise ValueError(f"{origin}: {key!r} is a group of settings ({', '.join(current)}); set one of them")
            _set(cfg.values, key, value)
            cfg.overrides[key] = {"value": value, "from": origin}
    _check_together(cfg)
    return cfg


def _check_together(cfg: Config) -> None:
    """Settings that contradict each other, or that this environment cannot run: stopped when the profile loads,
    before anything is loaded or run."""
    if cfg["serve.backend"] == "llamacpp" and not cfg["gguf.export"]:
        raise ValueError(f"profile {cfg.name}: serve.backend is llamacpp, which serves the GGUF notebook 04 exports, "
                         "but gguf.export is false, so 04 exports none: set gguf.export: true, or serve.backend: auto "
                         "(vLLM on a GPU, else transformers)")
    if cfg["serve.backend"] == "llamacpp":
        from . import steps  # the environment, not a setting: a series that cannot serve stops here, not in 05

        if why := steps.llama_cpp_missing():
            raise ValueError(f"profile {cfg.name}: serve.backend is llamacpp, but {why}; or serve.backend: auto "
                             "(vLLM on a GPU, else transformers)")


# --------------------------------------------------------------------------- manifest


def _git(root: Path) -> dict:
    def run(*args):
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)

    try:
        head = run("rev-parse", "HEAD")
        if head.returncode != 0:
            return {"commit": None}
        return {"commit": head.stdout.strip(), "dirty": bool(run("status", "--porcelain").stdout.strip())}
    except (OSError, subprocess.TimeoutExpired):
        return {"commit": None}


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _device() -> dict:
    import torch

    if torch.cuda.is_available():
        return {"device": "cuda", "name": torch.cuda.get_device_name(0), "count": torch.cuda.device_count()}
    return {"device": "cpu", "name": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}


def write_manifest(cfg: Config, notebook: str | None = None) -> Path:
    """Record how this run was made in ``outputs/<profile>/manifest.json``.

    Top level: the profile (file, its hash, the resolved settings and their hash, overrides),
    package versions, git commit, torch device, ``runtime`` (``models.runtime``: the device, whether it
    computes bf16 natively, the training precision, and ``model.dtype`` as set and as chosen on this
    machine: ``auto`` → float32 on a CPU without native bf16, bf16 → fp16 on a T4), time. ``notebooks`` keeps one entry per
    notebook that ran, so a mixed-up output folder shows which settings made what.
    """
    path = cfg.out / "manifest.json"
    old = {}
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            old = {}
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    manifest = {
        "profile": cfg.name,
        "profile_file": str(cfg.source.relative_to(cfg.root)),
        "profile_file_sha256": hashlib.sha256(cfg.source.read_bytes()).hexdigest(),
        "settings": cfg.values,
        "settings_sha256": cfg.sha256,
        "overrides": cfg.overrides,
        "base_model": cfg.base_model,
        "packages": _versions(),
        "git": _git(cfg.root),
        "torch_device": _device(),
        "runtime": models.runtime(cfg),
        "time": now,
        "notebooks": old.get("notebooks", {}),
    }
    if notebook:
        manifest["notebooks"][notebook] = {"time": now, "settings_sha256": cfg.sha256}
    return files.write_text(path, json.dumps(manifest, ensure_ascii=False, indent=2, default=str))


def banner(cfg: Config) -> None:
    """Say which profile runs: a red box on smoke (console text outside a notebook)."""
    lines = [f"profile: {cfg.name} ({cfg.source.relative_to(cfg.root)})", f"base model: {cfg.base_model}",
             f"MedQA: {cfg.path('data.medqa_dir')}", f"outputs: {cfg.out}"]
    lines += [f"override {k} = {v['value']!r} (from {v['from']})" for k, v in cfg.overrides.items()]
    text = "\n".join(([SMOKE_WARNING] if cfg.smoke else []) + lines)
    # a notebook kernel has imported IPython already; a script or a GPU machine without it never needs it
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    if shell is None or "IPKernelApp" not in shell.config:  # a console, not a notebook
        print(text, file=sys.stderr if cfg.smoke else sys.stdout)
        return
    from IPython.display import display

    body = "<br>".join(html.escape(line) for line in lines)
    warn = (f'<div style="border:3px solid #c00;background:#fee;padding:8px;font-weight:bold;margin-bottom:6px">'
            f"⚠ {html.escape(SMOKE_WARNING)}</div>") if cfg.smoke else ""
    display({"text/html": f"{warn}<div style='font-family:monospace'>{body}</div>", "text/plain": text}, raw=True)


def setup(profile: str | None = None, overrides: dict | None = None, notebook: str | None = None) -> Config:
    """What every notebook calls first: load the profile, build the smoke assets when the
    profile asks for them, write the manifest, and say which profile runs."""
    cfg = load(profile, overrides)
    if cfg.smoke:
        tiny.build_assets(cfg.path("assets_dir"), seed=int(cfg["seed"]))
    write_manifest(cfg, notebook)
    banner(cfg)
    return cfg
