"""Watching training live (``train.report_to``): TensorBoard and trackio, both local, no account.

A run's record is its ``train_log.jsonl``; a dashboard shows the same numbers as they come, and is kept equal
to it. When a run starts afresh its dashboard runs are cleared; when it resumes from a checkpoint they are
rewritten from the log as it was cut back to that checkpoint, so no step shows twice and none from another run
is mixed in. Every point sits at its optimizer step, as in the log.

* **TensorBoard**: event files in the run's folder, ``models/<mode>/tensorboard/``, so they go where the run
  goes; 02's learning curve in ``tensorboard/curve/``. Open with ``tensorboard --logdir outputs/<profile>/models``.
* **trackio**: the profile's store, ``outputs/<profile>/trackio/`` (``$TRACKIO_DIR`` when it is set), project
  ``medqa-zh-<profile>``. One run per training run, named ``<mode>-<8 hex digits of its run key>``, so a run with
  other settings is another line beside it; the learning curve is ``<that name>-curve``. Open with
  ``TRACKIO_DIR=outputs/<profile>/trackio trackio show --project medqa-zh-<profile>``.

Any other name trl accepts (``wandb``, ``mlflow``, ...) goes to the trainer as it is, and keeps its data where
that tool does. Under a launch only the main process reports: the callbacks check ``state.is_world_process_zero``,
and :meth:`Watch.restart` is called by the main process alone. With ``none``, the default, this module imports
neither package and writes nothing.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from . import runs

OURS = ("tensorboard", "trackio")  # the dashboards this module places and keeps equal to the log
# transformers' end-of-training summary: one number each, not a curve; its trackio callback leaves them out too
SUMMARY = ("train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss", "total_flos")
CURVE_DIR = "curve"  # in the run's tensorboard/ folder: the learning curve, rewritten whenever it is computed
CURVE_TAGS = {"plain": "validation/plain_accuracy", "pride": "validation/pride_accuracy"}


def names(setting) -> list[str]:
    """``train.report_to`` as a list of names: ``none`` (or an empty list) is []."""
    wanted = [setting] if isinstance(setting, str) else list(setting or [])
    if "all" in wanted:
        raise ValueError("train.report_to: all would report to every tool installed, TensorBoard among them into a "
                         "folder outside the run's; name them instead, e.g. [tensorboard, trackio]")
    return [name for name in wanted if name != "none"]


def run_name(run_key: dict) -> str:
    """A training run's name in the dashboards: its mode and 8 hex digits of its run key."""
    digest = hashlib.sha256(json.dumps(run_key, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{run_key['mode']}-{digest}"


def scalars(logs: dict, drop: tuple = ()) -> dict:
    """A trainer's log (or a ``train_log.jsonl`` row) as the dashboards show it: its numbers, under the names
    transformers' own callbacks give them (``loss`` is ``train/loss``, ``eval_loss`` is ``eval/loss``)."""
    from transformers.integrations.integration_utils import rewrite_logs

    kept = {k: v for k, v in logs.items() if k not in drop and k != "step"}
    return {k: v for k, v in rewrite_logs(kept).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


@dataclass
class Watch:
    """Where one run's dashboards are; :func:`watch` builds it from the profile."""

    names: list[str]  # every name of train.report_to
    tensorboard: Path  # the run's event folder
    project: str  # trackio's project
    store: Path  # trackio's store (read when trackio is first imported)

    @property
    def others(self) -> list[str] | str:
        """What goes to the trainer's own ``report_to``: the names this module does not place."""
        return [name for name in self.names if name not in OURS] or "none"

    def check(self) -> "Watch":
        """Refuse a name the trainer does not know, with the ones it knows: before a model is loaded."""
        from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

        unknown = [name for name in self.names if name not in INTEGRATION_TO_CALLBACK]
        if unknown:
            raise ValueError(f"train.report_to: {', '.join(unknown)} is not a tool the trainer reports to; choose none "
                             f"or any of {', '.join(INTEGRATION_TO_CALLBACK)}")
        return self

    def callbacks(self) -> list:
        """The trainer callbacks for TensorBoard (writing into the run's folder) and trackio (at the optimizer
        step); each raises, naming the extra to install, when its package is missing. A name the trainer does
        not know is refused (:meth:`check`)."""
        self.check()
        made = []
        if "tensorboard" in self.names:
            from transformers.integrations import TensorBoardCallback

            try:
                callback = TensorBoardCallback()
            except RuntimeError as e:
                raise RuntimeError(f"train.report_to: tensorboard needs the tensorboard package ({e}); install the "
                                   "watch extra: pip install -e '.[watch]' (./run_all.sh installs it)") from None
            callback.logging_dir = str(self.tensorboard)  # read when training begins, by the main process only
            made.append(callback)
        if "trackio" in self.names:
            self.trackio()
            made.append(_trackio_callback())
        return made

    def commands(self) -> list[str]:
        """The command lines that open this run's dashboards (from the project's root, with .venv/bin on PATH)."""
        found = []
        if "tensorboard" in self.names:
            found.append(f"tensorboard --logdir {self.tensorboard.parent.parent} --port 6006")
        if "trackio" in self.names:
            found.append(f"TRACKIO_DIR={self.store} trackio show --project {self.project}")
        return found

    def trackio(self):
        """The trackio module, its store at :attr:`store`. trackio reads ``TRACKIO_DIR`` once, when it is first
        imported; a process that imported it before keeps that store, and this says where."""
        if "trackio" not in sys.modules:
            before = os.environ.get("TRACKIO_DIR")
            os.environ["TRACKIO_DIR"] = str(self.store)
            try:
                import trackio  # noqa: F401
            except ImportError as e:
                raise RuntimeError(f"train.report_to: trackio needs the trackio package ({e}); install the watch "
                                   "extra: pip install -e '.[watch]' (./run_all.sh installs it)") from None
            finally:
                if before is None:
                    del os.environ["TRACKIO_DIR"]
                else:
                    os.environ["TRACKIO_DIR"] = before
        import trackio
        import trackio.utils

        actual = Path(trackio.utils.TRACKIO_DIR)
        if actual.resolve() != self.store.resolve():
            print(f"trackio was imported earlier in this process with its store at {actual}: its runs go there")
            self.store = actual
        return trackio

    def restart(self, run_key: dict, rows: list[dict], keep_curve: bool = False) -> None:
        """Make the dashboards hold ``rows`` and nothing else of this run's training. The main process calls it:
        as training starts (``rows``: [] for a fresh start, the rows up to the checkpoint for a resumed one; the
        learning curve of a run that trains again is dropped), and for a finished run with its whole log
        (``keep_curve``: a dashboard turned on after the run, or whose store was deleted, catches up; the curve
        is 02's to redraw). Each time the same rows give the same dashboards."""
        name = run_name(run_key)
        for command in self.commands():
            print(f"watch it{'' if keep_curve else ' live'}: {command}")
        if "tensorboard" in self.names:
            if keep_curve and self.tensorboard.is_dir():
                for old in self.tensorboard.iterdir():
                    if old.is_dir() and old.name != CURVE_DIR:
                        shutil.rmtree(old)
                    elif old.is_file():
                        old.unlink()
            else:
                shutil.rmtree(self.tensorboard, ignore_errors=True)
            if rows:
                from torch.utils.tensorboard import SummaryWriter

                with SummaryWriter(log_dir=str(self.tensorboard)) as writer:
                    for row in rows:
                        for tag, value in scalars(row).items():
                            writer.add_scalar(tag, value, row["step"])
        if "trackio" in self.names:
            if not keep_curve:
                self._trackio_run(name + "-curve", [])  # the curve of a run that is training again is gone
            self._trackio_run(name, [(row["step"], scalars(row, drop=SUMMARY)) for row in rows])

    def curve(self, run_key: dict, curve: pd.DataFrame) -> None:
        """02's learning curve (plain and PriDe validation accuracy at each point, by optimizer step), written
        afresh each time it is computed: ``tensorboard/curve/``, trackio's ``<run name>-curve``."""
        if curve.empty or not set(self.names) & set(OURS):
            return
        points = [(int(row["step"]), {tag: float(row[column]) for column, tag in CURVE_TAGS.items()})
                  for _, row in curve.iterrows()]
        if "tensorboard" in self.names:
            from torch.utils.tensorboard import SummaryWriter

            folder = self.tensorboard / CURVE_DIR
            shutil.rmtree(folder, ignore_errors=True)
            with SummaryWriter(log_dir=str(folder)) as writer:
                for step, values in points:
                    for tag, value in values.items():
                        writer.add_scalar(tag, value, step)
        if "trackio" in self.names:
            self._trackio_run(run_name(run_key) + "-curve", points)

    def _trackio_run(self, name: str, points: list[tuple[int, dict]]) -> None:
        """Replace trackio's run ``name`` in the project with ``points`` (step, values); none: delete it."""
        trackio = self.trackio()
        try:
            logged = list(trackio.Api().runs(self.project))
        except ValueError:  # trackio's word for a project it has no database of yet
            logged = []
        for old in logged:
            if old.name == name:
                old.delete()
        if not points:
            return
        trackio.init(project=self.project, name=name, resume="never", auto_log_cpu=False, auto_log_gpu=False)
        try:
            for step, values in points:
                trackio.log(values, step=step)
        finally:
            trackio.finish()


def watch(cfg, run_dir: str | Path) -> Watch:
    """The dashboards ``train.report_to`` asks for, for the run in ``run_dir``."""
    store = Path(os.environ.get("TRACKIO_DIR") or cfg.out / "trackio")
    return Watch(names(cfg["train.report_to"]), Path(run_dir) / runs.TENSORBOARD_DIR, f"medqa-zh-{cfg.name}", store)


def read_tensorboard(folder: str | Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of every point of ``tag`` in the event files of ``folder``, read with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})  # 0: every point, not a sample
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)] if tag in events.Tags()["scalars"] else []


