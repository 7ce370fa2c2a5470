"""train.report_to: TensorBoard and trackio show what train_log.jsonl holds, read back with each tool's own reader.

TensorBoard's event files are read with its ``EventAccumulator``, trackio's store with its ``SQLiteStorage`` in a
process of its own (``dashboards.read_tensorboard``, ``dashboards.read_trackio``: a few lines around each reader).
"""
import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from helpers import REPO, Crash, crash_at, logged, same_points, trackio_points
from medqa_zh import dashboards, runs, train

STEPS = {"train.max_steps": 4, "train.eval_steps": 2, "train.logging_steps": 1}


def test_tensorboard_sees_the_losses_train_log_has(smoke):
    """Event files in the run's own folder; TensorBoard's reader finds every training and eval loss at its step,
    equal to train_log.jsonl's."""
    cfg = smoke(**STEPS, **{"train.report_to": "tensorboard"})
    out = cfg.out / "models" / "tb-check"
    run = train.prepare(cfg, "lora", out_dir=out)
    assert run.trainer.args.report_to in ([], "none", ["none"])  # our callback, not transformers' default folder
    train.train(run, resume=False)
    for tag, key in (("train/loss", "loss"), ("eval/loss", "eval_loss")):
        assert len(logged(out, key)) >= 2, key
        same_points(dashboards.read_tensorboard(out / runs.TENSORBOARD_DIR, tag), logged(out, key))
    assert not (cfg.out / "trackio").exists()


def test_trackio_holds_the_losses_train_log_has(smoke, capsys):
    """One trackio run per training run, in the profile's store and project, every point at its optimizer step."""
    cfg = smoke(**STEPS, **{"train.report_to": ["trackio"]})
    out = cfg.out / "models" / "trackio-check"
    run = train.prepare(cfg, "lora", out_dir=out)
    train.train(run, resume=False)
    assert f"watch it live: TRACKIO_DIR={run.watch.store} trackio show --project medqa-zh-smoke" in capsys.readouterr().out
    name = dashboards.run_name(run.run_key)
    assert run.trainer.args.project == f"medqa-zh-{cfg.name}" and name.startswith("lora-")
    store = dashboards.read_trackio(run.watch.store, run.watch.project)
    assert name in store
    for tag, key in (("train/loss", "loss"), ("eval/loss", "eval_loss")):
        same_points(trackio_points(store[name], tag), logged(out, key))
    assert not (out / runs.TENSORBOARD_DIR).exists()


def test_trackio_keeps_its_store_in_the_profiles_outputs(smoke_root, tmp_path):
    """In a fresh process (a notebook's kernel, a launched process) the store is outputs/<profile>/trackio, and
    the environment is left as it was; TRACKIO_DIR, when set, wins."""
    code = ("import os, sys\nfrom medqa_zh import config, dashboards\n"
            "w = dashboards.watch(config.load('smoke', {'train.report_to': 'trackio'}), sys.argv[1])\n"
            "w.trackio()\nprint(w.store, os.environ.get('TRACKIO_DIR'))")
    env = {k: v for k, v in os.environ.items() if k != "TRACKIO_DIR" and not k.startswith("MEDQA_")}
    env.update(MEDQA_ROOT=str(smoke_root), PYTHONPATH=str(REPO / "lib"))
    for extra, expected in (({}, smoke_root / "outputs" / "smoke" / "trackio"), ({"TRACKIO_DIR": str(tmp_path)}, tmp_path)):
        done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")], env={**env, **extra},
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        store, environ = done.stdout.split()[-2:]
        assert store == str(expected) and environ == extra.get("TRACKIO_DIR", "None")


