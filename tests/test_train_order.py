"""The training data order, the prefetching loader, step plans on resume and the metric
sinks, without Ray."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pyarrow as pa
import pytest

from qgscale import storage
from qgscale.config import LossConfig, StudentTrainConfig
from qgscale.data.schema import CORPUS, QRELS, QUERIES, TRAIN_EXAMPLES
from qgscale.errors import ConfigError
from qgscale.train import data as tdata
from qgscale.train.loop import Position, deepspeed_config, plan_steps
from qgscale.train.order import (
    EpochOrder,
    Loader,
    Shard,
    ShardRows,
    epoch_order,
    list_shards,
    sample_seed,
)
from qgscale.train.tracking import Tracker, event_file_bytes, mlflow_client


@pytest.fixture
def shards(tmp_path):
    """3 shards of 10, 7 and 13 rows; row ``i`` has ``id == i``."""
    start = 0
    for i, n in enumerate((10, 7, 13)):
        table = pa.table({"id": list(range(start, start + n)),
                          "text": [f"row {j}" for j in range(start, start + n)]})
        storage.write_parquet(str(tmp_path / f"part-{i:05d}.parquet"), table)
        start += n
    return list_shards(str(tmp_path))


def test_epoch_order_is_a_seeded_shard_major_permutation(shards):
    assert [s.rows for s in shards] == [10, 7, 13]
    o = epoch_order(shards, seed=13, epoch=0)
    assert sorted(o.tolist()) == list(range(30))
    assert np.array_equal(o, epoch_order(shards, seed=13, epoch=0))
    assert not np.array_equal(o, epoch_order(shards, seed=13, epoch=1))
    assert not np.array_equal(o, epoch_order(shards, seed=14, epoch=0))
    shard_of = np.searchsorted([10, 17, 30], o, side="right")
    runs = [int(shard_of[0])] + [int(b) for a, b in zip(shard_of[:-1], shard_of[1:],
                                                        strict=True) if a != b]
    assert sorted(runs) == [0, 1, 2]  # each shard read once, as one run
    assert sample_seed(13, 0, 8) == sample_seed(13, 0, 8) != sample_seed(13, 0, 16)


@pytest.mark.parametrize("prefetch", [0, 2])
def test_workers_split_the_stream_the_same_for_any_worker_count(shards, prefetch):
    """Micro-batch j of worker r is samples [(j * world + r) * b, + b): 2 workers x batch 3
    and 1 worker x batch 3 read the same stream, in the same order, from any offset."""
    order = epoch_order(shards, 13, 1).tolist()

    def ids(rows):
        return rows["id"]

    def stream(world, offset, n):
        per = [list(Loader(shards, 13, r, world, 3, ids, prefetch).epoch(1, offset, n))
               for r in range(world)]
        out = []
        for j in range(n):
            for r in range(world):
                mb = per[r][j]
                assert mb.epoch == 1 and mb.sample == offset + (j * world + r) * 3
                out += mb.batch
        return out

    assert stream(2, 0, 4) == order[:24]
    assert stream(1, 0, 8) == order[:24]
    assert stream(2, 12, 2) == order[12:24]  # resumed at sample 12, e.g. after 2 steps
    assert stream(1, 12, 4) == order[12:24]  # ... on another worker count


def test_a_worker_holds_only_its_rows_of_a_shard(tmp_path, monkeypatch):
    """A worker holds, of the shard it reads, only the rows it takes in the epoch (read row
    group by row group: 4-row groups here), and gets the rows of the stream all the same."""
    monkeypatch.setattr(storage, "ROW_GROUP_ROWS", 4)
    table = pa.table({"id": list(range(40)), "text": [f"row {j}" for j in range(40)]})
    storage.write_parquet(str(tmp_path / "part-00000.parquet"), table)
    shards = list_shards(str(tmp_path))
    order = EpochOrder(shards, 3, 0)
    mine = np.concatenate([order.take(s, s + 2) for s in range(2, 40, 8)])  # rank 1 of 4
    rows = ShardRows(shards, np.sort(mine))
    assert rows(mine[:2])["id"] == mine[:2].tolist()
    assert rows._held[2].num_rows == 10  # 10 of the shard's 40 rows
    assert rows(mine[::-1])["id"] == mine[::-1].tolist()
    with pytest.raises(RuntimeError, match="rows asked that were not wanted"):
        rows(np.array([int(np.setdiff1d(np.arange(40), mine)[0])]))
    got = [mb.batch for mb in Loader(shards, 3, 1, 4, 2, lambda r: r["id"], 0).epoch(0, 0, 5)]
    assert sum(got, []) == mine.tolist()


def test_read_take_reads_rows_across_row_groups(tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "ROW_GROUP_ROWS", 3)
    uri = str(tmp_path / "t.parquet")
    storage.write_parquet(uri, pa.table({"x": list(range(10))}))
    assert storage.read_take(uri, [0, 2, 3, 9])["x"].to_pylist() == [0, 2, 3, 9]
    assert storage.read_take(uri, []).num_rows == 0
    with pytest.raises(ValueError, match=r"t.parquet: rows 5-10 asked of a file with 10 rows"):
        storage.read_take(uri, [5, 10])


def test_prefetch_stops_and_reraises(shards):
    def boom(rows):
        if rows["id"][0] == epoch_order(shards, 13, 0)[6]:
            raise ValueError("bad row")
        return rows["id"]

    it = Loader(shards, 13, 0, 1, 3, boom, prefetch=2).epoch(0, 0, 5)
    assert len(next(it).batch) == 3
    assert len(next(it).batch) == 3
    with pytest.raises(ValueError, match="bad row"):
        next(it)
    it = Loader(shards, 13, 0, 1, 3, lambda r: r, prefetch=2).epoch(0, 0, 5)
    next(it)
    it.close()  # stops the thread (joined in the generator's finally)


@pytest.mark.parametrize("sizes", [(10, 7, 13), (2000, 0, 1999, 1, 5000), ()])
def test_lazy_epoch_order_equals_the_materialised_one(sizes):
    """Loader reads the order one shard at a time: any slice equals the whole permutation
    (shard order seeded by (seed, epoch), rows by (seed, epoch, shard)) that exact resume
    depends on."""
    shards = tuple(Shard(f"s{i}", n) for i, n in enumerate(sizes))
    starts = np.cumsum([0, *sizes])
    want = [starts[i] + np.random.default_rng([13, 2, int(i)]).permutation(sizes[i])
            for i in np.random.default_rng([13, 2]).permutation(len(sizes))]
    want = np.concatenate(want) if want else np.zeros(0, dtype=np.int64)
    assert np.array_equal(epoch_order(shards, 13, 2), want)
    order = EpochOrder(shards, 13, 2)
    for start, stop in [(0, 3), (5, 40), (1995, 2010), (0, len(want) + 5), (len(want), 9999)]:
        assert np.array_equal(order.take(start, stop), want[start:stop])


def test_written_rows_mix_languages_in_every_shard(tmp_path):
    """Readers prefix qids with the language: rows in qid order made each shard, so each
    micro-batch (its in-batch negatives) and runs of steps, one language. Student, qg-rank
    and QG rows are written in a hash order of the qids: every shard mixes languages."""
    qids = [f"{lang}:{i:03d}" for lang in ("de", "en", "ja") for i in range(40)]
    tables = {
        "queries": ([{"qid": q, "lang": q[:2], "text": f"query {q}"} for q in qids], QUERIES),
        "corpus": ([{"pid": f"p-{q}", "lang": q[:2], "title": "", "text": f"passage {q}"}
                    for q in qids], CORPUS),
        "qrels": ([{"qid": q, "pid": f"p-{q}", "rel": 1} for q in qids], QRELS),
        "examples": ([{"qid": q, "pos_pids": [f"p-{q}"], "neg_pids": []} for q in qids],
                     TRAIN_EXAMPLES)}
    uri = {k: str(tmp_path / k) for k in tables}
    for k, (rows, schema) in tables.items():
        storage.write_parquet(f"{uri[k]}/part-00000.parquet", pa.Table.from_pylist(rows, schema))
    student, _ = tdata.build_student_rows(uri["queries"], uri["corpus"],
                                          LossConfig(n_hard_negatives=0), qrels_uri=uri["qrels"])
    rank, _ = tdata.build_qg_rank_rows(uri["queries"], uri["corpus"], uri["examples"], 0)
    qg = tdata.in_row_order(storage.read_parquet(uri["qrels"]), ("qid", "pid"))  # run_train_qg
    # a shard of an interrupted Ray Data build (other names) is not mixed into the rows
    storage.write_parquet(str(tmp_path / "qg" / "part-00000000abcdef01-0a1b2c3d.parquet"), qg)
    for name, table in (("student", student), ("qg-rank", rank), ("qg", qg)):
        tdata.write_rows(table, str(tmp_path / name), 10, "k")
        shards = list_shards(str(tmp_path / name))
        assert len(shards) == 12
        for s in shards:
            langs = {q[:2] for q in storage.read_parquet(s.uri).column("qid").to_pylist()}
            assert len(langs) > 1, (name, s.uri, langs)


def test_plan_on_resume_with_another_worker_count():
    tc = StudentTrainConfig(batch_size=8, epochs=2)
    fresh = plan_steps(128, 2, tc)
    assert (fresh.per_epoch, fresh.total, fresh.samples_per_step) == (8, 16, 16)
    # same workers: the same total from any checkpoint
    assert plan_steps(128, 2, tc, Position(step=5, epoch=0, offset=80)).total == 16
    assert plan_steps(128, 2, tc, Position(step=11, epoch=1, offset=48)).total == 16
    # 4 steps of 16 samples on 2 workers, then 1 worker: 64 samples left = 8 steps, + 16
    assert plan_steps(128, 1, tc, Position(step=4, epoch=0, offset=64)).total == 4 + 8 + 16
    capped = StudentTrainConfig(batch_size=8, epochs=2, max_steps=10)
    assert plan_steps(128, 1, capped, Position(step=4, epoch=0, offset=64)).total == 10


def test_deepspeed_config_comm_settings():
    tc = StudentTrainConfig(zero_stage=2, grad_accum=4, reduce_bucket_size=5_000_000,
                            overlap_comm=False)
    z = deepspeed_config(tc, 8)["zero_optimization"]
    assert z == {"stage": 2, "overlap_comm": False, "contiguous_gradients": True,
                 "reduce_bucket_size": 5_000_000, "allgather_bucket_size": 200_000_000}
    assert deepspeed_config(tc, 8)["train_batch_size"] == 8 * 8 * 4
    z3 = deepspeed_config(tc.model_copy(update={"zero_stage": 3}), 8)
    assert z3["zero_optimization"]["stage3_prefetch_bucket_size"] == 200_000_000
    assert deepspeed_config(tc.model_copy(update={"zero_stage": 0}), 8)[
        "zero_optimization"] == {"stage": 0}
    assert deepspeed_config(tc, 1, load_universal=True)["checkpoint"] == {
        "load_universal": True}


def _log(n):
    return [{"step": i, "loss": 3.0 - 0.1 * i, "lr": 1e-3, "epoch": 0, "start_step": 0,
             "time": 1_700_000_000.0 + i, "resume": None} for i in range(1, n + 1)]


def test_tensorboard_file_from_metrics(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = str(tmp_path / "stage")
    Tracker(out).write(_log(5))
    Tracker(out).write(_log(3))  # a resumed attempt rewrites it from its metrics
    assert len(storage.list_files(storage.join(out, "tensorboard"))) == 1
    acc = EventAccumulator(storage.join(out, "tensorboard"))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == {"train/loss", "train/lr", "train/epoch"}
    assert [(e.step, round(e.value, 5)) for e in acc.Scalars("train/loss")] == [
        (1, 2.9), (2, 2.8), (3, 2.7)]
    lines = storage.read_bytes(storage.join(out, "metrics.jsonl")).splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3]
    assert event_file_bytes([])  # only the file header


def test_mlflow_without_the_package_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"mlflow_uri is set but MLflow is not installed: "
                                          r"pip install 'qgscale\[tracking\]'"):
        Tracker(str(tmp_path), mlflow_uri=f"file://{tmp_path}/mlruns")


def test_mlflow_telemetry_off(tmp_path):
    """No usage telemetry (network) from MLflow: in a clean process (none of the CI/test
    variables that also switch it off) the tracker's import leaves no telemetry client."""
    import os
    import subprocess

    code = (f"from qgscale.train import tracking; tracking.mlflow_client('file://{tmp_path}'); "
            "from mlflow.telemetry import get_telemetry_client; "
            "print(get_telemetry_client())")
    env = {k: os.environ[k] for k in ("PATH", "HOME", "PYTHONPATH") if k in os.environ}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=120, check=True).stdout
    assert out.strip().splitlines()[-1] == "None"


