"""GGUF export: a model folder as llama.cpp files (f16, q8_0, Q4_K_M) for llama.cpp, Ollama and LM Studio,
made with llama.cpp's own converter and quantizer, and the checks that a file answers like its model.

Where the tools come from, all through PyPI (the ``gguf`` extra; ``./run_all.sh`` installs it):

* the **quantizer and the runtime**: ``llama-cpp-python`` (pinned in ``pyproject.toml``), built from its
  source distribution with cmake and a C++ compiler; its ``llama_model_quantize`` is llama.cpp's own;
* the **converter**: llama.cpp's ``convert_hf_to_gguf.py`` with its ``conversion`` package and ``gguf-py``,
  taken from the same source distribution (``python -m medqa_zh.export install-tools``, run once by
  ``./run_all.sh`` after the install) into ``<environment>/share/medqa-llama.cpp/``. The converter and the
  runtime are therefore the same llama.cpp commit.

The checks (notebook 04):

* :func:`template_check`: the chat template embedded in the GGUF, rendered the way llama-cpp-python's server
  renders it and tokenized by the GGUF's own tokenizer, gives the same token ids as ``prompts`` with the
  Hugging Face tokenizer (system prompt included) — the usual cause of "my GGUF answers differently";
* :func:`letter_scores`: letter log-probabilities read from a GGUF, row for row as
  ``evaluate.letter_scores`` reads them from the model, so a file can be compared to the model it came from
  and evaluated like any model (plain and debiased);
* :func:`check_file`: a GGUF whose tensors do not all lie inside the file (a half-written or truncated file)
  is refused by name, so it is never taken for a model. Files are written under a temporary name and
  renamed when complete (``files.replacing``).
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import shlex
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from . import debias, evaluate, files, models, prompts, serve_child, steps

# torch and the Hugging Face stack (transformers, peft, trl, datasets, sentence-transformers, vLLM) are
# imported inside the functions that use them, so importing this module stays fast; so is llama_cpp.

TOOLS_DIR = Path(sys.prefix) / "share" / "medqa-llama.cpp"   # install_tools puts the converter here
CONVERTER = "convert_hf_to_gguf.py"
TOOLS = (CONVERTER, "conversion", "gguf-py", "LICENSE")       # what install_tools takes from the sdist
# the files 04 writes, in order: f16 is converted from the model, the others are quantized from f16
QUANTIZATIONS = ("f16", "q8_0", "Q4_K_M")
_FTYPES = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}
GGUF_MAGIC = b"GGUF"
# Qwen2.5's pre-tokenizer, as its tokenizer.json writes it: llama.cpp's "qwen2" pre-tokenizer is this split
QWEN2_PRE_TOKENIZER = {
    "type": "Sequence",
    "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"},
         "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
    ],
}
EXTRA = f"{steps.LLAMA_CPP_INSTALL} (./run_all.sh does both)"


class ExportError(RuntimeError):
    """The tools are missing, the converter or quantizer failed, or a GGUF file is not whole."""


def llama_cpp_version() -> str:
    """The installed llama-cpp-python's version; an error naming the fix when it is not installed."""
    if why := steps.llama_cpp_missing():
        raise ExportError(why)
    try:
        return importlib.metadata.version("llama_cpp_python")
    except importlib.metadata.PackageNotFoundError:
        raise ExportError(f"llama-cpp-python is not installed in this environment ({sys.executable}): {EXTRA}") from None


def tools_dir(root: Path = TOOLS_DIR) -> Path:
    """The folder with llama.cpp's converter, checked to be from the installed llama-cpp-python's release."""
    version = llama_cpp_version()
    stamp = root / "VERSION"
    if not stamp.is_file():
        raise ExportError(f"llama.cpp's converter is not installed at {root}: run python -m medqa_zh.export install-tools "
                          "(./run_all.sh does it)")
    if stamp.read_text().strip() != version:
        raise ExportError(f"the converter at {root} is from llama-cpp-python {stamp.read_text().strip()}, the installed "
                          f"runtime is {version}: run python -m medqa_zh.export install-tools again")
    return root


