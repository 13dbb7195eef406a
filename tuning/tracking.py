"""The driver's view of a running search: one MLflow child run per trial and one progress line per finished trial.

A Tune callback runs on the driver, so the rule "only the driver writes to MLflow" holds: trials report
metrics to Tune, the callback turns them into a nested child run of the search's parent run (params =
the trial's point, every report a step of each metric, so the UI draws learning curves). The trial →
child-run map is kept in <out>/child_runs.json, so a resumed search continues the same child runs; for a search
folder at a URI, in its local stand-in, pushed to the URI whenever it changes.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ray import tune

from invgan_core.files import atomic_write_json
from jobs import storage
from jobs.run_tables import flatten_config, safe_name

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

CHILD_RUNS = "child_runs.json"
SKIP_METRICS = {
    "trial_id",
    "step",
    "done",
    "training_iteration",
    "time_this_iter_s",
    "time_total_s",
    "timestamp",
    "time_since_restore",
    "iterations_since_restore",
    "pid",
    "date",
    "hostname",
    "node_ip",
    "config",
    "checkpoint_dir_name",
    "should_checkpoint",
    "experiment_tag",
}


def format_params(params: dict) -> str:
    return ", ".join(f"{k.rsplit('.', 1)[-1]}={_short(v)}" for k, v in params.items())


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class SearchCallback(tune.Callback):
    """Child MLflow runs under `parent_run_id` (when given) and one printed line per finished trial.

    `out`: the search's folder, a local path or a URI (then its local stand-in holds child_runs.json)."""

    def __init__(
        self,
        *,
        out: str,
        tracking_uri: str | None,
        experiment_id: str | None,
        parent_run_id: str | None,
        metric: str,
        mode: str,
        label: str,
        total: int,
        show: bool = True,
    ):
        self.out, self.tracking_uri, self.experiment_id = out, tracking_uri, experiment_id
        self.parent_run_id = parent_run_id
        self.metric, self.mode, self.label, self.total, self.show = metric, mode, label, total, show
        self._client: MlflowClient | None = None
        self._folder: Path | None = None
        self._started: dict[str, float] = {}

    def __getstate__(self):  # Tune pickles its callbacks with the experiment: no live client in there
        return {k: v for k, v in self.__dict__.items() if k not in ("_client", "_folder")} | {
            "_client": None,
            "_folder": None,
        }

    @property
    def folder(self) -> Path:
        """The local folder of the driver's files: `out` itself, or the stand-in of a URI (on this machine)."""
        folder = getattr(self, "_folder", None)  # None too in a callback pickled by an older version
        if folder is None:
            folder = self._folder = storage.stand_in(self.out) if storage.is_uri(self.out) else Path(self.out)
        return folder

    # -- MLflow

    @property
    def client(self) -> MlflowClient | None:
        if self._client is None and self.parent_run_id:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(self.tracking_uri)
        return self._client

    def _runs(self) -> dict:
        path = self.folder / CHILD_RUNS
        return json.loads(path.read_text()) if path.exists() else {}

    def child_run(self, trial) -> str | None:
        """The trial's child run: the recorded one (a resumed search), else a new one."""
        if self.client is None:
            return None
        runs = self._runs()
        if trial.trial_id not in runs:
            assert self.experiment_id is not None, "a parent run comes with its experiment id"
            run = self.client.create_run(
                self.experiment_id,
                run_name=f"trial-{trial.trial_id}",
                tags={
                    "mlflow.parentRunId": self.parent_run_id,
                    "trial_id": trial.trial_id,
                    "mlflow.note.content": f"Trial {trial.trial_id} of the search in "
                    f"[parent run {self.parent_run_id}](#/experiments/{self.experiment_id}/runs/{self.parent_run_id})"
                    f" ({self.out}).",
                },
            )
            for key, value in flatten_config(trial.config).items():
                self.client.log_param(run.info.run_id, key, value)
            runs[trial.trial_id] = run.info.run_id
            atomic_write_json(self.folder / CHILD_RUNS, runs)
            storage.push(self.folder / CHILD_RUNS)  # a URI's copy at once: a resume elsewhere continues these runs
        else:
            self.client.update_run(runs[trial.trial_id], status="RUNNING")
        return runs[trial.trial_id]

    def on_trial_start(self, iteration, trials, trial, **info):
        self._started.setdefault(trial.trial_id, time.monotonic())
        self.child_run(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if self.client is None:
            return
        from mlflow.entities import Metric

        run_id = self._runs().get(trial.trial_id) or self.child_run(trial)
        now, step = int(time.time() * 1000), int(result.get("step", 0))
        metrics = [
            Metric(safe_name(k), float(v), now, step)
            for k, v in result.items()
            if k not in SKIP_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        ]
        self.client.log_batch(run_id, metrics=metrics)

    def _end(self, trial, status: str, state: str) -> None:
        if self.client is not None and (run_id := self._runs().get(trial.trial_id)):
            self.client.set_tag(run_id, "trial_status", state)
            self.client.set_terminated(run_id, status=status)

    # -- progress

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = trial.last_result or {}
        state = "complete" if result.get("complete") else "stopped early (ASHA)"
        self._end(trial, "FINISHED", state if result.get("complete") else "stopped")
        self._line(trials, trial, state)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._end(trial, "FAILED", "error")
        self._line(trials, trial, "error: see " + str(trial.local_path or "the trial folder"))

    def _line(self, trials, trial, state: str) -> None:
        if not self.show:
            return
        finished = [t for t in trials if t.status in ("TERMINATED", "ERROR") or t is trial]
        best = best_so_far(trials, self.mode)
        value = (trial.last_result or {}).get(self.metric)
        best_text = f"best so far {best[1]:.4g} (trial {best[0]})" if best else "no complete trial yet"
        seconds = (trial.last_result or {}).get("time_total_s", 0.0)
        shown = "-" if value is None else f"{value:.4g}"
        print(
            f"[{len(finished)}/{self.total}] trial {trial.trial_id} {format_params(trial.config)} -> "
            f"{self.label} = {shown} ({state}, {seconds:.0f} s); {best_text}",
            flush=True,
        )


def best_so_far(trials, mode: str):
    """(trial id, objective) of the best complete trial among `trials`, or None."""
    done = [
        (t.trial_id, t.last_result["objective"])
        for t in trials
        if (t.last_result or {}).get("complete")
        and t.last_result.get("objective") is not None
        and math.isfinite(t.last_result["objective"])
    ]
    if not done:
        return None
    return (max if mode == "max" else min)(done, key=lambda p: p[1])
