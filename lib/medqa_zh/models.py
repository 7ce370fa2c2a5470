"""Load the base model, its tokenizer and LoRA adapters, with errors that say what to fix.

Training, merging and every evaluation load models through here, so a missing model, an adapter
trained on another base, or an unsupported precision fails the same clear way everywhere.
A model is named by a hub id (``Qwen/Qwen2.5-0.5B-Instruct``; downloads go to ``HF_ENDPOINT``, a
mirror, when it is set), a ModelScope id (``modelscope:Qwen/Qwen2.5-0.5B-Instruct``: downloaded once
into a local folder, see :func:`fetch`) or a local folder written by ``save_pretrained``; nothing is
downloaded unless the profile names a hub or ModelScope id.
"""
from __future__ import annotations

import gc
import hashlib
import json
import os
import re
import warnings
from pathlib import Path

from safetensors import safe_open

from . import runs, steps

# torch and the Hugging Face stack (transformers, peft, trl, datasets, sentence-transformers, vLLM) are
# imported inside the functions that use them, so importing this module stays fast.

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}
FINGERPRINT_FILE = "base_model.json"


class ModelNotFoundError(FileNotFoundError):
    """The base model (or an adapter) cannot be loaded; the message says which setting to fix."""


class AdapterMismatchError(ValueError):
    """A LoRA adapter was trained on a different base model than the one given."""


MODELSCOPE = "modelscope:"  # MEDQA_BASE_MODEL=modelscope:Qwen/Qwen2.5-0.5B-Instruct: from ModelScope, not the hub


def hub_endpoint() -> str:
    """Where Hugging Face downloads go: ``HF_ENDPOINT`` (a mirror, e.g. https://hf-mirror.com) or the hub."""
    return os.environ.get("HF_ENDPOINT") or "https://huggingface.co"


def how_to_get(name: str, variable: str = "MEDQA_BASE_MODEL") -> str:
    """The ways to get model ``name``: the hub (or a mirror), ModelScope, a local folder."""
    example = modelscope_id(name) or (name if "/" in name and is_hub_id(name) else "Qwen/Qwen2.5-0.5B-Instruct")
    local = "models/" + example.rsplit("/", 1)[-1]
    return (
        f"Fix, one of: (1) a hub id where {hub_endpoint()} can be reached, or a mirror of it: "
        f"`HF_ENDPOINT=https://hf-mirror.com {variable}={example}`; (2) ModelScope: `pip install modelscope`, then "
        f"`{variable}={MODELSCOPE}{example}` (downloaded once into {modelscope_dir(example)}); (3) a local folder "
        f"holding config.json, the *.safetensors weights and the tokenizer files, made with "
        f"`hf download {example} --local-dir {local}` (or `modelscope download --model {example} --local_dir {local}`) "
        f"where there is network: `{variable}={local} ./run_all.sh --profile cpu`."
    )


def modelscope_id(name) -> str | None:
    """``Qwen/Qwen2.5-0.5B-Instruct`` for ``modelscope:Qwen/Qwen2.5-0.5B-Instruct``; None for anything else.
    An id that is not ``owner/name`` is an error."""
    text = str(name)
    if not text.startswith(MODELSCOPE):
        return None
    model_id = text[len(MODELSCOPE):]
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", model_id):
        raise ValueError(f"{text!r}: a ModelScope id is {MODELSCOPE}owner/name, e.g. {MODELSCOPE}Qwen/Qwen2.5-0.5B-Instruct")
    return model_id


def modelscope_dir(model_id: str) -> Path:
    """The local folder a ModelScope model is downloaded into once: ``$MEDQA_MODELSCOPE_CACHE`` (default
    ``~/.cache/medqa-zh/modelscope``) ``/<owner>/<name>``."""
    root = os.environ.get("MEDQA_MODELSCOPE_CACHE") or Path.home() / ".cache" / "medqa-zh" / "modelscope"
    return Path(root).expanduser() / model_id


