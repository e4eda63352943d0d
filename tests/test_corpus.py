"""The semi-join: training rows read only the passages they use, never the whole corpus."""

from __future__ import annotations

import gc
import random
from collections import Counter

import pyarrow as pa
import pytest

from qgscale import storage
from qgscale.config import LossConfig
from qgscale.data import corpus as C
from qgscale.data.schema import (
    CANDIDATES,
    CORPUS,
    GENERATED,
    QRELS,
    QUERIES,
    SCORES,
    passage_text,
)
from qgscale.errors import DataError
from qgscale.train import data as tdata

N_SHARDS, PER_SHARD = 10, 50


@pytest.fixture()
def data(tmp_path):
    """10 corpus shards of 50 passages; 20 queries whose positives, examples' negatives and
    candidates all live in shards 2 and 7."""
    root = str(tmp_path)
    rng = random.Random(1)
    for s in range(N_SHARDS):
        rows = [{"pid": f"s{s}-{i}", "lang": "en", "title": f"T{s}.{i}",
                 "text": f"passage {i} of shard {s} " + " ".join(rng.choices("abcdefg", k=8))}
                for i in range(PER_SHARD)]
        storage.write_parquet(f"{root}/corpus/part-{s:05d}.parquet",
                              pa.Table.from_pylist(rows, schema=CORPUS))
    used = [f"s{s}-{i}" for s in (2, 7) for i in range(PER_SHARD)]
    queries, qrels, cands, scores, gen = [], [], [], [], []
    for q in range(20):
        qid, lang = f"q{q}", ("de", "es")[q % 2]
        queries.append({"qid": qid, "lang": lang, "text": f"question {q}"})
        pos = rng.sample(used, 2)
        qrels += [{"qid": qid, "pid": p, "rel": 1} for p in pos]
        cand = [pos[0]] + rng.sample([p for p in used if p not in pos], 5)
        cands.append({"qid": qid, "pids": cand, "scores": None})
        scores += [{"qid": qid, "pid": p, "score": -float(r), "ntok": 3}
                   for r, p in enumerate(cand)]
        gen.append({"pid": pos[0], "lang": "en", "query": f"gen {q}", "logprob": -1.0})
    for name, rows, schema in (("queries", queries, QUERIES), ("qrels", qrels, QRELS),
                               ("cands", cands, CANDIDATES), ("scores", scores, SCORES),
                               ("gen", gen, GENERATED)):
        storage.write_parquet(f"{root}/{name}/part-00000.parquet",
                              pa.Table.from_pylist(rows, schema=schema))
    return {k: f"{root}/{k}" for k in ("corpus", "queries", "qrels", "cands", "scores", "gen")}


def _count_reads(monkeypatch) -> Counter:
    """Rows read from corpus shards, per (shard, read of text columns or not), in this
    process: ``scan`` reads its shards here, not on Ray tasks, even where an earlier test
    started the session's Ray (``test_scan_on_ray_tasks`` covers those)."""
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    reads: Counter = Counter()
    read = storage.read_parquet

    def counting(uri, columns=None):
        t = read(uri, columns)
        if "/corpus/" in uri:
            reads[(uri.rsplit("/", 1)[1], "text" in (columns or ["text"]))] += t.num_rows
        return t

    monkeypatch.setattr(storage, "read_parquet", counting)
    return reads


