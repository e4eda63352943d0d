"""How qgscale runs work on Ray: joining it, what workers receive, resources, shard jobs.

**Joining** (:func:`connect`): the cluster named by ``ray.address`` or ``RAY_ADDRESS``, else
this process's own local Ray. On several nodes, :func:`check_shared` checks that every node
sees the local paths the stages read and write.

**Settings and credentials** (:func:`worker_env`, :func:`remote_options`): only non-secret
settings travel through Ray, as the ``runtime_env`` of each actor and task (S3 endpoint and
region, offline flags, cache folders, progress-bar switches). Credentials
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``) never do: they
are in no task or actor argument and no runtime env, where anyone who can open the Ray
dashboard could read them. A worker takes them from the environment it was started in:

- on a cluster, the pods' environment (the Kubernetes Secret that ``k8s/*.yaml`` mount into
  every Ray container) or an IAM role / instance profile;
- with the local embedded Ray (``ray.address: null``), this process's environment when Ray
  started: :func:`connect` starts it after :func:`qgscale.storage.configure` has put the
  ``storage:`` settings into ``os.environ``, so its workers inherit them. A Ray started by
  this process *before* the credentials were set (or changed) would run its workers with the
  old ones; :func:`connect` checks for that and fails with what to do.

**Resources** (:func:`actor_resources`): CPUs and GPUs per actor come from the stage's config
(``cpus_per_actor``, ``gpus_per_actor``); a stage that asks for GPUs on a cluster that has
none (and cannot scale up to any) fails at once naming the stage and the resource, and the
automatic choice (``gpus_per_actor: null``) is logged. An autoscaler's limits are read from
the cluster config it publishes; on a joined cluster that publishes none, a GPU stage waits
for GPU nodes with a warning instead. An actor's device follows what Ray gave it
(:func:`actor_device`).

**Shard jobs** (:func:`run_shards`): the one runner of sharded work (corpus encoding, teacher
scoring and generation, the index build's add step). Why an explicit actor pool and not Ray
Data ``map_batches``: the unit of work is an *output shard* with a stable name, a done marker
and a retry count. Ray Data's blocks have no stable identity across runs, so a re-run could not
skip finished work shard by shard, and a block lost with its actor is retried inside Ray Data
where we cannot see it or bound it. Here each actor sets up once (loads its model), takes one
shard at a time and writes it atomically plus its done marker
(:class:`qgscale.storage.ShardWriter`); the driver only moves shard descriptors. A killed
actor's shard goes back to the queue (at most ``max_retries`` times) and a fresh actor
replaces it; a shard is written whole or not at all, so every output row exists exactly once.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import os
import sys
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import pyarrow as pa

from qgscale import storage
from qgscale.config import Actors
from qgscale.errors import QgscaleError, unwrap

log = logging.getLogger("qgscale")

# settings every actor/task receives in its runtime env (never a credential)
WORKER_ENV_KEYS = ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "HF_HUB_OFFLINE",
                   "TRANSFORMERS_OFFLINE", "HF_HOME", "QGSCALE_CACHE", "TOKENIZERS_PARALLELISM",
                   "TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS",
                   "RAY_DATA_DISABLE_PROGRESS_BARS")
# what a worker must find in its own environment
SECRET_ENV_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


class ResourceError(QgscaleError, RuntimeError):
    """A stage asks for resources (GPUs, CPUs per actor) that the Ray cluster cannot give."""


class WorkerEnvError(QgscaleError, RuntimeError):
    """The local Ray's workers run with other S3 credentials than this process."""


class ShardsFailed(RuntimeError):
    """Some shards of a job failed on every try (the others are finished and kept)."""


# ---------------------------------------------------------------- joining, worker settings
def worker_env() -> dict[str, str]:
    """The non-secret storage/offline/logging settings of this process (no credentials)."""
    return {k: os.environ[k] for k in WORKER_ENV_KEYS if os.environ.get(k)}


def remote_options(num_cpus: float = 1.0, num_gpus: float = 0.0, **extra: Any) -> dict:
    """``.options()`` of a qgscale actor/task: its resources and :func:`worker_env` as its
    runtime env (merged by Ray into the job's own runtime env)."""
    return {"num_cpus": num_cpus, "num_gpus": num_gpus,
            "runtime_env": {"env_vars": worker_env()}, **extra}


_checked_secrets: set[str] = set()  # digests the local Ray's workers are known to have


def _secrets_digest() -> str:
    """A digest of this process's credentials (compared, never sent anywhere)."""
    h = hashlib.sha256()
    for key in SECRET_ENV_KEYS:
        h.update(f"{key}\0{os.environ.get(key, '')}\0".encode())
    return h.hexdigest()


