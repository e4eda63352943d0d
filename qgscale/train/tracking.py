"""Training metrics: ``metrics.jsonl``, TensorBoard event files and (optionally) MLflow.

Rank 0 keeps the metrics of every logged step (after a resume: those up to the checkpoint,
reloaded from ``metrics.jsonl``). At every checkpoint it writes, into the stage folder
(local or ``s3://``):

- ``metrics.jsonl``: one JSON object per logged step;
- ``tensorboard/events.out.tfevents.qgscale``: the same metrics as TensorBoard scalars
  (``train/<name>``, written with tensorboardX), regenerated from the kept metrics, so that
  steps logged by an attempt that died after its last checkpoint never appear twice.
  ``tensorboard --logdir <stage>/tensorboard`` (or the run root, for every stage) shows them.

With ``mlflow_uri`` set, every logged step also goes to MLflow (experiment
``mlflow_experiment``, one MLflow run per training stage, reopened on resume). MLflow is an
optional dependency (``pip install 'qgscale[tracking]'``).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from typing import Any

from qgscale import storage
from qgscale.errors import ConfigError

EVENTS_NAME = "events.out.tfevents.qgscale"
# not scalars worth a chart
_SKIP = {"step", "start_step", "time"}


def mlflow_module() -> Any:
    """``mlflow``, or a ConfigError saying how to install it."""
    try:
        import mlflow
    except ImportError:
        raise ConfigError("mlflow_uri is set but MLflow is not installed: pip install "
                          "'qgscale[tracking]' (or mlflow), or unset mlflow_uri") from None
    return mlflow


def scalars(m: dict[str, Any]) -> dict[str, float]:
    """The finite numeric metrics of one logged step (bools and counters excluded)."""
    return {k: float(v) for k, v in m.items() if k not in _SKIP
            and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def event_file_bytes(log: list[dict[str, Any]]) -> bytes:
    """A TensorBoard event file holding ``log``'s scalars as ``train/<name>`` at each step."""
    from tensorboardX import SummaryWriter

    with tempfile.TemporaryDirectory() as d:
        w = SummaryWriter(logdir=d, flush_secs=3600)
        for m in log:
            for k, v in scalars(m).items():
                w.add_scalar(f"train/{k}", v, global_step=int(m["step"]),
                             walltime=m.get("time"))
        w.close()
        (name,) = [n for n in os.listdir(d) if "tfevents" in n]
        with open(os.path.join(d, name), "rb") as f:
            return f.read()


class Tracker:
    """Rank 0's metric sinks for one training stage's output folder ``output_uri``."""

    def __init__(self, output_uri: str, mlflow_uri: str | None = None,
                 experiment: str = "qgscale", run_name: str = "train",
                 params: dict[str, Any] | None = None, mlflow_run_id: str | None = None):
        self.output_uri = output_uri
        self.mlflow_run_id: str | None = None
        self._client = None
        if mlflow_uri:
            mlflow = mlflow_module()
            self._client = mlflow.tracking.MlflowClient(tracking_uri=mlflow_uri)
            if mlflow_run_id:  # resumed: the same MLflow run
                self._client.update_run(mlflow_run_id, status="RUNNING")
                self.mlflow_run_id = mlflow_run_id
            else:
                exp = self._client.get_experiment_by_name(experiment)
                exp_id = exp.experiment_id if exp else self._client.create_experiment(experiment)
                run = self._client.create_run(exp_id, run_name=run_name,
                                              tags={"qgscale.output": output_uri})
                self.mlflow_run_id = run.info.run_id
                for k, v in (params or {}).items():
                    self._client.log_param(self.mlflow_run_id, k, str(v)[:500])

    @property
    def metrics_uri(self) -> str:
        return storage.join(self.output_uri, "metrics.jsonl")

    @property
    def events_uri(self) -> str:
        return storage.join(self.output_uri, "tensorboard", EVENTS_NAME)

    def log(self, m: dict[str, Any]) -> None:
        """Send one logged step to MLflow (the files are written by :meth:`write`)."""
        if self._client is None:
            return
        from mlflow.entities import Metric

        ts = int(1000 * m.get("time", time.time()))
        self._client.log_batch(self.mlflow_run_id, metrics=[
            Metric(k, v, ts, int(m["step"])) for k, v in scalars(m).items()])

    def write(self, log: list[dict[str, Any]]) -> None:
        """Write ``metrics.jsonl`` and the TensorBoard event file from all logged steps."""
        storage.write_bytes(self.metrics_uri,
                            "".join(json.dumps(x) + "\n" for x in log).encode())
        storage.write_bytes(self.events_uri, event_file_bytes(log))

    def finish(self) -> None:
        if self._client is not None:
            self._client.set_terminated(self.mlflow_run_id)