def fetch(name, setting: str = "model.base", variable: str = "MEDQA_BASE_MODEL", download: bool = True) -> str:
    """``name`` as ``from_pretrained`` takes it: a hub id or a folder as it is; a ModelScope id
    (``modelscope:owner/name``) becomes its local folder, downloaded the first time with the
    ``modelscope`` package (the folder appears only once the download is whole; a folder already
    there is used with no network call). ``download=False``: an error instead of a download."""
    model_id = modelscope_id(name)
    if model_id is None:
        return str(name)
    folder = modelscope_dir(model_id)
    if folder.is_dir():
        return str(folder)
    if not download:
        raise ModelNotFoundError(f"{setting} = {name!r} is not downloaded yet (no {folder})")
    try:
        from modelscope import snapshot_download
    except ImportError:
        raise ModelNotFoundError(
            f"{setting} = {name!r} needs the modelscope package, which is not installed: "
            f"`pip install modelscope` (or `pip install -e '.[modelscope]'`). {how_to_get(model_id, variable)}"
        ) from None
    partial = folder.with_name(folder.name + ".partial")
    print(f"downloading {model_id} from ModelScope into {folder} (once)")
    try:
        snapshot_download(model_id, local_dir=str(partial))
    except Exception as e:  # no network, no such model, a broken download
        raise ModelNotFoundError(
            f"cannot download {model_id!r} from ModelScope ({setting} = {name!r}): {type(e).__name__}: {e}. "
            f"{how_to_get(model_id, variable)}"
        ) from None
    partial.rename(folder)  # whole now: from here on the folder is the model
    return str(folder)


# a first folder that makes ``x/y`` a path even where it does not exist: the folders this project writes and
# reads models from (the README's ``models/<name>``), which the hub keeps as reserved names anyway
LOCAL_PREFIXES = ("models", "outputs", "data")


def is_hub_id(name, root: str | Path | None = None) -> bool:
    """The one rule for "hub id or local folder" (the profile's settings, model loading and the server).

    A hub id is ``owner/name`` (or a bare ``name``) of letters, digits, ``_ . -``. Everything else is a
    path, whether or not it exists: a value that starts with ``/ . ~``, has more than one ``/``, exists
    relative to ``root`` (default: the working directory), or starts with ``models/``, ``outputs/``,
    ``data/`` or a folder that exists here. So ``models/Qwen2.5-0.5B-Instruct`` that is not there yet
    gets "no such folder", not a hub error.
    """
    text = str(name)
    base = Path(root) if root is not None else Path.cwd()
    if text.startswith(("/", ".", "~")) or text.count("/") > 1 or (base / text).exists():
        return False
    first = text.split("/", 1)[0]
    if "/" in text and (first in LOCAL_PREFIXES or (base / first).is_dir()):
        return False
    return re.fullmatch(r"[\w.-]+(/[\w.-]+)?", text) is not None


def _tried(name: str) -> str:
    """Where a hub id was looked for: the hub, or the mirror HF_ENDPOINT names."""
    return f" (source tried: {hub_endpoint()})" if is_hub_id(name) else ""


def _fix(name: str, setting: str) -> str:
    if "model.base" in setting or "MEDQA_BASE_MODEL" in setting:
        return how_to_get(name)
    if "rag.embedder" in setting or "MEDQA_EMBEDDER" in setting:
        return how_to_get(name, "MEDQA_EMBEDDER")
    return "Fix: run the notebook that writes this folder, or point to one that holds a model saved with save_pretrained."


def _check_source(name: str, setting: str, needs: str = "config.json", download: bool = True) -> str:
    """``name`` as from_pretrained takes it (:func:`fetch`), after checking a local folder holds ``needs``."""
    name = fetch(name, setting, download=download)
    if not is_hub_id(name):
        path = Path(name).expanduser()
        if not path.is_dir():
            raise ModelNotFoundError(f"{setting} = {name!r}: no such folder. {_fix(name, setting)}")
        if not (path / needs).is_file():
            raise ModelNotFoundError(
                f"{setting} = {name!r}: this folder has no {needs}, so it is not a model or tokenizer saved with "
                f"save_pretrained. {_fix(name, setting)}"
            )
    return name


def torch_dtype(name: str):
    """The torch dtype named ``name`` (float32 / bfloat16 / float16, or fp32 / bf16 / fp16);
    ``auto`` stays ``auto``: transformers then keeps the dtype the weights were saved in."""
    import torch

    if name == "auto":
        return "auto"
    try:
        return getattr(torch, DTYPES[str(name)])
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(sorted(set(DTYPES.values())))}") from None


