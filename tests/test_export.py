"""GGUF export (medqa_zh.export) on the tiny model: llama.cpp's converter and quantizer, the template proof,
letter scores through llama.cpp, whole-file checks, the Ollama template, and the llamacpp server backend."""
import json
import shutil

import httpx
import pytest

from medqa_zh import data, evaluate, export, prompts, serve

pytestmark = pytest.mark.timeout(1200)  # a hang fails with its stack; at least 5x the longest such test measured with both cores busy


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_assets):
    """The tiny model as f16, q8_0 and Q4_K_M GGUF files."""
    out = tmp_path_factory.mktemp("gguf")
    paths = {"f16": export.convert(tiny_assets["model"], out / "tiny-f16.gguf", log=out / "convert.log")}
    for q in ("q8_0", "Q4_K_M"):
        paths[q] = export.quantize(paths["f16"], out / f"tiny-{q}.gguf", q, log=out / f"{q}.log")
    return paths


@pytest.fixture(scope="module")
def tokenizer(tiny_assets):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_assets["model"])


@pytest.fixture(scope="module")
def questions(tiny_assets):
    rows, _ = data.read_questions(tiny_assets["medqa"] / "questions" / "Mainland" / "dev.jsonl")
    return rows[:10]


def test_every_quantization_is_a_whole_gguf_of_its_type(exported):
    infos = {q: export.check_file(p) for q, p in exported.items()}
    assert {q: i["file_type"] for q, i in infos.items()} == {"f16": 1, "q8_0": 7, "Q4_K_M": 15}  # llama.cpp's ftypes
    assert infos["q8_0"]["bytes"] < infos["f16"]["bytes"] and infos["Q4_K_M"]["bytes"] < infos["f16"]["bytes"]
    assert len({i["tensors"] for i in infos.values()}) == 1
    meta = export.metadata(exported["f16"])
    assert meta["tokenizer.ggml.pre"] == "qwen2" and meta["general.architecture"] == "qwen2"
    assert "<|im_start|>" in meta["tokenizer.chat_template"]
    assert not list(exported["f16"].parent.glob("*.tmp"))  # nothing left under a temporary name


def test_the_calls_04_prints_are_the_ones_the_children_ran(exported, tiny_assets):
    out = exported["f16"].parent  # each child logs its call, on the temporary name the file is written under
    ran = (out / "convert.log").read_text(encoding="utf-8")
    call = export.call_text(tiny_assets["model"], str(exported["f16"]) + ".tmp", "f16")
    assert f"medqa_zh.export: {call}\n" in ran
    assert "convert_hf_to_gguf.py" in ran and "--outtype f16" in ran
    for q, ftype in (("q8_0", "LLAMA_FTYPE_MOSTLY_Q8_0"), ("Q4_K_M", "LLAMA_FTYPE_MOSTLY_Q4_K_M")):
        ran = (out / f"{q}.log").read_text(encoding="utf-8")
        assert f"medqa_zh.export: {export.call_text(exported['f16'], str(exported[q]) + '.tmp', q)}\n" in ran
        assert export.quantize_params(q) == {"ftype": ftype, "nthread": 0} and f"ftype=llama_cpp.{ftype}" in ran
    with pytest.raises(ValueError, match="f16 comes from convert"):
        export.quantize_params("f16")


def test_a_truncated_or_foreign_file_is_never_taken_for_a_model(exported, tmp_path):
    whole = exported["q8_0"].read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole[: len(whole) - 1000])  # the tensor data ends early
    with pytest.raises(export.ExportError, match="truncated"):
        export.check_file(cut)
    head = tmp_path / "head.gguf"
    head.write_bytes(whole[:200])  # the header itself ends early
    with pytest.raises(export.ExportError, match="not a whole GGUF"):
        export.check_file(head)
    other = tmp_path / "other.gguf"
    other.write_bytes(b"PK\x03\x04" + whole[4:])
    with pytest.raises(export.ExportError, match="not a GGUF"):
        export.check_file(other)
    with pytest.raises(export.ExportError, match="no GGUF"):
        export.check_file(tmp_path / "missing.gguf")
    with pytest.raises(export.ExportError, match="truncated"):
        export.load(cut)
    with pytest.raises(export.ExportError, match="truncated"):
        export.quantize(cut, tmp_path / "q.gguf", "q8_0")
    assert not (tmp_path / "q.gguf").exists()


