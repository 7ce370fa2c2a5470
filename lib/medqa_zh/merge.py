"""Merge a LoRA adapter into its base model, and prove the merged model computes the same thing.

A LoRA layer computes ``W x + s·B(A x)``; merging stores ``W' = W + s·BA`` instead, so a merged
model needs no peft at serving time (vLLM, transformers, any OpenAI-compatible
server). In exact arithmetic the two are equal. In floating point they differ by rounding, and
in bfloat16 (8 significant bits) ``W + s·BA`` is rounded once more when it is stored. :func:`compare`
measures that difference on real prompts; :func:`check` fails loudly when it exceeds the
tolerance for the dtype.
"""
from __future__ import annotations

import gc
import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from . import files, models, prompts

# torch and the Hugging Face stack (transformers, peft, trl, datasets, sentence-transformers, vLLM) are
# imported inside the functions that use them, so importing this module stays fast.

INFO_FILE = "merge_info.json"

# Allowed max |logit(merged) - logit(base+adapter)| relative to the largest |logit| of the prompt,
# by the dtype the merged weights were saved in (both computed in float32, see compare()).
# float32 keeps 24 significant bits (unit roundoff 6e-8): merging only reorders sums, which leaves
# relative differences around 1e-6 across a 24-layer model, so 1e-4 leaves a wide margin and still
# catches any real error (a missed module or a wrong scale moves logits by far more). bfloat16 keeps
# 8 bits (unit roundoff 2^-8 ≈ 0.004): every merged weight is rounded once, by up to that much,
# and those errors add up through the layers to a few units; 2^-5 ≈ 0.03 of the largest logit is
# allowed, still well below what losing the adapter (or half of it) does to the logits.
# The notebook shows the measured difference next to the adapter's own effect on the logits:
# the proof only means something when that effect is much larger than the tolerance.
RELATIVE_TOLERANCE = {"float32": 1e-4, "bfloat16": 2**-5, "float16": 2**-8}


class MergeMismatchError(AssertionError):
    """The merged model's logits differ from base + adapter by more than the tolerance."""


def merge(base_name: str, adapter_dir: str | Path, out_dir: str | Path, dtype: str = "bfloat16",
          setting: str = "model.base") -> Path:
    """Merge ``adapter_dir`` into ``base_name`` (in float32) and save it in ``dtype``: safetensors
    weights, config, generation config and the tokenizer the adapter was trained with."""
    import torch

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    base = models.load_model(base_name, "float32", setting=setting)
    merged = models.load_adapter(base, adapter_dir, base_name).merge_and_unload()
    merged = merged.to(models.torch_dtype(dtype))
    with files.replacing(out_dir) as tmp:  # a crash leaves the old merged model or none, never half of one
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer_source = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base_name
        models.load_tokenizer(str(tokenizer_source), setting="the adapter's tokenizer").save_pretrained(tmp)
        models.write_fingerprint(base, base_name, tmp)
        info = {"base_model": base_name, "adapter": str(adapter_dir), "dtype": dtype,
                "parameters": sum(p.numel() for p in merged.parameters()), "torch": torch.__version__}
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2), encoding="utf-8")
    return out_dir


@dataclass
class Comparison:
    """Per-prompt next-token logit differences between the merged model and base + adapter."""

    table: object  # pandas DataFrame, one row per prompt
    dtype: str
    tolerance: float

    @property
    def max_abs_diff(self) -> float:
        return float(self.table["max_abs_diff_merged"].max())

    @property
    def max_relative_diff(self) -> float:
        return float(self.table["relative_diff"].max())

    @property
    def argmax_agrees(self) -> bool:
        return bool(self.table["argmax_agrees"].all())

    @property
    def passed(self) -> bool:
        return self.argmax_agrees and self.max_relative_diff <= self.tolerance

    def summary(self) -> dict:
        t = self.table
        return {
            "prompts": len(t), "dtype": self.dtype,
            "max |merged - adapter|": self.max_abs_diff,
            "max relative diff": self.max_relative_diff,
            "tolerance (relative)": self.tolerance,
            "argmax agrees on every prompt": self.argmax_agrees,
            "max |adapter - base| (the fine-tune's effect)": float(t["max_abs_diff_base"].max()),
            "prompts where the adapter changed the argmax": int((~t["base_argmax_same"]).sum()),
            "passed": self.passed,
        }