def load_tokenizer(name: str, setting: str = "model.base", local_only: bool = False):
    """The model's own tokenizer (and with it its chat template), with a pad token set.
    ``local_only``: never download (a hub id must already be in the local cache)."""
    from transformers import AutoTokenizer

    name = _check_source(name, setting, needs="tokenizer_config.json", download=not local_only)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=local_only)
    except (OSError, ValueError) as e:
        raise ModelNotFoundError(f"cannot load the tokenizer of {setting} = {name!r}{_tried(name)}: {e}\n"
                                 f"{_fix(name, setting)}") from None
    if tokenizer.chat_template is None:
        raise ValueError(f"{setting} = {name!r} has no chat template; use an instruction-tuned (chat) model")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def chat_template_preview(name: str, messages: list[dict], setting: str = "model.base") -> str:
    """The text the model reads for ``messages`` (its chat template applied), from a tokenizer already
    on this machine; when there is none, a note saying why instead of an error (notebook 01 needs no model)."""
    try:
        tokenizer = load_tokenizer(name, setting, local_only=True)
    except (ModelNotFoundError, ValueError) as e:
        return f"(no preview of the chat template: {str(e).splitlines()[0]})"
    return tokenizer.apply_chat_template(messages, tokenize=False)


def load_model(name: str, dtype: str = "float32", setting: str = "model.base", device: str | None = None,
               attn_implementation: str | None = None):
    """A causal LM in ``dtype`` (float32 / bfloat16 / float16), in eval mode, on ``device`` (default CPU), with
    transformers' attention kernel ``attn_implementation`` (None: its default, sdpa)."""
    from transformers import AutoModelForCausalLM

    name = _check_source(name, setting)
    kernel = {"attn_implementation": attn_implementation} if attn_implementation else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype(dtype), **kernel)
    except (OSError, ValueError) as e:
        raise ModelNotFoundError(f"cannot load the model {setting} = {name!r}{_tried(name)}: {e}\n{_fix(name, setting)}") from None
    if device:
        model.to(device)
    return model.eval()


def setting_origin(cfg) -> str:
    """Where ``model.base`` came from, for error messages: the profile file or an override."""
    override = cfg.overrides.get("model.base")
    if override is None:
        return f"model.base from {cfg.source.name}"
    return "MEDQA_BASE_MODEL" if override["from"] == "environment" else f"model.base from the {override['from']}"


# --------------------------------------------------------------------------- adapters


def fingerprint(model) -> str:
    """A short hash of the first rows of the input embedding, rounded to bfloat16.

    Two checkpoints of the same architecture (Qwen2.5-0.5B-Instruct and Qwen2.5-Coder-0.5B-Instruct,
    say) have identical shapes, so an adapter loads onto either without complaint; their
    embeddings differ. The bfloat16 rounding makes the hash the same whether the base was loaded
    in float32 or bfloat16.
    """
    import torch

    rows = model.get_input_embeddings().weight[:16].detach().to("cpu", torch.bfloat16).float()
    return hashlib.sha256(rows.numpy().tobytes()).hexdigest()[:16]


def write_fingerprint(model, name: str, out_dir: str | Path) -> Path:
    """Record which base a run trained on next to its adapter or checkpoint (``model``: the base, or
    its :func:`fingerprint` taken before training)."""
    path = Path(out_dir) / FINGERPRINT_FILE
    value = model if isinstance(model, str) else fingerprint(model)
    path.write_text(json.dumps({"base_model": name, "fingerprint": value}, indent=2), encoding="utf-8")
    return path