def _driver_join(d: dict, loss: LossConfig, seed: int) -> list[dict]:
    """The reference: the whole corpus in one dict, joined row by row (the old driver join:
    random positive, candidates that are not positives as hard negatives in rank order, the
    first candidates with their teacher scores, one generated query in another language), with
    each query's draws seeded by (seed, qid)."""
    corpus = {r["pid"]: passage_text(r["title"], r["text"])
              for r in storage.read_parquet(d["corpus"]).to_pylist()}
    queries = {r["qid"]: r for r in storage.read_parquet(d["queries"]).to_pylist()}
    pos: dict[str, list[str]] = {}
    for r in storage.read_parquet(d["qrels"]).to_pylist():
        pos.setdefault(r["qid"], []).append(r["pid"])
    cands = {r["qid"]: r["pids"] for r in storage.read_parquet(d["cands"]).to_pylist()}
    scores = {(r["qid"], r["pid"]): r["score"]
              for r in storage.read_parquet(d["scores"]).to_pylist()}
    gens: dict[str, list] = {}
    for r in storage.read_parquet(d["gen"]).to_pylist():
        gens.setdefault(r["pid"], []).append((r["lang"], r["query"]))
    rows = []
    for qid in sorted(pos, key=tdata.row_order):  # written in a hash order of the qids
        rng = random.Random(f"{seed}:row:{qid}")  # each query's own seeded stream
        positive = rng.choice(pos[qid])
        negs = [p for p in cands[qid] if p not in pos[qid]][:loss.n_hard_negatives]
        top = cands[qid][:loss.n_candidates]
        options = sorted((p, gl, gq) for p in set(pos[qid]) for gl, gq in gens.get(p, [])
                         if gl != queries[qid]["lang"])
        gen_query = rng.choice(options)[2] if options else ""
        rows.append({"qid": qid, "query": queries[qid]["text"],
                     "passages": [corpus[p] for p in [positive, *negs]],
                     "cand_texts": [corpus[p] for p in top],
                     "cand_scores": [scores[(qid, p)] for p in top], "gen_query": gen_query,
                     "gen_scores": [],
                     "passage_ids": [tdata.pid_key(p) for p in [positive, *negs]],
                     "positive_ids": [tdata.pid_key(p) for p in sorted(set(pos[qid]))]})
    return rows


def test_rows_read_only_the_passages_they_use(data, monkeypatch):
    loss = LossConfig(n_hard_negatives=3, n_candidates=4)
    want = _driver_join(data, loss, seed=5)
    # generated queries of passages no training query has as positive (as with
    # teacher.generate.passages: corpus): a shard of them is never read past its pid column
    positives = {r["pid"] for r in storage.read_parquet(data["qrels"]).to_pylist()}
    storage.write_parquet(f"{data['gen']}/part-00001.parquet", pa.Table.from_pylist(
        [{"pid": f"s{s}-{i}", "lang": "fr", "query": f"other {s}.{i}", "logprob": -1.0}
         for s in range(N_SHARDS) for i in range(PER_SHARD) if f"s{s}-{i}" not in positives],
        schema=GENERATED))
    gen_reads: Counter = Counter()
    read = storage.read_parquet
    monkeypatch.setattr(storage, "read_parquet", lambda uri, columns=None: (
        gen_reads.update([(uri.rsplit("/", 1)[1], tuple(columns or ()))])
        if "/gen/" in uri else None) or read(uri, columns))
    reads = _count_reads(monkeypatch)
    table, counts = tdata.build_student_rows(
        data["queries"], data["corpus"], loss, qrels_uri=data["qrels"],
        candidates_uri=data["cands"], scores_uri=data["scores"], generated_uri=data["gen"],
        seed=5)
    assert table.to_pylist() == want  # identical to the whole-corpus driver join
    assert counts == {"rows": 20, "random_negatives": 0, "without_generated": 0}
    assert gen_reads == {("part-00000.parquet", ("pid",)): 1,
                         ("part-00000.parquet", ("pid", "lang", "query")): 1,
                         ("part-00001.parquet", ("pid",)): 1}
    # every shard's pid column is scanned; text is read only from the two shards in use
    assert {s for (s, text) in reads if text} == {"part-00002.parquet", "part-00007.parquet"}
    assert sum(n for (s, text), n in reads.items() if not text) == N_SHARDS * PER_SHARD
    needed = {p for r in storage.read_parquet(data["cands"]).to_pylist() for p in r["pids"]}
    needed |= {r["pid"] for r in storage.read_parquet(data["qrels"]).to_pylist()}
    assert len(C.read_passages(data["corpus"], needed)) == len(needed)


