"""The steps a profile can turn off, and what a notebook does when one is off.

Each optional step of the series (a learning curve, the GGUF export, the debiased readings, ...) is
turned on by a setting of ``profiles/base.yaml``: a switch (``gguf.export: false``), an empty list
(``rag.models: []``) or a 0 (``train.curve_questions: 0``); the steps that run llama.cpp (04's GGUF export, 07's
evaluation through llama.cpp's server) are off, too, where llama.cpp is not installed (:func:`llama_cpp_missing`:
``./run_all.sh`` leaves it out on a machine without a C++ compiler). Where a step is off, its notebook calls
:func:`skip`: it says in one line which setting turned it off, and deletes the files an earlier run
of the step left (a table or figure of another run must not read as this run's). The later
notebooks carry on without its outputs; 10 lists every step that was off (:func:`table`), and
``results.collect`` leaves out answers of an evaluation that is off (:func:`evaluation_off`). A step that trains a
model (04b's ``grpo``) deletes its tables and figures but never the model (training is expensive): ``models.available``
leaves the model out while its step is off, so no later notebook takes it for this run's.
"""
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd


def _false(key: str):
    return lambda cfg: None if cfg[key] else f"{key} is false (true turns it on)"


def _empty(key: str, example: str):
    return lambda cfg: None if cfg[key] else f"{key} is empty (name {example} to turn it on)"


def _zero(key: str, on: str):
    return lambda cfg: f"{key} is 0 ({on})" if cfg[key] == 0 else None


def _names(key: str, name: str):
    return lambda cfg: None if name in cfg[key] else f"{key} does not name {name} (add it to turn this on)"


def _step(name: str):
    return lambda cfg: off(cfg, name)


# how llama.cpp gets into this environment (the gguf extra; ./run_all.sh installs it where it finds a C++ compiler)
LLAMA_CPP_INSTALL = "pip install -e '.[gguf]' && python -m medqa_zh.export install-tools"
GET_LLAMA_CPP = ("install a C++ compiler (Debian/Ubuntu: sudo apt install g++; conda: conda install -c conda-forge "
                 f"cxx-compiler), then run ./run_all.sh again (by hand: {LLAMA_CPP_INSTALL})")


def llama_cpp_missing() -> str | None:
    """Why llama.cpp cannot run in this environment, or None: its Python package ``llama_cpp`` (llama-cpp-python,
    the ``gguf`` extra, which ``./run_all.sh`` leaves out on a machine without a C++ compiler) is not importable.
    The one test that 04's and 07's steps, ``export``, ``serve``'s llamacpp backend and the profile check share."""
    if importlib.util.find_spec("llama_cpp") is None:
        return (f"llama.cpp is not installed (the package llama-cpp-python, the gguf extra, is not in {sys.prefix}): "
                + GET_LLAMA_CPP)
    return None


def _llama_cpp(cfg):
    return llama_cpp_missing()  # not a setting: what this environment lacks, and how to get it


@dataclass(frozen=True)
class Step:
    notebook: str               # where it runs: "04"
    what: str                   # in words, for the one-line note and 10's table
    outputs: tuple[str, ...]    # the files it writes, relative to outputs/<profile>/: deleted when it is off
    needs: tuple                # checks, each cfg -> why the step is off (the setting, and what turns it on) or None


GENERATED = _zero("eval.generate_questions", "null turns it on for every eval question, a number N for the first N")
GGUF = (_false("gguf.export"), _names("gguf.models", "merged"), _llama_cpp)

