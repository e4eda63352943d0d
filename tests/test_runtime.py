"""qgscale.runtime on a real local Ray (2 CPUs, 0 GPUs): explicit resources, worker settings
without credentials, stale credentials of a Ray started too early."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pytest

from qgscale import runtime, storage
from qgscale.data.schema import CORPUS


def test_gpu_stage_fails_fast_on_a_cluster_without_gpus(ray_local):
    with pytest.raises(runtime.ResourceError,
                       match=r"teacher\.score: gpus_per_actor=1 asks for GPUs but the Ray "
                             r"cluster has 0 GPUs"):
        runtime.actor_resources("teacher.score", None, 1.0, 1)
    with pytest.raises(runtime.ResourceError, match=r"index\.cpus_per_actor=64: .* 2 CPUs"):
        runtime.actor_resources("index", 1, 64, 0)
    # explicit CPU, and the automatic choice (logged) on a cluster without GPUs
    cpu = runtime.actor_resources("teacher.score", None, 0.5, 0)
    assert (cpu.num_gpus, cpu.num_cpus, cpu.num_actors) == (0, 0.5, 2)  # 1 CPU left
    assert runtime.actor_resources("index", None, 1.0, None).num_gpus == 0
    assert runtime.actor_device(0) == "cpu"


def test_stage_asking_for_gpus_fails_before_any_work(ray_local, tmp_path):
    """The stage function with ``index.encode.gpus_per_actor: 1`` from the config: the error names
    the stage's config section and the resource; no actor ran, nothing was written."""
    from qgscale.config import parse
    from qgscale.index.encode import run_encode

    corpus, out = str(tmp_path / "corpus"), str(tmp_path / "emb")
    storage.write_parquet(storage.join(corpus, "part-00000.parquet"), pa.Table.from_pylist(
        [{"pid": "d0", "lang": "en", "title": "", "text": "x"}], schema=CORPUS))
    cfg = parse({"run": {"root": str(tmp_path)}, "index": {"encode": {"gpus_per_actor": 1}}})
    with pytest.raises(runtime.ResourceError,
                       match=r"index\.encode: gpus_per_actor=1 .* 0 GPUs"):
        run_encode(cfg, str(tmp_path / "no-model"), corpus, out, "k1")
    assert not storage.list_files(out, ".parquet")


def test_training_stage_asking_for_gpus_fails_before_any_work(ray_local, tmp_path):
    """A Ray Train stage with ``use_gpu: true`` on a cluster without GPUs fails at once,
    naming the section and the resource, before its rows are built (Ray Train would wait for
    the GPUs forever); the shapes it requests otherwise are one bundle per worker."""
    from qgscale.config import TrainConfig, parse
    from qgscale.train.trainer import run_train_qg, worker_bundles

    cfg = parse({"run": {"root": str(tmp_path)}, "qg": {"use_gpu": True}})
    out = str(tmp_path / "qg")
    with pytest.raises(runtime.ResourceError,
                       match=r"^qg: num_workers=1 x use_gpu=True asks for 1 GPUs but the Ray "
                             r"cluster has 0 .* set qg\.use_gpu: false"):
        run_train_qg(cfg, out_uri=out, key="k", queries_uri="q", corpus_uri="c",
                     qrels_uri="r")
    assert not storage.exists(out)
    with pytest.raises(runtime.ResourceError, match=r"warmup: num_workers=3 x "
                                                    r"cpus_per_worker=1 asks for 3 CPUs"):
        worker_bundles(TrainConfig(num_workers=3), "warmup")
    assert worker_bundles(TrainConfig(num_workers=2, cpus_per_worker=0.5), "warmup") == [
        {"CPU": 0.5}, {"CPU": 0.5}]


class _RecordRequest:
    """A shard job whose output is what the autoscaler was asked for while it ran."""

    def setup(self, device: str, threads: int) -> None:
        return None

    def run(self, state: None, shard: runtime.Shard) -> pa.Table:
        return pa.table({"requested": [_requested()]})


def _requested() -> str:
    from ray._private.ray_constants import AUTOSCALER_RESOURCE_REQUEST_CHANNEL
    from ray.experimental.internal_kv import _internal_kv_get

    got = _internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL)
    return got.decode() if got is not None else ""


def test_stage_requests_its_resources_from_the_autoscaler(ray_local, tmp_path):
    """While a shard pool runs, the autoscaler has been asked (``request_resources``) for one
    bundle per actor from the config; the request is cleared when the stage ends. (The local
    Ray has no autoscaler: the request is recorded in the cluster's KV store, where the
    autoscaler reads it, and the run is otherwise unchanged.)"""
    from qgscale.config import Actors

    assert runtime.bundles(runtime.Resources("s", 3, 0.5, 0.0)) == [{"CPU": 0.5}] * 3
    assert runtime.bundles(runtime.Resources("s", 8, 4.0, 1.0), 2) == [
        {"CPU": 4.0, "GPU": 1.0}] * 2
    out = str(tmp_path / "out")
    shards = [runtime.Shard(f"part-{i:05d}", 1, i) for i in range(3)]
    stats = runtime.run_shards(_RecordRequest(), shards, out, "k",
                               Actors(num_actors=2, cpus_per_actor=0.5, gpus_per_actor=0),
                               stage="test.pool")
    assert stats["shards_run"] == 3
    seen = storage.read_parquet(out).column("requested").to_pylist()
    assert [json.loads(x) for x in seen] == [[{"CPU": 0.5}, {"CPU": 0.5}]] * 3
    assert json.loads(_requested()) == []  # cleared
    with runtime.requesting("test", [{"CPU": 1.0}]):
        assert json.loads(_requested()) == [{"CPU": 1.0}]
        with pytest.raises(ValueError):
            with runtime.requesting("test.inner", []):  # nothing asked: nothing changed
                assert json.loads(_requested()) == [{"CPU": 1.0}]
                raise ValueError
    assert json.loads(_requested()) == []  # cleared on the way out


def test_worker_env_carries_settings_not_credentials(s3_server):
    env = runtime.worker_env()
    assert env["AWS_ENDPOINT_URL"] == s3_server
    assert not set(runtime.SECRET_ENV_KEYS) & set(env)
    options = runtime.remote_options(0.5, 0)
    assert options["runtime_env"] == {"env_vars": env}
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    assert secret not in repr(options)


def test_local_ray_started_before_the_credentials_is_refused(ray_local, monkeypatch):
    """Workers of the local Ray hold the credentials it started with; other ones set later
    would silently not reach them, so connect() (which every stage calls) says so."""
    runtime.connect()  # the fixture started Ray after the S3 settings: fine
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "set-after-ray-started")
    with pytest.raises(runtime.WorkerEnvError, match="started before this process's S3 "
                                                     "credentials were set or changed"):
        runtime.connect()
    monkeypatch.undo()
    runtime.connect()
