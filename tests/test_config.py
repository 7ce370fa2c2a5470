import json
import os

import pytest
import yaml

from helpers import REPO
from medqa_zh import config


def test_default_profile_is_smoke(project):
    cfg = config.load()
    assert cfg.name == "smoke" and cfg.smoke
    assert cfg.root == project
    assert cfg.out == project / "outputs" / "smoke"


def test_every_profile_loads_and_names_the_same_settings(project):
    keys = {}
    for name in ("smoke", "cpu", "gpu"):
        cfg = config.load(name)
        assert cfg.smoke == (name == "smoke")
        keys[name] = set(config._leaf_keys(cfg.values)) - {"assets_dir"}
    assert keys["cpu"] == keys["gpu"] == keys["smoke"]


def test_real_profiles_default_to_the_real_base_model(project):
    assert config.load("gpu").base_model == config.DEFAULT_BASE_MODEL == "Qwen/Qwen2.5-0.5B-Instruct"


def test_relative_paths_resolve_against_the_root_not_the_cwd(project, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = config.load("smoke")
    assert cfg.path("data.medqa_dir") == project / "outputs" / "smoke" / "assets" / "medqa"
    assert cfg.questions_dir == cfg.path("data.medqa_dir") / "questions" / "Mainland"
    assert cfg.base_model == str(project / "outputs" / "smoke" / "assets" / "tiny-qwen2")


def test_environment_overrides(project, tmp_path):
    env = {"MEDQA_DIR": str(tmp_path / "medqa"), "MEDQA_BASE_MODEL": "someone/some-model"}
    cfg = config.load("cpu", environ=env)
    assert cfg.path("data.medqa_dir") == tmp_path / "medqa"
    assert cfg.base_model == "someone/some-model"  # a hub id stays a hub id
    assert cfg.overrides["data.medqa_dir"]["from"] == "environment"
    assert config.load("cpu", environ={"MEDQA_BASE_MODEL": "gpt2"}).base_model == "gpt2"
    assert config.load("cpu", environ={"MEDQA_BASE_MODEL": "./models/x"}).base_model == str(project / "models" / "x")
    local = tmp_path / "local-model"
    local.mkdir()
    assert config.load("cpu", environ={"MEDQA_BASE_MODEL": str(local)}).base_model == str(local)


def test_papermill_overrides_beat_the_environment(project):
    cfg = config.load(
        "cpu",
        overrides={"data.medqa_dir": "/from/papermill", "data.splits.eval": "dev[3000:]"},
        environ={"MEDQA_DIR": "/from/env", "MEDQA_PROFILE": "gpu"},
    )
    assert str(cfg.path("data.medqa_dir")) == "/from/papermill"
    assert cfg["data.splits"] == {"train": "dev[:2400]", "validation": "dev[2400:2900]", "eval": "dev[3000:]",
                                  "replication": "test[:500]"}


def test_profile_from_environment(project):
    assert config.load(environ={"MEDQA_PROFILE": "gpu"}).name == "gpu"


def test_unknown_setting_is_an_error_listing_known_ones(project):
    with pytest.raises(KeyError, match="no setting 'data.split'.*data.splits.train"):
        config.load("smoke", overrides={"data.split": "x"})
    with pytest.raises(ValueError, match="group of settings"):
        config.load("smoke", overrides={"data.splits": "dev"})


def test_a_renamed_setting_is_an_error_naming_the_new_one(project):
    """issue 44: train.gradient_checkpointing became train.activation_checkpointing (SFTConfig's name since
    transformers 5); the old key, in a profile or an override, says which key to write instead."""
    assert config.load("smoke")["train.activation_checkpointing"] is False
    new = r"it was renamed: write 'train.activation_checkpointing'"
    with pytest.raises(KeyError, match=r"no setting 'train.gradient_checkpointing'; " + new):
        config.load("smoke", overrides={"train.gradient_checkpointing": True})
    (project / "profiles" / "old.yaml").write_text("train:\n  gradient_checkpointing: true\n")
    with pytest.raises(KeyError, match=r"old.yaml: 'train.gradient_checkpointing' is not a setting of "
                                       r"profiles/base.yaml; " + new):
        config.load("old")
    assert config.load("smoke", overrides={"train.activation_checkpointing": True})["train.activation_checkpointing"]
    # issue 52: the names SFTConfig gives another meaning
    for old, new in (("train.num_train_epochs", "train.epochs"), ("train.packing", "train.padding_free")):
        with pytest.raises(KeyError, match=rf"no setting '{old}'; it was renamed: write '{new}'"):
            config.load("smoke", overrides={old: 1})


def test_unknown_profile_lists_the_known_ones(project):
    with pytest.raises(FileNotFoundError, match="known profiles: cpu, gpu, gpu-multi, smoke"):
        config.load("gpus")


def test_manifest_records_profile_versions_git_device_and_notebooks(project):
    cfg = config.load("smoke", overrides={"eval.batch_size": 2})
    config.write_manifest(cfg, notebook="01_data")
    config.write_manifest(cfg, notebook="02_lora_sft")
    m = json.loads((project / "outputs" / "smoke" / "manifest.json").read_text(encoding="utf-8"))
    assert m["profile"] == "smoke" and m["profile_file"] == "profiles/smoke.yaml"
    assert len(m["profile_file_sha256"]) == 64 and m["settings_sha256"] == cfg.sha256
    assert m["settings"]["eval"]["batch_size"] == 2
    assert m["overrides"]["eval.batch_size"]["value"] == 2
    assert m["packages"]["torch"] and m["packages"]["transformers"] and m["packages"]["python"]
    assert m["torch_device"]["device"] in ("cpu", "cuda")
    assert "commit" in m["git"] and m["time"].endswith("+00:00")
    assert set(m["notebooks"]) == {"01_data", "02_lora_sft"}


def test_settings_hash_follows_the_settings(project):
    a = config.load("smoke")
    assert a.sha256 == config.load("smoke").sha256
    assert a.sha256 != config.load("smoke", overrides={"seed": 1}).sha256


def test_setup_builds_smoke_assets_and_warns(project, capsys):
    cfg = config.setup("smoke", notebook="01_data")
    assert (cfg.path("model.base") / "config.json").is_file()
    assert (cfg.questions_dir / "train.jsonl").is_file()
    assert (cfg.out / "manifest.json").is_file()
    assert "SMOKE PROFILE" in capsys.readouterr().err


def test_setup_of_a_real_profile_builds_nothing(project, capsys):
    cfg = config.setup("cpu")
    assert not (project / "outputs" / "cpu" / "assets").exists()
    assert "SMOKE" not in capsys.readouterr().out
    assert os.path.isfile(cfg.out / "manifest.json")


def test_a_profile_holds_only_its_changes_to_the_base(project):
    profiles = project / "profiles"
    cpu = config.load("cpu")
    assert cpu["train.learning_rate"] == config.load("gpu")["train.learning_rate"]  # from the base
    written = yaml.safe_load((profiles / "cpu.yaml").read_text(encoding="utf-8"))["train"]
    assert cpu["train.max_steps"] == written["max_steps"] != config.load("gpu")["train.max_steps"]  # the profile's own
    assert cpu["train.full.max_steps"] == 6 and cpu["train.lora.r"] == 16
    (profiles / "typo.yaml").write_text("train:\n  learning_rat: 1.0e-4\n")
    with pytest.raises(KeyError, match=r"typo.yaml: 'train.learning_rat' is not a setting of profiles/base.yaml"):
        config.load("typo")
    (profiles / "flat.yaml").write_text("train:\n  lora: 8\n")
    with pytest.raises(ValueError, match=r"flat.yaml: 'train.lora' is a group of settings \(r, alpha"):
        config.load("flat")
    with pytest.raises(FileNotFoundError, match="no profile 'base'") as e:
        config.load("base")
    assert "known profiles: cpu, flat, gpu, gpu-multi, smoke, typo" in str(e.value)


# --------------------------------------------------------------------------- model.dtype: auto, on a CPU


@pytest.fixture
def cpu_bf16(monkeypatch):
    """``cpu_bf16(native)``: PyTorch sees no GPU, and this CPU has (True) or lacks (False) native bf16."""
    import torch

    from medqa_zh import models

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    return lambda native: monkeypatch.setattr(models, "cpu_supports_bf16", lambda: native)


@pytest.mark.parametrize("native, dtype, precision", [(False, "float32", "fp32"), (True, "bfloat16", "bf16")])
def test_model_dtype_auto_follows_native_bf16_on_a_cpu_and_the_manifest_records_it(project, cpu_bf16, native, dtype,
                                                                                    precision):
    from medqa_zh import models

    cpu_bf16(native)
    cfg = config.load("cpu")  # the base's auto, which the cpu profile keeps
    assert cfg["model.dtype"] == "auto" and models.eval_dtype(cfg) == dtype
    assert models.training_precision("auto", "cpu") == precision  # train.precision: auto, the same detection
    runtime = json.loads(config.write_manifest(cfg).read_text(encoding="utf-8"))["runtime"]
    assert (runtime["model_dtype"], runtime["eval_dtype"], runtime["bf16_native"]) == ("auto", dtype, native)
    assert models.dtype_line("auto", "cpu") == (f"model.dtype auto → {dtype} (this CPU has "
                                                + ("native bf16 (AVX-512 BF16 or AMX))" if native else
                                                   "no native bf16 (no AVX-512 BF16/AMX))"))


def test_cached_answers_are_keyed_by_the_dtype_auto_resolved_to(project, cpu_bf16):
    from medqa_zh import models

    def fingerprint(**change):
        return models.answers_fingerprint(config.load("cpu", change), "base")

    cpu_bf16(False)
    fp32 = fingerprint()
    assert fp32 == fingerprint(**{"model.dtype": "float32"})
    cpu_bf16(True)
    assert fingerprint() == fingerprint(**{"model.dtype": "bfloat16"}) != fp32


def test_an_explicit_dtype_is_taken_as_given_and_bf16_on_a_cpu_without_it_says_it_is_slow(project, cpu_bf16, tmp_path,
                                                                                          monkeypatch, capsys):
    from medqa_zh import models, serve

    cpu_bf16(False)
    assert models.eval_dtype(config.load("cpu", {"model.dtype": "bfloat16"})) == "bfloat16"
    assert models.eval_dtype(config.load("smoke")) == "float32"  # smoke sets it
    line = models.dtype_line("bfloat16", "cpu")
    assert "\n" not in line and models.emulated_bf16("bfloat16", "cpu") and not models.emulated_bf16("auto", "cpu")
    assert line.startswith("model.dtype bfloat16 on a CPU without native bf16 (no AVX-512 BF16/AMX): taken as given")
    assert "slower than in float32" in line and "docs/results-cpu.md" in line
    assert "bench/eval_dtype.py" in (REPO / "docs" / "results-cpu.md").read_text(encoding="utf-8")  # the cited measurement
    assert models.dtype_line("float32", "cpu") == "model.dtype float32 (as set)"

    class Exited:  # a server process that exits at once: what start printed before it is all that matters
        pid, returncode = 999_999, 1

        def __init__(self, cmd, **kwargs):
            pass

        def poll(self):
            return 1

    monkeypatch.setattr(serve.subprocess, "Popen", Exited)
    (tmp_path / "config.json").write_text("{}")
    auto = "model.dtype auto → float32 (this CPU has no native bf16 (no AVX-512 BF16/AMX))"
    for dtype, said in (("bfloat16", line + "\n"), ("auto", auto + "\n"), ("float32", "")):  # the server says it too
        with pytest.raises(serve.ServerError, match="exited with code 1"):
            serve.start(str(tmp_path), backend="transformers", dtype=dtype, device="cpu")
        assert capsys.readouterr().out == said
    cpu_bf16(True)
    assert models.dtype_line("bfloat16", "cpu") == "model.dtype bfloat16 (as set)"  # native: nothing to warn of


@pytest.mark.parametrize("profile, backend", [("smoke", "transformers"), ("cpu", "transformers")])
def test_the_serve_command_a_person_types_is_the_profiles_server(profile, backend):
    """05 prints it (issue 52): python -m medqa_zh.serve's own parser reads it back as the profile's server."""
    from medqa_zh import serve

    cfg = config.load(profile)
    cmd = serve.typed_command(cfg, "outputs/x/models/merged", served_name="merged")
    assert cmd[:3] == ["python", "-m", "medqa_zh.serve"]
    a = serve.parser().parse_args(cmd[3:])
    assert (a.model_dir, a.profile, a.backend, a.dtype, a.port, a.served_model_name) == (
        "outputs/x/models/merged", profile, backend, str(cfg["model.dtype"]), 8000, "merged")
    # llama.cpp serves the model's GGUF (04's export), as serve.from_profile does
    cfg = config.load(profile, {"serve.backend": "llamacpp"})
    a = serve.parser().parse_args(serve.typed_command(cfg, "outputs/x/models/merged", served_name="merged")[3:])
    assert a.backend == "llamacpp" and a.model_dir.endswith(f"merged-{cfg['gguf.serve']}.gguf"), a.model_dir
