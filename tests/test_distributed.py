"""Training in two processes on the CPU (data parallel over gloo), through ``python -m medqa_zh.train``.

Each run is a real launch (``accelerate launch`` of the entry point, two Python processes) on the
tiny smoke model: seconds of training, about 10 s of process start-up each.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import types

import pytest
import torch
import yaml
from safetensors import safe_open

from helpers import REPO, at_root, logged, processes_of, same_points, trackio_points
from medqa_zh import config, dashboards, models, runs, train

pytestmark = pytest.mark.timeout(1200)  # a hang fails with its stack; at least 5x the longest such test measured with both cores busy

# 6 steps of per_device_train_batch_size 8 (the smoke profile's): evaluation at steps 0 and 5 (eval_steps 5)
STEPS = ("train.max_steps=6", "train.eval_steps=5", "train.logging_steps=1", "train.resume=false")


def _env(root) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDQA_") and k != "TRACKIO_DIR"}
    env["MEDQA_ROOT"] = str(root)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "lib"), *filter(None, [env.get("PYTHONPATH")])])
    return env


def _train(root, mode: str, *overrides: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m medqa_zh.train`` as a user types it; it launches processes when train.launch asks for more than one."""
    cmd = [sys.executable, "-m", "medqa_zh.train", "--profile", "smoke", "--mode", mode, *overrides]
    return subprocess.run(cmd, env=_env(root), cwd=root, capture_output=True, text=True, timeout=timeout)