def install_tools(root: Path = TOOLS_DIR, sdist: str | Path | None = None) -> Path:
    """Put llama.cpp's converter (``convert_hf_to_gguf.py``, ``conversion/``, ``gguf-py/``) from the installed
    llama-cpp-python's source distribution into ``root``: the given ``sdist`` file, else downloaded from
    the package index with pip (the file pip built the installed package from, 77 MB)."""
    version = llama_cpp_version()
    with tempfile.TemporaryDirectory(prefix="medqa-llama-sdist-") as tmp:
        if sdist is None:
            cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                   f"llama-cpp-python=={version}", "-d", tmp]
            done = subprocess.run(cmd, capture_output=True, text=True)
            found = sorted(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
            if done.returncode or not found:
                raise ExportError(f"could not download llama-cpp-python {version}'s source ({' '.join(cmd)}):\n"
                                  f"{done.stderr[-2000:]}")
            sdist = found[0]
        prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
        with tarfile.open(sdist) as tar, files.replacing(root) as out:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)
                       and m.name[len(prefix):].split("/")[0] in TOOLS and (m.isfile() or m.isdir())]
            if not any(m.name == prefix + CONVERTER for m in members):
                raise ExportError(f"{sdist} has no {prefix + CONVERTER}: is it llama-cpp-python {version}'s sdist?")
            out.mkdir()
            for m in members:
                m.name = m.name[len(prefix):]
                tar.extract(m, out, filter="data")
            (out / "VERSION").write_text(version + "\n")
    return root


# --------------------------------------------------------------------------- making the files


