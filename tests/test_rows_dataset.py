"""Training rows built with Ray Data equal the driver join, row for row (real local Ray)."""

from __future__ import annotations

import pyarrow as pa
import pytest

from qgscale import storage
from qgscale.config import LossConfig
from qgscale.data.schema import CORPUS, QRELS, QUERIES, SCORES, passage_text
from qgscale.errors import DataError
from qgscale.teacher.common import load_queries
from qgscale.train import data as tdata
from qgscale.train.rows_dataset import build_student_rows_dataset
from tests.test_corpus import data  # noqa: F401 - the shared fixture


@pytest.fixture(autouse=True)
def one_aggregator_per_shuffle():
    """Each join's 2 hash partitions go to one aggregator actor, not one each: the partitioning
    is the same, and the ~10 joins start half as many actor processes (on a 2-core machine the
    three tests took 220 s with two aggregators a join, 190 s with one)."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    old = ctx.max_hash_shuffle_aggregators
    ctx.max_hash_shuffle_aggregators = 1
    yield
    ctx.max_hash_shuffle_aggregators = old


def _both(d: dict, tmp_path, loss: LossConfig, **inputs) -> tuple[list, dict, list, dict]:
    want, want_counts = tdata.build_student_rows(d["queries"], d["corpus"], loss, seed=7,
                                                 **inputs)
    out = str(tmp_path / "rows")
    counts = build_student_rows_dataset(d["queries"], d["corpus"], out, "k1", loss, seed=7,
                                        num_partitions=2, shard_rows=6, **inputs)
    manifest = storage.read_manifest(out)
    assert manifest["rows"] == counts["rows"] and len(manifest["shards"]) >= 3
    return want.to_pylist(), want_counts, storage.read_parquet(out).to_pylist(), counts


@pytest.mark.timeout(1500)  # ~10 Ray Data shuffles: minutes on a loaded 2-core machine
def test_distill_rows_equal_the_driver_join(data, tmp_path, ray_local):  # noqa: F811
    # teacher scores of the generated queries too, so the gen_qid join is exercised
    gen = storage.read_parquet(data["gen"]).to_pylist()
    cands = {r["qid"]: r["pids"] for r in storage.read_parquet(data["cands"]).to_pylist()}
    extra = [{"qid": tdata.generated_qid(g["pid"], g["lang"], g["query"]), "pid": p,
              "score": -0.5 * k, "ntok": 2}
             for g in gen for p in {p for pids in cands.values() for p in pids}
             for k in [len(p)]]
    storage.write_parquet(f"{data['scores']}/part-00001.parquet",
                          pa.Table.from_pylist(extra, schema=SCORES))
    # 6 hard negatives: the 5 non-positive candidates, then one random passage per row
    loss = LossConfig(n_hard_negatives=6, n_candidates=4, kd_on_generated=True)
    want, want_counts, got, counts = _both(
        data, tmp_path, loss, qrels_uri=data["qrels"], candidates_uri=data["cands"],
        scores_uri=data["scores"], generated_uri=data["gen"])
    assert got == want and counts == want_counts
    assert len(got) == 20 and all(len(r["gen_scores"]) == 4 for r in got)
    assert counts["random_negatives"] > 0 and all(len(r["passages"]) == 7 for r in got)
    # lists cut before the join on both paths (3 of the fixture's 6: n_hard_negatives + the
    # one positive), the same rows
    loss = LossConfig(n_hard_negatives=2, n_candidates=2, kd_on_generated=True)
    want, want_counts, got, counts = _both(
        data, tmp_path / "cut", loss, qrels_uri=data["qrels"], candidates_uri=data["cands"],
        scores_uri=data["scores"], generated_uri=data["gen"])
    assert got == want and counts == want_counts and len(got) == 20
    assert all(len(r["passages"]) == 3 and len(r["gen_scores"]) == 2 for r in got)


@pytest.mark.timeout(1500)
def test_bad_input_is_named_as_by_the_driver_join(data, tmp_path, ray_local):  # noqa: F811
    storage.write_parquet(f"{data['qrels']}/part-00001.parquet", pa.Table.from_pylist(
        [{"qid": "q0", "pid": "nope", "rel": 1}], schema=QRELS))
    with pytest.raises(DataError, match=r"qid=q0: positive pid=nope not in corpus"):
        build_student_rows_dataset(data["queries"], data["corpus"], str(tmp_path / "r"), "k",
                                   qrels_uri=data["qrels"], num_partitions=2)
    storage.remove(f"{data['qrels']}/part-00001.parquet")
    q = storage.read_parquet(data["queries"]).to_pylist()
    storage.write_parquet(f"{data['queries']}/part-00001.parquet", pa.Table.from_pylist(
        [dict(q[5], text="asked again")], schema=QUERIES))
    want = (rf"queries/part-00001.parquet: row 0 \(qid={q[5]['qid']}\): qid also in "
            rf"\S+/queries/part-00000.parquet row 5 \(one row per qid\)")
    with pytest.raises(DataError, match=want):
        load_queries(data["queries"])  # the driver's message
    with pytest.raises(DataError, match=want):
        build_student_rows_dataset(data["queries"], data["corpus"], str(tmp_path / "r2"), "k",
                                   qrels_uri=data["qrels"], num_partitions=2,
                                   shard_rows=1)  # the two rows in two shards


@pytest.mark.timeout(1500)
def test_qg_rows_with_a_pair_twice_are_an_error_on_both_paths(data, tmp_path,  # noqa: F811
                                                            ray_local):
    """A (qid, pid) qrels pair on two rows (qrels written without `qgscale prepare`, which
    rejects it) would train the QG on it twice: both builds name it (the Ray build with the
    two copies in two shards). A pair whose passage is on two corpus rows names the corpus."""
    from qgscale.data.corpus import read_rows
    from qgscale.models.generator import qg_examples
    from qgscale.train.rows_dataset import build_qg_rows_dataset

    first = storage.read_parquet(data["qrels"]).slice(0, 1)
    storage.write_parquet(f"{data['qrels']}/part-00001.parquet", first)
    qrels = storage.read_parquet(data["qrels"])
    want = (rf"qrels: qid={first['qid'][0]}, pid={first['pid'][0]} has two rows \(one row "
            r"per \(qid, pid\) pair\)")
    with pytest.raises(DataError, match=want):
        list(qg_examples(storage.read_parquet(data["queries"]),
                         read_rows(data["corpus"], qrels.column("pid").to_pylist()),
                         tdata.in_row_order(qrels, ("qid", "pid")), data["qrels"]))
    with pytest.raises(DataError, match=want):
        build_qg_rows_dataset(data["queries"], data["corpus"], data["qrels"],
                              str(tmp_path / "qg"), "k1", num_partitions=2, shard_rows=1)
    # the pair once, its passage on two corpus rows: the corpus is named, not the qrels
    storage.remove(f"{data['qrels']}/part-00001.parquet")
    pid = first["pid"][0].as_py()
    row = [r for r in storage.read_parquet(data["corpus"]).to_pylist() if r["pid"] == pid]
    storage.write_parquet(f"{data['corpus']}/part-00099.parquet",
                          pa.Table.from_pylist(row, schema=CORPUS))
    want = rf"corpus: pid={pid} is on two corpus rows"
    with pytest.raises(DataError, match=want):
        list(qg_examples(storage.read_parquet(data["queries"]), read_rows(data["corpus"], [pid]),
                         first, data["qrels"], corpus_uri=data["corpus"]))
    with pytest.raises(DataError, match=want):
        build_qg_rows_dataset(data["queries"], data["corpus"], data["qrels"],
                              str(tmp_path / "qg2"), "k1", num_partitions=2, shard_rows=1)


@pytest.mark.timeout(1500)
def test_qg_and_qg_rank_rows_equal_the_driver_join(data, tmp_path, ray_local):  # noqa: F811
    """The teacher's rows built with Ray Data: QG rows (every positive qrels pair) and
    qg-rank rows (a seeded positive, the first 3 mined negatives that are not positives; two
    example rows of one qid are concatenated) equal the driver's, in the same order."""
    from qgscale.data.corpus import read_rows
    from qgscale.data.schema import TRAIN_EXAMPLES
    from qgscale.models.generator import qg_examples
    from qgscale.train.rows_dataset import build_qg_rank_rows_dataset, build_qg_rows_dataset

    qrels = storage.read_parquet(data["qrels"])
    want = list(qg_examples(  # as run_train_qg joins them on the driver
        storage.read_parquet(data["queries"]), read_rows(data["corpus"],
                                                         qrels.column("pid").to_pylist()),
        tdata.in_row_order(qrels, ("qid", "pid"))))
    out = str(tmp_path / "qg")
    counts = build_qg_rows_dataset(data["queries"], data["corpus"], data["qrels"], out, "k1",
                                   num_partitions=2, shard_rows=6)
    got = storage.read_parquet(out)
    assert counts == {"rows": 40} and storage.read_manifest(out)["rows"] == 40
    assert got.column_names == tdata.QG_ROWS.names
    assert got.to_pylist() == want

    pos: dict[str, list[str]] = {}
    for r in qrels.to_pylist():
        pos.setdefault(r["qid"], []).append(r["pid"])
    examples = [{"qid": r["qid"], "pos_pids": pos[r["qid"]][:1], "neg_pids": r["pids"]}
                for r in storage.read_parquet(data["cands"]).to_pylist()]
    examples += [{"qid": "q3", "pos_pids": pos["q3"][1:], "neg_pids": []}]  # a second row
    ex_uri = str(tmp_path / "examples")
    storage.write_parquet(f"{ex_uri}/part-00000.parquet",
                          pa.Table.from_pylist(examples, schema=TRAIN_EXAMPLES))
    want_t, want_counts = tdata.build_qg_rank_rows(data["queries"], data["corpus"], ex_uri, 3,
                                                   seed=7)
    out = str(tmp_path / "qg-rank")
    counts = build_qg_rank_rows_dataset(data["queries"], data["corpus"], ex_uri, 3, out, "k1",
                                        seed=7, num_partitions=2, shard_rows=6)
    assert counts == want_counts == {"rows": 20, "short_lists": 0, "no_negatives": 0}
    assert storage.read_parquet(out).to_pylist() == want_t.to_pylist()


def test_the_corpus_rows_a_join_shuffles_are_the_needed_ones(data, ray_local):  # noqa: F811
    """The corpus side of a row join is read through the needed pids' Bloom filter
    (:func:`~qgscale.data.joins.pid_filter`): every needed passage, with its text,
    and about 1% of the others, instead of all 500."""
    import ray

    from qgscale.data.joins import passages_dataset, pid_filter

    corpus = storage.read_parquet(data["corpus"], ["pid", "title", "text"]).to_pylist()
    pids = [r["pid"] for r in corpus]
    need = pids[::10]
    ds = ray.data.from_items([{"qid": f"q{i % 3}", "pid": p} for i, p in enumerate(need)])
    got = {r["pid"]: r["passage"] for r in passages_dataset(
        data["corpus"], pid_filter(ds.materialize())).take_all()}
    text = {r["pid"]: passage_text(r["title"], r["text"]) for r in corpus}
    assert set(need) <= set(got) and all(got[p] == text[p] for p in need)
    assert len(got) <= len(need) + 10  # 450 others: ~5 expected to pass
    assert len(passages_dataset(data["corpus"]).take_all()) == len(pids)  # unfiltered: the corpus