def _started_here() -> bool:
    """Whether this process started the Ray it is connected to (a local Ray)."""
    import ray._private.worker as ray_worker

    node = getattr(ray_worker, "_global_node", None)
    return bool(node is not None and getattr(node, "head", False))


def check_worker_secrets() -> None:
    """With a Ray started by this process: fail if its workers (which inherited this
    process's environment when Ray started) hold other credentials than this process now.
    Runs one tiny task per credential value; a no-op on a cluster joined by address, whose
    workers take credentials from their own pods."""
    import ray

    digest = _secrets_digest()
    if digest in _checked_secrets or not _started_here():
        return
    probe = ray.remote(num_cpus=0, max_retries=0)(_secrets_digest)
    if ray.get(probe.remote()) != digest:
        raise WorkerEnvError(
            "the local Ray was started before this process's S3 credentials were set or "
            f"changed ({'/'.join(SECRET_ENV_KEYS[:2])} differ in its workers), and workers "
            "only inherit the environment Ray started with; credentials never travel through "
            "Ray. Set them (environment or the config's storage: block) before Ray starts, "
            "or ray.shutdown() and run again")
    _checked_secrets.add(digest)


def local_ray_env(num_cpus: int | None = None) -> dict[str, str]:
    """Environment set (unless already set) for a local Ray of ``num_cpus`` CPUs (None: the
    machine's) that this process starts; joined clusters keep Ray's defaults.

    Its Ray Train controller polls the workers every 0.2 s, not 2 s, so a training stage
    starts and ends sooner (about 5 s a stage on 2 cores; the default costs one call per worker
    per poll). It keeps at least 6 idle worker processes, not one per CPU: on a small machine
    Ray Data's operators (map tasks, a join's aggregator actor, a sort) otherwise kill and
    restart workers between operators, each start re-importing pyarrow, Ray Data and qgscale
    (the four Ray Data training-row tests on 2 cores: 119 s with one idle worker per CPU, 35 s
    with 6)."""
    cpus = num_cpus if num_cpus is not None else os.cpu_count() or 1
    return {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
            "RAY_num_workers_soft_limit": str(max(6, cpus))}


def connect(ray_cfg: Any = None) -> None:
    """Join the cluster named by ``ray.address`` or ``RAY_ADDRESS`` (``ray job submit`` sets
    it), else start this process's own local Ray sized by ``ray.num_cpus``/``num_gpus``, even
    when another Ray runs on this machine (``ray start --head``): ``ray.address: null`` means
    the embedded default. Logs which it did. When already connected, only checks that a local
    Ray's workers have this process's credentials (:func:`check_worker_secrets`)."""
    import ray

    if ray.is_initialized():
        check_worker_secrets()
        return
    address = getattr(ray_cfg, "address", None) or os.environ.get("RAY_ADDRESS")
    if address:  # a job's own runtime env (``ray job submit``) must not be overridden
        ray.init(address=address, logging_level=logging.WARNING,
                 log_to_driver=getattr(ray_cfg, "log_to_driver", False))
        log.info("joined the Ray cluster at %s (%s CPUs, %s GPUs)", address,
                 ray.cluster_resources().get("CPU", 0), ray.cluster_resources().get("GPU", 0))
    else:  # workers inherit this process's environment, credentials included
        for k, v in local_ray_env(getattr(ray_cfg, "num_cpus", None)).items():
            os.environ.setdefault(k, v)
        ray.init(address="local", num_cpus=getattr(ray_cfg, "num_cpus", None),
                 num_gpus=getattr(ray_cfg, "num_gpus", None), include_dashboard=False,
                 logging_level=logging.WARNING,
                 log_to_driver=getattr(ray_cfg, "log_to_driver", False))
        _checked_secrets.add(_secrets_digest())
        log.info("started a local Ray (%s CPUs, %s GPUs; ray.address: null)",
                 ray.cluster_resources().get("CPU", 0), ray.cluster_resources().get("GPU", 0))


SHARED_CHECK_S = 120.0  # how long the per-node checks may take before they are skipped
_shared_seen: set[tuple[str, frozenset[str]]] = set()  # (path, nodes) checked in this process