def check_adapter(adapter_dir: str | Path, base, base_name: str) -> dict:
    """Fail with :class:`AdapterMismatchError` unless the adapter in ``adapter_dir`` fits ``base``.

    Checks, in order: the adapter files exist; every module the adapter's weights address exists
    in the base with matching shapes; and, when the training run recorded it, the base's
    fingerprint. Returns the adapter's ``adapter_config.json``.
    """
    adapter_dir = Path(adapter_dir)
    config_path, weights = adapter_dir / runs.ADAPTER_CONFIG, adapter_dir / runs.ADAPTER_WEIGHTS
    if not config_path.is_file() or not weights.is_file():
        raise ModelNotFoundError(
            f"{adapter_dir} holds no LoRA adapter (adapter_config.json and adapter_model.safetensors); "
            "run notebook 02_lora_sft first, or point to the folder it wrote"
        )
    adapter_config = json.loads(config_path.read_text(encoding="utf-8"))
    fix = (f"Fix: load the adapter onto the base it was trained on "
           f"({adapter_config.get('base_model_name_or_path')!r} when it was trained), or retrain it on {base_name!r}.")
    modules = dict(base.named_modules())
    with safe_open(weights, framework="pt") as f:
        for key in f.keys():
            # base_model.model.<module path>.lora_A.weight -> <module path>
            if ".lora_A." not in key and ".lora_B." not in key:
                continue
            module_path = key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
            module = modules.get(module_path)
            if module is None:
                raise AdapterMismatchError(
                    f"adapter {adapter_dir} addresses module {module_path!r}, which the base {base_name!r} does not "
                    f"have. {fix}"
                )
            shape = tuple(f.get_slice(key).get_shape())
            expected = module.in_features if ".lora_A." in key else module.out_features
            got = shape[1] if ".lora_A." in key else shape[0]
            if got != expected:
                raise AdapterMismatchError(
                    f"adapter {adapter_dir}: {key} has shape {shape}, but {module_path} of the base {base_name!r} "
                    f"has {module.in_features} inputs and {module.out_features} outputs. {fix}"
                )
    recorded_path = adapter_dir / FINGERPRINT_FILE
    if recorded_path.is_file():
        recorded = json.loads(recorded_path.read_text(encoding="utf-8"))
        if recorded["fingerprint"] != fingerprint(base):
            raise AdapterMismatchError(
                f"adapter {adapter_dir} was trained on {recorded['base_model']!r}, whose weights differ from the base "
                f"given now ({base_name!r}): same shapes, different model. {fix}"
            )
    return adapter_config


def load_adapter(base, adapter_dir: str | Path, base_name: str):
    """``base`` with the LoRA adapter of ``adapter_dir`` on top (not merged), after :func:`check_adapter`."""
    from peft import PeftModel

    check_adapter(adapter_dir, base, base_name)
    with warnings.catch_warnings():  # peft asks the model a property transformers 5 renamed: noise, not a fault
        warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*deprecated", category=FutureWarning)
        return PeftModel.from_pretrained(base, str(adapter_dir)).eval()


# --------------------------------------------------------------------------- device and precision
#
# One place decides where models run and in which precision, so that training, in-process
# evaluation, the chat demo, the embedder and the server agree, and the manifest can say what was
# chosen (:func:`runtime`).

DEVICES = ("auto", "cpu", "cuda")  # one GPU of several: CUDA_VISIBLE_DEVICES=1
BF16_CAPABILITY = (8, 0)  # Ampere: A10, A100, L4, H100, RTX 30xx/40xx. Below it (T4, V100) bf16 is emulated.


def best_device(requested: str = "auto") -> str:
    """Where models run (profile ``model.device``): ``auto`` is ``cuda`` when PyTorch sees a GPU,
    else ``cpu``. Always one device: ``cuda`` is the first visible GPU (choose another with
    ``CUDA_VISIBLE_DEVICES``); training on several GPUs is a launched path."""
    import torch

    requested = str(requested or "auto")
    if requested not in DEVICES:
        raise ValueError(f"model.device must be auto, cpu or cuda, not {requested!r} "
                         "(to use another GPU than the first, set CUDA_VISIBLE_DEVICES)")
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"model.device = {requested!r} but PyTorch sees no GPU (torch {torch.__version__}, "
                           f"built for CUDA {torch.version.cuda}). Fix: set model.device to auto or cpu, or see "
                           "docs/gpu.md, Running on a GPU (driver and torch build)")
    return requested


def cuda_bf16_native(device: str = "cuda") -> bool:
    """True when the GPU computes bfloat16 in hardware (compute capability 8.0 or newer).

    ``torch.cuda.is_bf16_supported()`` also says True for emulated bf16 on a T4 or V100, which is
    slow, and vLLM refuses bf16 there; the capability is what matters.
    """
    import torch

    if not torch.cuda.is_available():
        return False
    return tuple(torch.cuda.get_device_capability(torch.device(device))) >= BF16_CAPABILITY


def cpu_supports_bf16() -> bool:
    """True when this CPU has native bfloat16 math (AVX-512 BF16 or AMX), where bf16 is faster than fp32."""
    import torch

    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def bf16_native(device: str) -> bool:
    """True when ``device`` computes bfloat16 in hardware: a GPU of compute capability 8.0+
    (:func:`cuda_bf16_native`) or a CPU with AVX-512 BF16 or AMX (:func:`cpu_supports_bf16`). The one
    test behind both ``auto`` settings, ``model.dtype`` (:func:`inference_dtype`) and ``train.precision``
    (:func:`training_precision`)."""
    return cuda_bf16_native(device) if device.startswith("cuda") else cpu_supports_bf16()


