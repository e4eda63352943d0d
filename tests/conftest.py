"""Shared fixtures: a real S3 endpoint (moto server on 127.0.0.1), a local Ray, tiny models."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
RESOURCES = REPO / "qgscale" / "resources"
TEST_DATA = REPO / "tests" / "data"  # vendored fixtures; see each SOURCE.md

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server over HTTP on 127.0.0.1; sets the AWS variables for this process.

    The credentials are random (moto takes any), so that a test can look for them in what
    Ray saw (they must be nowhere: workers inherit them, see :mod:`qgscale.runtime`)."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("moto server did not start") from None
            time.sleep(0.2)
    env = {"AWS_ENDPOINT_URL": endpoint,
           "AWS_ACCESS_KEY_ID": f"QGSTEST{uuid.uuid4().hex[:13].upper()}",
           "AWS_SECRET_ACCESS_KEY": f"qgs-secret-{uuid.uuid4().hex}",
           "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    from qgscale import storage

    storage.configure()
    yield endpoint
    proc.terminate()
    proc.wait(10)
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    storage.configure()


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh bucket on the local S3 endpoint; returns ``s3://bucket``."""
    import boto3

    name = f"qgs-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """One real local Ray instance for the whole session (2 CPUs, no GPU, like CI), started
    after the S3 settings are in the environment: its workers inherit the credentials, which
    never travel through Ray (the rule of :mod:`qgscale.runtime`)."""
    import ray

    from qgscale.runtime import local_ray_env

    if not ray.is_initialized():
        for k, v in local_ray_env(2).items():  # as qgscale's own local Ray (runtime.connect)
            os.environ.setdefault(k, v)
        ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tokenizer():
    """A small BPE tokenizer trained on bundled XQuAD text (12 languages)."""
    from qgscale.models.tiny import train_tokenizer, xquad_texts

    return train_tokenizer(xquad_texts(["en", "de", "ru", "zh", "ar", "hi"])[:3000],
                           vocab_size=3000)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, ray_local) -> tuple[Path, dict]:
    """The whole pipeline, run once per session on tiny random models (real Ray, DeepSpeed and
    FAISS): ``benchmarks/quality.py --tiny``'s config. Returns (config path, stage results).
    Read-only: a test that changes a run works on a :func:`copy_run` of it."""
    from qgscale import config, pipeline

    tmp = tmp_path_factory.mktemp("tiny-run")
    path = Path(load_benchmark("quality").write_tiny_config(tmp / "tiny.yaml", str(tmp / "run")))
    return path, pipeline.run(config.load(path))


def copy_run(config_path: Path, dest: Path) -> Path:
    """A copy of the run of ``config_path`` under ``dest`` (``dest/run``), with its config
    (``dest/<name>``, run.root changed); returns the new config's path. Finished stages stay
    finished: their keys hash the files' modification times, which the copy keeps."""
    import shutil

    raw = yaml.safe_load(Path(config_path).read_text())
    shutil.copytree(raw["run"]["root"], dest / "run")  # copy2: modification times kept
    out = dest / Path(config_path).name
    out.write_text(yaml.safe_dump(dict(raw, run={**raw["run"], "root": str(dest / "run")})))
    return out


def load_benchmark(name: str):
    """``benchmarks/<name>.py`` as a module (the benchmarks are scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"{name}_bench",
                                                  REPO / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def autoscaler_request() -> list[dict[str, float]]:
    """The cluster's one resource request, as the autoscaler reads it (the local Ray has no
    autoscaler: the request is recorded in the cluster's KV store)."""
    import json

    from ray._private.ray_constants import AUTOSCALER_RESOURCE_REQUEST_CHANNEL
    from ray.experimental.internal_kv import _internal_kv_get

    got = _internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL)
    return json.loads(got) if got else []