def gguf_path(folder: str | Path, name: str, quantization: str) -> Path:
    """Where a model's GGUF lives: ``<folder>/<name>-<quantization>.gguf`` (``models/gguf/merged-q8_0.gguf``)."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r}: choose from {', '.join(QUANTIZATIONS)}")
    return Path(folder) / f"{name}-{quantization}.gguf"


def folder(cfg) -> Path:
    """Where a run keeps its GGUF files and Modelfiles: ``outputs/<profile>/models/gguf/``."""
    return cfg.out / "models" / "gguf"


def source_folder(location: str) -> Path:
    """A model's local folder for the converter: the folder itself, or a hub id's snapshot in the Hugging Face
    cache (fetched through ``HF_ENDPOINT`` if it is not there yet, as loading the model would)."""
    if Path(location).expanduser().is_dir():
        return Path(location).expanduser()
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(location))


def export_models(cfg, progress: bool = True):
    """Every model of ``gguf.models`` that the run has, as each of ``gguf.quantizations`` (f16 converted from the
    weights, the others quantized from it), each with an Ollama Modelfile beside it; the converter's and
    quantizer's output go to ``logs/``. A file whose stamp (``<file>.json``: the model's fingerprint, llama.cpp's
    version) matches is kept, so a rerun redoes only what changed. Returns a table: model, quantization, file,
    MiB, bits per weight, whether it was made now (else kept), seconds."""
    columns = ["model", "quantization", "file", "MiB", "bits per weight", "made now", "seconds"]
    if not cfg["gguf.export"]:
        print("gguf.export is false: no GGUF files are made (serve.backend llamacpp needs them)")
        return pd.DataFrame(columns=columns)
    if why := steps.llama_cpp_missing():
        print(f"no GGUF files are made: {why}")
        return pd.DataFrame(columns=columns)
    quantizations = list(cfg["gguf.quantizations"])
    if quantizations[:1] != ["f16"] or not set(quantizations) <= set(QUANTIZATIONS):
        raise ValueError(f"gguf.quantizations must start with f16 (the others are made from it) and hold only "
                         f"{', '.join(QUANTIZATIONS)}, not {quantizations}")
    out_dir, logs = folder(cfg), cfg.out / "logs"
    have = models.available(cfg)
    wanted = [name for name in cfg["gguf.models"] if name in have]
    rows = []
    for name in tqdm(wanted, desc="GGUF export", unit="model", disable=not progress):
        stamp = {"model": name, "fingerprint": models.answers_fingerprint(cfg, name), "llama_cpp": llama_cpp_version()}
        parameters = None
        for quantization in quantizations:
            path = gguf_path(out_dir, name, quantization)
            t0, made = time.perf_counter(), not _current(path, stamp)
            if made:
                log = logs / f"gguf-{name}-{quantization}.log"
                if quantization == "f16":
                    convert(source_folder(have[name]), path, "f16", log=log)
                else:
                    quantize(gguf_path(out_dir, name, "f16"), path, quantization, log=log)
                files.write_text(path.with_name(path.name + ".json"), json.dumps(stamp, indent=1))
            info = check_file(path)
            parameters = parameters or _parameters(path)
            files.write_text(path.with_suffix(".Modelfile"), modelfile(path.name, num_ctx=cfg["gguf.n_ctx"]))
            rows.append({"model": name, "quantization": quantization, "file": path.name,
                         "MiB": round(info["bytes"] / 2**20, 1), "bits per weight": round(8 * info["bytes"] / parameters, 2),
                         "made now": made, "seconds": round(time.perf_counter() - t0, 1)})
    return pd.DataFrame(rows)


def _current(path: Path, stamp: dict) -> bool:
    """Whether ``path`` is a whole GGUF made from the model and llama.cpp ``stamp`` names."""
    side = path.with_name(path.name + ".json")
    if not (path.is_file() and side.is_file()) or json.loads(side.read_text(encoding="utf-8")) != stamp:
        return False
    try:
        check_file(path)
    except ExportError:
        return False
    return True


def _parameters(path: Path) -> int:
    """The number of weights in a GGUF (the product of every tensor's shape)."""
    _gguf_on_path()
    from gguf import GGUFReader

    return sum(int(t.n_elements) for t in GGUFReader(path).tensors)


def convert(model_dir: str | Path, out: str | Path, outtype: str = "f16", log=None) -> Path:
    """``model_dir`` (a ``save_pretrained`` folder) as a GGUF at ``out``, with llama.cpp's converter run in a
    child process (its output goes to ``log``, a path, and its tail into the error when it fails). A model
    whose tokenizer uses exactly Qwen2.5's pre-tokenizer but whose vocabulary llama.cpp does not know by its
    hash (a fine-tune with a new vocabulary, the smoke profile's tiny model) is declared ``qwen2``:
    :func:`template_check` then proves the token ids agree."""
    out = Path(out)
    with files.replacing(out) as tmp:
        _child(["_convert", str(model_dir), str(tmp), outtype], log, f"llama.cpp's converter failed on {model_dir}")
        check_file(tmp)
    return out


def _child(args: list[str], log, failure: str) -> None:
    """``python -m medqa_zh.export <args>`` in a child process; its output to ``log`` (a path, or None), and an
    :class:`ExportError` starting with ``failure`` and ending with the output's tail when it fails."""
    cmd = [sys.executable, "-m", "medqa_zh.export", *args]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if log is not None:
        files.write_text(log, f"$ {' '.join(cmd)}\n{done.stdout}{done.stderr}")
    if done.returncode:
        raise ExportError(f"{failure} (exit {done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")


def _convert_main(model_dir: str, out: str, outtype: str) -> None:
    """In the child: llama.cpp's converter, with the Qwen2 pre-tokenizer declared where it applies."""
    root = tools_dir()
    sys.path[:0] = [str(root), str(root / "gguf-py")]
    import convert_hf_to_gguf
    from conversion import base

    recognise = base.TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer):
        try:
            return recognise(self, tokenizer)
        except NotImplementedError:
            if qwen2_pre_tokenizer(model_dir):
                print("medqa_zh.export: the tokenizer's pre-tokenizer is exactly Qwen2.5's: declared qwen2")
                return "qwen2"
            raise

    base.TextModel.get_vocab_base_pre = get_vocab_base_pre
    sys.argv = converter_argv(model_dir, out, outtype)
    print(f"medqa_zh.export: {call_text(model_dir, out, outtype)}", flush=True)
    convert_hf_to_gguf.main()