def read_trackio(store: str | Path, project: str) -> dict[str, list[dict]]:
    """Every run of ``project`` in the trackio store ``store`` (name: its logged rows), read with trackio's own
    reader in a process of its own: trackio fixes its store when it is first imported, and this one may hold
    another."""
    code = ("import json, sys\nfrom trackio.sqlite_storage import SQLiteStorage as S\n"
            "print(json.dumps({r: S.get_logs(sys.argv[1], r) for r in S.get_runs(sys.argv[1])}))")
    done = subprocess.run([sys.executable, "-c", code, project], env={**os.environ, "TRACKIO_DIR": str(store)},
                          capture_output=True, text=True, timeout=300)
    if done.returncode:
        raise RuntimeError(f"reading trackio's store {store}, project {project}: {done.stderr[-2000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def _trackio_callback():
    """A trainer callback that logs each point to trackio at its optimizer step (transformers' own trackio callback
    logs at trackio's running count, which drifts from the step with every evaluation), into the project
    ``args.project``, as the run ``args.run_name``, on the main process only. It uses trackio's public API
    (``init``, ``log``, ``finish``) and nothing of a Hub Space."""
    import trackio
    from transformers import TrainerCallback

    class StepTrackio(TrainerCallback):
        started = False

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            if not self.started:
                trackio.init(project=args.project, name=args.run_name, resume="allow", config=args.to_dict(),
                             auto_log_cpu=False, auto_log_gpu=False)
                self.started = True
            trackio.log(scalars(logs, drop=SUMMARY), step=state.global_step)

        def on_train_end(self, args, state, control, **kwargs):
            if self.started:
                trackio.finish()
                self.started = False

    return StepTrackio()