def test_a_stale_or_damaged_export_is_redone(exported, tmp_path):
    path = tmp_path / "m-f16.gguf"
    shutil.copy(exported["f16"], path)
    stamp = {"model": "m", "fingerprint": "abc", "llama_cpp": export.llama_cpp_version()}
    path.with_name(path.name + ".json").write_text(json.dumps(stamp))
    assert export._current(path, stamp)
    assert not export._current(path, {**stamp, "fingerprint": "retrained"})
    path.write_bytes(path.read_bytes()[:-10])
    assert not export._current(path, stamp)


def test_the_gguf_reads_every_conversation_as_the_model_does(exported, tokenizer, questions):
    llm = export.load(exported["f16"])
    cases = export.template_cases(questions[:3], "letter_text")
    table = export.template_check(llm, tokenizer, cases)
    assert len(table) == len(cases) == 8 and table["same"].all()
    export.require_same(table)
    # the system prompt is part of every conversation checked
    assert all(c.messages[0] == {"role": "system", "content": prompts.SYSTEM_PROMPT} for c in cases)


def test_a_drifted_template_is_caught(exported, tokenizer, questions):
    llm = export.load(exported["f16"])
    cases = export.template_cases(questions[:2])
    drifted = tokenizer.chat_template.replace("<|im_start|>assistant\\n", "<|im_start|>assistant\\n\\n")
    assert drifted != tokenizer.chat_template
    original = tokenizer.chat_template
    try:
        tokenizer.chat_template = drifted
        table = export.template_check(llm, tokenizer, cases)
    finally:
        tokenizer.chat_template = original
    assert not table["same"].all()
    assert table.loc[~table["same"], "first difference at"].notna().all()
    with pytest.raises(export.TemplateMismatchError):
        export.require_same(table)