def converter_argv(model_dir: str | Path, out: str | Path, outtype: str = "f16") -> list[str]:
    """llama.cpp's converter's command line as :func:`convert` runs it (the child's ``sys.argv`` for
    ``convert_hf_to_gguf.main``): ``convert_hf_to_gguf.py <model_dir> --outfile <out> --outtype <outtype>``."""
    return [CONVERTER, str(model_dir), "--outfile", str(out), "--outtype", outtype]


def quantize_params(quantization: str) -> dict:
    """What :func:`quantize` sets on llama.cpp's default quantize parameters: ``ftype``, the file type (the name of a
    ``llama_cpp`` constant), and ``nthread`` (0: every core)."""
    if quantization not in _FTYPES:
        raise ValueError(f"quantize makes {', '.join(_FTYPES)}, not {quantization!r} (f16 comes from convert)")
    return {"ftype": _FTYPES[quantization], "nthread": 0}


def call_text(source: str | Path, out: str | Path, quantization: str) -> str:
    """What makes the GGUF ``out``, as one line: for ``f16`` (or another converter outtype) the converter's command
    line on the model folder ``source`` (:func:`converter_argv`); for a quantization, llama.cpp's
    ``llama_model_quantize`` called through llama-cpp-python on the f16 GGUF ``source`` with
    :func:`quantize_params` (what llama.cpp's ``llama-quantize <source> <out> <type>`` does). The child process
    prints it into its log; the file is written as ``<out>.tmp`` and renamed when whole."""
    if quantization not in _FTYPES:
        return "python " + shlex.join(converter_argv(source, out, quantization))
    fields = ", ".join(f"{k}=llama_cpp.{v}" if k == "ftype" else f"{k}={v}" for k, v in quantize_params(quantization).items())
    return (f"llama_cpp.llama_model_quantize({str(source)!r}, {str(out)!r}, params)  "
            f"# params: llama_model_quantize_default_params() with {fields}")


def qwen2_pre_tokenizer(model_dir: str | Path) -> bool:
    """Whether the folder's ``tokenizer.json`` splits text exactly as Qwen2.5's does (and normalizes at most
    with NFC, which Qwen2.5's also does), so llama.cpp's ``qwen2`` pre-tokenizer is the right one."""
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        return False
    spec = json.loads(path.read_text(encoding="utf-8"))
    normalizer = spec.get("normalizer")
    return spec.get("pre_tokenizer") == QWEN2_PRE_TOKENIZER and (normalizer is None or normalizer == {"type": "NFC"})


def quantize(source: str | Path, out: str | Path, quantization: str, log=None) -> Path:
    """``source`` (an f16 GGUF) quantized to ``quantization`` (``q8_0``, ``Q4_K_M``) with llama.cpp's quantizer,
    in a child process (its report of every tensor goes to ``log``, a path, and its tail into the error)."""
    quantize_params(quantization)  # an unknown quantization is refused here, before the child starts
    check_file(source)
    out = Path(out)
    with files.replacing(out) as tmp:
        _child(["_quantize", str(source), str(tmp), quantization], log,
               f"llama.cpp's quantizer failed on {source} -> {quantization}")
        check_file(tmp)  # also: no file at all
    return out