def next_token_logits(model, tokenizer, texts: list[str]):
    """Float32 logits of the token after each text (one text at a time: no padding to get wrong)."""
    import torch

    rows = []
    with torch.inference_mode():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt").input_ids.to(model.device)
            rows.append(model(input_ids=ids).logits[0, -1].float().cpu())
    return torch.stack(rows)


def compare(base_name: str, adapter_dir: str | Path, merged_dir: str | Path, questions: list,
            setting: str = "model.base") -> Comparison:
    """Next-token logits after :func:`prompts.answer_prompt` for each question, from three models:
    the base, base + adapter (unmerged, as peft runs it), and the merged model read back from disk.

    All three compute in float32 from their weights as stored, so the only difference left between
    merged and base + adapter is the merge itself, including the rounding of the merged weights to
    the dtype they were saved in (which sets the tolerance). Computing in bfloat16 would add the
    rounding noise of every matmul, which flips the top token wherever two tokens nearly tie.
    """
    merged_dir = Path(merged_dir)
    info_path = merged_dir / INFO_FILE
    if not info_path.is_file():
        raise FileNotFoundError(f"{info_path} is missing: {merged_dir} was not written by merge.merge()")
    saved_dtype = json.loads(info_path.read_text(encoding="utf-8"))["dtype"]
    tokenizer = models.load_tokenizer(str(merged_dir), setting="the merged model")
    texts = [prompts.answer_prompt(tokenizer, q.question, q.options) for q in questions]
    base = models.load_model(base_name, "float32", setting=setting)
    base_logits = next_token_logits(base, tokenizer, texts)
    adapted = models.load_adapter(base, adapter_dir, base_name)
    adapter_logits = next_token_logits(adapted, tokenizer, texts)
    del adapted, base
    gc.collect()
    merged = models.load_model(str(merged_dir), "float32", setting="the merged model")
    merged_logits = next_token_logits(merged, tokenizer, texts)

    diff = (merged_logits - adapter_logits).abs().amax(dim=1)
    scale = adapter_logits.abs().amax(dim=1)
    top2 = adapter_logits.topk(2, dim=1).values
    table = pd.DataFrame({
        "question": [q.id for q in questions],
        "adapter_top": [tokenizer.decode([i]) for i in adapter_logits.argmax(1).tolist()],
        "merged_top": [tokenizer.decode([i]) for i in merged_logits.argmax(1).tolist()],
        "argmax_agrees": (merged_logits.argmax(1) == adapter_logits.argmax(1)).tolist(),
        "adapter_top2_margin": (top2[:, 0] - top2[:, 1]).tolist(),
        "max_abs_diff_merged": diff.tolist(),
        "max_abs_logit": scale.tolist(),
        "relative_diff": (diff / scale).tolist(),
        "max_abs_diff_base": (adapter_logits - base_logits).abs().amax(dim=1).tolist(),
        "base_argmax_same": (base_logits.argmax(1) == adapter_logits.argmax(1)).tolist(),
    })
    return Comparison(table, saved_dtype, RELATIVE_TOLERANCE[models.DTYPES[saved_dtype]])


def check(comparison: Comparison) -> dict:
    """The summary, or :class:`MergeMismatchError` when the merged model is not base + adapter."""
    summary = comparison.summary()
    if not comparison.passed:
        bad = comparison.table[~comparison.table["argmax_agrees"]
                               | (comparison.table["relative_diff"] > comparison.tolerance)]
        raise MergeMismatchError(
            f"the merged model differs from base + adapter ({comparison.dtype}): max relative logit difference "
            f"{comparison.max_relative_diff:.3g} (tolerance {comparison.tolerance:.3g}), argmax agrees on every prompt: "
            f"{comparison.argmax_agrees}. Offending prompts: {', '.join(bad['question'].head(5))}. Do not serve this "
            "merged model; merge again from the adapter, and check that the base is the one it was trained on."
        )
    return summary