def test_a_resumed_run_shows_each_step_once_in_both_dashboards(smoke):
    """A crash after checkpoint 4 leaves steps 5 and 6 in the dashboards; the resumed run redoes them. Both
    dashboards are rewritten from the log cut back to the checkpoint, so each step shows once, with the value
    the log keeps; a later fresh start of the same run leaves only its own points."""
    cfg = smoke(**{"train.max_steps": 8, "train.save_steps": 4, "train.eval_steps": 4, "train.logging_steps": 1,
                   "train.report_to": ["tensorboard", "trackio"]})
    out = cfg.out / "models" / "resumed"
    crashed = train.prepare(cfg, "lora", out_dir=out)
    crashed.trainer.add_callback(crash_at(6))
    with pytest.raises(Crash):
        train.train(crashed, resume=False)
    before = dashboards.read_tensorboard(out / runs.TENSORBOARD_DIR, "train/loss")
    assert [s for s, _ in before] == [1, 2, 3, 4, 5]  # step 6 crashed before its log

    resumed = train.prepare(cfg, "lora", out_dir=out)
    assert train.train(resumed)["resumed_from"].endswith("checkpoint-4")
    name = dashboards.run_name(resumed.run_key)
    for tag, key in (("train/loss", "loss"), ("eval/loss", "eval_loss")):
        expected = logged(out, key)
        assert [s for s, _ in expected] == sorted({s for s, _ in expected}), key  # the log itself: once each
        same_points(dashboards.read_tensorboard(out / runs.TENSORBOARD_DIR, tag), expected)
        same_points(trackio_points(dashboards.read_trackio(resumed.watch.store, resumed.watch.project)[name], tag), expected)

    again = train.prepare(cfg, "lora", out_dir=out)
    train.train(again, resume=False)  # the same run key, trained afresh: its old points go
    same_points(dashboards.read_tensorboard(out / runs.TENSORBOARD_DIR, "train/loss"), logged(out, "loss"))
    same_points(trackio_points(dashboards.read_trackio(again.watch.store, again.watch.project)[name], "train/loss"),
                logged(out, "loss"))


def test_the_learning_curve_reaches_both_dashboards_once_however_often_it_is_drawn(smoke, tmp_path):
    cfg = smoke(**{"train.report_to": ["tensorboard", "trackio"]})
    key = {"mode": "lora", "settings": {"seed": 1}}
    curve = pd.DataFrame({"step": [0, 8, 16], "plain": [0.2, 0.25, 0.3], "pride": [0.22, 0.24, 0.31]})
    dashboards.watch(smoke(), tmp_path / "off").curve(key, curve)  # report_to none: nothing
    assert not (tmp_path / "off").exists()
    watch = dashboards.watch(cfg, tmp_path / "on")
    for _ in range(2):  # 02 draws the curve on every run of the notebook
        watch.curve(key, curve)
    expected = [(0, 0.22), (8, 0.24), (16, 0.31)]
    same_points(dashboards.read_tensorboard(watch.tensorboard / dashboards.CURVE_DIR, "validation/pride_accuracy"), expected)
    rows = dashboards.read_trackio(watch.store, watch.project)[dashboards.run_name(key) + "-curve"]
    same_points(trackio_points(rows, "validation/pride_accuracy"), expected)
    same_points(trackio_points(rows, "validation/plain_accuracy"), [(0, 0.2), (8, 0.25), (16, 0.3)])