def _quantize_main(source: str, out: str, quantization: str) -> None:
    """In the child: llama.cpp's ``llama_model_quantize`` with :func:`quantize_params` (all cores)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    for key, value in quantize_params(quantization).items():
        setattr(params, key, getattr(llama_cpp, value) if key == "ftype" else value)
    print(f"medqa_zh.export: {call_text(source, out, quantization)}", flush=True)
    code = llama_cpp.llama_model_quantize(source.encode(), out.encode(), params)
    if code:
        sys.exit(f"llama_model_quantize returned {code}")


def check_file(path: str | Path) -> dict:
    """Read a GGUF's header and tensor table (llama.cpp's own ``gguf`` reader) and check that every tensor's
    data lies inside the file. Returns the file's size, tensor count and file type; an :class:`ExportError`
    naming the file when it is not a GGUF or not whole (a half-written or truncated file)."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"no GGUF at {path}: export it first (notebook 04)")
    size = path.stat().st_size
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise ExportError(f"{path} is not a GGUF file (no GGUF magic at its start): export it again (notebook 04)")
    _gguf_on_path()
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except (ValueError, IndexError, OSError) as e:  # the reader stops where the header or tensor table ends early
        raise ExportError(f"{path} is not a whole GGUF file ({size:,} bytes; {e}): delete it and export it again "
                          "(notebook 04)") from None
    end = max((t.data_offset + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > size:
        raise ExportError(f"{path} is truncated: its tensors end at byte {end:,} but the file has {size:,}; "
                          "delete it and export it again (notebook 04)")
    field = reader.get_field("general.file_type")
    file_type = int(field.parts[field.data[0]][0]) if field is not None else None
    return {"file": path.name, "bytes": size, "tensors": len(reader.tensors), "file_type": file_type}


def _gguf_on_path() -> None:
    """llama.cpp's ``gguf`` package from the converter's folder (the same commit as the converter)."""
    folder = str(tools_dir() / "gguf-py")
    if folder not in sys.path:
        sys.path.insert(0, folder)


def metadata(path: str | Path) -> dict:
    """A GGUF's key-value metadata (strings and numbers; arrays left out), through llama.cpp's ``gguf`` reader."""
    _gguf_on_path()
    from gguf import GGUFReader, GGUFValueType

    check_file(path)
    reader = GGUFReader(path)
    out = {}
    for name, field in reader.fields.items():
        if not field.types or field.types[0] == GGUFValueType.ARRAY:
            continue
        value = field.parts[field.data[0]]
        out[name] = bytes(value).decode("utf-8") if field.types[0] == GGUFValueType.STRING else value.tolist()[0]
    return out


# --------------------------------------------------------------------------- what a file answers


def load(path: str | Path, n_ctx: int = 4096, extra_buffers: bool = False, threads: int | None = None):
    """A ``llama_cpp.Llama`` for the GGUF at ``path`` (CPU, quiet), after :func:`check_file`. ``extra_buffers``
    (``gguf.extra_buffers``): llama.cpp's repacked CPU weights; off by default, since on CPUs with AMX they crash
    in the first batched matrix product of a quantized model (llama.cpp issue #20824; llama.cpp's ``--no-repack``).
    ``threads``: for prompts and generation alike (None: every core this process may use, :func:`serve_child.cores`;
    llama-cpp-python's own default generates on half of them)."""
    import llama_cpp

    check_file(path)
    threads = threads or serve_child.cores()
    with serve_child.llama_model_params(extra_buffers):
        return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                               n_gpu_layers=0, logits_all=False, verbose=False)


def server_tokens(llm, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """The token ids llama-cpp-python's server feeds the model for ``messages`` (:func:`serve_child.llama_prompt_tokens`:
    the GGUF's embedded chat template, tokenized by the GGUF's tokenizer)."""
    try:
        return serve_child.llama_prompt_tokens(llm, messages, add_generation_prompt)
    except ValueError as e:  # no template in the file
        raise ExportError(str(e)) from None


@dataclass
class TemplateCase:
    """One conversation of :func:`template_check`: its messages, and whether the assistant turn is opened."""

    name: str
    messages: list
    add_generation_prompt: bool = True


def template_cases(questions, completion: str = "letter") -> list[TemplateCase]:
    """The conversations :func:`template_check` renders: training examples (the assistant's answer included, as
    ``train.completion`` writes it), evaluation prompts (the assistant turn opened), and chat turns (09's
    format: a free question, a follow-up after an answer) — each with the system prompt."""
    cases = []
    for q in questions:
        cases.append(TemplateCase(f"train {q.id}", prompts.build_messages(q.question, q.options, q.answer_idx,
                                                                          completion=completion), False))
        cases.append(TemplateCase(f"eval {q.id}", prompts.build_messages(q.question, q.options)))
    first = questions[0]
    turn = prompts.chat_messages([], "胸痛伴大汗应首先做什么检查？")
    cases.append(TemplateCase("chat", turn))
    cases.append(TemplateCase("chat, second turn", prompts.chat_messages(
        [turn[1], {"role": "assistant", "content": prompts.format_answer(first.answer_idx)}],
        "为什么？请简要说明。")))
    return cases


def template_check(llm, tokenizer, cases: list[TemplateCase]):
    """Per conversation: the token ids of ``prompts`` + the Hugging Face tokenizer's chat template against
    :func:`server_tokens` from the GGUF; ``same`` is True only when every id agrees. A table (pandas)."""
    rows = []
    for case in cases:
        hf = tokenizer.apply_chat_template(case.messages, tokenize=True, add_generation_prompt=case.add_generation_prompt,
                                           return_dict=False)
        hf = list(hf["input_ids"] if isinstance(hf, dict) else hf)
        gguf = server_tokens(llm, case.messages, case.add_generation_prompt)
        first = next((i for i, (a, b) in enumerate(zip(hf, gguf, strict=False)) if a != b), min(len(hf), len(gguf)))
        rows.append({"conversation": case.name, "tokens (transformers)": len(hf), "tokens (GGUF)": len(gguf),
                     "same": hf == gguf, "first difference at": None if hf == gguf else first})
    return pd.DataFrame(rows)


class TemplateMismatchError(AssertionError):
    """The GGUF reads a conversation as other token ids than the model was trained and evaluated on."""


def require_same(table) -> None:
    """Raise :class:`TemplateMismatchError` unless every conversation of a :func:`template_check` (or
    :func:`ollama_check`) table agrees."""
    bad = table[~table["same"]]
    if len(bad):
        raise TemplateMismatchError(f"{len(bad)} of {len(table)} conversations differ (first: {bad.iloc[0].to_dict()}): "
                                    "the exported chat template or tokenizer does not match the model's")


def ollama_check(tokenizer, cases: list[TemplateCase]):
    """Per conversation that ends with the assistant's turn opened (what Ollama renders for a request): the
    text of :data:`OLLAMA_TEMPLATE` (:func:`render_ollama_template`) against the tokenizer's chat template. A
    table (pandas), as :func:`template_check`'s."""
    rows = []
    for case in (c for c in cases if c.add_generation_prompt):
        ours = render_ollama_template(OLLAMA_TEMPLATE, case.messages)
        theirs = tokenizer.apply_chat_template(case.messages, tokenize=False, add_generation_prompt=True)
        first = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), min(len(ours), len(theirs)))
        rows.append({"conversation": case.name, "characters (tokenizer)": len(theirs), "characters (Ollama)": len(ours),
                     "same": ours == theirs, "first difference at": None if ours == theirs else first})
    return pd.DataFrame(rows)


