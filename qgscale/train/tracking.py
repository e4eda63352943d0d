"""Training metrics: ``metrics.jsonl``, TensorBoard event files and (optionally) MLflow.

Rank 0 keeps the metrics of every logged step (after a resume: those up to the checkpoint,
reloaded from ``metrics.jsonl``). At every checkpoint it writes, into the stage folder
(local or ``s3://``):

- ``metrics.jsonl``: one JSON object per logged step;
- ``tensorboard/events.out.tfevents.qgscale``: the same metrics as TensorBoard scalars
  (``train/<name>``, written with tensorboardX), regenerated from the kept metrics, so that
  steps logged by an attempt that died after its last checkpoint never appear twice.
  ``tensorboard --logdir <stage>/tensorboard`` (or the run root, for every stage) shows them.

With ``mlflow_uri`` set, the same steps also go to MLflow (experiment ``mlflow_experiment``,
one MLflow run per training stage, tagged with the stage folder, the training config as
params). They are sent at every checkpoint, once it is uploaded, so MLflow holds the steps a
restart resumes from. A resumed attempt reopens the run (its id is in the checkpoint) and sends only
the steps after the last one MLflow holds, so no step appears twice. MLflow is an
optional dependency (``pip install 'qgscale[tracking]'``: mlflow-skinny). Its usage telemetry
is off unless ``MLFLOW_DISABLE_TELEMETRY`` says otherwise, and a local ``file://`` store (in
maintenance mode since MLflow 3.7) is allowed unless ``MLFLOW_ALLOW_FILE_STORE`` says
otherwise.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from typing import Any

from qgscale import storage
from qgscale.errors import ConfigError

logger = logging.getLogger("qgscale.train")
EVENTS_NAME = "events.out.tfevents.qgscale"
# not scalars worth a chart
_SKIP = {"step", "start_step", "time"}


def mlflow_module() -> Any:
    """``mlflow`` (with its usage telemetry off, unless ``MLFLOW_DISABLE_TELEMETRY`` is set:
    no network but the tracking URI's), or a ConfigError saying how to install it."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # read when mlflow is imported
    try:
        import mlflow
    except ImportError:
        raise ConfigError("mlflow_uri is set but MLflow is not installed: pip install "
                          "'qgscale[tracking]' (or mlflow), or unset mlflow_uri") from None
    return mlflow


def mlflow_client(uri: str) -> Any:
    """An ``MlflowClient`` for the tracking URI ``uri``. A local store (``file://`` or a
    path) raises in MLflow >= 3.7 unless ``MLFLOW_ALLOW_FILE_STORE`` is true: set here,
    unless already set."""
    mlflow = mlflow_module()
    if "://" not in uri or uri.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # read when the store opens
    return mlflow.tracking.MlflowClient(tracking_uri=uri)


def flat_params(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``d`` as MLflow params: nested sections as ``section.key``, values as strings."""
    out: dict[str, str] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flat_params(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = (v if isinstance(v, str) else json.dumps(v))[:6000]
    return out


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
    """Rank 0's metric sinks for one training stage's output folder ``output_uri``.

    With ``mlflow_uri``: the MLflow run ``mlflow_run_id`` (a resumed attempt: the id its
    checkpoint recorded) reopened, else a run of this stage folder that holds no metrics yet
    and the same params (left by an attempt that died before its first checkpoint), else a
    new one. ``log``: the steps up to ``start_step`` (the checkpoint resumed from), sent to
    MLflow where it lacks them.
    """

    def __init__(self, output_uri: str, mlflow_uri: str | None = None,
                 experiment: str = "qgscale", run_name: str = "train",
                 params: dict[str, Any] | None = None, mlflow_run_id: str | None = None,
                 log: list[dict[str, Any]] | None = None, start_step: int = 0):
        self.output_uri = output_uri
        self.mlflow_run_id: str | None = None
        self._client = None
        self._sent = 0  # the last step MLflow holds
        if not mlflow_uri:
            return
        self._client = mlflow_client(mlflow_uri)
        if mlflow_run_id:
            self._client.update_run(mlflow_run_id, status="RUNNING")
            self.mlflow_run_id = mlflow_run_id
        else:
            self.mlflow_run_id = self._open_run(experiment, run_name,
                                                flat_params(params or {}))
        self._sent = self._last_step()
        if self._sent > start_step:
            logger.warning("MLflow run %s already holds steps %d-%d, sent by an attempt "
                           "that died before Ray Train registered their checkpoint; they are "
                           "kept, not sent again", self.mlflow_run_id, start_step + 1,
                           self._sent)
        self.sync(log or [])

    def _open_run(self, experiment: str, run_name: str, params: dict[str, str]) -> str:
        """The id of this stage's new (or metric-less, same-params) MLflow run."""
        from mlflow.entities import Param

        c = self._client
        exp = c.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else c.create_experiment(experiment)
        for r in _stage_runs(c, exp_id, self.output_uri):
            if not r.data.metrics and r.data.params == params:
                c.update_run(r.info.run_id, status="RUNNING")
                return r.info.run_id
        run_id = c.create_run(exp_id, run_name=run_name,
                              tags={"qgscale.output": self.output_uri}).info.run_id
        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow's limit per batch
            c.log_batch(run_id, params=items[i:i + 100])
        return run_id

    def _last_step(self) -> int:
        """The last step of any metric the MLflow run holds (0: none)."""
        run = self._client.get_run(self.mlflow_run_id)
        return max((m.step for k in run.data.metrics
                    for m in self._client.get_metric_history(self.mlflow_run_id, k)),
                   default=0)

    @property
    def metrics_uri(self) -> str:
        return storage.join(self.output_uri, "metrics.jsonl")

    @property
    def events_uri(self) -> str:
        return storage.join(self.output_uri, "tensorboard", EVENTS_NAME)

    def sync(self, log: list[dict[str, Any]]) -> None:
        """Send MLflow the steps of ``log`` after the last one it holds."""
        if self._client is None:
            return
        from mlflow.entities import Metric

        new = [m for m in log if m["step"] > self._sent]
        metrics = [Metric(k, v, int(1000 * m.get("time", time.time())), int(m["step"]))
                   for m in new for k, v in scalars(m).items()]
        for i in range(0, len(metrics), 1000):  # MLflow's limit per batch
            self._client.log_batch(self.mlflow_run_id, metrics=metrics[i:i + 1000])
        if new:
            self._sent = int(new[-1]["step"])

    def write(self, log: list[dict[str, Any]]) -> None:
        """Write ``metrics.jsonl`` and the TensorBoard event file from all logged steps."""
        storage.write_bytes(self.metrics_uri,
                            "".join(json.dumps(x) + "\n" for x in log).encode())
        storage.write_bytes(self.events_uri, event_file_bytes(log))

    def finish(self) -> None:
        """Mark the MLflow run FINISHED."""
        if self._client is not None:
            self._client.set_terminated(self.mlflow_run_id, status="FINISHED")


def mark_failed(mlflow_uri: str, experiment: str, output_uri: str) -> list[str]:
    """Mark FAILED the RUNNING MLflow runs of the stage folder ``output_uri`` (a rerun
    reopens them); the driver calls this when a training stage fails. Returns their ids."""
    client = mlflow_client(mlflow_uri)
    exp = client.get_experiment_by_name(experiment)
    runs = [] if exp is None else _stage_runs(client, exp.experiment_id, output_uri,
                                              "attributes.status = 'RUNNING'")
    for r in runs:
        client.set_terminated(r.info.run_id, status="FAILED")
    return [r.info.run_id for r in runs]


def _stage_runs(client: Any, exp_id: str, output_uri: str, where: str = "") -> list[Any]:
    """The MLflow runs of the stage folder ``output_uri`` (tag ``qgscale.output``), ``where``
    an extra filter; none for a folder name MLflow's filter syntax cannot quote."""
    if "'" in output_uri:
        return []
    query = f"tags.`qgscale.output` = '{output_uri}'" + (f" and {where}" if where else "")
    return client.search_runs([exp_id], filter_string=query)