def test_empty_generated_query_of_a_positive_is_named(data):
    pid = storage.read_parquet(data["qrels"]).to_pylist()[1]["pid"]
    storage.write_parquet(f"{data['gen']}/part-00001.parquet", pa.Table.from_pylist(
        [{"pid": pid, "lang": "fr", "query": "fine", "logprob": -1.0},
         {"pid": pid, "lang": "it", "query": " ", "logprob": -1.0}], schema=GENERATED))
    with pytest.raises(DataError, match=rf"gen/part-00001.parquet: row 1 \(pid={pid}\): "
                                        r"empty field 'query'"):
        tdata.build_student_rows(data["queries"], data["corpus"], qrels_uri=data["qrels"],
                                 generated_uri=data["gen"])


def test_random_negatives_from_a_sample_of_the_pid_column(data, monkeypatch):
    reads = _count_reads(monkeypatch)
    loss = LossConfig(n_hard_negatives=4)
    table, counts = tdata.build_student_rows(data["queries"], data["corpus"], loss,
                                             qrels_uri=data["qrels"], seed=3)
    assert counts["random_negatives"] == 20 * 4
    # the sample reads pid columns only; text is read once per shard in use
    assert all(n == PER_SHARD for (s, text), n in reads.items() if text)
    texts = {passage_text(r["title"], r["text"]): r["pid"]
             for r in storage.read_parquet(data["corpus"]).to_pylist()}
    pos: dict[str, set] = {}
    for r in storage.read_parquet(data["qrels"]).to_pylist():
        pos.setdefault(r["qid"], set()).add(r["pid"])
    drawn = set()
    for row in table.to_pylist():
        pids = [texts[t] for t in row["passages"]]
        assert pids[0] in pos[row["qid"]] and len(set(pids[1:])) == 4
        assert not set(pids[1:]) & pos[row["qid"]]
        drawn |= set(pids[1:])
    assert len({p.split("-")[0] for p in drawn}) >= 5  # drawn from the whole corpus
    again, _ = tdata.build_student_rows(data["queries"], data["corpus"], loss,
                                        qrels_uri=data["qrels"], seed=3)
    assert again.to_pylist() == table.to_pylist()  # seeded