def inference_dtype(requested: str, device: str) -> str:
    """The dtype to load or serve a model in for ``model.dtype`` on ``device``, always a concrete one.

    ``auto``: bfloat16 where ``device`` computes it natively (:func:`bf16_native`), else float16 on a
    GPU (T4, V100) and float32 on a CPU (emulated bf16 there is several times slower than float32:
    docs/results-cpu.md). An explicit dtype is taken as given, except that bfloat16 becomes float16
    on a GPU without native bf16, where vLLM refuses bfloat16 and PyTorch would emulate it
    (:func:`dtype_line` says what was chosen and why)."""
    name = str(requested)
    if name == "auto":
        if bf16_native(device):
            return "bfloat16"
        return "float16" if device.startswith("cuda") else "float32"
    name = DTYPES.get(name)
    if name is None:
        raise ValueError(f"unknown dtype {requested!r}; use one of {', '.join(sorted(set(DTYPES.values())))} or auto")
    if name == "bfloat16" and device.startswith("cuda") and not cuda_bf16_native(device):
        return "float16"
    return name


def emulated_bf16(requested: str, device: str) -> bool:
    """True when ``model.dtype = requested`` computes in bfloat16 on a CPU without native bf16 (only an
    explicit bfloat16 does: ``auto`` picks float32 there), which PyTorch emulates, several times slower."""
    return (inference_dtype(requested, device) == "bfloat16" and not device.startswith("cuda")
            and not cpu_supports_bf16())


def dtype_line(requested: str, device: str) -> str:
    """One line saying which dtype ``model.dtype = requested`` gives on ``device``, and why: what the
    evaluation notebooks print. For an explicit bfloat16 on a CPU without native bf16 (taken as given)
    it says that this will be slow, and where the measurement is."""
    chosen = inference_dtype(requested, device)
    gpu = device.startswith("cuda")
    native = bf16_native(device)
    why = (("this GPU computes bf16 natively (compute capability 8.0+)" if native else
            "this GPU has no native bf16 (compute capability below 8.0)") if gpu else
           ("this CPU has native bf16 (AVX-512 BF16 or AMX)" if native else
            "this CPU has no native bf16 (no AVX-512 BF16/AMX)"))
    if str(requested) == "auto":
        return f"model.dtype auto → {chosen} ({why})"
    if chosen != DTYPES[str(requested)]:
        return f"model.dtype {requested} → {chosen} ({why})"
    if emulated_bf16(chosen, device):
        return ("model.dtype bfloat16 on a CPU without native bf16 (no AVX-512 BF16/AMX): taken as given, but "
                "PyTorch emulates bf16 here and letter scoring runs several times slower than in float32 "
                "(measured: docs/results-cpu.md); model.dtype: auto picks float32 on this CPU")
    return f"model.dtype {chosen} (as set)"


def training_precision(requested: str = "auto", device: str | None = None) -> str:
    """``bf16``, ``fp16`` or ``fp32`` for training on ``device`` (default: :func:`best_device`).

    ``auto``: bf16 on a GPU with native bf16 (compute capability 8.0+); fp16 mixed precision on an
    older GPU (T4, V100: bf16 would only be emulated there); on a CPU bf16 where it is native
    (AVX-512 BF16 or AMX), else fp32. An explicit ``bf16`` or ``fp32`` is taken as given; ``fp16``
    needs a GPU.
    """
    if requested not in ("auto", "bf16", "fp16", "fp32"):
        raise ValueError(f"train.precision must be auto, bf16, fp16 or fp32, not {requested!r}")
    device = device or best_device()
    if requested == "fp16" and not device.startswith("cuda"):
        raise ValueError("train.precision = fp16 needs a CUDA GPU (mixed precision with a loss scaler); "
                         "on a CPU use auto, bf16 or fp32")
    if requested != "auto":
        return requested
    if bf16_native(device):
        return "bf16"
    return "fp16" if device.startswith("cuda") else "fp32"