def letter_scores(llm, tokenizer, questions, progress: bool = True, contexts: dict | None = None) -> list[dict]:
    """Letter scoring through llama.cpp: the log-probability of each option letter as the next token after
    :func:`prompts.answer_prompt`, tokenized by the GGUF's tokenizer. Rows as :func:`evaluate.letter_scores`
    returns them (``id``, ``gold``, ``pred``, ``logprobs``). The letters' token ids come from ``tokenizer``
    (the model's own; the converter keeps every id, and :func:`template_check` shows it). Consecutive prompts
    share their common beginning's KV cache (the system prompt and instruction, or a question's passages)."""
    import numpy as np

    letters = "".join(sorted({letter for q in questions for letter in q.options}))
    ids = evaluate.letter_token_ids(tokenizer, letters)
    n_vocab = llm.n_vocab()
    out = []
    for q in tqdm(questions, desc="letter scoring (GGUF)", unit="q", disable=not progress):
        text = prompts.answer_prompt(tokenizer, q.question, q.options, evaluate.context_of(contexts, q.id))
        tokens = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        logits = _next_logits(llm, tokens, n_vocab, np)
        logprobs = logits - np.logaddexp.reduce(logits)
        scores = {letter: float(logprobs[ids[letter]]) for letter in sorted(q.options)}
        row = {"id": q.id, "gold": q.answer_idx, "pred": max(scores, key=scores.get), "logprobs": scores}
        if contexts is not None:
            row["passages"] = [p.id for p in contexts.get(q.id, [])]
        out.append(row)
    return out


