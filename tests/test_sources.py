"""Where models come from when huggingface.co cannot be reached: a Hugging Face mirror (HF_ENDPOINT),
ModelScope (``modelscope:owner/name``), or a local folder. Neither service is reachable from the test
machines: these tests check the id parsing, the cache folder, the errors, that a mirror is where the
requests go (a local HTTP server plays it), and that a filled cache folder is used with no network at all."""
import http.server
import os
import shutil
import socket
import subprocess
import sys
import threading
import types

import pytest

from helpers import REPO
from medqa_zh import config, models, rag


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt fails the test; importing modelscope (a download) does too."""
    def refuse(*args, **kwargs):
        pytest.fail(f"a network connection was attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setitem(sys.modules, "modelscope", None)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "modelscope-cache"
    monkeypatch.setenv("MEDQA_MODELSCOPE_CACHE", str(root))
    return root


def test_a_modelscope_id_is_parsed_and_anything_else_is_left_alone(cache):
    assert models.modelscope_id("modelscope:Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
    assert models.modelscope_id("Qwen/Qwen2.5-0.5B-Instruct") is None and models.modelscope_id("/models/x") is None
    for bad in ("modelscope:", "modelscope:Qwen", "modelscope:a/b/c", "modelscope:Qwen/Qwen 2"):
        with pytest.raises(ValueError, match="a ModelScope id is modelscope:owner/name"):
            models.modelscope_id(bad)
    assert models.modelscope_dir("Qwen/Qwen2.5-0.5B-Instruct") == cache / "Qwen" / "Qwen2.5-0.5B-Instruct"
    assert models.fetch("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"  # a hub id: as it is


def test_the_profile_keeps_a_modelscope_id_as_an_id_not_a_path(project, monkeypatch):
    monkeypatch.setenv("MEDQA_BASE_MODEL", "modelscope:Qwen/Qwen2.5-0.5B-Instruct")
    monkeypatch.setenv("MEDQA_EMBEDDER", "modelscope:BAAI/bge-small-zh-v1.5")
    cfg = config.load("cpu")
    assert (cfg.base_model, cfg.embedder) == ("modelscope:Qwen/Qwen2.5-0.5B-Instruct", "modelscope:BAAI/bge-small-zh-v1.5")


def test_a_filled_cache_folder_is_used_with_no_network_call(cache, tiny_assets, no_network):
    shutil.copytree(tiny_assets["model"], cache / "Qwen" / "Qwen2.5-0.5B-Instruct")
    shutil.copytree(tiny_assets["encoder"], cache / "BAAI" / "bge-small-zh-v1.5")
    model = models.load_model("modelscope:Qwen/Qwen2.5-0.5B-Instruct")
    tokenizer = models.load_tokenizer("modelscope:Qwen/Qwen2.5-0.5B-Instruct")
    assert model.config.vocab_size >= len(tokenizer) > 0
    encoder = rag.load_embedder("modelscope:BAAI/bge-small-zh-v1.5", device="cpu")
    assert encoder.encode(["内科学"]).shape[0] == 1


def _fake_modelscope(monkeypatch, download):
    calls = []

    def snapshot_download(model_id, local_dir=None, **kwargs):
        calls.append(model_id)
        return download(model_id, local_dir)

    monkeypatch.setitem(sys.modules, "modelscope", types.SimpleNamespace(snapshot_download=snapshot_download))
    return calls


def test_a_download_happens_once_and_the_folder_appears_only_when_it_is_whole(cache, tiny_assets, monkeypatch):
    def download(model_id, local_dir):
        shutil.copytree(tiny_assets["model"], local_dir, dirs_exist_ok=True)
        return local_dir

    calls = _fake_modelscope(monkeypatch, download)
    folder = models.fetch("modelscope:Qwen/Qwen2.5-0.5B-Instruct")
    assert folder == str(cache / "Qwen" / "Qwen2.5-0.5B-Instruct") and (cache / "Qwen" / "Qwen2.5-0.5B-Instruct" /
                                                                         "config.json").is_file()
    assert models.fetch("modelscope:Qwen/Qwen2.5-0.5B-Instruct") == folder
    assert calls == ["Qwen/Qwen2.5-0.5B-Instruct"]  # the second time, the folder


def test_a_failed_download_names_the_id_the_source_and_the_other_routes(cache, monkeypatch):
    def download(model_id, local_dir):
        os.makedirs(local_dir, exist_ok=True)
        (open(os.path.join(local_dir, "model.safetensors"), "wb")).close()  # half of it, then the network goes
        raise ConnectionError("connection reset")

    _fake_modelscope(monkeypatch, download)
    with pytest.raises(models.ModelNotFoundError) as e:
        models.load_model("modelscope:Qwen/Qwen2.5-0.5B-Instruct", setting="MEDQA_BASE_MODEL")
    message = str(e.value)
    assert "cannot download 'Qwen/Qwen2.5-0.5B-Instruct' from ModelScope" in message and "connection reset" in message
    assert "HF_ENDPOINT=https://hf-mirror.com MEDQA_BASE_MODEL=Qwen/Qwen2.5-0.5B-Instruct" in message
    assert "a local folder" in message
    assert not (cache / "Qwen" / "Qwen2.5-0.5B-Instruct").exists()  # a half download is never taken for a model


def test_without_the_modelscope_package_the_error_says_how_to_install_it(cache, monkeypatch):
    monkeypatch.setitem(sys.modules, "modelscope", None)
    with pytest.raises(models.ModelNotFoundError, match=r"needs the modelscope package.*pip install modelscope"):
        models.fetch("modelscope:Qwen/Qwen2.5-0.5B-Instruct")
    with pytest.raises(rag.EmbedderNotFoundError, match=r"MEDQA_EMBEDDER=modelscope:BAAI/bge-small-zh-v1.5"):
        rag.load_embedder("modelscope:BAAI/bge-small-zh-v1.5", device="cpu")
    # the chat-template preview of notebook 01 never downloads
    assert models.chat_template_preview("modelscope:Qwen/Qwen2.5-0.5B-Instruct", []).startswith(
        "(no preview of the chat template: model.base = 'modelscope:Qwen/Qwen2.5-0.5B-Instruct' is not downloaded yet")


class _Mirror(http.server.BaseHTTPRequestHandler):
    """A Hugging Face mirror that knows no model: it records what was asked and answers 404."""

    paths: list[str] = []

    def _answer(self):
        _Mirror.paths.append(self.path)
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.send_header("X-Error-Code", "RepoNotFound")
        self.end_headers()

    do_GET = do_HEAD = _answer

    def log_message(self, *args):
        pass


def test_hf_endpoint_sends_every_download_to_the_mirror(tmp_path):
    """Both downloads the project makes, the base model (transformers) and the embedder
    (sentence-transformers), go to HF_ENDPOINT; the errors name it as the source tried."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Mirror)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    mirror = f"http://127.0.0.1:{server.server_address[1]}"
    script = (
        "from medqa_zh import models, rag\n"
        "for load in (lambda: models.load_tokenizer('mirror-test/base-model'),\n"
        "             lambda: rag.load_embedder('mirror-test/embedder', device='cpu')):\n"
        "    try:\n"
        "        load()\n"
        "    except Exception as e:\n"
        "        print(type(e).__name__, str(e).splitlines()[0])\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "MEDQA_", "TRANSFORMERS_"))}
    env.update(HF_ENDPOINT=mirror, HF_HOME=str(tmp_path / "hf"), HF_HUB_ETAG_TIMEOUT="5",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO / "lib"), env.get("PYTHONPATH")])))
    try:
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=180)
    finally:
        server.shutdown()
    lines = done.stdout.splitlines()
    assert done.returncode == 0 and len(lines) == 2, done.stdout + done.stderr[-2000:]
    assert lines[0].startswith("ModelNotFoundError") and f"(source tried: {mirror})" in lines[0]
    assert lines[1].startswith("EmbedderNotFoundError") and f"from {mirror}" in lines[1]
    asked = " ".join(_Mirror.paths)
    assert "mirror-test/base-model" in asked and "mirror-test/embedder" in asked