# every step a profile can turn off, in the order of the series
STEPS = {
    "learning_curve": Step("02", "the learning curve (PriDe on validation at each checkpoint)",
                           ("tables/02_learning_curve.csv", "figures/02_learning_curve.png"),
                           (_zero("train.curve_questions", "a number of validation questions turns it on"),)),
    "gguf": Step("04", "the GGUF export and its proofs (template, f16 letters, Ollama)",
                 ("tables/04_gguf_template.csv", "tables/04_gguf_f16_letters.csv"), GGUF),
    "gguf_quantization": Step("04", "the GGUF quantizations scored against the merged model",
                              ("tables/04_quantization.csv",), (*GGUF, _empty("gguf.evaluate", "quantizations, e.g. [q8_0],"))),
    "grpo": Step("04b", "GRPO (reinforcement learning with the answer's correctness as its reward)",
                 ("tables/04b_spread.csv", "tables/04b_letters.csv", "figures/04b_curves.png",
                  "figures/04b_letters.png"),
                 (_zero("grpo.max_steps", "a number of steps turns it on"),)),
    "generate": Step("06", "generate-and-parse (06's generate reading)", (), (GENERATED,)),
    "rotations": Step("06", "the debiased readings (PriDe's calibration, every rotation)",
                      ("tables/06_debiased.csv", "figures/06_debiased.png", "tables/06_pride_vs_cyclic.csv",
                       "tables/06_letter_prior.csv", "figures/06_cyclic.png"),
                      (_false("eval.rotations"),)),
    "api": Step("07", "the evaluation over the HTTP API", ("tables/07_api.csv", "tables/07_agreement.csv"),
                (_empty("eval.api_models", "models, e.g. [merged],"), GENERATED)),
    "gguf_api": Step("07", "the API evaluation through llama.cpp's server (the GGUF)", ("tables/07_gguf_api.csv",),
                     (_false("gguf.export"), _empty("gguf.api_models", "models, e.g. [merged],"), _step("api"),
                      _llama_cpp)),
    "rag": Step("08", "the API evaluation with passages", ("tables/08_rag.csv", "figures/08_rag_accuracy.png"),
                (_empty("rag.models", "models, e.g. [merged],"), GENERATED)),
    "rag_rotations": Step("08", "the debiased readings with passages",
                          ("tables/08_rag_debiased.csv", "figures/08_rag_debiased.png"),
                          (_step("rotations"), _empty("rag.models", "models, e.g. [merged],"),
                           _empty("rag.rotation_retrievers", "retrievers, e.g. [bm25],"))),
}
NAMES = tuple(STEPS)


def step(name: str) -> Step:
    if name not in STEPS:
        raise KeyError(f"no step {name!r}: choose from {', '.join(NAMES)}")
    return STEPS[name]


def off(cfg, name: str) -> str | None:
    """Why the profile turns step ``name`` off (the setting, and what turns it on), or None when it is on."""
    return next((why for check in step(name).needs if (why := check(cfg))), None)


def skip(cfg, name: str) -> bool:
    """True when step ``name`` is off: then say so in one line and delete what an earlier run of it left."""
    why = off(cfg, name)
    if why is None:
        return False
    gone = [rel for rel in step(name).outputs if _unlink(cfg.out / rel)]
    print(f"skipped: {step(name).what}: {why}" + (f"; removed an earlier run's {', '.join(gone)}" if gone else ""))
    return True


def _unlink(path: Path) -> bool:
    if path.is_file():
        path.unlink()
        return True
    return False


def table(cfg) -> pd.DataFrame:
    """Every step this profile turns off: notebook, step, why (the setting), for 10's report."""
    rows = [{"notebook": s.notebook, "step": s.what, "off because": why}
            for name, s in STEPS.items() if (why := off(cfg, name))]
    return pd.DataFrame(rows, columns=["notebook", "step", "off because"])


def evaluation_off(cfg, evaluation: str) -> str | None:
    """Why this profile makes no answers for ``evaluation`` (a name of ``results``: ``generate``, ``api+rag bm25``,
    ``api@llamacpp-q8_0``, ``letter+rag bm25``, ``rotations``, ...), or None: ``results.collect`` leaves such answers
    out, since they come from an earlier run with other settings."""
    kind = evaluation.split("+")[0].split("@")[0]
    with_passages, through = "+rag " in evaluation, evaluation.partition("@")[2]
    checks = []
    if kind in ("generate", "api"):
        checks.append(GENERATED)
    if kind in ("rotations", "calibration"):
        checks.append(_step("rotations"))
    if with_passages:  # 08: over the API, or in-process for the debiased readings
        checks.append(_step("rag" if kind == "api" else "rag_rotations"))
    elif through:
        checks.append(_step("gguf_api"))
    elif kind == "api":  # 07 asks it, and 08 as its answers without passages
        checks.append(lambda cfg: off(cfg, "api") if off(cfg, "rag") else None)
    return next((why for check in checks if (why := check(cfg))), None)