def runtime(cfg) -> dict:
    """What this machine makes of the profile: the device, whether it computes bf16 natively, the
    training precision and the dtype models are evaluated and served in (recorded in the manifest:
    ``model_dtype`` is the setting, ``auto`` included, ``eval_dtype`` what it resolved to)."""
    import torch

    device = best_device(cfg["model.device"])
    out = {"device": device, "model_dtype": cfg["model.dtype"],
           "eval_dtype": inference_dtype(cfg["model.dtype"], device), "bf16_native": bf16_native(device)}
    try:
        out["train_precision"] = training_precision(cfg["train.precision"], device)
    except ValueError as e:  # fp16 on a CPU: training says so when it starts; other notebooks run
        out["train_precision"] = f"not possible here: {e}"
    if device.startswith("cuda"):
        major, minor = torch.cuda.get_device_capability(torch.device(device))
        out.update(gpu=torch.cuda.get_device_name(torch.device(device)), compute_capability=f"{major}.{minor}")
    return out


def free_memory() -> None:
    """Collect garbage and give PyTorch's cached GPU memory back to the driver, so that the next
    step (another model, or a vLLM server in its own process) finds it free. Drop your own
    references first (``del run``, ``del model``): memory still referenced cannot be freed."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- the models of a run

NAMES = ("base", "lora", "full", "merged", "grpo")  # the models a run can have, in the order the series makes them
WEIGHTS = {"lora": runs.ADAPTER_WEIGHTS, "full": runs.MODEL_WEIGHTS, "merged": runs.MODEL_WEIGHTS,
           "grpo": runs.MODEL_WEIGHTS}


def folder(cfg, name: str) -> Path:
    """Where the run keeps a trained model: ``outputs/<profile>/models/<name>/`` (lora: 02, full: 03,
    merged: 04; the training log, checkpoints and ``run.json`` beside the weights)."""
    return cfg.out / "models" / name


def available(cfg) -> dict[str, str]:
    """The models this profile's run has so far: the base (always) and whichever of the LoRA
    adapter (02), the full SFT model (03), the merged model (04) and the GRPO model (04b) exist. name -> location.
    A model whose step the profile turns off (``grpo`` with ``grpo.max_steps: 0``, :func:`steps.off`) is left out
    though its folder is there: an earlier run trained it, and it is kept (training is expensive), not this run's."""
    found = {"base": cfg.base_model}
    for name, weights in WEIGHTS.items():
        if name in steps.STEPS and steps.off(cfg, name):
            continue
        if (folder(cfg, name) / weights).is_file():
            found[name] = str(folder(cfg, name))
    return found


def eval_device(cfg) -> str:
    """Where in-process evaluation runs: the profile's ``model.device`` (``auto``: the GPU when there is one)."""
    return best_device(cfg["model.device"])


def eval_dtype(cfg) -> str:
    """The profile's ``model.dtype`` as this machine runs it (:func:`inference_dtype`: ``auto`` resolved,
    bfloat16 becomes float16 on a T4 or V100): what models are loaded in, and what
    :func:`answers_fingerprint` keys cached answers by."""
    return inference_dtype(cfg["model.dtype"], eval_device(cfg))


def load_for_eval(cfg, name: str):
    """(model, tokenizer) for one of :func:`available`, on :func:`eval_device` in
    :func:`eval_dtype`; the LoRA adapter runs unmerged on top of the base, as peft serves it."""
    where = available(cfg)
    if name not in where:
        raise FileNotFoundError(f"no {name!r} model in {cfg.out / 'models'}: run the notebook that trains it first "
                                f"(available: {', '.join(where)})")
    dtype, device = eval_dtype(cfg), eval_device(cfg)
    origin = setting_origin(cfg)
    if name == "base":
        return (load_model(cfg.base_model, dtype, setting=origin, device=device),
                load_tokenizer(cfg.base_model, setting=origin))
    if name == "lora":
        base = load_model(cfg.base_model, dtype, setting=origin, device=device)
        return load_adapter(base, where["lora"], cfg.base_model), load_tokenizer(where["lora"], name)
    return (load_model(where[name], dtype, setting=name, device=device),
            load_tokenizer(where[name], setting=name))


def answers_fingerprint(cfg, name: str, folder: str | Path | None = None) -> str:
    """A hash of what a model's answers depend on: its weight files (or the base's name), the
    dtype; results cached under it are never reused for a retrained model. ``folder``: another
    folder of weights for ``name`` (a training checkpoint)."""
    h = hashlib.sha256(f"{name}|{eval_dtype(cfg)}|{cfg.base_model}".encode())
    folder = Path(folder or available(cfg)[name])
    if folder.is_dir():
        for path in sorted(folder.glob("*.safetensors")):
            with open(path, "rb") as f:
                for block in iter(lambda f=f: f.read(1 << 24), b""):
                    h.update(block)
    return h.hexdigest()[:12]