def test_sample_pids_uniform_bounded_and_seeded(data, monkeypatch):
    """A seeded uniform sample: each shard returns only its pids below a threshold (about
    k + 6 sqrt(k) + 16 in all, not the pid column); a threshold too low takes another pass
    and gives the same sample."""
    a = C.sample_pids(data["corpus"], 100, seed=1)
    assert len(a) == len(set(a)) == 100 and a == C.sample_pids(data["corpus"], 100, seed=1)
    assert a != C.sample_pids(data["corpus"], 100, seed=2)
    per_shard = Counter(p.split("-")[0] for p in a)
    assert len(per_shard) == N_SHARDS and max(per_shard.values()) <= 25
    # each shard draws its own keys: the rows it gives differ from the other shards'
    rows_of = {s: frozenset(p.split("-")[1] for p in a if p.startswith(f"s{s}-"))
               for s in range(N_SHARDS)}
    assert len(set(rows_of.values())) == N_SHARDS
    assert sorted(C.sample_pids(data["corpus"], 10_000, seed=1)) == sorted(
        f"s{s}-{i}" for s in range(N_SHARDS) for i in range(PER_SHARD))
    returned: list[int] = []
    real = C._sample_shard
    monkeypatch.setattr(C, "_sample_shard", lambda *x: (
        lambda r: returned.append(len(r[0])) or r)(real(*x)))
    assert C.sample_pids(data["corpus"], 100, seed=1) == a
    assert len(returned) == N_SHARDS and 100 <= sum(returned) <= 250  # of 500 pids
    returned.clear()
    monkeypatch.setattr(C, "SAMPLE_MARGIN", -6.0)  # (100 - 60 + 16) / 500: ~56 come back
    assert C.sample_pids(data["corpus"], 100, seed=1) == a
    assert len(returned) >= 2 * N_SHARDS
    monkeypatch.undo()
    # the row count: from the corpus's manifest when it lists these files, else the footers
    footers: list[str] = []
    real_rows = C._shard_rows
    monkeypatch.setattr(C, "_shard_rows", lambda u: footers.append(u) or real_rows(u))
    storage.write_json(f"{data['corpus']}/_manifest.json", {"shards": [
        {"file": f"part-{s:05d}.parquet", "rows": PER_SHARD} for s in range(N_SHARDS)]})
    assert C.sample_pids(data["corpus"], 100, seed=1) == a and footers == []
    storage.write_json(f"{data['corpus']}/_manifest.json", {"shards": [
        {"file": f"part-{s:05d}.parquet", "rows": PER_SHARD} for s in range(N_SHARDS - 1)]})
    assert C.corpus_rows(data["corpus"], C.corpus_shards(data["corpus"])) == 500
    assert len(footers) == N_SHARDS  # a manifest of other files: every footer read
    storage.write_json(f"{data['corpus']}/_manifest.json", ["not", "a", "manifest"])
    assert C.corpus_rows(data["corpus"], C.corpus_shards(data["corpus"])) == 500
    # a manifest that counts 10x the rows: ~18 come back, then one pass at the counted rows'
    storage.write_json(f"{data['corpus']}/_manifest.json", {"shards": [
        {"file": f"part-{s:05d}.parquet", "rows": 10 * PER_SHARD} for s in range(N_SHARDS)]})
    monkeypatch.setattr(C, "_sample_shard", lambda *x: (
        lambda r: returned.append(len(r[0])) or r)(real(*x)))
    returned.clear()
    assert C.sample_pids(data["corpus"], 100, seed=1) == a
    assert len(returned) == 2 * N_SHARDS and sum(returned[:N_SHARDS]) < 100
    storage.remove(f"{data['corpus']}/_manifest.json")
    monkeypatch.undo()
    # uniform: over 40 seeds each shard holds about a tenth of the samples (400 of 4,000)
    totals = Counter(p.split("-")[0] for seed in range(40)
                     for p in C.sample_pids(data["corpus"], 100, seed))
    assert len(totals) == N_SHARDS and all(320 <= n <= 480 for n in totals.values()), totals


def test_missing_or_empty_passages_are_named(data, tmp_path):
    storage.write_parquet(f"{data['qrels']}/part-00000.parquet", pa.Table.from_pylist(
        [{"qid": "q0", "pid": "nope", "rel": 1}], schema=QRELS))
    with pytest.raises(DataError, match=r"qid=q0: positive pid=nope not in corpus"):
        tdata.build_student_rows(data["queries"], data["corpus"], qrels_uri=data["qrels"])
    bad = str(tmp_path / "bad")
    storage.write_parquet(f"{bad}/part-00000.parquet", pa.Table.from_pylist(
        [{"pid": "a", "lang": "en", "title": "", "text": "fine"},
         {"pid": "b", "lang": "en", "title": "", "text": "  "}], schema=CORPUS))
    with pytest.raises(DataError, match=r"bad/part-00000.parquet: row 1 \(pid=b\): empty "
                                        r"field 'text'"):
        C.read_passages(bad, {"a", "b"})
    assert C.read_passages(bad, {"a"}) == {"a": passage_text("", "fine")}