def check_shared(inputs: dict[str, str | None], outputs: dict[str, str | None] | None = None
                 ) -> list[str]:
    """On a Ray cluster of several nodes, that every node sees each local path (setting name
    -> path) of ``inputs`` (files or folders this process sees, which tasks read; others are
    left to the code that reads them) and ``outputs`` (folders, made here if need be, each
    checked through a probe file in it, so that a node-local folder that exists everywhere,
    ``/tmp/run``, is found too); URIs such as ``s3://`` are not checked. One task of no CPU
    per alive node checks them there, where the stages' tasks and actors read and write them;
    a path checked on the same nodes before, in this process, is not checked again (a node
    that joins later is). A node that does not answer in :data:`SHARED_CHECK_S` s, or that
    left, is skipped with a warning. Raises :class:`ConfigError` naming the setting, the
    path and a node that lacks it; returns the node ids checked (none on one node)."""
    import uuid

    import ray
    from ray.exceptions import RayError
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from qgscale.errors import ConfigError

    nodes = [n for n in ray.nodes() if n.get("Alive")] if ray.is_initialized() else []
    if len(nodes) < 2:
        return []
    on = frozenset(n["NodeID"] for n in nodes)
    paths = {**inputs, **(outputs or {})}

    def local(given: dict[str, str | None]) -> dict[str, str]:  # absolute local paths
        return {k: os.path.abspath(p.removeprefix("file://")) for k, p in given.items()
                if p and storage.is_local(p)}

    checked = {k: p for k, p in local(inputs).items() if os.path.exists(p)}
    outs = local(outputs or {})
    if not checked and not outs:
        return []
    checked, outs = ({k: p for k, p in d.items() if (p, on) not in _shared_seen}
                     for d in (checked, outs))
    if not checked and not outs:  # all seen on these nodes before
        return sorted(on)
    wanted, probes = dict(checked), {}
    check = ray.remote(num_cpus=0)(_missing_here)
    try:
        for k, p in outs.items():
            os.makedirs(p, exist_ok=True)
            probes[k] = wanted[k] = os.path.join(p, f".qgscale-shared-{uuid.uuid4().hex[:12]}")
            open(probes[k], "w").close()
        refs = [check.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
            n["NodeID"], soft=False)).remote(wanted) for n in nodes]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=SHARED_CHECK_S)
        skipped = []
        for node, ref in zip(nodes, refs, strict=True):
            try:
                missing = ray.get(ref) if ref in ready else None
            except RayError:  # the node left, or its worker could not start
                missing = None
            if missing is None:  # left to finish on its own: a cancel racing its end can
                skipped.append(node["NodeManagerAddress"])  # abort the driver (map_shards)
            elif missing:
                k = missing[0]
                where = {**checked, **outs}[k]
                raise ConfigError(
                    f"{k}={paths[k]}{f' ({where})' if where != paths[k] else ''}: a local path "
                    f"that Ray node {node['NodeManagerAddress']} does not see ({len(nodes)} "
                    "nodes): on a cluster of several nodes the stages' tasks read and write it "
                    "on every node; give an s3:// URI or a file system mounted at the same path "
                    "on every node")
        if skipped:
            log.warning("Ray node(s) %s did not answer within %.0f s, or left, whether they "
                        "see %s: not checked", ", ".join(skipped), SHARED_CHECK_S,
                        ", ".join(f"{k}={paths[k]}" for k in wanted))
        else:
            _shared_seen.update((p, on) for p in (*checked.values(), *outs.values()))
    finally:
        for probe in probes.values():
            with contextlib.suppress(OSError):
                os.remove(probe)
    return [n["NodeID"] for n in nodes]


def _missing_here(wanted: dict[str, str]) -> list[str]:
    """The settings of ``wanted`` (name -> local path) whose path this node lacks."""
    return [k for k, p in wanted.items() if not os.path.exists(p)]


# ---------------------------------------------------------------- resources and device
@dataclass(frozen=True)
class Resources:
    """What each actor of a stage gets, and how many actors to start."""

    stage: str
    num_actors: int
    num_cpus: float
    num_gpus: float

    @property
    def threads(self) -> int:
        """Compute threads for a CPU actor (its CPU share, at least 1)."""
        return max(1, int(self.num_cpus))

    def options(self, **extra: Any) -> dict:
        return remote_options(self.num_cpus, self.num_gpus, **extra)


def cluster_capacity(resource: str) -> tuple[float, float | None]:
    """``(now, most)``: the amount of ``resource`` the cluster has now, and the most it can
    have: its autoscaler's node groups at their maximum (the cluster config an autoscaler
    publishes), ``now`` for a Ray started by this process (no autoscaler), else ``None``
    (a joined cluster whose autoscaler, if any, publishes no limits)."""
    import ray

    now = float(ray.cluster_resources().get(resource, 0))
    try:
        from ray._private.state import state

        limits = state.get_max_resources_from_cluster_config()
    except Exception as e:  # noqa: BLE001 - no autoscaler config readable
        log.debug("no autoscaler limits (%s)", e)
        limits = None
    if limits is not None:
        return now, max(now, float(limits.get(resource, 0) or 0))
    return now, now if _started_here() else None


