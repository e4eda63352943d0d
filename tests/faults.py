"""Faults caused from outside the code under test: real process kills, no hooks."""

from __future__ import annotations

import os
import signal
import threading

import psutil

from qgscale import storage


def shard_actor_pids(busy_first: bool = True) -> list[int]:
    """PIDs of the live ``ShardActor`` processes of this driver's local Ray (children of its
    raylet only: other Ray instances on the machine are never touched); busy ones first."""
    import ray

    raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
    found = []
    for p in psutil.Process(raylet).children(recursive=True):
        try:
            title = (p.cmdline() or [""])[0]
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if title.startswith("ray::ShardActor"):
            found.append((not title.endswith(".run") if busy_first else 0, p.pid))
    return [pid for _, pid in sorted(found)]


class KillShardActorAfter(threading.Thread):
    """Once ``after`` shards of the job writing ``out_uri`` are done (done markers), SIGKILL
    one live shard actor (a busy one when there is one): a crash, with no exception and no
    clean-up in the actor. ``killed`` holds the PID and the done count at the kill."""

    def __init__(self, out_uri: str, after: int = 1) -> None:
        super().__init__(daemon=True)
        self.markers = storage.join(out_uri, storage.DONE_DIR)
        self.after = after
        self.old = set(shard_actor_pids())  # left over from earlier jobs: never the target
        self.stop = threading.Event()
        self.killed: dict[str, int] = {}

    def run(self) -> None:
        while not self.stop.is_set():
            done = len(storage.list_files(self.markers, ".json"))
            pids = [p for p in shard_actor_pids() if p not in self.old] \
                if done >= self.after else []
            if pids:
                os.kill(pids[0], signal.SIGKILL)
                self.killed = {"pid": pids[0], "done": done}
                return
            self.stop.wait(0.02)

    def __enter__(self) -> KillShardActorAfter:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.join(30)