def test_empty_ids_in_training_positives_are_named(tmp_path):
    """A null qid or pid in hand-made examples or positive qrels rows is an error naming the
    file, row and field, on the driver join and in the Ray Data rows' per-file check (it used
    to fail inside a sort, or train on a None pid)."""
    from qgscale.data.schema import TRAIN_EXAMPLES

    ex, qr = str(tmp_path / "examples"), str(tmp_path / "qrels")
    for rows, want in (([{"qid": None, "pos_pids": ["a"], "neg_pids": []}],
                        r"examples(/part-00000.parquet)?: row 0: empty field 'qid'"),
                       ([{"qid": "q1", "pos_pids": ["a"], "neg_pids": ["b", None]}],
                        r"examples(/part-00000.parquet)?: row 0 \(qid=q1\): field 'neg_pids' "
                        r"holds an empty/null pid"),
                       ([{"qid": "q1", "pos_pids": [""], "neg_pids": None}],
                        r"examples(/part-00000.parquet)?: row 0 \(qid=q1\): field 'pos_pids' "
                        r"holds an empty")):
        storage.write_parquet(f"{ex}/part-00000.parquet",
                              pa.Table.from_pylist(rows, schema=TRAIN_EXAMPLES))
        with pytest.raises(DataError, match=want):
            tdata.positives_from(ex, None)
        with pytest.raises(DataError, match=want):  # the Ray Data rows' check of each file
            tdata.check_examples(storage.read_parquet(ex), f"{ex}/part-00000.parquet")
    # qrels: only positive rows are pairs (a blank pid of a rel 0 row is never read)
    storage.write_parquet(f"{qr}/part-00000.parquet", pa.Table.from_pylist(
        [{"qid": "q1", "pid": "a", "rel": 1}, {"qid": "q3", "pid": " ", "rel": 0},
         {"qid": "q2", "pid": None, "rel": 1}], schema=QRELS))
    want = r"qrels/part-00000.parquet: row 2 \(qid=q2\): empty field 'pid'"
    with pytest.raises(DataError, match=want):
        tdata.positives_from(None, qr)
    with pytest.raises(DataError, match=want):
        tdata.check_positive_qrels(storage.read_parquet(qr), f"{qr}/part-00000.parquet")
    storage.write_parquet(f"{qr}/part-00000.parquet", pa.Table.from_pylist(
        [{"qid": "q1", "pid": "a", "rel": 1}, {"qid": "q3", "pid": " ", "rel": 0}],
        schema=QRELS))
    assert tdata.positives_from(None, qr)[0] == {"q1": ["a"]}


def test_scan_on_ray_tasks(data, tmp_path, ray_local, monkeypatch):
    """With Ray initialised, ``scan`` reads and filters each shard in a Ray task and yields
    the same tables in shard order as the serial scan here; its tasks ask for no CPU, so it
    runs while an actor holds every CPU; a task's bad row is the DataError naming its shard
    and row; a consumer may stop early. Below ``MAP_FROM`` files it reads here."""
    import ray

    from qgscale import runtime

    ran = []
    real_scan_shard = C._scan_shard
    monkeypatch.setattr(C, "_scan_shard", lambda *a: ran.append(a[0]) or real_scan_shard(*a))
    C.read_passages(data["corpus"], {"s1-0"})  # 10 shards, fewer than MAP_FROM: here
    assert len(ran) == N_SHARDS
    monkeypatch.undo()
    monkeypatch.setattr(runtime, "MAP_FROM", 2)
    ids = {f"s{s}-{i}" for s in (1, 4, 9) for i in (0, 7)}
    on_ray = [t.to_pylist() for t in C.scan(data["corpus"], ids)]
    every = [t.num_rows for t in C.scan(data["corpus"], None, ("pid",))]
    with monkeypatch.context() as m:
        m.setattr(ray, "is_initialized", lambda: False)
        assert on_ray == [t.to_pylist() for t in C.scan(data["corpus"], ids)]  # shard order
    assert [len(t) for t in on_ray] == [2, 2, 2] and every == [PER_SHARD] * N_SHARDS

    @ray.remote(num_cpus=2)
    class Hold:  # every CPU of the session's Ray held, as by a stage's actors
        def ready(self) -> bool:
            return True

    hold = Hold.remote()
    try:
        ray.get(hold.ready.remote(), timeout=120)
        monkeypatch.setattr(runtime, "MAP_WINDOW", 1)  # 2 tasks in flight on 2 CPUs
        assert C.read_passages(data["corpus"], ids) == {
            r["pid"]: passage_text(r["title"], r["text"]) for t in on_ray for r in t}
        # a consumer that stops early drops the other tasks' results, never ray.cancel
        # (which can abort the driver when it races a task's completion)
        cancels: list = []
        with monkeypatch.context() as m:
            m.setattr(ray, "cancel", lambda *a, **k: cancels.append(a))
            scan = C.scan(data["corpus"], None, ("pid",))
            first = next(scan)
            scan.close()
            del scan
            gc.collect()  # the inner map_shards generator closed too
        assert first.num_rows == PER_SHARD and cancels == []
    finally:
        ray.kill(hold)
    # the tasks get this process's storage settings (their runtime env), as actors do
    monkeypatch.setenv("AWS_DEFAULT_REGION", "qgs-test-region")
    assert set(runtime.map_shards(_env, ["a", "b"], "AWS_DEFAULT_REGION")) == {
        "qgs-test-region"}
    bad = str(tmp_path / "bad")
    for n in range(3):
        storage.write_parquet(f"{bad}/part-{n:05d}.parquet", pa.Table.from_pylist(
            [{"pid": f"{n}a", "lang": "en", "title": "", "text": "fine"},
             {"pid": f"{n}b", "lang": "en", "title": "", "text": "" if n == 1 else "ok"}],
            schema=CORPUS))
    with pytest.raises(DataError, match=r"bad/part-00001.parquet: row 1 \(pid=1b\): empty "
                                        r"field 'text'"):
        C.read_passages(bad, {"0a", "1b", "2a"})
    # memory:// files are this process's own: read here, never on tasks
    seen: list[str] = []
    assert list(runtime.map_shards(lambda u: seen.append(u) or u, ["memory://q/a",
                                                                   "memory://q/b"])) == \
        ["memory://q/a", "memory://q/b"] == seen