def test_only_qwens_exact_pre_tokenizer_is_declared_qwen2(tiny_assets, tmp_path):
    assert export.qwen2_pre_tokenizer(tiny_assets["model"])
    other = tmp_path / "other"
    shutil.copytree(tiny_assets["model"], other)
    spec = json.loads((other / "tokenizer.json").read_text(encoding="utf-8"))
    spec["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\s+|\S+"
    (other / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    assert not export.qwen2_pre_tokenizer(other)
    with pytest.raises(export.ExportError, match="converter failed"):  # llama.cpp does not know it: no guess
        export.convert(other, tmp_path / "other.gguf")
    assert not (tmp_path / "other.gguf").exists()


def test_letter_scores_through_llama_cpp_match_the_model(exported, tokenizer, questions, tiny_assets):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_assets["model"])
    reference = evaluate.letter_scores(model, tokenizer, questions, progress=False)
    f16 = export.letter_summary(export.compare_letters(reference, export.letter_scores(export.load(exported["f16"]),
                                                                                          tokenizer, questions, False)))
    assert f16["questions"] == len(questions) and f16["same choice"] == 1.0
    assert f16["largest |Δ log p|"] < 1e-3
    q4 = export.letter_summary(export.compare_letters(reference, export.letter_scores(export.load(exported["Q4_K_M"]),
                                                                                         tokenizer, questions, False)))
    assert q4["largest |Δ log p|"] > f16["largest |Δ log p|"]  # 4 bits do cost something: the reading is real


def test_shared_prefixes_score_as_fresh_prompts(exported, tokenizer, questions):
    """Reusing the KV cache of the common beginning gives the scores a fresh context gives."""
    llm = export.load(exported["q8_0"])
    together = export.letter_scores(llm, tokenizer, questions[:4], progress=False)
    alone = [export.letter_scores(export.load(exported["q8_0"]), tokenizer, [q], progress=False)[0] for q in questions[:4]]
    for a, b in zip(together, alone, strict=True):
        assert a["pred"] == b["pred"]
        assert max(abs(a["logprobs"][k] - b["logprobs"][k]) for k in a["logprobs"]) < 1e-4
    rows = export.rotation_scores(llm, tokenizer, questions[:2], progress=False)
    assert [len(r["logprobs"]) for r in rows] == [len(q.options) for q in questions[:2]]
    assert rows[0]["logprobs"][0] == pytest.approx(together[0]["logprobs"], abs=1e-4)  # rotation 0 is the plain pass


def test_the_ollama_template_renders_the_tokenizers_chat_template(tokenizer, questions):
    cases = export.template_cases(questions[:3])
    table = export.ollama_check(tokenizer, cases)
    assert len(table) == 5 and table["same"].all()  # 3 evaluation prompts and 2 chat turns
    text = export.modelfile("merged-q8_0.gguf")
    assert text.startswith("FROM ./merged-q8_0.gguf\n") and export.OLLAMA_TEMPLATE in text
    assert f'SYSTEM """{prompts.SYSTEM_PROMPT}"""' in text and "PARAMETER temperature 0" in text
    assert 'PARAMETER stop "<|im_end|>"' in text


def test_a_drifted_ollama_template_is_caught(tokenizer, questions):
    messages = prompts.build_messages(questions[0].question, questions[0].options)
    drifted = export.OLLAMA_TEMPLATE.replace("<|im_start|>{{ .Role }}\n", "<|im_start|>{{ .Role }}\n\n")
    ours = export.render_ollama_template(drifted, messages)
    assert ours != tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    with pytest.raises(ValueError, match="shape"):
        export.render_ollama_template("{{ .Prompt }}", messages)


@pytest.mark.slow
def test_the_llamacpp_server_checks_the_key_and_answers_like_the_file(exported, tokenizer, questions):
    messages = prompts.build_messages(questions[0].question, questions[0].options)
    with serve.serve(exported["q8_0"], backend="llamacpp", api_key="secret-key", startup_timeout=120,
                     quiet=True) as server:
        assert server.model == "tiny-q8_0" and server.backend == "llamacpp"
        assert httpx.get(f"{server.url}/health").status_code == 200  # open, as vLLM's
        body = {"model": server.model, "messages": messages, "max_tokens": 4, "temperature": 0}
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            for method, path, payload in (("GET", "/v1/models", None), ("POST", "/v1/chat/completions", body)):
                r = httpx.request(method, server.url + path, json=payload, headers=headers, timeout=30)
                assert r.status_code == 401, (path, headers, r.text)
                assert r.json()["error"]["type"] == "AuthenticationError"
        refused = httpx.post(server.url + "/v1/chat/completions", json={**body, "n": 2}, headers=server.headers())
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "n"
        unknown = httpx.post(server.url + "/v1/chat/completions", json={**body, "max_token": 2}, headers=server.headers())
        assert unknown.status_code == 400
        other = httpx.post(server.url + "/v1/chat/completions", json={**body, "model": "x"}, headers=server.headers())
        assert other.status_code == 404
        for bad, param in (({"logit_bias": {"99999999": 5}}, "logit_bias"), ({"seed": 2**80}, "seed"),
                           ({"stream_options": {"include_usage": True}}, "stream_options")):
            r = httpx.post(server.url + "/v1/chat/completions", json={**body, **bad}, headers=server.headers())
            assert r.status_code == 400 and r.json()["error"]["param"] == param, (bad, r.text)
        both = httpx.post(server.url + "/v1/chat/completions", json={**body, "max_completion_tokens": 2},
                          headers=server.headers(), timeout=60)
        assert both.json()["usage"]["completion_tokens"] <= 2, both.text  # max_completion_tokens over max_tokens
        reply = server.client().chat.completions.create(**body)
        prompt = len(export.server_tokens(export.load(exported["q8_0"]), messages))
        assert reply.usage.prompt_tokens == prompt
        # beyond the context: a 400 naming both numbers, as vLLM (llama-cpp-python alone would shorten it)
        beyond = httpx.post(server.url + "/v1/chat/completions", json={**body, "max_tokens": 4096},
                            headers=server.headers(), timeout=30)
        assert beyond.status_code == 400 and beyond.json()["error"]["param"] == "max_tokens", beyond.text
        assert f"({prompt} in the messages, 4096 in the completion)" in beyond.json()["error"]["message"]
        fits = httpx.post(server.url + "/v1/chat/completions", json={**body, "max_tokens": 4096 - prompt},
                          headers=server.headers(), timeout=120)
        assert fits.status_code == 200, fits.text
    assert not server.running()


def test_serve_refuses_a_broken_gguf_and_maps_a_run_model_to_its_file(exported, tmp_path, smoke):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(exported["q8_0"].read_bytes()[:-100])
    with pytest.raises(export.ExportError, match="truncated|not a whole GGUF"):
        serve.start(cut, backend="llamacpp")
    with pytest.raises(ValueError, match="adapter"):
        serve._command("llamacpp", str(cut), "127.0.0.1", 1, "auto", "cpu", {"adapters": {"a": "x"}}, "m", (),
                       llama={"n_ctx": 64, "extra_buffers": False, "threads": None})
    cfg = smoke(**{"serve.backend": "llamacpp"})
    assert serve.backend_tag(cfg) == "llamacpp-q8_0" and serve.backend_tag(smoke()) == "transformers"
    assert export.gguf_path(export.folder(cfg), "merged", "q8_0") == cfg.out / "models" / "gguf" / "merged-q8_0.gguf"
    with pytest.raises(export.ExportError, match="no GGUF"):  # nothing exported yet: the file is named
        serve.from_profile(cfg, cfg.out / "models" / "merged", served_name="merged")
