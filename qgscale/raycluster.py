"""Joining Ray, and handing this process's settings to Ray workers.

Workers of a Ray started earlier (by another stage, a test, or ``ray start``) do not see
variables set later in this process, so storage and offline settings travel explicitly:
stages pass :func:`worker_env` to their actors/tasks, which call :func:`apply_worker_env`.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from qgscale import storage

log = logging.getLogger("qgscale")

WORKER_ENV_KEYS = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                   "AWS_DEFAULT_REGION", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME",
                   "QGSCALE_CACHE", "TOKENIZERS_PARALLELISM", "TRANSFORMERS_VERBOSITY",
                   "HF_HUB_DISABLE_PROGRESS_BARS", "RAY_DATA_DISABLE_PROGRESS_BARS")


def worker_env() -> dict[str, str]:
    """The storage/offline/logging settings of this process."""
    return {k: os.environ[k] for k in WORKER_ENV_KEYS if os.environ.get(k)}


def apply_worker_env(env: dict[str, str]) -> None:
    """In a worker: take the driver's settings (and rebuild S3 clients if they changed)."""
    if any(os.environ.get(k) != v for k, v in env.items()):
        os.environ.update(env)
        storage.configure()


def connect(ray_cfg: Any = None) -> None:
    """Join the cluster named by ``ray.address`` or ``RAY_ADDRESS`` (``ray job submit`` sets
    it), else start this process's own local Ray sized by ``ray.num_cpus``/``num_gpus``, even
    when another Ray runs on this machine (``ray start --head``): ``ray.address: null`` means
    the embedded default. No-op when connected; logs which it did."""
    import ray

    if ray.is_initialized():
        return
    address = getattr(ray_cfg, "address", None) or os.environ.get("RAY_ADDRESS")
    if address:  # a job's own runtime env (``ray job submit``) must not be overridden
        ray.init(address=address, logging_level=logging.WARNING,
                 log_to_driver=getattr(ray_cfg, "log_to_driver", False))
        log.info("joined the Ray cluster at %s (%s CPUs, %s GPUs)", address,
                 ray.cluster_resources().get("CPU", 0), ray.cluster_resources().get("GPU", 0))
    else:
        ray.init(address="local", num_cpus=getattr(ray_cfg, "num_cpus", None),
                 num_gpus=getattr(ray_cfg, "num_gpus", None), include_dashboard=False,
                 logging_level=logging.WARNING, runtime_env={"env_vars": worker_env()},
                 log_to_driver=getattr(ray_cfg, "log_to_driver", False))
        log.info("started a local Ray (%s CPUs, %s GPUs; ray.address: null)",
                 ray.cluster_resources().get("CPU", 0), ray.cluster_resources().get("GPU", 0))