def test_remote_shards_are_read_on_tasks(data, ray_local, s3_bucket, monkeypatch):
    """On object storage ``map_shards`` uses Ray tasks from 2 shards on (local files only
    from ``MAP_FROM``): the same passages and the same sample as from the local copy."""
    remote = f"{s3_bucket}/corpus"
    for s in range(3):
        name = f"part-{s:05d}.parquet"
        storage.write_parquet(f"{remote}/{name}",
                              storage.read_parquet(f"{data['corpus']}/{name}"))
    ids = {"s0-1", "s2-3", "s2-4"}
    ran: list[str] = []
    real = C._scan_shard
    monkeypatch.setattr(C, "_scan_shard", lambda *a: ran.append(a[0]) or real(*a))
    assert C.read_passages(remote, ids) == C.read_passages(data["corpus"], ids)
    assert len(ran) == N_SHARDS  # the local copy's 10 shards, here; the remote 3 on tasks
    local3 = str(data["corpus"]) + "-3"
    for s in range(3):
        name = f"part-{s:05d}.parquet"
        storage.write_parquet(f"{local3}/{name}",
                              storage.read_parquet(f"{data['corpus']}/{name}"))
    assert C.sample_pids(remote, 40, seed=5) == C.sample_pids(local3, 40, seed=5)


def _env(uri: str, name: str) -> str | None:
    import os

    return os.environ.get(name)


def test_map_window_in_a_task_is_small_unless_the_cluster_window_is_asked(ray_local):
    """From the driver, or from a task with cluster_window (eval's corpus passes while its
    search actors wait), map_shards keeps the cluster's window of tasks in flight; from a
    task otherwise, MAP_IN_WORKER."""
    import ray

    from qgscale import runtime

    cluster = min(runtime.MAP_MOST, max(2, runtime.MAP_WINDOW * int(
        ray.cluster_resources()["CPU"])))
    assert runtime.map_window() == runtime.map_window(True) == cluster

    @ray.remote(num_cpus=0)
    def windows() -> tuple[int, int]:
        from qgscale import runtime

        was, runtime.MAP_IN_WORKER = runtime.MAP_IN_WORKER, 1  # unlike the cluster's here
        try:
            return runtime.map_window(), runtime.map_window(cluster_window=True)
        finally:
            runtime.MAP_IN_WORKER = was

    assert ray.get(windows.remote()) == (1, cluster)