def test_a_default_run_reports_nowhere_and_imports_neither_package(smoke_root):
    """train.report_to none, in a process where tensorboard and trackio cannot be imported: training runs, and
    writes nothing beside the run's own files. Asking for TensorBoard there names the extra to install."""
    code = ("import sys\nfor name in ('tensorboard', 'tensorboardX', 'trackio'):\n    sys.modules[name] = None\n"
            "from medqa_zh import train\ntrain.main(sys.argv[1:])")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDQA_") and k != "TRACKIO_DIR"}
    env.update(MEDQA_ROOT=str(smoke_root), PYTHONPATH=str(REPO / "lib"))
    args = ["--profile", "smoke", "--mode", "lora", "train.max_steps=2", "train.eval_steps=2", "train.resume=false"]
    done = subprocess.run([sys.executable, "-c", code, *args], env=env, cwd=smoke_root, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    folder = smoke_root / "outputs" / "smoke" / "models" / "lora"
    assert runs.read_run(folder)["optimizer_steps"] == 2
    assert not (folder / runs.TENSORBOARD_DIR).exists() and not list(folder.rglob("events.out.tfevents*"))
    assert not (smoke_root / "outputs" / "smoke" / "trackio").exists()

    refused = subprocess.run([sys.executable, "-c", code, *args, "train.report_to=tensorboard"], env=env,
                             cwd=smoke_root, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "pip install -e '.[watch]'" in refused.stderr, refused.stderr[-2000:]


def test_report_to_is_checked_before_training(smoke):
    assert dashboards.names("none") == [] and dashboards.names(["tensorboard", "none"]) == ["tensorboard"]
    with pytest.raises(ValueError, match="train.report_to: all"):
        dashboards.names("all")
    with pytest.raises(ValueError, match="tensorbord is not a tool .* tensorboard"):
        train.prepare(smoke(**{"train.report_to": "tensorbord"}), "lora", out_dir=smoke().out / "models" / "typo")
    watch = dashboards.watch(smoke(**{"train.report_to": ["tensorboard", "wandb"]}), "unused")
    assert watch.others == ["wandb"]  # the tools this project does not place go to the trainer as they are


def test_the_check_script_finds_a_dashboard_that_differs_from_the_log(smoke_root):
    """scripts/check_dashboards.py, as docs/training.md runs it: every series equal after a run with both
    dashboards; a log changed afterwards is found."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDQA_") and k != "TRACKIO_DIR"}
    env["MEDQA_ROOT"] = str(smoke_root)
    train_cmd = [sys.executable, "-m", "medqa_zh.train", "--profile", "smoke", "--mode", "full", "train.max_steps=3",
                 "train.eval_steps=2", "train.logging_steps=1", "train.resume=false", "train.report_to=[tensorboard, trackio]"]
    done = subprocess.run(train_cmd, env={**env, "PYTHONPATH": str(REPO / "lib")}, cwd=smoke_root, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    check = [sys.executable, str(REPO / "scripts" / "check_dashboards.py"), "--profile", "smoke", "--mode", "full"]
    ok = subprocess.run(check, env=env, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0 and "every point equal" in ok.stdout, ok.stdout + ok.stderr[-2000:]
    assert ok.stdout.count(": equal") == 8  # four series, two dashboards

    log = smoke_root / "outputs" / "smoke" / "models" / "full" / runs.LOG_FILE
    rows = runs.read_log_file(log)
    rows[1]["loss"] += 0.5
    log.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    bad = subprocess.run(check, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and "train/loss" in bad.stdout and "DIFFERENT" in bad.stdout, bad.stdout


def test_dashboards_turned_on_after_a_run_catch_up_with_its_log(smoke_root):
    """A LoRA run finished with no dashboard; training it again with both on finds it finished and fills them from
    train_log.jsonl, so the check script finds every point equal. Again after deleting both stores; and a third time
    changes nothing (no point twice)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDQA_") and k != "TRACKIO_DIR"}
    env["MEDQA_ROOT"] = str(smoke_root)
    steps = ["train.max_steps=3", "train.eval_steps=2", "train.logging_steps=1"]
    train_cmd = [sys.executable, "-m", "medqa_zh.train", "--profile", "smoke", "--mode", "lora", *steps]
    run = lambda *extra: subprocess.run([*train_cmd, *extra], env={**env, "PYTHONPATH": str(REPO / "lib")},  # noqa: E731
                                        cwd=smoke_root, capture_output=True, text=True, timeout=300)
    check = lambda: subprocess.run([sys.executable, str(REPO / "scripts" / "check_dashboards.py"), "--profile", "smoke",  # noqa: E731
                                    "--mode", "lora"], env=env, capture_output=True, text=True, timeout=300)
    first = run("train.resume=false", "train.report_to=none")
    assert first.returncode == 0, first.stderr[-2000:]
    folder = smoke_root / "outputs" / "smoke" / "models" / "lora"
    assert not (folder / runs.TENSORBOARD_DIR).exists() and check().returncode != 0  # nothing to show yet
    for attempt in ("turned on", "stores deleted", "once more"):
        if attempt == "stores deleted":
            import shutil

            shutil.rmtree(folder / runs.TENSORBOARD_DIR)
            shutil.rmtree(smoke_root / "outputs" / "smoke" / "trackio")
        again = run("train.report_to=[tensorboard, trackio]")
        assert again.returncode == 0 and "already holds this run, finished" in again.stdout, again.stderr[-2000:]
        ok = check()
        assert ok.returncode == 0 and "every point equal" in ok.stdout, (attempt, ok.stdout + ok.stderr[-2000:])
        assert ok.stdout.count(": equal") == 8, attempt  # four series, two dashboards