def _mlflow_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in mlflow_client(uri).get_metric_history(run_id, key)]


def test_mlflow_file_store(tmp_path, caplog):
    """Real MLflow (mlflow-skinny), a local file store: one run per stage folder with the
    config as flat params; steps sent once, also across a resumed attempt (the run reopened,
    the steps it holds not sent again); a run left without metrics by an attempt that died
    before its first checkpoint is taken over, not duplicated."""
    uri = f"file://{tmp_path}/mlruns"
    out = str(tmp_path / "warmup")
    params = {"lr": 0.1, "loss": {"alpha": 1.0, "align": "student_kl"}, "max_steps": None}
    dead = Tracker(out, mlflow_uri=uri, run_name="warmup", params=params)
    t = Tracker(out, mlflow_uri=uri, run_name="warmup", params=params)
    assert t.mlflow_run_id == dead.mlflow_run_id  # no metrics yet: the same run
    t.sync(_log(2))
    t.sync(_log(4))  # a later checkpoint: steps 3 and 4 only
    # the attempt dies; the next one resumes from the step-4 checkpoint
    t2 = Tracker(out, mlflow_uri=uri, run_name="warmup", params=params,
                 mlflow_run_id=t.mlflow_run_id, log=_log(4), start_step=4)
    assert t2.mlflow_run_id == t.mlflow_run_id
    t2.sync(_log(6))
    t2.finish()
    client = mlflow_client(uri)
    run = client.get_run(t.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "warmup"
    assert run.data.tags["qgscale.output"] == out
    assert run.data.params == {"lr": "0.1", "loss.alpha": "1.0", "loss.align": "student_kl",
                               "max_steps": "null"}
    want = [(x["step"], x["loss"]) for x in _log(6)]
    assert _mlflow_history(uri, t.mlflow_run_id, "loss") == want
    assert [m.timestamp for m in client.get_metric_history(t.mlflow_run_id, "lr")] == [
        int(1000 * x["time"]) for x in _log(6)]
    assert set(run.data.metrics) == {"loss", "lr", "epoch"}  # no step/time/start_step
    exp = client.get_experiment_by_name("qgscale")
    assert len(client.search_runs([exp.experiment_id])) == 1
    # catch-up: the attempt resumed at step 8 sends the steps 7-8 MLflow lacks
    Tracker(out, mlflow_uri=uri, mlflow_run_id=t.mlflow_run_id, log=_log(8), start_step=8)
    assert _mlflow_history(uri, t.mlflow_run_id, "loss") == [
        (x["step"], x["loss"]) for x in _log(8)]
    # MLflow ahead of the checkpoint resumed from (its report never registered): warned,
    # those steps kept, the later ones sent once
    with caplog.at_level("WARNING", logger="qgscale.train"):
        t4 = Tracker(out, mlflow_uri=uri, mlflow_run_id=t.mlflow_run_id, log=_log(6),
                     start_step=6)
    assert f"MLflow run {t.mlflow_run_id} already holds steps 7-8" in caplog.text
    t4.sync(_log(10))
    assert [s for s, _ in _mlflow_history(uri, t.mlflow_run_id, "loss")] == list(range(1, 11))
    # a new run of the stage (its folder cleared: a new key) gets a new MLflow run
    t3 = Tracker(out, mlflow_uri=uri, run_name="warmup", params=params)
    assert t3.mlflow_run_id != t.mlflow_run_id
    assert len(client.search_runs([exp.experiment_id])) == 2


def test_mlflow_failed_stage_marked_by_the_driver(tmp_path):
    """A failed stage's MLflow run is marked FAILED by ``mark_failed`` (the driver, after
    ``trainer.fit`` raised; the workers, which may be killed mid-write, no longer write it):
    only RUNNING runs of that stage folder; a resumed attempt reopens the run."""
    from qgscale.train.tracking import mark_failed

    uri = f"file://{tmp_path}/mlruns"
    out, other = str(tmp_path / "warmup"), str(tmp_path / "distill")
    t = Tracker(out, mlflow_uri=uri, run_name="warmup", params={"lr": 0.1})
    t.sync(_log(2))
    done = Tracker(other, mlflow_uri=uri, run_name="distill", params={"lr": 0.1})
    done.finish()
    assert mark_failed(uri, "qgscale", out) == [t.mlflow_run_id]
    client = mlflow_client(uri)
    assert client.get_run(t.mlflow_run_id).info.status == "FAILED"
    assert client.get_run(done.mlflow_run_id).info.status == "FINISHED"
    assert mark_failed(uri, "qgscale", out) == []  # no RUNNING run left
    assert mark_failed(uri, "no-such-experiment", out) == []
    t2 = Tracker(out, mlflow_uri=uri, mlflow_run_id=t.mlflow_run_id, log=_log(2),
                 start_step=2)
    assert client.get_run(t2.mlflow_run_id).info.status == "RUNNING"


def test_train_reads_benchmark(tmp_path, capsys):
    """benchmarks/train_reads.py at a tiny size: worker 0 of 4 gets its share of the rows."""
    from tests.conftest import load_benchmark

    bench = load_benchmark("train_reads")
    bench.write_data(tmp_path, 2, 300, 2)
    bench.child("4", str(tmp_path), "")
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert got["rows"] == 600 // (4 * bench.BATCH) * bench.BATCH


DS_LOAD = """
import os, shutil, sys, torch, deepspeed
from qgscale.train.loop import CKPT_TAG, load_checkpoint
ok, tmp, port = sys.argv[1:]
os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                  MASTER_PORT=port)
deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
model = torch.nn.Linear(4, 2)
engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config={
    "train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "AdamW", "params": {"lr": 0.1}},
    "zero_optimization": {"stage": 1}})
engine.save_checkpoint(ok, tag=CKPT_TAG)
load_checkpoint(engine, ok, 3)
print("LOADED", flush=True)
no_optim = os.path.join(tmp, "no-optim")
shutil.copytree(ok, no_optim)
for name in os.listdir(os.path.join(no_optim, CKPT_TAG)):
    if name.endswith("optim_states.pt"):
        os.remove(os.path.join(no_optim, CKPT_TAG, name))
for folder in (os.path.join(tmp, "empty"), no_optim):
    try:
        load_checkpoint(engine, folder, 3)
    except RuntimeError as e:
        print("ERROR", e, flush=True)
"""


def test_a_checkpoint_deepspeed_cannot_fully_load_is_an_error(tmp_path):
    """Resuming from a checkpoint folder without the tag's files (DeepSpeed: a bare
    assertion), or from a ZeRO checkpoint without its optimizer states (a bare
    FileNotFoundError, or a fallback to the 16-bit weights where DeepSpeed's ZeRO load
    reports failure) fails naming the folder and step; a saved one loads."""
    import socket
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([sys.executable, "-c", DS_LOAD, str(tmp_path / "ok"), str(tmp_path),
                          str(port)], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    errors = [x for x in out.stdout.splitlines() if x.startswith(("LOADED", "ERROR"))]
    assert errors == [
        "LOADED",
        f"ERROR {tmp_path / 'empty'}: no checkpoint 'ckpt' to resume step 3 from",
        f"ERROR {tmp_path / 'no-optim' / 'ckpt'}: a ZeRO checkpoint without its optimizer "
        "states (*optim_states.pt): resuming step 3 would lose them"]


DS_LR = """
import os, sys, torch, deepspeed
from qgscale.config import TrainConfig
from qgscale.train.loop import CKPT_TAG, load_checkpoint, lr_scheduler, schedule_at
tmp, port = sys.argv[1:]
os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                  MASTER_PORT=port)
deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
tc = TrainConfig(lr=0.3, warmup_ratio=0.5)

def engine():
    model = torch.nn.Linear(4, 2)
    return deepspeed.initialize(model=model, model_parameters=model.parameters(), config={
        "train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 1},
        "optimizer": {"type": "AdamW", "params": {"lr": tc.lr}}},
        lr_scheduler=lr_scheduler(tc, 6))[0]

def steps(e, n):
    out = []
    for _ in range(n):
        out.append(round(e.get_lr()[0], 6))  # the lr this step uses
        e.backward(e(torch.ones(1, 4)).sum())
        e.step()
    return out

e = engine()
print("LR", steps(e, 3), flush=True)
e.save_checkpoint(tmp, tag=CKPT_TAG)
again = engine()
load_checkpoint(again, tmp, 3)
schedule_at(again, 3)
print("LR", steps(again, 3), flush=True)
# a checkpoint of an older release: DeepSpeed's WarmupDecayLR state in it
model = torch.nn.Linear(4, 2)
old = deepspeed.initialize(model=model, model_parameters=model.parameters(), config={
    "train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 1},
    "optimizer": {"type": "AdamW", "params": {"lr": tc.lr}},
    "scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": 6,
                  "warmup_max_lr": tc.lr, "warmup_num_steps": 3}}})[0]
steps(old, 3)
old.save_checkpoint(tmp + "-old", tag=CKPT_TAG)
resumed = engine()
load_checkpoint(resumed, tmp + "-old", 3)
schedule_at(resumed, 3)
print("LR", steps(resumed, 3), flush=True)
"""


def test_lr_schedule_on_a_deepspeed_engine(tmp_path):
    """Linear warm-up from the first step (DeepSpeed's WarmupDecayLR gave steps 1 and 2 lr 0
    and peaked two steps late), then linear decay; a resume sets the schedule from its step
    (not from the checkpoint's scheduler state): from this release's checkpoint and from one
    that holds the old WarmupDecayLR state (LambdaLR cannot load it). 6 steps, warm-up ratio
    0.5: 3 warm-up steps."""
    import socket
    import subprocess

    from qgscale.train.loop import lr_factor

    assert [lr_factor(s, 4, 10) for s in range(10)] == pytest.approx(
        [0.25, 0.5, 0.75, 1.0, 1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6])
    assert lr_factor(0, 1, 5) == 1.0  # no warm-up: the full lr from the first step
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([sys.executable, "-c", DS_LR, str(tmp_path / "ck"), str(port)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    got = [x for x in out.stdout.splitlines() if x.startswith("LR")]
    assert got == ["LR [0.1, 0.2, 0.3]", "LR [0.3, 0.2, 0.1]", "LR [0.3, 0.2, 0.1]"]


def test_universal_copy_is_made_once_per_node(tmp_path, monkeypatch):
    """Workers of one node resuming on another worker count: the first to take the lock
    converts the checkpoint (here a stand-in that writes a file), the others reuse its
    complete copy; it is removed when the workers' stacks close (which
    ``train_loop_per_worker`` does after a barrier: every worker has loaded it)."""
    import contextlib
    import threading
    import time

    from qgscale.train import loop

    made = []

    def convert(ckpt_dir, out_root):
        made.append(out_root)
        time.sleep(0.3)  # the others wait on the lock meanwhile
        os.makedirs(out_root)
        open(os.path.join(out_root, "weights"), "w").close()
        return out_root

    monkeypatch.setattr(loop, "to_universal", convert)
    monkeypatch.setattr(loop.tempfile, "gettempdir", lambda: str(tmp_path))
    restored = loop.Restored(str(tmp_path / "ckpt"), {"step": 4}, "s3://b/run/checkpoint_3")
    stacks = [contextlib.ExitStack() for _ in range(4)]
    roots: list[str] = []
    threads = [threading.Thread(target=lambda s=s: roots.append(loop.universal_copy(restored, s)))
               for s in stacks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(made) == 1 and len(set(roots)) == 1
    assert sorted(os.listdir(roots[0])) == [".complete", "weights"]
    for s in stacks:
        s.close()
    assert not os.path.exists(roots[0])


def test_a_failed_universal_conversion_is_not_repeated_on_the_node(tmp_path, monkeypatch):
    """The first worker's conversion fails (a full disk): the others of the node fail at once
    instead of converting again in turn (each then falls back to the fp32 weights; that all
    workers agree on it is :func:`test_workers_agree_on_the_resume_mode`); the marker goes
    with the attempt."""
    import contextlib
    import threading

    from qgscale.train import loop

    made = []

    def convert(ckpt_dir, out_root):
        made.append(out_root)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(loop, "to_universal", convert)
    monkeypatch.setattr(loop.tempfile, "gettempdir", lambda: str(tmp_path))
    restored = loop.Restored(str(tmp_path / "ckpt"), {"step": 4}, "s3://b/run/checkpoint_3")
    stacks = [contextlib.ExitStack() for _ in range(3)]
    errors: list[str] = []

    def worker(stack):
        try:
            loop.universal_copy(restored, stack)
        except Exception as e:  # noqa: BLE001
            errors.append(str(e))

    threads = [threading.Thread(target=worker, args=(s,)) for s in stacks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(made) == 1 and len(errors) == 3
    assert sum("another worker of this node failed to convert it: OSError" in e
               for e in errors) == 2
    assert loop.agreed_mode("universal") == "universal"  # no process group: its own mode
    for s in stacks:
        s.close()
    assert [n for n in os.listdir(tmp_path) if n.endswith(".failed")] == []


AGREE = """
import sys, torch.distributed as dist
from qgscale.train.loop import agreed_mode
rank, mode = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", init_method=sys.argv[3], rank=rank, world_size=3)
print(agreed_mode(mode), flush=True)
dist.barrier()
dist.destroy_process_group()
"""


def test_workers_agree_on_the_resume_mode(tmp_path):
    """Three workers on a real (gloo) process group: one failed its universal conversion, so
    all three take the fp32 weights (loading different checkpoint kinds would run mismatched
    collectives); when none failed, all keep the universal checkpoint."""
    import subprocess
    import sys

    for modes, want in ((["universal", "weights", "universal"], "weights"),
                        (["universal"] * 3, "universal")):
        init = f"file://{tmp_path / ('pg-' + want)}"
        procs = [subprocess.Popen([sys.executable, "-c", AGREE, str(r), m, init],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for r, m in enumerate(modes)]
        outs = [p.communicate(timeout=120) for p in procs]
        assert [p.returncode for p in procs] == [0, 0, 0], [err[-2000:] for _, err in outs]
        assert [out.strip() for out, _ in outs] == [want] * 3