def _ok(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def _folder(root, mode):
    with at_root(root):
        return models.folder(config.load("smoke"), mode)


def _first_step(folder) -> dict:
    return next(r for r in runs.read_log(folder) if r["step"] == 1 and "loss" in r)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_two_processes_train_like_one_process_with_twice_the_accumulation(smoke_root, mode):
    """Two processes x 1 micro-batch per step and one process x 2 micro-batches read the same 16 examples
    in each optimizer step, in the same micro-batches (the stream is sorted per global step, and the
    launched processes take alternate micro-batches). Before the first update the two computations differ
    only in float32 summation order (the all-reduce adds two halves that gradient accumulation adds in
    turn), so the first step's loss and gradient norm agree to 1e-5 relative; a gradient averaged
    wrongly across processes (the loss not scaled back up by the world size) halves the norm."""
    folder = _folder(smoke_root, mode)
    out = _ok(_train(smoke_root, mode, *STEPS, "train.launch.num_processes=2"))
    assert "-m accelerate.commands.launch --num_processes 2" in out  # the command, shown before it runs
    two = runs.read_run(folder)
    assert (two["world_size"], two["parallelism"]) == (2, "MULTI_CPU")
    assert two["examples_per_step"] == 2 * 8 * 1  # the global batch: per device x accumulation x processes
    assert two["optimizer_steps"] == 6
    weights = sorted(p.name for p in folder.glob("*.safetensors"))
    assert weights == (["adapter_model.safetensors"] if mode == "lora" else ["model.safetensors"])
    assert not folder.with_name(folder.name + ".saving").exists()
    assert sorted(p.name for p in (folder / "checkpoints").glob("checkpoint-*/rng_state*.pth")) == \
        ["rng_state_0.pth", "rng_state_1.pth"]  # one per process: a resume restores each one's randomness
    two_first, two_log = _first_step(folder), runs.read_log(folder)
    # the launched processes built their trainer from the builders 02's and 03's cells call (train.parts,
    # train.sft_config, train.lora_config): what they trained with is what the cells build for the same run here
    saved = torch.load(sorted((folder / "checkpoints").glob("checkpoint-*"))[-1] / "training_args.bin", weights_only=False)
    with at_root(smoke_root):
        overrides = dict(item.split("=") for item in (*STEPS, "train.launch.num_processes=2"))
        p = train.parts(config.load("smoke", {k: yaml.safe_load(v) for k, v in overrides.items()}), mode, out_dir=folder)
    cell = train.sft_config(p)
    fields = ("learning_rate", "lr_scheduler_type", "warmup_steps", "weight_decay", "max_grad_norm", "max_steps",
              "num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps", "completion_only_loss",
              "max_length", "padding_free", "packing", "bf16", "fp16", "seed", "output_dir", "eval_steps", "save_steps",
              "logging_steps")
    assert {f: getattr(saved, f) for f in fields} == {f: getattr(cell, f) for f in fields}
    if mode == "lora":
        adapter = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
        lora = train.lora_config(p.settings)
        assert (adapter["r"], adapter["lora_alpha"], adapter["lora_dropout"]) == (lora.r, lora.lora_alpha, lora.lora_dropout)
    del p

    _ok(_train(smoke_root, mode, *STEPS, "train.gradient_accumulation_steps=2"))
    one = runs.read_run(folder)
    assert (one["world_size"], one["examples_per_step"], one["parallelism"]) == (1, 16, "NO")
    one_first = _first_step(folder)
    assert two_first["num_input_tokens_seen"] == one_first["num_input_tokens_seen"]  # the same examples
    for key in ("loss", "grad_norm", "entropy"):
        assert two_first[key] == pytest.approx(one_first[key], rel=1e-5), key
    # the answer tokens of both processes: the same counts as one process's two micro-batches
    assert (two_first["mean_token_accuracy"], two_first["num_tokens"]) == (one_first["mean_token_accuracy"], one_first["num_tokens"])
    evals = {r["step"]: r["eval_loss"] for r in two_log if "eval_loss" in r}
    assert evals[0] == pytest.approx(runs.read_log(folder)[0]["eval_loss"], rel=1e-5)

    # what two processes write loads as any run does (notebooks 04 and 06): the adapter onto its base
    # (base_model.json's fingerprint checked), the full model with the base's tensor names
    _ok(_train(smoke_root, mode, *STEPS, "train.launch.num_processes=2"))
    base_dir = smoke_root / "outputs" / "smoke" / "assets" / "tiny-qwen2"
    if mode == "lora":
        models.load_adapter(models.load_model(str(base_dir)), folder, str(base_dir))
    else:
        with safe_open(folder / "model.safetensors", "pt") as saved, safe_open(base_dir / "model.safetensors", "pt") as base:
            assert sorted(saved.keys()) == sorted(base.keys())
        models.load_model(str(folder))


# one process of a launch on this host, as torchrun starts it, planning its micro-batches with tokens_per_device: auto;
# each reads the free memory at its own moment, here made to differ (MEMORY_MIB, per rank), as it does under load
_PLAN = """
import json, os, sys, types
import torch
from accelerate import PartialState
from medqa_zh import train

PartialState(cpu=True)
rank = int(os.environ["RANK"])
train.device_memory_bytes = lambda device: int(float(os.environ["MEMORY_MIB"].split(",")[rank]) * 2**20)
shape = types.SimpleNamespace(hidden_size=64, intermediate_size=128, num_hidden_layers=2, vocab_size=1000)
model = types.SimpleNamespace(parameters=lambda: [torch.zeros(10_000)], config=shape)
s = {"per_device_train_batch_size": 8, "gradient_accumulation_steps": 1, "tokens_per_device": "auto", "padding_free": False}
try:
    plan = train.plan_micro_batches(s, [100] * 64, model, "fp32", "lora", "cpu", head_share=0.1)
    print("PLAN " + json.dumps(plan), flush=True)
except ValueError as error:
    print("ERROR " + str(error), flush=True)
torch.distributed.barrier()  # neither leaves while the other still talks to it, then the group ends cleanly
torch.distributed.destroy_process_group()
"""
_SHAPE = types.SimpleNamespace(hidden_size=64, intermediate_size=128, num_hidden_layers=2, vocab_size=1000)


def _plans(memory_mib: str) -> list[str]:
    """What each of two processes of a launch (gloo, on this host) printed after planning with ``MEMORY_MIB``."""
    with socket.socket() as sock:  # a free port for this launch's rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "MEMORY_MIB": memory_mib, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO / "lib"), *filter(None, [os.environ.get("PYTHONPATH")])])}
    procs = [subprocess.Popen([sys.executable, "-c", _PLAN], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    try:
        outs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:  # one left waiting for the other (a plan never sent) is not left behind
            if p.poll() is None:
                p.kill()
                p.wait()
    assert all(p.returncode == 0 for p in procs), outs
    return [next(line for line in out.splitlines() if line.startswith(("PLAN ", "ERROR "))) for out in outs]


def _budget(memory_mib: float) -> int:
    """auto's budget by hand, for one of two processes sharing ``memory_mib``: 60% of their half, less the 40 kB of
    weights, less the logged entropy's temporaries, over the activations a token keeps (``_PLAN``'s shape)."""
    per_token = train.activation_bytes_per_token(_SHAPE, "fp32", True, 0.1)
    return max(int(((memory_mib / 2 * 2**20 - 40_000) * train.AUTO_MEMORY_SHARE - train.entropy_bytes(_SHAPE.vocab_size))
                   / per_token), 1)


@pytest.mark.parametrize("rank1_mib", [12, 2])
def test_every_process_of_a_launch_gets_the_same_micro_batches(rank1_mib):
    """``tokens_per_device: auto`` is planned once, by the main process, from the host's memory divided among the
    processes on it, and every process takes that plan. Rank 1, reading under a third of rank 0's free memory, would
    otherwise split each step into more micro-batches than rank 0 (wrong batches, or a gradient sync that hangs); and
    reading 2 MiB, too little for even one example, its own plan would stop it while rank 0's fits."""
    lines = _plans(f"40,{rank1_mib}")
    assert all(line.startswith("PLAN ") for line in lines), lines
    plans = [json.loads(line[5:]) for line in lines]
    assert plans[0] == plans[1]
    assert plans[0]["token_budget"] == _budget(40) and plans[0]["per_step"] == 1  # rank 0's: 20 MiB each
    alone = _budget(rank1_mib)  # rank 1's own, so the test can fail
    if rank1_mib == 12:
        assert train.micro_batches([100] * 64, 8, alone, False) != plans[0]["per_step"]
    else:
        with pytest.raises(ValueError, match="smaller than the longest training example"):
            train.micro_batches([100] * 64, 8, alone, False)


def test_when_the_main_processs_plan_does_not_fit_every_process_stops_with_its_error():
    """Rank 0 reads too little memory for one example; rank 1, with plenty, must not wait for a plan that never
    comes: both stop with the main process's error, which says what to set."""
    lines = _plans("2,40")
    assert lines[0].startswith("ERROR train.tokens_per_device = ") and "smaller than the longest" in lines[0]
    assert lines[1] == lines[0]


def _complete(checkpoint) -> bool:
    return not train.checkpoint_missing(checkpoint) and len(list(checkpoint.glob("rng_state_*.pth"))) == 2


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_a_killed_two_process_run_resumes_from_its_last_checkpoint(smoke_root, mode):
    folder = _folder(smoke_root, mode)
    shutil.rmtree(folder, ignore_errors=True)  # an earlier test's finished run: any checkpoint found is this run's
    overrides = {"train.max_steps": 60, "train.save_steps": 5, "train.eval_steps": 30, "train.logging_steps": 1,
                 "train.launch.num_processes": 2}
    with at_root(smoke_root):
        cfg = config.load("smoke", {**overrides, "train.resume": False})
        command = train.launch_command(cfg, mode)  # what a notebook with train.launch.num_processes 2 starts
    proc = subprocess.Popen(command, env=_env(smoke_root), cwd=smoke_root, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not any(_complete(c) for c in (folder / "checkpoints").glob("checkpoint-*")):
            assert proc.poll() is None, "the run ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.05)
    finally:
        for pid in processes_of(smoke_root):  # the launcher and both processes, at once, as a crash would
            os.kill(pid, signal.SIGKILL)
        proc.wait()
    time.sleep(0.5)
    assert not processes_of(smoke_root)
    assert not (folder / runs.RUN_FILE).exists(), "killed after it finished: the test proved nothing"
    args = [f"{k}={json.dumps(v)}" for k, v in overrides.items()]

    # one process cannot continue what two began: the steps would hold other examples
    refused = _train(smoke_root, mode, *args, "train.launch.num_processes=1")
    assert refused.returncode != 0
    assert "written by a run in 2 process(es)" in refused.stderr and "train with 2 process(es) again" in refused.stderr

    out = _ok(_train(smoke_root, mode, *args))
    metrics = runs.read_run(folder)
    assert "resuming from" in out and metrics["resumed_from"]
    assert metrics["optimizer_steps"] == 60 and metrics["world_size"] == 2
    steps = [r["step"] for r in runs.read_log(folder) if "loss" in r]
    assert steps == list(range(1, 61))  # each step logged once: the log was cut back to the checkpoint


@pytest.mark.slow
def test_under_a_launch_only_the_main_process_reports(smoke_root):
    """Two processes with train.report_to [tensorboard, trackio]: one writer of event files and one trackio run,
    each holding every logged step once, equal to train_log.jsonl."""
    folder = _folder(smoke_root, "lora")
    _ok(_train(smoke_root, "lora", *STEPS, "train.launch.num_processes=2", "train.report_to=[tensorboard, trackio]"))
    assert runs.read_run(folder)["world_size"] == 2
    assert len(list((folder / runs.TENSORBOARD_DIR).glob("events.out.tfevents*"))) == 1
    store = dashboards.read_trackio(smoke_root / "outputs" / "smoke" / "trackio", "medqa-zh-smoke")
    rows = store[dashboards.run_name(runs.read_run(folder)["run_key"])]
    for tag, key in (("train/loss", "loss"), ("eval/loss", "eval_loss")):
        same_points(dashboards.read_tensorboard(folder / runs.TENSORBOARD_DIR, tag), logged(folder, key))
        same_points(trackio_points(rows, tag), logged(folder, key))


@pytest.mark.slow
def test_a_launched_process_that_finds_itself_alone_does_not_launch_again(smoke_root):
    """A launcher that starts no process group (accelerate's --cpu without MPI does that) must not make each
    process start the launch again, which would never end."""
    env = {**_env(smoke_root), train.LAUNCHED: "2"}
    cmd = [sys.executable, "-m", "medqa_zh.train", "--profile", "smoke", "train.launch.num_processes=2"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "the launcher started no process group" in done.stderr


@pytest.mark.parametrize("name", ["ddp.yaml", "fsdp.yaml"])
def test_the_shipped_accelerate_configs_are_valid_for_accelerate(name):
    from accelerate.commands.config.config_args import load_config_from_file

    path = REPO / "profiles" / "accelerate" / name
    loaded = load_config_from_file(str(path))
    assert loaded.distributed_type.value == yaml.safe_load(path.read_text())["distributed_type"]
    if name == "fsdp.yaml":
        assert loaded.fsdp_config["fsdp_version"] == 2
        assert loaded.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
        from transformers.models.qwen2 import modeling_qwen2

        assert hasattr(modeling_qwen2, loaded.fsdp_config["fsdp_transformer_layer_cls_to_wrap"])


@pytest.mark.slow
def test_a_notebook_asking_for_two_processes_previews_on_the_cpu_then_launches_and_streams(smoke_root, monkeypatch,
                                                                                          capsys):
    monkeypatch.setenv("PYTHONPATH", _env(smoke_root)["PYTHONPATH"])  # the launched processes import this lib
    with at_root(smoke_root):
        cfg = config.load("smoke", {"train.launch.num_processes": 2, "train.max_steps": 4, "train.resume": False})
        run = train.prepare(cfg, "lora")  # what 02 runs: its tables and the label view come from this run
        assert run.launch[run.launch.index("--num_processes") + 1] == "2"
        assert {p.device.type for p in run.model.parameters()} == {"cpu"}  # the GPUs stay free for the processes
        assert any(counted for _, counted in train.label_view(run, 0))
        metrics = train.train(run)
    streamed = capsys.readouterr().out
    assert "4/4" in streamed and "4/4" in (run.out_dir / "launch.log").read_text()  # the progress bar came through
    assert (metrics["world_size"], metrics["optimizer_steps"]) == (2, 4)
    assert metrics == runs.read_run(run.out_dir)
    assert run.model is None and run.trainer is None  # the preview's model was freed before the launch


def test_the_launch_command_carries_the_profile_the_mode_and_the_overrides(smoke):
    cfg = smoke(**{"train.launch.num_processes": 4, "train.max_steps": 20, "train.lora": {"r": 4}})
    cfg.overrides["model.base"] = {"value": "/elsewhere", "from": "environment"}  # reaches the processes by itself
    command = train.launch_command(cfg, "lora")
    threads = str(max(1, torch.get_num_threads() // 4))  # this machine's cores, shared by the 4 processes
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "4",
                "--num_cpu_threads_per_process", threads, "--multi_gpu",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    assert command == launcher + ["-m", "medqa_zh.train", "--profile", "smoke", "--mode", "lora",
                                  "train.launch.num_processes=4", "train.max_steps=20", 'train.lora={"r": 4}']
    parsed = dict(train._override(a) for a in command[command.index("--mode") + 2:])
    assert parsed == {k: v["value"] for k, v in cfg.overrides.items() if v["from"] != "environment"}


def test_full_sft_launches_with_its_own_accelerate_config(smoke):
    cfg = smoke(**{"train.launch": {"num_processes": 2, "config": "profiles/accelerate/ddp.yaml"},
                   "train.full.launch": {"num_processes": None, "config": "profiles/accelerate/fsdp.yaml"}})
    config_of = {mode: train.launch_command(cfg, mode) for mode in train.MODES}
    for mode, name in (("lora", "ddp.yaml"), ("full", "fsdp.yaml")):
        command = config_of[mode]
        assert command[command.index("--config_file") + 1] == str(cfg.root / "profiles" / "accelerate" / name)
        assert command[command.index("--num_processes") + 1] == "2"  # train.full.launch: null keeps LoRA's
        assert "--multi_gpu" not in command  # the config file says how


def test_a_missing_accelerate_config_or_a_bad_process_count_is_named(smoke):
    with pytest.raises(FileNotFoundError, match=r"train.launch.config = 'profiles/accelerate/nope.yaml'.*missing"):
        train.launch_command(smoke(**{"train.launch.num_processes": 2,
                                      "train.launch.config": "profiles/accelerate/nope.yaml"}), "lora")
    for bad in (0, "two", 1.5, True):
        with pytest.raises(ValueError, match="train.launch.num_processes is"):
            train.processes(train.settings(smoke(**{"train.launch.num_processes": bad}), "lora"))
    assert train.processes(train.settings(smoke(**{"train.launch.num_processes": "auto"}), "lora")) >= 1


@pytest.mark.parametrize("text", ["train.max_steps", "=3", "max_steps 3"])
def test_an_override_without_key_and_value_is_refused(text):
    with pytest.raises(SystemExit):
        train.main(["--profile", "smoke", text])


def test_an_fsdp_checkpoint_is_complete_only_once_its_shards_are_all_written(tmp_path):
    """FSDP checkpoints hold the weights and the optimizer as torch.distributed.checkpoint folders, whose
    .metadata is written after every shard: without it the folder is half-written, with it complete (a
    resume must neither delete a good FSDP checkpoint nor trust a broken one)."""
    folder = tmp_path / "checkpoint-10"
    for name in ("pytorch_model_fsdp_0/__0_0.distcp", "pytorch_model_fsdp_0/__1_0.distcp", "optimizer_0/__0_0.distcp",
                 "trainer_state.json", "scheduler.pt", "rng_state_0.pth", "rng_state_1.pth"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"x")
    missing = train.checkpoint_missing(folder)
    assert len(missing) == 2 and missing[0].startswith("the weights") and missing[1] == "optimizer.pt"
    for shards in ("pytorch_model_fsdp_0", "optimizer_0"):
        (folder / shards / ".metadata").write_bytes(b"x")
    assert train.checkpoint_missing(folder) == []

