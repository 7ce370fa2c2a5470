"""The GPU path, on a machine without one: PyTorch's view of CUDA is faked (availability, compute
capability, name), and what the project then chooses — device, precision, dtype, the vLLM command,
the installed set — is checked. Nothing here touches a real GPU; a real run is in the README."""
import json
import sys
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from helpers import REPO
from medqa_zh import config, models, rag, report, serve

T4, A100 = ("Tesla T4", (7, 5)), ("NVIDIA A100-SXM4-80GB", (8, 0))


@pytest.fixture
def fake_gpu(monkeypatch):
    """``fake_gpu(T4)``: from now on PyTorch reports one GPU of that name and compute capability."""
    import torch

    def install(card, count=1):
        name, capability = card
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)

    return install


@pytest.fixture
def no_gpu(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


# --------------------------------------------------------------------------- device and precision


def test_auto_device_is_the_gpu_when_pytorch_sees_one(fake_gpu, monkeypatch):
    import torch

    fake_gpu(A100)
    assert models.best_device("auto") == "cuda" and models.best_device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert models.best_device("auto") == "cpu"
    with pytest.raises(RuntimeError, match="PyTorch sees no GPU.*Running on a GPU"):
        models.best_device("cuda")
    with pytest.raises(ValueError, match="CUDA_VISIBLE_DEVICES"):
        models.best_device("cuda:1")


def test_bf16_becomes_fp16_below_ampere_for_serving_evaluation_and_training(fake_gpu):
    fake_gpu(T4)  # bf16 only emulated; vLLM refuses it
    assert not models.cuda_bf16_native()
    assert models.inference_dtype("bfloat16", "cuda") == "float16"
    assert models.inference_dtype("bf16", "cuda") == "float16"
    assert models.inference_dtype("float32", "cuda") == "float32"
    assert models.inference_dtype("bfloat16", "cpu") == "bfloat16"  # the CPU profile's choice stays
    assert models.training_precision("auto", "cuda") == "fp16"
    assert models.training_precision("fp32", "cuda") == "fp32"
    fake_gpu(A100)
    assert models.cuda_bf16_native()
    assert models.inference_dtype("bfloat16", "cuda") == "bfloat16"
    assert models.training_precision("auto", "cuda") == "bf16"
    assert models.training_precision("fp16", "cuda") == "fp16"


@pytest.mark.parametrize("card, dtype, precision", [(A100, "bfloat16", "bf16"), (T4, "float16", "fp16")])
def test_auto_dtype_is_bf16_on_a_gpu_that_has_it_else_fp16(fake_gpu, card, dtype, precision):
    fake_gpu(card)
    assert models.inference_dtype("auto", "cuda") == dtype
    assert models.training_precision("auto", "cuda") == precision  # the same detection decides both
    assert models.dtype_line("auto", "cuda").startswith(f"model.dtype auto → {dtype} (this GPU ")
    assert models.inference_dtype("float32", "cuda") == "float32"  # an explicit dtype is taken as given
    assert not models.emulated_bf16("bfloat16", "cuda")


def test_the_manifest_and_the_report_say_what_this_machine_chose(project, fake_gpu):
    fake_gpu(T4, count=2)
    cfg = config.load("gpu")
    manifest = json.loads(config.write_manifest(cfg).read_text(encoding="utf-8"))
    assert manifest["runtime"] == {"device": "cuda", "model_dtype": "auto", "eval_dtype": "float16",
                                   "train_precision": "fp16", "gpu": "Tesla T4", "compute_capability": "7.5",
                                   "bf16_native": False}
    line = report.device_line(manifest["torch_device"], manifest["runtime"])
    assert line == "cuda: 2 x Tesla T4 (compute capability 7.5); training fp16, models in float16"
    assert "None" not in line  # the old line read "cuda Tesla T4 (None threads)"


def test_the_report_device_line_on_a_cpu(project, no_gpu):
    manifest = json.loads(config.write_manifest(config.load("smoke")).read_text(encoding="utf-8"))
    line = report.device_line(manifest["torch_device"], manifest["runtime"])
    assert line.startswith("cpu: ") and " threads; training " in line and "models in float32" in line


def test_the_gpu_profile_steps_on_32_questions_in_batches_a_24gb_card_holds(project):
    """32 per device padded to the batch's longest question was estimated at 23-38 GB: over a 24 GB card.
    The rows are 8 per forward pass unless train.tokens_per_device fits more (the gpu profile: auto); same step."""
    from medqa_zh import train

    default = train.settings(config.load("gpu"), "lora")
    large = train.settings(config.load("gpu", {"train.per_device_train_batch_size": 32, "train.gradient_accumulation_steps": 1}), "full")
    assert default["per_device_train_batch_size"] <= 8
    steps = [s["per_device_train_batch_size"] * s["gradient_accumulation_steps"] for s in (default, large)]
    assert steps == [32, 32]
    assert config.load("gpu")["train.tokens_per_device"] == "auto" and config.load("cpu")["train.tokens_per_device"] is None


# --------------------------------------------------------------------------- models on the GPU


@pytest.fixture
def loads(monkeypatch):
    """Record what would be loaded where, instead of loading it."""
    calls = []
    monkeypatch.setattr(models, "load_model", lambda name, dtype="float32", setting="", device=None:
                        calls.append({"name": name, "dtype": dtype, "device": device}) or "model")
    monkeypatch.setattr(models, "load_tokenizer", lambda name, setting="": "tokenizer")
    return calls


@pytest.mark.parametrize("card, dtype", [(A100, "bfloat16"), (T4, "float16")])
def test_in_process_evaluation_runs_on_the_gpu(project, fake_gpu, loads, card, dtype):
    fake_gpu(card)
    cfg = config.load("gpu")
    assert models.load_for_eval(cfg, "base") == ("model", "tokenizer")
    assert loads == [{"name": cfg.base_model, "dtype": dtype, "device": "cuda"}]


def test_in_process_evaluation_follows_model_device(project, fake_gpu, loads, monkeypatch):
    fake_gpu(A100)
    monkeypatch.setattr(models, "cpu_supports_bf16", lambda: False)  # auto: the CPU's choice, not the GPU's
    models.load_for_eval(config.load("gpu", {"model.device": "cpu"}), "base")
    assert loads[0]["device"] == "cpu" and loads[0]["dtype"] == "float32"


def test_the_embedder_runs_on_the_gpu(fake_gpu, monkeypatch):
    import sentence_transformers

    made = []
    monkeypatch.setattr(sentence_transformers, "SentenceTransformer",
                        lambda name, device=None: made.append(device) or "encoder")
    fake_gpu(A100)
    assert rag.load_embedder("BAAI/bge-small-zh-v1.5") == "encoder"
    assert rag.load_embedder("BAAI/bge-small-zh-v1.5", device="cpu") == "encoder"
    assert made == ["cuda", "cpu"]


# --------------------------------------------------------------------------- serving with vLLM


def _adapter(folder, r):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": r, "lora_alpha": 2 * r}), encoding="utf-8")
    return str(folder)


def test_the_vllm_command_runs_through_this_python_with_the_adapters_rank(tmp_path):
    lora = {"adapters": {"lora": _adapter(tmp_path / "lora", 16)}}
    cmd = serve._command("vllm", "/models/base", "127.0.0.1", 8000, "bfloat16", None, lora, None, (),
                         gpu_memory_utilization=0.3)
    # not a `vllm` looked up on PATH: a kernel or .venv/bin/python started without the env's bin/ on PATH works too
    assert cmd[:5] == [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", "/models/base"]
    assert cmd[cmd.index("--max-lora-rank") + 1] == "16"
    assert cmd[cmd.index("--gpu-memory-utilization") + 1] == "0.3"
    assert f"lora={tmp_path / 'lora'}" in cmd
    assert cmd[cmd.index("--served-model-name") + 1] == "/models/base" and "--disable-fastapi-docs" not in cmd
    public = serve._command("vllm", "/models/base", "0.0.0.0", 8000, "bfloat16", None, None, "merged", (),
                            public=True)
    assert public[public.index("--served-model-name") + 1] == "merged" and "--disable-fastapi-docs" in public


def test_max_lora_rank_is_the_smallest_vllm_value_that_holds_every_adapter(tmp_path):
    assert serve.lora_rank({"a": _adapter(tmp_path / "a", 8)}) == 8
    assert serve.lora_rank({"a": _adapter(tmp_path / "a", 8), "b": _adapter(tmp_path / "b", 12)}) == 16
    with pytest.raises(ValueError, match="above the largest"):
        serve.lora_rank({"big": _adapter(tmp_path / "big", 1024)})
    with pytest.raises(FileNotFoundError, match="adapter 'gone'"):
        serve.lora_rank({"gone": str(tmp_path / "nothing")})


def test_vllm_without_the_gpu_extra_is_a_clear_error(tmp_path, fake_gpu, monkeypatch):
    fake_gpu(A100)
    monkeypatch.setattr(serve, "vllm_installed", lambda: False)
    (tmp_path / "config.json").write_text("{}")  # a model folder, as far as the checks before starting look
    with pytest.raises(serve.ServerError, match=r"vLLM is not installed.*\.\[gpu\]"):
        serve.start(str(tmp_path), backend="vllm")
    assert serve.pick_backend("auto") == "transformers"


class _Exited:
    """A server process that exits at once (what was started is all the test needs)."""

    pid, returncode = 999_999, 1

    def __init__(self, cmd, **kwargs):
        _Exited.command = cmd

    def poll(self):
        return 1


@pytest.mark.parametrize("card, dtype", [(A100, "bfloat16"), (T4, "float16")])
def test_the_gpu_profile_serves_with_vllm_in_a_dtype_the_card_has(project, fake_gpu, monkeypatch, tmp_path, card, dtype):
    fake_gpu(card)
    monkeypatch.setattr(serve, "vllm_installed", lambda: True)
    monkeypatch.setattr(serve.subprocess, "Popen", _Exited)
    (tmp_path / "config.json").write_text("{}")
    cfg = config.load("gpu")
    with pytest.raises(serve.ServerError, match="exited with code 1"):
        serve.from_profile(cfg, str(tmp_path), quiet=True)
    cmd = _Exited.command
    assert cmd[:4] == [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve"]
    assert cmd[cmd.index("--dtype") + 1] == dtype
    assert cmd[cmd.index("--gpu-memory-utilization") + 1] == str(cfg["serve.gpu_memory_utilization"])


def test_the_smoke_profile_never_starts_vllm_for_the_tiny_model(project, fake_gpu, monkeypatch):
    fake_gpu(A100)
    monkeypatch.setattr(serve, "vllm_installed", lambda: True)
    assert serve.pick_backend("auto") == "vllm"  # what smoke used to get on a GPU machine
    assert serve.pick_backend(config.load("smoke")["serve.backend"]) == "transformers"


# --------------------------------------------------------------------------- the installed set


def _pyproject():
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def _lock():
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import lock_gpu
    finally:
        sys.path.remove(str(REPO / "scripts"))
    return lock_gpu


def test_the_gpu_extra_pins_the_recorded_vllm_and_the_project_admits_the_recorded_set():
    """requirements/gpu-linux-py311.txt is what pip resolved for .[gpu,dev] (scripts/lock_gpu.py):
    every requirement of the project must still admit it, or the extra no longer resolves to it."""
    lock = _lock()
    project, pins = _pyproject(), lock.read_lock()
    gpu = [Requirement(r) for r in project["optional-dependencies"]["gpu"]]
    assert [(r.name, str(r.specifier)) for r in gpu] == [("vllm", f"=={pins['vllm']}")]
    requirements = [Requirement(r) for r in project["dependencies"]]
    requirements += [Requirement(r) for extra in ("gpu", "dev") for r in project["optional-dependencies"][extra]]
    for r in requirements:
        name = lock.normalize(r.name)
        assert name in pins, f"{r.name} is not in the recorded set: run scripts/lock_gpu.py --write"
        assert r.specifier.contains(pins[name], prereleases=True), (
            f"pyproject.toml asks for {r} but the recorded gpu set has {r.name}=={pins[name]}: "
            "check the resolution with scripts/lock_gpu.py (and --write it)")
    assert SpecifierSet(project["requires-python"]).contains("3.11")
    assert not SpecifierSet(project["requires-python"]).contains("3.10")  # vLLM 0.33 and trl 1.16 need 3.11
    # the key versions the README and run_all.sh name
    assert pins["torch"].startswith("2.14.") and pins["transformers"].startswith("5.20.")


def test_a_malformed_lock_line_is_named(tmp_path):
    bad = tmp_path / "lock.txt"
    bad.write_text("# comment\nvllm==0.33.0\ntorch>=2\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"lock.txt:3: expected NAME==VERSION"):
        _lock().read_lock(bad)


# --------------------------------------------------------------------------- several GPUs


def test_the_vllm_command_carries_the_profiles_parallel_and_memory_settings(project, fake_gpu, monkeypatch, tmp_path):
    fake_gpu(A100, count=4)
    monkeypatch.setattr(serve, "vllm_installed", lambda: True)
    monkeypatch.setattr(serve.subprocess, "Popen", _Exited)
    (tmp_path / "config.json").write_text("{}")
    cfg = config.load("gpu-multi", {"serve.tensor_parallel_size": 2, "serve.max_num_seqs": 128,
                                    "serve.max_model_len": 4096})
    with pytest.raises(serve.ServerError, match="exited with code 1"):
        serve.from_profile(cfg, str(tmp_path), quiet=True)
    cmd = _Exited.command
    flags = cmd[cmd.index("--dtype") + 2:]
    flags = flags[flags.index("--tensor-parallel-size"):]
    assert flags == ["--tensor-parallel-size", "2", "--data-parallel-size", "2", "--gpu-memory-utilization", "0.3",
                     "--max-num-seqs", "128", "--max-model-len", "4096"]
    # the gpu profile leaves vLLM's defaults alone, but for the memory share and single copies
    assert serve.vllm_scaling({k: config.load("gpu")[f"serve.{k}"] for k in serve.VLLM_SCALING}) == [
        "--tensor-parallel-size", "1", "--data-parallel-size", "1", "--gpu-memory-utilization", "0.3"]


def test_the_transformers_backend_refuses_a_parallel_size_it_cannot_honour(tmp_path):
    cmd = serve._command("transformers", str(tmp_path), "127.0.0.1", 8000, "float32", "cpu", None, None, (),
                         gpu_memory_utilization=0.3, scaling={"tensor_parallel_size": 1, "data_parallel_size": 1,
                                                              "max_num_seqs": 8})
    assert not any(a.startswith("--") and "parallel" in a for a in cmd)  # one copy on one device: nothing to pass
    with pytest.raises(ValueError, match=r"serve.data_parallel_size = 2 is for vLLM"):
        serve._command("transformers", str(tmp_path), "127.0.0.1", 8000, "float32", "cpu", None, None, (),
                       scaling={"data_parallel_size": 2})
    with pytest.raises(ValueError, match="unknown vLLM setting 'pipeline_parallel_size'"):
        serve.vllm_scaling({"pipeline_parallel_size": 2})


def test_vllms_own_parser_reads_the_command_built_for_it(tmp_path):
    """The flags' names and values as vLLM itself parses them. vLLM is not installed on the CPU machines
    that run this suite (it is too big for them), so there it is skipped and only the GPU set runs it."""
    pytest.importorskip("vllm", reason="vLLM is not installed here: its parser cannot be asked (the GPU set has it)")
    from vllm.entrypoints.openai.cli_args import make_arg_parser

    try:
        from vllm.utils.argparse_utils import FlexibleArgumentParser
    except ImportError:
        from vllm.utils import FlexibleArgumentParser
    cmd = serve._command("vllm", str(tmp_path), "127.0.0.1", 8000, "bfloat16", None, None, "merged", (),
                         gpu_memory_utilization=0.3,
                         scaling={"tensor_parallel_size": 2, "data_parallel_size": 2, "max_num_seqs": 64,
                                  "max_model_len": 2048})
    args = make_arg_parser(FlexibleArgumentParser()).parse_args(["--model", *cmd[4:]])
    assert (args.model, args.tensor_parallel_size, args.data_parallel_size, args.gpu_memory_utilization,
            args.max_num_seqs, args.max_model_len) == (str(tmp_path), 2, 2, 0.3, 64, 2048)


def test_the_gpu_multi_profile_launches_one_process_per_gpu_ddp_for_lora_and_fsdp_for_full_sft(project, fake_gpu):
    from medqa_zh import train

    fake_gpu(A100, count=4)
    cfg = config.load("gpu-multi")
    for mode, accelerate_config in (("lora", "ddp.yaml"), ("full", "fsdp.yaml")):
        command = train.launch_command(cfg, mode)
        assert command[command.index("--num_processes") + 1] == "4"
        assert command[command.index("--config_file") + 1] == str(project / "profiles" / "accelerate" / accelerate_config)
        s = train.settings(cfg, mode)
        assert s["per_device_train_batch_size"] * s["gradient_accumulation_steps"] * train.processes(s) == 32
    assert config.load("gpu")["train.launch.num_processes"] == 1  # the gpu profile trains in the kernel