def rotation_scores(llm, tokenizer, questions, progress: bool = True, contexts: dict | None = None) -> list[dict]:
    """Letter scores of every question under each cyclic rotation of its options, read from a GGUF: rows as
    :func:`debias.rotation_scores` returns them (PriDe's calibration, the full cyclic debiasing). The rotations
    of a question share the KV cache of everything before the options."""
    out = []
    for q in tqdm(questions, desc="rotations (GGUF)", unit="q", disable=not progress):
        rotated = [debias.rotate(q, r) for r in range(len(q.options))]
        rows = letter_scores(llm, tokenizer, rotated, progress=False, contexts=contexts)
        row = {"id": q.id, "gold": q.answer_idx, "letters": "".join(sorted(q.options)),
               "logprobs": [r["logprobs"] for r in rows]}
        if contexts is not None:
            row["passages"] = rows[0]["passages"]
        out.append(row)
    return out


def _next_logits(llm, tokens: list[int], n_vocab: int, np):
    """The logits after ``tokens``, reusing the KV cache of the longest prefix shared with the last call."""
    if len(tokens) > llm.n_ctx():
        raise ExportError(f"a prompt of {len(tokens)} tokens is longer than the context ({llm.n_ctx()}): raise gguf.n_ctx")
    keep = 0
    for a, b in zip(llm.input_ids[: llm.n_tokens], tokens, strict=False):
        if a != b:
            break
        keep += 1
    llm.n_tokens = min(keep, len(tokens) - 1)  # at least one token is evaluated, so its logits are fresh
    llm.eval(tokens[llm.n_tokens:])
    # with logits_all off, llama.cpp keeps the logits of the last token of the last batch only
    import llama_cpp

    return np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm.ctx), shape=(n_vocab,)).astype(np.float64)


def compare_letters(reference: list[dict], gguf: list[dict]):
    """Per question: the largest |difference| of the letters' log-probabilities between the model and a GGUF,
    and whether both choose the same letter. A table (pandas)."""
    rows = []
    for a, b in zip(reference, gguf, strict=True):
        if a["id"] != b["id"]:
            raise ValueError(f"the rows are of different questions ({a['id']} vs {b['id']})")
        diff = max(abs(a["logprobs"][k] - b["logprobs"][k]) for k in a["logprobs"])
        rows.append({"id": a["id"], "model": a["pred"], "GGUF": b["pred"], "same choice": a["pred"] == b["pred"],
                     "largest |Δ log p|": diff})
    return pd.DataFrame(rows)


def letter_summary(table) -> dict:
    """A :func:`compare_letters` table in four numbers: questions, same choice (share), the largest and the
    median |difference| of a letter's log-probability."""
    return {"questions": len(table), "same choice": float(table["same choice"].mean()),
            "largest |Δ log p|": float(table["largest |Δ log p|"].max()),
            "median |Δ log p|": float(table["largest |Δ log p|"].median())}


# --------------------------------------------------------------------------- Ollama


def modelfile(gguf_file: str, system_prompt: str = prompts.SYSTEM_PROMPT, num_ctx: int = 4096) -> str:
    """An Ollama ``Modelfile`` for a GGUF beside it: Qwen2.5's ChatML turns as an Ollama (Go) template, the
    project's system prompt, ``<|im_end|>`` and ``<|endoftext|>`` as stops, temperature 0 (greedy)."""
    return f'''FROM ./{gguf_file}

# Qwen2.5's chat format (ChatML), as the model was trained on it: notebook 04 checks this text against the
# tokenizer's own chat template
TEMPLATE """{OLLAMA_TEMPLATE}"""

SYSTEM """{system_prompt}"""

PARAMETER stop "<|im_end|>"
PARAMETER stop "<|endoftext|>"
PARAMETER temperature 0
PARAMETER num_ctx {num_ctx}
'''


