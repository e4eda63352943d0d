"""An explicit Ray actor pool over named shards, with exactly-once output and retries.

Why an explicit pool and not Ray Data ``map_batches``: the unit of work here is an *output
shard* with a stable name, a done marker and a retry count. Ray Data's blocks have no stable
identity across runs, so a re-run could not skip finished work shard by shard, and a block
lost with its actor is retried inside Ray Data where we cannot see it or bound it. With the
pool, each actor loads the model once, takes one shard at a time, groups its pairs by
passage for the fast path, and writes the shard atomically plus its marker
(:class:`qgscale.storage.ShardWriter`); the driver only moves shard descriptors. A killed
actor's shard goes back to the queue and a fresh actor replaces it; a shard is written whole
or not at all, so every output row exists exactly once.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from tqdm import tqdm

from qgscale.raycluster import connect as ensure_ray  # noqa: F401  (used by the stages)
from qgscale.raycluster import worker_env as actor_env


@dataclass
class Unit:
    """One output shard: ``name`` (file stem), ``size`` (pairs or passages), job ``payload``."""

    name: str
    size: int
    payload: Any


class Job(Protocol):
    """What an actor runs: ``setup()`` once (load model and texts), ``run(state, unit)`` per
    shard (write it; return rows written, 0 when it was already done)."""

    def setup(self) -> Any: ...

    def run(self, state: Any, unit: Unit) -> int: ...


class Worker:
    """The Ray actor: holds the model (``job.setup()``) and runs shards one at a time."""

    def __init__(self, job: Job, threads: int | None = None):
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.job = job
        self.state = job.setup()

    def ready(self) -> bool:
        return True

    def run(self, unit: Unit) -> int:
        return self.job.run(self.state, unit)


def actor_resources(num_actors: int | None, cpus_per_actor: float) -> tuple[int, float, float]:
    """(actors, CPUs, GPUs per actor): one actor per GPU when the cluster has GPUs, else one per
    ``cpus_per_actor`` slot leaving one CPU free for the driver."""
    import ray

    res = ray.cluster_resources()
    gpus = int(res.get("GPU", 0))
    if gpus:
        return num_actors or gpus, 1.0, 1.0
    spare = max(res.get("CPU", 1) - 1, cpus_per_actor)
    return num_actors or max(1, int(spare // cpus_per_actor)), cpus_per_actor, 0.0


def run_pool(job: Job, units: Sequence[Unit], *, num_actors: int | None = None,
             cpus_per_actor: float = 1.0, max_retries: int = 3, desc: str = "shards",
             unit: str = "it", on_done: Callable[[str, int, list], None] | None = None
             ) -> dict[str, int]:
    """Run ``job`` over ``units`` on an actor pool; returns counts for the manifest.

    A unit whose actor dies is re-queued (at most ``max_retries`` times per unit) and the
    actor replaced. Errors raised by the job itself (bad input) propagate at once.
    ``on_done(name, actor_index, actors)`` is called after each finished shard.
    """
    import ray
    from ray.exceptions import RayActorError

    stats = {"shards": len(units), "shards_run": 0, "rows_written": 0, "actor_failures": 0}
    if not units:
        return stats
    n, cpus, gpus = actor_resources(num_actors, cpus_per_actor)
    n = min(n, len(units))
    actor_cls = ray.remote(Worker).options(
        num_cpus=cpus, num_gpus=gpus, max_restarts=0,
        runtime_env={"env_vars": actor_env()})
    threads = max(1, int(cpus)) if not gpus else None

    def start() -> Any:
        return actor_cls.remote(job, threads)

    actors = [start() for _ in range(n)]
    pending = deque(units)
    attempts: dict[str, int] = {}
    inflight: dict[Any, tuple[int, Unit]] = {}
    idle = list(range(n))
    bar = tqdm(total=sum(u.size for u in units), desc=desc, unit=unit, unit_scale=True,
               smoothing=0.1, mininterval=1.0)
    try:
        ray.get([a.ready.remote() for a in actors])  # model load errors surface here, once
        while pending or inflight:
            while pending and idle:
                i, u = idle.pop(), pending.popleft()
                inflight[actors[i].run.remote(u)] = (i, u)
            [ref], _ = ray.wait(list(inflight), num_returns=1)
            i, u = inflight.pop(ref)
            try:
                rows = ray.get(ref)
            except RayActorError as e:
                stats["actor_failures"] += 1
                attempts[u.name] = attempts.get(u.name, 0) + 1
                if attempts[u.name] > max_retries:
                    raise RuntimeError(f"shard {u.name}: its actor died {attempts[u.name]} "
                                       f"times (max_retries={max_retries}): {e}") from e
                pending.appendleft(u)
                ray.kill(actors[i])  # an unavailable (not dead) actor must not write later
                actors[i] = start()
                idle.append(i)
                continue
            stats["shards_run"] += 1
            stats["rows_written"] += rows
            bar.update(u.size)
            idle.append(i)
            if on_done:
                on_done(u.name, i, actors)
    finally:
        bar.close()
        for a in actors:
            ray.kill(a)
    return stats