def actor_resources(stage: str, num_actors: int | None = None, cpus_per_actor: float = 1.0,
                    gpus_per_actor: float | None = None) -> Resources:
    """Resources of each actor of ``stage`` (its config section, named in errors) and the
    number of actors (``num_actors``, else as many as the cluster holds).

    ``gpus_per_actor``: ``None`` = automatic (1 GPU per actor when the cluster has or can
    scale up to GPUs, else CPU only; the choice is logged), ``0`` = CPU only, ``> 0`` = that
    many GPUs per actor, a :class:`ResourceError` when the cluster cannot give them (on a
    joined cluster whose autoscaler limits are unknown: a warning, the actors wait for GPU
    nodes).
    """
    connect()
    if num_actors is not None and num_actors < 1:
        raise ResourceError(f"{stage}.num_actors={num_actors}: expected >= 1 (or null)")
    if cpus_per_actor <= 0:
        raise ResourceError(f"{stage}.cpus_per_actor={cpus_per_actor}: expected > 0")
    if gpus_per_actor is not None and (gpus_per_actor < 0 or gpus_per_actor > 1
                                       and gpus_per_actor != int(gpus_per_actor)):
        raise ResourceError(f"{stage}.gpus_per_actor={gpus_per_actor:g}: expected a fraction "
                            "of one GPU (0 to 1, shared) or whole GPUs (or null)")
    gpus_now, gpus_most = cluster_capacity("GPU")
    cpus_now, _ = cluster_capacity("CPU")
    gpus_can = gpus_now if gpus_most is None else gpus_most
    if gpus_per_actor is None:
        gpus = 1.0 if gpus_can >= 1 else 0.0
        if gpus:
            log.info("%s: gpus_per_actor unset: 1 GPU per actor (the cluster has %g, up to "
                     "%s)", stage, gpus_now, "?" if gpus_most is None else f"{gpus_most:g}")
        elif gpus_most is None:
            log.warning("%s: gpus_per_actor unset and the cluster has no GPU now: CPU only "
                        "(an autoscaler might add GPU nodes: set %s.gpus_per_actor to wait "
                        "for them)", stage, stage)
        else:
            log.info("%s: gpus_per_actor unset: CPU only (the Ray cluster has no GPUs)", stage)
    elif gpus_per_actor > gpus_can:
        if gpus_most is None:
            log.warning("%s: gpus_per_actor=%g and the cluster has %g GPUs now (its autoscaler "
                        "limits are unknown): waiting for GPU nodes", stage, gpus_per_actor,
                        gpus_now)
            gpus = float(gpus_per_actor)
        else:
            raise ResourceError(
                f"{stage}: gpus_per_actor={gpus_per_actor:g} asks for GPUs but the Ray cluster "
                f"has {gpus_now:g} GPUs"
                f"{' and cannot scale up to more' if gpus_most == gpus_now else ''} (at most "
                f"{gpus_most:g}); join a cluster with GPUs (ray.address) or set "
                f"{stage}.gpus_per_actor: 0 to run on CPUs")
    else:
        gpus = float(gpus_per_actor)
    res = Resources(stage, num_actors or 1, float(cpus_per_actor), gpus)
    if num_actors is None:  # as many as fit the nodes: GPU actors as the cluster can scale
        most = capacity(res.num_cpus, gpus, at_most=bool(gpus))
        if most is None or most >= sys.maxsize:
            most = capacity(res.num_cpus, gpus, at_most=False)
        if not gpus:  # CPU actors: those of the CPUs there now, one left to the driver
            most = min(most or 1, int(max(cpus_now - 1, cpus_per_actor) // cpus_per_actor))
        res = Resources(stage, max(1, most or 1), res.num_cpus, gpus)
    check_fits(Resources(stage, 1, res.num_cpus, gpus), "one actor",
               f"lower {stage}.cpus_per_actor or gpus_per_actor, or add nodes that can run it")
    return res


def node_shapes(at_most: bool = True) -> list[tuple[float, float, int]] | None:
    """``(CPUs, GPUs, how many)`` of each kind of node: not ``at_most``, the nodes alive now;
    ``at_most``, the autoscaler's node groups at their maximum (the cluster config an
    autoscaler publishes; groups with resources and a maximum only; an unbounded one counts
    ``sys.maxsize``), else ``None`` (no groups published)."""
    import ray

    if not at_most:
        return [(float(n["Resources"].get("CPU", 0)), float(n["Resources"].get("GPU", 0)), 1)
                for n in ray.nodes() if n.get("Alive")]
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception as e:  # noqa: BLE001 - no autoscaler config readable
        log.debug("no autoscaler node groups (%s)", e)
        config = None
    groups = [(float(g.resources.get("CPU", 0)), float(g.resources.get("GPU", 0)),
               sys.maxsize if g.max_count < 0 else int(g.max_count))
              for g in (config.node_group_configs if config is not None else [])
              if g.max_count and (g.resources.get("CPU", 0) or g.resources.get("GPU", 0))]
    return groups or None


def slots(cpus: float, gpus: float, node_cpus: float, node_gpus: float) -> int:
    """How many actors of ``cpus`` CPUs and ``gpus`` GPUs one node runs at once. Ray packs
    ``floor(1 / gpus)`` actors of a fraction on one GPU, and whole GPUs above one."""
    n = int(node_cpus / cpus + 1e-9) if cpus else sys.maxsize
    if gpus:
        n = min(n, int(node_gpus) * int(1 / gpus + 1e-9) if gpus <= 1
                else int(node_gpus // gpus))
    return n


def capacity(cpus: float, gpus: float, at_most: bool = True) -> int | None:
    """How many actors of ``cpus`` / ``gpus`` the cluster runs at once, node by node: on the
    nodes there now, or ``at_most`` the most of those and of the autoscaler's node groups at
    their maximum (:func:`node_shapes`); ``None`` where that is unknown (a cluster joined by
    address whose autoscaler publishes no node groups)."""
    def count(shapes: list[tuple[float, float, int]]) -> int:
        return min(sys.maxsize, sum(slots(cpus, gpus, c, g) * k for c, g, k in shapes))

    now = count(node_shapes(at_most=False))
    if not at_most:
        return now
    groups = node_shapes(at_most=True)
    if groups is not None:
        return max(now, count(groups))
    return now if _started_here() else None


def check_fits(res: Resources, what: str, advice: str) -> None:
    """A :class:`ResourceError` when the ``res.num_actors`` actors of ``res``, which must all
    run at once (``what``: who they are), can never fit the cluster at its largest, node by
    node (:func:`capacity`): they would wait forever. Where its largest is unknown, a warning
    when the nodes there now cannot run them."""
    most = capacity(res.num_cpus, res.num_gpus)
    gpus = f" and {res.num_gpus:g} GPUs" if res.num_gpus else ""
    if most is not None and res.num_actors > most:
        raise ResourceError(
            f"{res.stage}: {what}: {res.num_actors} of {res.num_cpus:g} CPUs{gpus} each, and "
            f"the Ray cluster's nodes can run at most {most} of them at once: {advice}")
    if most is None and res.num_actors > (now := capacity(res.num_cpus, res.num_gpus, False)):
        log.warning("%s: %s: %d of %g CPUs%s each, and the nodes there now run %d of them "
                    "(the autoscaler publishes no limits): waiting for nodes; if none come, "
                    "%s", res.stage, what, res.num_actors, res.num_cpus, gpus, now, advice)


def bundles(res: Resources, n: int | None = None) -> list[dict[str, float]]:
    """The resource shapes of ``n`` actors of ``res`` (default: ``res.num_actors``), as
    ``ray.autoscaler.sdk.request_resources`` takes them: ``{"CPU": c[, "GPU": g]}`` each."""
    one = {"CPU": res.num_cpus, **({"GPU": res.num_gpus} if res.num_gpus else {})}
    return [dict(one) for _ in range(res.num_actors if n is None else n)]


#: How long a stage's autoscaler request outlives its last renewal (a driver that dies
#: mid-stage leaves it to lapse), and how often a running stage renews it: Ray Train's values.
REQUEST_EXPIRE_S = 180.0
REQUEST_RENEW_S = 20.0


@contextmanager
def requesting(stage: str, shapes: list[dict[str, float]]) -> Iterator[None]:
    """Ask the autoscaler for ``shapes`` (:func:`bundles`) while the block runs: the
    cluster scales up to fit them at once (KubeRay, the cluster launcher), not only after it
    notices pending actors, and does not scale the GPU group down while a stage waits for it.

    The request goes through Ray's ``AutoscalingCoordinator``, the cluster-wide actor with
    which Ray Data and Ray Train register theirs: it sends the autoscaler the merge of every
    live requester's bundles. (A bare ``request_resources`` replaces the one cluster-wide
    request: the coordinator's next merge, every 20 s, would drop it, and clearing it would
    drop everyone else's.) The request is renewed every :data:`REQUEST_RENEW_S` while the
    block runs and cancelled when it ends; a driver that dies leaves it to expire. It is a
    hint: on a cluster without autoscaler it changes nothing, and a failing request only
    logs."""
    if not shapes:
        yield
        return
    import threading
    import uuid

    import ray

    requester = f"qgscale-{stage}-{uuid.uuid4().hex[:8]}"

    def call(method: str, **kwargs: Any) -> None:
        try:  # a Ray without the coordinator (private module) only logs, as any failure
            from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
                get_or_create_autoscaling_coordinator,
            )

            coordinator = get_or_create_autoscaling_coordinator()  # a named-actor lookup
            ray.get(getattr(coordinator, method).remote(requester_id=requester, **kwargs),
                    timeout=10)
        except Exception as e:  # noqa: BLE001 - a hint: never fails the stage
            log.warning("%s: could not %s from the autoscaler (%s)", stage,
                        method.replace("_", " "), e)

    def ask() -> None:
        call("request_resources", resources=shapes, expire_after_s=REQUEST_EXPIRE_S)

    ask()
    log.debug("%s: requested %d bundle(s) of %s from the autoscaler", stage, len(shapes),
              shapes[0])
    done = threading.Event()

    def renew() -> None:
        while not done.wait(REQUEST_RENEW_S):
            ask()

    renewer = threading.Thread(target=renew, name=f"{requester}-renew", daemon=True)
    renewer.start()
    try:
        yield
    finally:
        done.set()
        renewer.join()
        call("cancel_request")


def actor_device(num_gpus: float) -> str:
    """The torch device of an actor Ray gave ``num_gpus`` GPUs: ``"cuda"`` (checked to be
    there) or ``"cpu"`` (even when the node has GPUs: they belong to other actors)."""
    if not num_gpus:
        return "cpu"
    from qgscale.models.precision import default_device

    if default_device() != "cuda":
        raise ResourceError(f"this actor was given {num_gpus:g} GPU(s) by Ray but torch sees "
                            "no CUDA device (a CPU build of torch?)")
    return "cuda"


# ---------------------------------------------------------------- shard jobs
@dataclass
class Shard:
    """One output shard: ``name`` (file stem), ``size`` (for progress), job ``payload``."""

    name: str
    size: int
    payload: Any


class ShardJob(Protocol):
    """What an actor runs: ``setup(device, threads)`` once (load the model and inputs), then
    ``run(state, shard)`` per shard: the shard's output table, or ``(table, marker_extra)``.
    The runner writes it (and its done marker); the job may write side files first."""

    def setup(self, device: str, threads: int) -> Any: ...

    def run(self, state: Any, shard: Shard) -> pa.Table | tuple[pa.Table, dict]: ...


class ShardActor:
    """The Ray actor of :func:`run_shards`: sets the job up once, writes shard after shard."""

    def __init__(self, job: ShardJob, out_uri: str, config_hash: str, num_gpus: float,
                 threads: int):
        self.writer = storage.ShardWriter(out_uri, config_hash)
        self.job = job
        self.state = job.setup(actor_device(num_gpus), threads)

    def ready(self) -> bool:
        return True

    def run(self, shard: Shard) -> int:
        """Rows written (0 when the shard was already done: a retried shard is never
        written twice)."""
        if self.writer.done(shard.name):
            return 0
        out = self.job.run(self.state, shard)
        table, extra = out if isinstance(out, tuple) else (out, {})
        self.writer.write(shard.name, table, **extra)
        return table.num_rows


UNITS_PER_ACTOR = 2  # work units per actor at least (load balance), shard_rows permitting
PLAN = "_plan.json"  # under a shard job's output: the unit size of its first run


def unit_rows(n: int, shard_rows: int, num_actors: int) -> int:
    """Rows per work unit: ``shard_rows``, or fewer so that ``n`` rows make at least
    ``UNITS_PER_ACTOR`` units per actor (every actor gets work)."""
    return max(1, min(shard_rows, -(-n // (UNITS_PER_ACTOR * max(1, num_actors)))))


def planned_unit_rows(out_uri: str, config_hash: str, n: int, shard_rows: int,
                      actors: Actors, stage: str) -> int:
    """The unit size of a shard job writing ``out_uri``: that of its first run with the same
    ``config_hash`` (kept in ``PLAN``, so a resume with another actor count keeps the same
    shards), else :func:`unit_rows` for the actor pool ``actors`` would start."""
    uri = storage.join(out_uri, PLAN)
    plan = storage.read_json(uri) if storage.exists(uri) else {}
    rows = plan.get("unit_rows") if plan.get("config_hash") == config_hash else None
    if not rows:
        rows = unit_rows(n, shard_rows, actor_resources(
            stage, actors.num_actors, actors.cpus_per_actor, actors.gpus_per_actor).num_actors)
        storage.write_json(uri, {"config_hash": config_hash, "unit_rows": rows})
    return rows


def run_shards(job: ShardJob, shards: Sequence[Shard], out_uri: str, config_hash: str,
               actors: Actors, *, stage: str, desc: str | None = None,
               unit: str = "shard") -> dict[str, int]:
    """Write every shard of ``shards`` not yet done (marker with ``config_hash``) into
    ``out_uri`` on an actor pool; returns counts for the manifest (the caller finalizes).

    ``actors`` (the stage's config section, named ``stage`` in errors) sizes the pool, via
    :func:`actor_resources`. A shard whose actor dies is re-queued (at most
    ``actors.max_retries`` times) on a fresh actor; a shard that fails every try is reported
    after the others are done (:class:`ShardsFailed`, finished shards are kept). An error
    raised by the job itself (bad input) propagates at once.
    The pool's resources are requested from the autoscaler while it runs
    (:func:`requesting`).
    """
    import ray

    writer = storage.ShardWriter(out_uri, config_hash)
    done = writer.markers()
    todo = [s for s in shards if s.name not in done]
    stats = {"shards": len(shards), "shards_run": 0, "rows_written": 0, "actor_failures": 0}
    if not todo:
        return stats
    res = actor_resources(stage, actors.num_actors, actors.cpus_per_actor,
                          actors.gpus_per_actor)
    max_retries = actors.max_retries
    n = min(res.num_actors, len(todo))
    check_fits(Resources(stage, n, res.num_cpus, res.num_gpus),
               f"{stage}.num_actors={actors.num_actors}, {len(todo)} shard(s) to do",
               f"lower {stage}.num_actors, cpus_per_actor or gpus_per_actor, or add nodes "
               "that can run them")
    log.info("%s: %d shard(s) to do on %d actor(s) x (%g CPU, %g GPU)", stage, len(todo), n,
             res.num_cpus, res.num_gpus)
    actor_cls = ray.remote(ShardActor).options(max_restarts=0, **res.options())

    def start() -> Any:
        return actor_cls.remote(job, out_uri, config_hash, res.num_gpus, res.threads)

    with requesting(stage, bundles(res, n)):
        return _run_pool(start, n, todo, stats, max_retries, desc or stage, unit)


def _run_pool(start: Any, n: int, todo: list[Shard], stats: dict[str, int],
              max_retries: int, desc: str, unit: str) -> dict[str, int]:
    """:func:`run_shards`' loop: ``n`` actors from ``start()`` write the ``todo`` shards."""
    import ray
    from ray.exceptions import RayActorError
    from tqdm import tqdm

    actors = [start() for _ in range(n)]
    pending = deque(todo)
    attempts: dict[str, int] = {}
    failed: dict[str, str] = {}
    inflight: dict[Any, tuple[int, Shard]] = {}
    idle = list(range(n))
    bar = tqdm(total=sum(s.size for s in todo), desc=desc, unit=unit,
               unit_scale=True, smoothing=0.1, mininterval=1.0)
    try:
        ray.get([a.ready.remote() for a in actors])  # setup errors surface here, once
        while pending or inflight:
            while pending and idle:
                i, s = idle.pop(), pending.popleft()
                if actors[i] is None:
                    actors[i] = start()
                inflight[actors[i].run.remote(s)] = (i, s)
            [ref], _ = ray.wait(list(inflight), num_returns=1)
            i, s = inflight.pop(ref)
            try:
                rows = ray.get(ref)
            except RayActorError as e:
                stats["actor_failures"] += 1
                attempts[s.name] = attempts.get(s.name, 0) + 1
                ray.kill(actors[i])  # an unavailable (not dead) actor must not write later
                actors[i] = None  # replaced when it gets its next shard
                idle.append(i)
                if attempts[s.name] > max_retries:
                    failed[s.name] = (f"its actor died {attempts[s.name]} time(s) "
                                      f"(max_retries={max_retries}): "
                                      f"{str(e).strip().splitlines()[0][:300]}")
                else:
                    pending.appendleft(s)
                continue
            stats["shards_run"] += 1
            stats["rows_written"] += rows
            bar.update(s.size)
            idle.append(i)
    finally:
        bar.close()
        for a in actors:
            if a is not None:
                ray.kill(a)
    if failed:
        first = next(iter(failed))
        raise ShardsFailed(f"{desc} failed for {sorted(failed)} (re-run to resume; "
                           f"the other shards are done): {first}: {failed[first]}")
    return stats


MAP_FROM = 32  # map_shards runs on tasks from this many local files (2 remote ones) ...
MAP_WINDOW = 2  # ... with this many tasks in flight per CPU of the Ray cluster ...
MAP_MOST = 256  # ... and at most this many from the driver,
MAP_IN_WORKER = 4  # this many from an actor or task (its nodes' CPUs are the stages')


def map_window(cluster_window: bool = False) -> int:
    """How many of :func:`map_shards`' tasks are in flight: :data:`MAP_WINDOW` per cluster
    CPU, at most :data:`MAP_MOST`, from the driver or with ``cluster_window``; else (from an
    actor or task) :data:`MAP_IN_WORKER`."""
    import ray

    if cluster_window or ray.get_runtime_context().worker.mode == ray.SCRIPT_MODE:
        return min(MAP_MOST, max(2, MAP_WINDOW * int(ray.cluster_resources().get("CPU", 1))))
    return MAP_IN_WORKER


def off_cpuless_head() -> dict[str, Any]:
    """Task options that keep a task of no CPU off a head node started with no CPUs (the
    KubeRay manifests' head: "no task or actor lands next to the driver"), which Ray would
    otherwise find feasible for it: a label selector excluding the head, while some other
    node has CPUs. Empty otherwise (a local Ray; a cluster scaled to its head alone)."""
    import ray

    alive = [n for n in ray.nodes() if n.get("Alive")]
    head = [n for n in alive if "node:__internal_head__" in n.get("Resources", {})]
    if (len(head) != 1 or head[0]["Resources"].get("CPU", 0) > 0
            or not any(n["Resources"].get("CPU", 0) > 0 for n in alive)):
        return {}
    return {"label_selector": {"ray.io/node-id": f"!{head[0]['NodeID']}"}}


def map_shards(fn: Callable[..., Any], uris: Sequence[Any], *args: Any,
               cluster_window: bool = False, num_cpus: float = 0,
               least: int | None = None) -> Iterator[Any]:
    """``fn(uri, *args)`` for each of ``uris``, the results in that order: on Ray tasks
    where Ray is initialised and there are several remote files or :data:`MAP_FROM` local
    ones (``num_cpus`` each, 0 by default; spread over the nodes, with :func:`worker_env`;
    ``args`` put in the object store once; :data:`MAP_WINDOW` tasks per cluster CPU in
    flight, :data:`MAP_MOST` at most; :data:`MAP_IN_WORKER` from inside an actor or task,
    unless ``cluster_window``: for a task whose stage's actors wait meanwhile, as eval's
    corpus passes), else here one after another. A task's error is raised as itself (a
    DataError naming its file). ``uris`` may be other work units than file URIs (e.g.
    byte ranges of a file, :mod:`qgscale.data.collection`): they count as remote ones.
    ``least``: on tasks from this many items (e.g. 1: work too large for this process).
    Tasks of no CPU stay off a head started with no CPUs (:func:`off_cpuless_head`).

    For the driver's passes over many files (corpus lookups, statistics): each file's work
    goes where it is read, only ``fn``'s result comes back, and the files' round trips
    overlap. Fewer local files are read here: the tasks' first call in a process costs
    seconds of worker start-up (their runtime env), more than reading a few local files one
    after another. ``memory://`` files (this process's own) are always read here."""
    import ray

    first = uris[0] if uris else None
    uri = first if isinstance(first, str) else ""
    if least is None:
        least = 2 if first is not None and not (uri and storage.is_local(uri)) else \
            max(2, MAP_FROM)
    if len(uris) < least or not ray.is_initialized() or uri.startswith("memory://"):
        for u in uris:
            yield fn(u, *args)
        return
    from ray.exceptions import RayTaskError

    task = ray.remote(fn).options(**remote_options(
        num_cpus, scheduling_strategy="SPREAD", **(off_cpuless_head() if not num_cpus else {})))
    refs = [ray.put(a) for a in args]
    window = map_window(cluster_window)
    pending: deque[Any] = deque()
    todo = iter(uris)
    try:
        for uri in itertools.islice(todo, window):
            pending.append(task.remote(uri, *refs))
        while pending:
            try:
                out = ray.get(pending.popleft())
            except RayTaskError as e:
                raise unwrap(e) from None
            for uri in itertools.islice(todo, 1):
                pending.append(task.remote(uri, *refs))
            yield out
    finally:
        # a consumer that stops early: the window's tasks run to their end and their
        # results are dropped. Not ray.cancel: in Ray 2.60 a cancel racing the task's
        # completion aborts the driver ("Check failed: it != submissible_tasks_.end() Tried
        # to complete task that was not pending", task_manager.cc; seen in a CI run here)
        pending.clear()