# Ollama's Go template for ChatML: the system prompt (the request's, else the Modelfile's SYSTEM), then every
# user / assistant turn (Ollama also lists system messages among .Messages: skipped, they are .System), then
# the assistant's turn opened
OLLAMA_TEMPLATE = (
    '{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}'
    '{{- range .Messages }}{{- if ne .Role "system" }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}{{ end }}'
    '<|im_start|>assistant\n'
)
_OLLAMA_PARTS = ('{{- if .System }}', '{{ end }}{{- range .Messages }}{{- if ne .Role "system" }}', '{{ end }}{{ end }}')


def render_ollama_template(template: str, messages: list[dict]) -> str:
    """The text Ollama's Go template engine makes of :data:`OLLAMA_TEMPLATE` for ``messages`` (the system prompt
    among them, as Ollama passes it: ``.System`` and a system message). Only that template's constructs are
    read; a template of any other shape is an error, so a change this reading cannot follow fails the check
    instead of passing it. (Ollama itself is not installable here: this is what can be tested without it.)"""
    head, sep1, rest = template.partition(_OLLAMA_PARTS[0])
    system_block, sep2, rest = rest.partition(_OLLAMA_PARTS[1])
    turn, sep3, tail = rest.partition(_OLLAMA_PARTS[2])
    if head or not (sep1 and sep2 and sep3) or "{{" in tail:
        raise ValueError("the Ollama template is not of the shape this check reads (see export.OLLAMA_TEMPLATE)")
    system = "\n".join(m["content"] for m in messages if m["role"] == "system")
    text = system_block.replace("{{ .System }}", system) if system else ""
    for m in messages:
        if m["role"] != "system":
            text += turn.replace("{{ .Role }}", m["role"]).replace("{{ .Content }}", m["content"])
    if "{{" in text:
        raise ValueError("the Ollama template has a construct this check does not read: " + text[text.index("{{"):][:60])
    return text + tail


# --------------------------------------------------------------------------- command line


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m medqa_zh.export", description=(
        "GGUF export tools: install llama.cpp's converter, or convert / quantize a model by hand."))
    sub = p.add_subparsers(dest="command", required=True)
    tools = sub.add_parser("install-tools", help=f"put llama.cpp's converter into {TOOLS_DIR}")
    tools.add_argument("--sdist", default=None, help="llama-cpp-python's source .tar.gz (default: download it with pip)")
    conv = sub.add_parser("convert", help="a model folder to a GGUF (f16 by default)")
    conv.add_argument("model_dir")
    conv.add_argument("out")
    conv.add_argument("--outtype", default="f16", choices=["f32", "f16", "bf16", "q8_0"])
    quant = sub.add_parser("quantize", help="an f16 GGUF to q8_0 or Q4_K_M")
    quant.add_argument("source")
    quant.add_argument("out")
    quant.add_argument("quantization", choices=list(_FTYPES))
    child = sub.add_parser("_convert", help=argparse.SUPPRESS)
    child.add_argument("model_dir")
    child.add_argument("out")
    child.add_argument("outtype")
    child = sub.add_parser("_quantize", help=argparse.SUPPRESS)
    child.add_argument("source")
    child.add_argument("out")
    child.add_argument("quantization")
    a = p.parse_args(argv)
    try:
        if a.command == "install-tools":
            print(f"llama.cpp's converter (llama-cpp-python {llama_cpp_version()}) in {install_tools(sdist=a.sdist)}")
        elif a.command == "convert":
            print(check_file(convert(a.model_dir, a.out, a.outtype)))
        elif a.command == "quantize":
            print(check_file(quantize(a.source, a.out, a.quantization)))
        elif a.command == "_quantize":
            _quantize_main(a.source, a.out, a.quantization)
        else:
            _convert_main(a.model_dir, a.out, a.outtype)
    except ExportError as e:
        p.exit(2, f"error: {e}\n")


if __name__ == "__main__":
    main()
