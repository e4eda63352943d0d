"""Teacher stages on a real local Ray: scoring and generation over shards, killed actors,
resume, local disk and the local S3 endpoint."""

from __future__ import annotations

import os
import random

import numpy as np
import pyarrow as pa
import pytest
import torch

from qgscale import storage
from qgscale.config import GenerateConfig, ScoreConfig
from qgscale.data.schema import CANDIDATES, CORPUS, GENERATED, QRELS, QUERIES, passage_text
from qgscale.errors import DataError, MissingInputError
from qgscale.models.generator import QueryGenerator
from qgscale.models.tiny import tiny_t5_config, xquad_texts
from qgscale.teacher.common import QGSpec
from qgscale.teacher.generation import generate_queries, plan_units
from qgscale.teacher.pairs_dataset import generated_candidates_dataset
from qgscale.teacher.scoring import candidate_pairs, generated_candidates, score_candidates
from qgscale.train.data import generated_qid
from tests.faults import KillShardActorAfter


def _write_inputs(root: str, tokenizer, n_pass: int = 10, n_q: int = 16, k: int = 4):
    """Tiny QG saved under root/qg + corpus, queries, qrels and 2 candidate shards."""
    from transformers import T5ForConditionalGeneration

    rng = random.Random(0)
    texts = xquad_texts(["en", "de"])
    paras = [t for t in texts if len(t) > 200][:n_pass]
    questions = [t for t in texts if len(t) < 100][:n_q]
    corpus = [{"pid": f"p{i}", "lang": "en", "title": f"T{i}", "text": t}
              for i, t in enumerate(paras)]
    queries = [{"qid": f"q{i}", "lang": rng.choice(["en", "de"]), "text": t}
               for i, t in enumerate(questions)]
    cands = [{"qid": q["qid"], "pids": rng.sample([c["pid"] for c in corpus], k),
              "scores": None} for q in queries]
    qrels = [{"qid": c["qid"], "pid": c["pids"][0], "rel": 1} for c in cands]
    storage.write_parquet(storage.join(root, "corpus.parquet"),
                          pa.Table.from_pylist(corpus, schema=CORPUS))
    storage.write_parquet(storage.join(root, "queries.parquet"),
                          pa.Table.from_pylist(queries, schema=QUERIES))
    storage.write_parquet(storage.join(root, "qrels.parquet"),
                          pa.Table.from_pylist(qrels, schema=QRELS))
    half = len(cands) // 2
    for i, part in enumerate([cands[:half], cands[half:]]):
        storage.write_parquet(storage.join(root, "cands", f"part-{i:05d}.parquet"),
                              pa.Table.from_pylist(part, schema=CANDIDATES))
    cfg = tiny_t5_config(len(tokenizer))
    cfg.initializer_factor = 0.05
    torch.manual_seed(0)
    qg = QueryGenerator(T5ForConditionalGeneration(cfg).eval(), tokenizer,
                        max_passage_len=128, max_query_len=32)
    qg.save_pretrained(storage.join(root, "qg"))
    spec = QGSpec({"name_or_path": storage.join(root, "qg")}, qg.prompt, 128, 32)
    return qg, spec, corpus, queries, cands


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "run")
    return f"{request.getfixturevalue('s3_bucket')}/run"


def test_score_kill_actor_exactly_once_and_resume(ray_local, tokenizer, root):
    qg, spec, corpus, queries, cands = _write_inputs(root, tokenizer)
    out = storage.join(root, "scores")
    args = (spec, storage.join(root, "cands"), storage.join(root, "queries.parquet"),
            storage.join(root, "corpus.parquet"), out, "k1")
    sc = ScoreConfig(shard_pairs=4, cpus_per_actor=0.5, batch_tokens=2000, precision="fp32",
                     num_actors=2)
    with KillShardActorAfter(out, after=1) as killer:  # a crash, from outside the run
        m = score_candidates(*args, sc)
    pairs = [(c["qid"], p) for c in cands for p in c["pids"]]
    assert len(m["shards"]) == 16 and m["rows"] == len(pairs) == 64
    assert killer.killed and m["run"]["actor_failures"] == 1
    got = storage.read_parquet(out)
    keys = list(zip(got["qid"].to_pylist(), got["pid"].to_pylist(), strict=True))
    assert len(keys) == len(set(keys)) and sorted(keys) == sorted(pairs)  # exactly once
    # the scores are the model's: equal to scoring the same pairs in this process
    qtext = {q["qid"]: (q["text"], q["lang"]) for q in queries}
    ptext = {c["pid"]: passage_text(c["title"], c["text"]) for c in corpus}
    want = qg.score([(qtext[q][0], ptext[p], qtext[q][1]) for q, p in keys])
    np.testing.assert_allclose(got["score"].to_numpy(), want.mean, atol=1e-5)
    np.testing.assert_array_equal(got["ntok"].to_numpy(), want.ntok)

    markers = {f: storage.read_json(f) for f in storage.list_files(
        storage.join(out, storage.DONE_DIR), ".json")}
    again = score_candidates(*args, sc)
    assert again["run"]["shards_run"] == 0 and again["rows"] == 64  # every shard done
    assert {f: storage.read_json(f) for f in markers} == markers

    # lose the manifest and one shard's marker: only that shard is redone
    storage.remove(storage.join(out, storage.MANIFEST))
    lost = sorted(markers)[1]
    storage.remove(lost)
    # a unit of an older plan (another name, here a copy of a shard): removed, not read twice
    storage.write_parquet(storage.join(out, "part-00000-0000.parquet"),
                          storage.read_parquet(storage.join(out, "part-00000.parquet")))
    third = score_candidates(*args, sc.model_copy(update={"num_actors": 1}))
    assert third["run"]["shards_run"] == 1 and third["rows"] == 64
    assert len(storage.read_parquet(out)) == 64
    assert not storage.exists(storage.join(out, "part-00000-0000.parquet"))


def test_generate_resumable(ray_local, tokenizer, tmp_path):
    root = str(tmp_path / "gen")
    _, spec, corpus, queries, cands = _write_inputs(root, tokenizer, n_pass=6, n_q=8)
    out = storage.join(root, "generated")
    gc = GenerateConfig(langs=["de", "zh"], num_queries=2, do_sample=True, max_new_tokens=8,
                        shard_rows=2, num_actors=1, cpus_per_actor=1)
    kw = dict(gc=gc, qrels_uri=storage.join(root, "qrels.parquet"))
    m = generate_queries(spec, storage.join(root, "corpus.parquet"), out, "k1", **kw)
    positives = sorted({c["pids"][0] for c in cands})
    assert m["passages"] == len(positives) and len(m["shards"]) == -(-len(positives) // 2)
    got = storage.read_parquet(out)
    assert got.num_rows + m["empty_queries_dropped"] + m["repeated_queries_dropped"] == \
        len(positives) * 2 * 2
    keys = list(zip(got["pid"].to_pylist(), got["lang"].to_pylist(), got["query"].to_pylist(),
                    strict=True))
    assert len(set(keys)) == len(keys)  # no query twice for one passage and language
    assert got.num_rows >= len(positives) and all(got["query"].to_pylist())
    assert sorted(set(got["pid"].to_pylist())) == positives
    assert sorted(set(got["lang"].to_pylist())) == ["de", "zh"]
    assert np.isfinite(got["logprob"].to_numpy()).all() and (got["logprob"].to_numpy() < 0).all()
    # resume: drop one shard's marker and the manifest; only it is redone, identically
    storage.remove(storage.join(out, storage.MANIFEST))
    storage.remove(storage.join(out, storage.DONE_DIR, "part-00000.json"))
    again = generate_queries(spec, storage.join(root, "corpus.parquet"), out, "k1", **kw)
    assert again["run"]["shards_run"] == 1
    assert storage.read_parquet(out).to_pylist() == got.to_pylist()  # seeded: same queries
    # more actors on resume: the first run's units are kept (their shards are done)
    third = generate_queries(spec, storage.join(root, "corpus.parquet"), out, "k1",
                             gc=gc.model_copy(update={"num_actors": 2}), qrels_uri=kw["qrels_uri"])
    assert third["run"]["shards_run"] == 0 and third["unit_rows"] == m["unit_rows"] == 2
    # every corpus passage: units are row ranges of the corpus shards, read by the actors
    every = generate_queries(spec, storage.join(root, "corpus.parquet"),
                             storage.join(root, "gen-all"), "k1",
                             gc.model_copy(update={"shard_rows": 4, "num_queries": 1}))
    assert every["passages"] == len(corpus) and len(every["shards"]) == 2
    assert set(storage.read_parquet(storage.join(root, "gen-all"))["pid"].to_pylist()) <= {
        c["pid"] for c in corpus}

    # KD on generated queries: score them on the union of their source queries' candidates
    c_uri, q_uri = generated_candidates(
        storage.join(root, "cands"), storage.join(root, "queries.parquet"),
        storage.join(root, "qrels.parquet"), out, storage.join(root, "gen_pairs"))
    lang = {q["qid"]: q["lang"] for q in queries}
    want = set()
    for r in got.to_pylist():
        for c in cands:  # qrels: c["pids"][0] is the positive of c["qid"]
            if c["pids"][0] == r["pid"] and lang[c["qid"]] != r["lang"]:
                want |= {(generated_qid(r["pid"], r["lang"], r["query"]), p) for p in c["pids"]}
    assert want  # some generated query has candidates
    c2, _ = generated_candidates(  # the first 2 of each list (distill.loss.n_candidates)
        storage.join(root, "cands"), storage.join(root, "queries.parquet"),
        storage.join(root, "qrels.parquet"), out, storage.join(root, "gen_pairs2"), first=2)
    want2 = {(generated_qid(r["pid"], r["lang"], r["query"]), p) for r in got.to_pylist()
             for c in cands if c["pids"][0] == r["pid"] and lang[c["qid"]] != r["lang"]
             for p in c["pids"][:2]}
    got2 = {(r["qid"], p) for r in storage.read_parquet(c2).to_pylist() for p in r["pids"]}
    assert got2 == want2 and got2 < want
    c2r, q2r = generated_candidates_dataset(  # the same with Ray Data
        storage.join(root, "cands"), storage.join(root, "queries.parquet"),
        storage.join(root, "qrels.parquet"), out, storage.join(root, "gen_pairs2r"), first=2,
        num_partitions=2)
    assert sorted(storage.read_parquet(c2r).to_pylist(), key=str) == sorted(
        storage.read_parquet(c2).to_pylist(), key=str)
    assert sorted(storage.read_parquet(q2r).to_pylist(), key=str) == sorted(
        storage.read_parquet(storage.join(root, "gen_pairs2", "queries")).to_pylist(), key=str)
    # generated from every corpus passage: only the queries that get a list are written
    c3, q3 = generated_candidates(
        storage.join(root, "cands"), storage.join(root, "queries.parquet"),
        storage.join(root, "qrels.parquet"), storage.join(root, "gen-all"),
        storage.join(root, "gen_pairs3"))
    every_gen = storage.read_parquet(storage.join(root, "gen-all")).to_pylist()
    listed = {generated_qid(r["pid"], r["lang"], r["query"]) for r in every_gen for c in cands
              if c["pids"][0] == r["pid"] and lang[c["qid"]] != r["lang"]}
    assert set(storage.read_parquet(q3)["qid"].to_pylist()) == listed
    assert set(storage.read_parquet(c3)["qid"].to_pylist()) == listed
    assert 0 < len(listed) < len(every_gen)
    c3r, q3r = generated_candidates_dataset(
        storage.join(root, "cands"), storage.join(root, "queries.parquet"),
        storage.join(root, "qrels.parquet"), storage.join(root, "gen-all"),
        storage.join(root, "gen_pairs3r"), num_partitions=3)
    assert {r["qid"]: set(r["pids"]) for r in storage.read_parquet(c3r).to_pylist()} == {
        r["qid"]: set(r["pids"]) for r in storage.read_parquet(c3).to_pylist()}
    assert sorted(storage.read_parquet(q3r).to_pylist(), key=str) == sorted(
        storage.read_parquet(q3).to_pylist(), key=str)
    sm = score_candidates(spec, [storage.join(root, "cands"), c_uri],
                          [storage.join(root, "queries.parquet"), q_uri],
                          storage.join(root, "corpus.parquet"), storage.join(root, "scores"),
                          "k1", ScoreConfig(num_actors=1, precision="fp32"))
    s = storage.read_parquet(storage.join(root, "scores"))
    keys = set(zip(s["qid"].to_pylist(), s["pid"].to_pylist(), strict=True))
    assert sm["rows"] == len(keys) == len(want) + sum(len(c["pids"]) for c in cands)
    assert want <= keys


def test_bad_candidates_named(ray_local, tokenizer, tmp_path):
    root = str(tmp_path / "bad")
    _, spec, _, _, _ = _write_inputs(root, tokenizer, n_pass=4, n_q=4)
    bad = storage.join(root, "bad.parquet")
    storage.write_parquet(bad, pa.Table.from_pylist(
        [{"qid": "q0", "pids": ["p1", "p2", "p1"], "scores": None}], schema=CANDIDATES))
    with pytest.raises(DataError, match=r"bad.parquet: row 0 \(qid=q0\).*pid twice"):
        candidate_pairs(bad)
    storage.write_parquet(bad, pa.Table.from_pylist(
        [{"qid": "q0", "pids": ["p1"], "scores": None},
         {"qid": "zz", "pids": ["p1"], "scores": None}], schema=CANDIDATES))
    with pytest.raises(DataError, match=r"bad.parquet: row 1: qid=zz not in queries"):
        score_candidates(spec, bad, storage.join(root, "queries.parquet"),
                         storage.join(root, "corpus.parquet"), storage.join(root, "out"), "k1")
    storage.write_parquet(bad, pa.Table.from_pylist(  # the first missing pid in file order
        [{"qid": "q0", "pids": ["p1"], "scores": None},
         {"qid": "q1", "pids": ["p1", "nope"], "scores": None},
         *({"qid": f"q{i}", "pids": [f"nope{i}"], "scores": None} for i in range(2, 4))],
        schema=CANDIDATES))
    with pytest.raises(DataError, match=r"bad.parquet: row 1 \(qid=q1\): pid=nope not in corpus"):
        score_candidates(spec, bad, storage.join(root, "queries.parquet"),
                         storage.join(root, "corpus.parquet"), storage.join(root, "out"), "k1",
                         ScoreConfig(num_actors=1, cpus_per_actor=0.5))
    assert not storage.exists(storage.join(root, "out", storage.MANIFEST))
    # the join's manifest neither: a re-run joins again (and fails again) instead of reusing it
    assert not storage.exists(storage.join(root, "out", "_pairs", storage.MANIFEST))
    # a candidate's pid on two corpus rows (two shards): named, not blamed on another pair
    corpus = storage.read_parquet(storage.join(root, "corpus.parquet"))
    for k in range(2):
        storage.write_parquet(storage.join(root, "corpus2", f"part-{k:05d}.parquet"), corpus)
    storage.write_parquet(bad, pa.Table.from_pylist(
        [{"qid": "q1", "pids": ["p1"], "scores": None}], schema=CANDIDATES))
    with pytest.raises(DataError, match=r"corpus2: pid=p1 \(a candidate of qid=q1\) is on 2 "):
        score_candidates(spec, bad, storage.join(root, "queries.parquet"),
                         storage.join(root, "corpus2"), storage.join(root, "out2"), "k1",
                         ScoreConfig(num_actors=1, cpus_per_actor=0.5))
    # a pid missing and another on two corpus rows: as many rows as pairs, still named
    storage.write_parquet(bad, pa.Table.from_pylist(
        [{"qid": "q1", "pids": ["p1", "nope"], "scores": None}], schema=CANDIDATES))
    with pytest.raises(DataError, match=r"bad.parquet: row 0 \(qid=q1\): pid=nope not in corp"):
        score_candidates(spec, bad, storage.join(root, "queries.parquet"),
                         storage.join(root, "corpus2"), storage.join(root, "out3"), "k1",
                         ScoreConfig(num_actors=1, cpus_per_actor=0.5))
    assert not storage.exists(storage.join(root, "out3", "_pairs", storage.MANIFEST))


def test_non_finite_teacher_score_is_never_written(tokenizer, tmp_path):
    """A real NaN/inf score (the tiny QG's output layer set to inf) stops the scoring unit
    with the pair-shard file, its row, qid and pid, before anything is written."""
    from transformers import T5ForConditionalGeneration

    from qgscale.runtime import Shard
    from qgscale.teacher.scoring import PAIRS, PairSlice, ScoreJob

    torch.manual_seed(0)
    qg = QueryGenerator(T5ForConditionalGeneration(tiny_t5_config(len(tokenizer))).eval(),
                        tokenizer, max_passage_len=64, max_query_len=16)
    uri = str(tmp_path / "_pairs" / "part-00000.parquet")
    storage.write_parquet(uri, pa.Table.from_pylist(
        [{"qid": f"q{i}", "lang": "en", "query": "Who wrote it?", "pid": f"p{i}",
          "passage": "A short passage about a book."} for i in range(3)], schema=PAIRS))
    job = ScoreJob(QGSpec({}, qg.prompt), precision="fp32")  # setup unused: qg is given
    shard = Shard("part-00000", 2, (PairSlice(uri, 1, 3),))
    assert np.isfinite(job.run(qg, shard)[0]["score"].to_numpy()).all()
    with torch.no_grad():
        qg.model.lm_head.weight.fill_(float("inf"))
    with pytest.raises(DataError, match=r"_pairs/part-00000.parquet: row 1 \(qid=q1, pid=p1\): "
                                        r"teacher score is nan"):
        job.run(qg, shard)
    with pytest.raises(DataError, match=r"_pairs/part-00000.parquet: row 2 \(qid=q2, pid=p2\): "
                                        r"teacher score is nan \(3 non-finite of 3"):
        job.run(qg, Shard("part-00001", 3, (PairSlice(uri, 2, 3), PairSlice(uri, 0, 2))))


def test_score_units_span_small_pair_shards():
    """Scoring units hold ``unit_pairs`` pairs, consecutive row ranges across pair shards
    (empty ones skipped), the last unit the rest."""
    from qgscale.teacher.scoring import PairSlice, plan_units

    manifest = {"shards": [{"file": f"part-{i:05d}.parquet", "rows": n}
                           for i, n in enumerate([3, 0, 5, 2])]}
    units = plan_units(manifest, "p", 4)
    assert [(u.name, u.size) for u in units] == [("part-00000", 4), ("part-00001", 4),
                                                  ("part-00002", 2)]
    assert [u.payload for u in units] == [
        (PairSlice("p/part-00000.parquet", 0, 3), PairSlice("p/part-00002.parquet", 0, 1)),
        (PairSlice("p/part-00002.parquet", 1, 5),),
        (PairSlice("p/part-00003.parquet", 0, 2),)]
    assert plan_units({"shards": [{"file": "a", "rows": 0}]}, "p", 4) == []


def test_duplicate_or_empty_query_named_by_file_and_row(tmp_path):
    """A qid twice (in one folder's shards, or in two query tables) names both rows; every
    row number is the row in its own file, not in the concatenated folder."""
    from qgscale.teacher.common import load_queries
    from qgscale.teacher.scoring import query_table

    def write(folder: str, qids: list[str], texts: list[str] | None = None) -> str:
        """Shards of two rows each: part-00000 holds qids[0:2], part-00001 qids[2:4]."""
        rows = [{"qid": q, "lang": "en", "text": t} for q, t in zip(qids, texts or qids,
                                                                    strict=True)]
        for i in range(0, len(rows), 2):
            storage.write_parquet(str(tmp_path / folder / f"part-{i // 2:05d}.parquet"),
                                  pa.Table.from_pylist(rows[i:i + 2], schema=QUERIES))
        return str(tmp_path / folder)

    a, b = write("a", ["q0", "q1", "q2", "q3"]), write("b", ["g0", "q2"])
    assert list(load_queries(a)) == ["q0", "q1", "q2", "q3"]
    with pytest.raises(DataError, match=r"b/part-00000.parquet: row 1 \(qid=q2\): qid also in "
                                        r"\S*a/part-00001.parquet row 0"):
        query_table([a, b])
    with pytest.raises(DataError, match=r"c/part-00001.parquet: row 1 \(qid=q1\): qid also in "
                                        r"\S*c/part-00000.parquet row 1"):
        load_queries(write("c", ["q0", "q1", "q2", "q1"]))
    with pytest.raises(DataError, match=r"d/part-00001.parquet: row 1 \(qid=q3\): "
                                        r"empty field 'text'"):
        load_queries(write("d", ["q0", "q1", "q2", "q3"], ["x", "y", "z", " "]))


@pytest.mark.parametrize("ray_from", [1_000_000, 0])
def test_run_score_stage_from_config(ray_local, tokenizer, tmp_path, ray_from):
    """The stage function the pipeline calls, on the run layout's locations: it scores the
    first ``distill.loss.n_candidates`` of each list (2 of 3), the pairs rows read; a second
    call with the same key finds every shard done and scores nothing again. From
    ``data.ray_rows_from`` lists on, Ray Data joins the pairs."""
    from qgscale.config import parse
    from qgscale.layout import Layout
    from qgscale.teacher.common import qg_spec
    from qgscale.teacher.scoring import run_score

    root = str(tmp_path / "run")
    cfg = parse({"run": {"root": root}, "qg": {"max_passage_len": 128, "max_query_len": 32},
                 "qg_rank": {"enabled": False},  # the QG itself is the teacher
                 "teacher": {"score": {"num_actors": 1, "cpus_per_actor": 0.5,
                                       "shard_pairs": 8}},
                 "distill": {"loss": {"n_candidates": 2}},
                 "data": {"ray_rows_from": ray_from, "ray_rows_partitions": 2}})
    lay = Layout(cfg)
    with pytest.raises(MissingInputError, match=r"train/qg/model: no query generator here; "
                                                r"run `qgscale train qg` first"):
        qg_spec(cfg, lay.teacher_model())
    src = str(tmp_path / "inputs")
    _, spec, _, queries, cands = _write_inputs(src, tokenizer, n_pass=4, n_q=4, k=3)
    # two English queries share the positive p0 with other candidates: a German query
    # generated from p0 gets the union of their first 2 (3 pids, more than n_candidates)
    for q, lang in zip(queries, ["en", "en", "de", "de"], strict=True):
        q["lang"] = lang
    for c, pids in zip(cands, [["p0", "p1", "p2"], ["p0", "p3", "p1"], ["p1", "p2", "p3"],
                               ["p2", "p0", "p3"]], strict=True):
        c["pids"] = pids
    storage.write_parquet(f"{src}/queries.parquet", pa.Table.from_pylist(queries,
                                                                         schema=QUERIES))
    storage.write_parquet(f"{src}/qrels.parquet", pa.Table.from_pylist(
        [{"qid": c["qid"], "pid": c["pids"][0], "rel": 1} for c in cands], schema=QRELS))
    for i, part in enumerate([cands[:2], cands[2:]]):
        storage.write_parquet(f"{src}/cands/part-{i:05d}.parquet",
                              pa.Table.from_pylist(part, schema=CANDIDATES))
    import shutil

    shutil.copytree(f"{src}/qg", cfg.uri("train", "qg", "model"))
    shutil.copytree(f"{src}/cands", cfg.uri("mine", "candidates"))
    for kind in ("queries", "corpus"):
        storage.write_parquet(cfg.uri("data", "train", kind, "part-00000.parquet"),
                              storage.read_parquet(f"{src}/{kind}.parquet"))
    def score():
        return run_score(cfg, lay.teacher_model(), candidates_uri=lay.candidates,
                         queries_uri=lay.data("train", "queries"),
                         corpus_uri=lay.data("train", "corpus"), out_uri=lay.scores, key="k1")

    m = score()
    # the work units are consecutive row ranges of the pair shards (one per corpus shard, or
    # per Ray Data partition), teacher.score.shard_pairs or fewer pairs each, so that the
    # one actor gets two units (runtime.unit_rows), however many pair shards there are
    assert m["rows"] == 8 and m["run"]["shards_run"] == len(m["shards"]) == 2
    scored = storage.read_parquet(cfg.uri("teacher", "scores"))
    assert sorted(zip(scored["qid"].to_pylist(), scored["pid"].to_pylist(), strict=True)) == \
        sorted((c["qid"], p) for c in cands for p in c["pids"][:2])
    assert m["first_candidates"] == 2
    joined = storage.read_manifest(storage.join(cfg.uri("teacher", "scores"), "_pairs"))
    assert (joined["run"].get("joined_by") == "ray-data") == (ray_from == 0)
    again = score()
    assert again["rows"] == 8 and again["run"]["shards_run"] == 0
    # with distill.loss.kd_on_generated the generated queries are scored too, on the lists of
    # their source queries (generated_candidates; from data.ray_rows_from on, with Ray Data)
    gen = str(tmp_path / "generated")
    generate_queries(spec, f"{src}/corpus.parquet", gen, "g1",
                     gc=GenerateConfig(langs=["de", "en"], num_queries=1, max_new_tokens=8,
                                       do_sample=True,
                                       num_actors=1, cpus_per_actor=0.5),
                     qrels_uri=f"{src}/qrels.parquet")
    m = run_score(cfg, lay.teacher_model(), candidates_uri=lay.candidates,
                  queries_uri=lay.data("train", "queries"),
                  corpus_uri=lay.data("train", "corpus"), out_uri=str(tmp_path / "scores-g"),
                  key="k2", generated_uri=gen, qrels_uri=f"{src}/qrels.parquet",
                  pairs_uri=str(tmp_path / "gen-pairs"))
    lang = {q["qid"]: q["lang"] for q in queries}
    want = {(generated_qid(r["pid"], r["lang"], r["query"]), p)
            for r in storage.read_parquet(gen).to_pylist() for c in cands
            if c["pids"][0] == r["pid"] and lang[c["qid"]] != r["lang"] for p in c["pids"][:2]}
    scored = storage.read_parquet(str(tmp_path / "scores-g"))
    got = set(zip(scored["qid"].to_pylist(), scored["pid"].to_pylist(), strict=True))
    assert want and m["rows"] == 8 + len(want) == scored.num_rows
    assert got == {(c["qid"], p) for c in cands for p in c["pids"][:2]} | want
    # the German queries of p0 are scored with p0, p1 (q0's) and p3 (q1's), not cut to 2
    de_p0 = {g for g, _ in want if any(generated_qid("p0", "de", r["query"]) == g
                                       for r in storage.read_parquet(gen).to_pylist())}
    assert de_p0 and {p for g, p in got if g in de_p0} == {"p0", "p1", "p3"}
    # no generated query at all (every one empty or repeated, dropped): the lists' pairs only
    none = storage.ShardWriter(str(tmp_path / "generated-none"), "g0")
    none.write("part-00000", GENERATED.empty_table())
    none.finalize(["part-00000"])
    m = run_score(cfg, lay.teacher_model(), candidates_uri=lay.candidates,
                  queries_uri=lay.data("train", "queries"),
                  corpus_uri=lay.data("train", "corpus"), out_uri=str(tmp_path / "scores-0"),
                  key="k3", generated_uri=none.root, qrels_uri=f"{src}/qrels.parquet",
                  pairs_uri=str(tmp_path / "gen-pairs-0"))
    assert m["rows"] == 8


def test_s3_credentials_never_reach_ray(ray_local, tokenizer, s3_bucket, monkeypatch):
    """A teacher scoring job on the S3 endpoint (its pairs joined by actors, then by Ray Data
    tasks). The S3 credentials appear in no argument the driver serialized for Ray
    (actor/task arguments, ``ray.put``), in no runtime env of the job's actors and tasks
    (the GCS task events and actor table: what the dashboard and ``ray.util.state`` list) and
    not in the job's runtime env; the endpoint does travel. A control task given the secret
    the old way (argument + runtime env) is caught by the same checks, so they can fail."""
    import json
    import time

    from ray._private.serialization import SerializationContext
    from ray._private.state import state

    ray = ray_local
    secrets = [os.environ["AWS_SECRET_ACCESS_KEY"], os.environ["AWS_ACCESS_KEY_ID"]]
    assert all(len(s) >= 16 for s in secrets)  # distinctive values (conftest)
    sent: list[bytes] = []
    serialize = SerializationContext.serialize

    def spy(self, value):
        out = serialize(self, value)
        sent.append(value if isinstance(value, bytes) else out.to_bytes())
        return out

    monkeypatch.setattr(SerializationContext, "serialize", spy)

    def task_events(names: tuple[str, ...]) -> list:
        """Every task event in the GCS, once those of each of ``names`` have arrived."""
        deadline = time.time() + 30
        while True:
            events = state._get_all_task_events()
            seen = {e.task_info.func_or_class_name for e in events}
            if all(n in seen for n in names):
                return events
            assert time.time() < deadline, f"no task events for {names}: {seen}"
            time.sleep(0.5)

    def leaks(events: list) -> list[str]:
        """Where a credential is."""
        actors = [state.get_actor_info(ray.ActorID(bytes.fromhex(a))) or b""
                  for a in state.actor_table(None)]
        job_env = json.dumps(ray.get_runtime_context().runtime_env)
        jobs = json.dumps(state.job_table(), default=str)
        found = []
        for s in secrets:
            found += [f"argument #{i}" for i, blob in enumerate(sent) if s.encode() in blob]
            found += [f"runtime env of {e.task_info.func_or_class_name}" for e in events
                      if s in e.task_info.runtime_env_info.serialized_runtime_env]
            found += [f"actor #{i}" for i, info in enumerate(actors) if s.encode() in info]
            found += ["job runtime env"] if s in job_env else []
            found += ["job table"] if s in jobs else []
        return found

    root = f"{s3_bucket}/secret"
    _, spec, _, _, _ = _write_inputs(root, tokenizer, n_pass=4, n_q=4, k=2)
    m = score_candidates(spec, storage.join(root, "cands"), storage.join(root, "queries.parquet"),
                         storage.join(root, "corpus.parquet"), storage.join(root, "scores"), "k1",
                         ScoreConfig(num_actors=1, cpus_per_actor=0.5, precision="fp32"))
    assert m["rows"] == 8 and storage.read_parquet(storage.join(root, "scores")).num_rows == 8
    r = score_candidates(spec, storage.join(root, "cands"), storage.join(root, "queries.parquet"),
                         storage.join(root, "corpus.parquet"), storage.join(root, "scores-r"),
                         "k1", ScoreConfig(num_actors=1, cpus_per_actor=0.5, precision="fp32"),
                         ray_from=0, num_partitions=2)  # the pairs joined by Ray Data tasks
    assert r["rows"] == 8 and storage.read_manifest(storage.join(
        root, "scores-r", "_pairs"))["run"]["joined_by"] == "ray-data"
    events = task_events(("ShardActor.__init__", "ShardActor.run"))
    assert sent and not leaks(events), leaks(events)
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    assert any(endpoint in e.task_info.runtime_env_info.serialized_runtime_env
               for e in events if e.task_info.func_or_class_name == "ShardActor.__init__")

    # control: credentials handed over the old way (an argument and a runtime env) are found
    env = {k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    leaky = ray.remote(num_cpus=0)(_echo).options(runtime_env={"env_vars": env})
    assert ray.get(leaky.remote(env)) == env
    found = leaks(task_events(("_echo",)))
    assert "runtime env of _echo" in found and any(f.startswith("argument") for f in found)


def _echo(x):
    return x


def test_generation_units_give_every_actor_work(tmp_path):
    """Units hold ``shard_rows`` passages, or fewer so that every actor gets at least two
    (the positives inline, or row ranges of the corpus shards); no passage is lost or
    repeated."""
    corpus = [{"pid": f"p{i}", "lang": "en", "title": "", "text": f"passage {i}"}
              for i in range(45)]
    for j in range(3):  # 3 corpus shards of 15 rows
        storage.write_parquet(str(tmp_path / "corpus" / f"part-{j:05d}.parquet"),
                              pa.Table.from_pylist(corpus[15 * j:15 * j + 15], schema=CORPUS))
    qrels = [{"qid": f"q{i}", "pid": f"p{i}", "rel": 1} for i in range(0, 45, 3)]  # 15
    storage.write_parquet(str(tmp_path / "qrels.parquet"),
                          pa.Table.from_pylist(qrels, schema=QRELS))
    c_uri, r_uri = str(tmp_path / "corpus"), str(tmp_path / "qrels.parquet")

    def passages(units):
        return [p for u in units for p in u.payload.read()[0]]

    # 15 positives at 5 per unit would be 3 units for 8 actors: 1 per unit, 15 units
    work = {"work_uri": str(tmp_path / "work"), "config_hash": "k"}
    units, n, rows = plan_units(c_uri, r_uri, 5, 2, num_actors=8, **work)
    assert (n, rows, len(units)) == (15, 1, 15) and len(units) >= 8
    assert passages(units) == [q["pid"] for q in qrels] and units[0].size == 2
    units, n, rows = plan_units(c_uri, r_uri, 5, 2, num_actors=2, **work)  # ceil(15 / 4) = 4
    assert (rows, [u.payload.stop for u in units]) == (4, [4, 4, 4, 3])
    # the positives' texts: one work shard per unit, kept for a resume of the same plan
    assert [u.payload.uri.rsplit("/", 1)[1] for u in units] == [
        f"part-{i:05d}.parquet" for i in range(4)]
    assert storage.read_manifest(work["work_uri"])["unit_rows"] == 4
    units, _, rows = plan_units(c_uri, r_uri, 5, 2, num_actors=1, **work)  # shard_rows caps: 5
    assert (rows, len(units)) == (5, 3)
    assert passages(units) == [q["pid"] for q in qrels]
    storage.write_parquet(str(tmp_path / "qrels.parquet"), pa.Table.from_pylist(
        [*qrels, {"qid": "q9", "pid": "nope", "rel": 0}, {"qid": "q8", "pid": "gone", "rel": 1}],
        schema=QRELS))
    work = {"work_uri": str(tmp_path / "work2"), "config_hash": "k2"}  # other inputs: a new key
    with pytest.raises(DataError, match=r"qrels.parquet: row 16 \(qid=q8\): pid=gone not in "
                                        r"corpus"):
        plan_units(c_uri, r_uri, 5, 2, num_actors=1, **work)
    storage.write_parquet(str(tmp_path / "corpus" / "part-00003.parquet"),  # p3 again
                          pa.Table.from_pylist(corpus[3:4], schema=CORPUS))
    storage.write_parquet(str(tmp_path / "qrels.parquet"),
                          pa.Table.from_pylist(qrels, schema=QRELS))
    work = {"work_uri": str(tmp_path / "work3"), "config_hash": "k3"}
    with pytest.raises(DataError, match=r"corpus: pid=p3 is on two corpus rows"):
        plan_units(c_uri, r_uri, 5, 2, num_actors=1, **work)
    storage.remove(str(tmp_path / "corpus" / "part-00003.parquet"))
    # every corpus passage: 45 rows, 8 actors -> ranges of ceil(45 / 16) = 3 rows
    units, n, rows = plan_units(c_uri, None, 20, 1, num_actors=8)
    assert (n, rows, len(units)) == (45, 3, 15)  # >= 8: every actor gets work
    assert passages(units) == [c["pid"] for c in corpus]
    assert len({u.name for u in units}) == len(units)
    units, _, rows = plan_units(c_uri, None, 20, 1, num_actors=1)  # 23 > 15: one per shard
    assert (rows, len(units)) == (20, 3)
    assert plan_units(c_uri, None, 20, 1, num_actors=8, rows_of=lambda n: 7)[2] == 7  # a kept plan


def test_scoring_units_give_every_actor_work(ray_local, tokenizer, tmp_path):
    """64 pairs with ``shard_pairs`` far above them still make two units per actor; a resume
    with another actor count keeps the first run's units (its shards are done)."""
    root = str(tmp_path / "run")
    _, spec, *_ = _write_inputs(root, tokenizer)
    out = storage.join(root, "scores")
    args = (spec, storage.join(root, "cands"), storage.join(root, "queries.parquet"),
            storage.join(root, "corpus.parquet"), out, "k1")
    sc = ScoreConfig(shard_pairs=10_000, cpus_per_actor=0.5, batch_tokens=2000,
                     precision="fp32", num_actors=2)
    m = score_candidates(*args, sc)
    assert m["rows"] == 64 and [s["rows"] for s in m["shards"]] == [16] * 4
    again = score_candidates(*args, sc.model_copy(update={"num_actors": 1}))
    assert again["run"]["shards_run"] == 0 and again["shards"] == m["shards"]


def test_pair_join_equals_the_hash_join(ray_local, tmp_path):
    """One corpus shard through PairJob.run (indexed pairs and queries) gives the rows of
    Arrow's hash join of the same pairs, in the same order, a pid twice in the shard included
    (two rows per pair, which join_pairs then names)."""
    import ray

    from qgscale.data.keyindex import KeyIndex
    from qgscale.data.pidfilter import pid_sum
    from qgscale.runtime import Shard
    from qgscale.teacher.scoring import PAIRS, PairJob

    rng = random.Random(1)
    corpus = [{"pid": f"p{i}", "lang": "en", "title": f"T{i}", "text": f"text {i}"}
              for i in range(40)] + [{"pid": "p7", "lang": "en", "title": "", "text": "again"}]
    uri = str(tmp_path / "part-00000.parquet")
    storage.write_parquet(uri, pa.Table.from_pylist(corpus, schema=CORPUS))
    queries = pa.table({"qid": [f"q{j}" for j in range(30)], "lang": ["de"] * 30,
                        "query": [f"query {j}" for j in range(30)]})
    pairs = pa.table({"qid": [f"q{j}" for j in range(30) for _ in range(5)],
                      "pid": [f"p{rng.randrange(80)}" for _ in range(150)]})  # half not here
    passages = pa.table({"pid": [c["pid"] for c in corpus], "passage": [
        passage_text(c["title"], c["text"]) for c in corpus]})
    want = pairs.join(passages, "pid", join_type="inner").join(
        queries, "qid", join_type="inner").select(PAIRS.names).cast(PAIRS).sort_by(
        [("pid", "ascending"), ("qid", "ascending")])
    refs = [ray.put(KeyIndex.build(pairs, "pid")), ray.put(KeyIndex.build(queries, "qid"))]
    job = PairJob(*refs)
    got, extra = job.run(job.setup("cpu", 1), Shard("part-00000", 1, uri))
    assert got.num_rows == want.num_rows > 20
    # the hash sum of the corpus rows found: p7 counts twice, a pid of another shard never
    needed = set(pairs["pid"].to_pylist())
    assert extra["pid_sum"] == pid_sum(pa.array([c["pid"] for c in corpus if c["pid"] in needed]))
    assert extra["pid_sum"] != pid_sum(pa.array(sorted(needed & {c["pid"] for c in corpus})))
    assert sorted(got.to_pylist(), key=str) == sorted(want.to_pylist(), key=str)
    assert got.select(["pid", "qid"]).to_pylist() == want.select(["pid", "qid"]).to_pylist()
    assert sum(r["pid"] == "p7" for r in got.to_pylist()) == 2 * pairs["pid"].to_pylist().count(
        "p7") > 0


@pytest.mark.parametrize(("lists", "error"), [
    ([{"qid": " ", "pids": ["p1"]}], r"c.parquet: row 0: empty field 'qid'"),
    ([{"qid": "q0", "pids": ["p1"]}, {"qid": "q1", "pids": None}],
     r"c.parquet: row 1 \(qid=q1\): field 'pids' is null"),
    ([{"qid": "q0", "pids": ["p1", ""]}], r"row 0 \(qid=q0\): field 'pids' holds an empty/null"),
    ([{"qid": "q0", "pids": ["p1", None]}], r"row 0 \(qid=q0\): field 'pids' holds an empty/nu"),
    ([{"qid": "q0", "pids": ["p1"]}, {"qid": "q1", "pids": ["p2", "p3", "p2"]},
      {"qid": "q2", "pids": ["p1", "p1"]}], r"row 1 \(qid=q1\): field 'pids' lists a pid twice"),
    ([{"qid": "q0", "pids": []}, {"qid": "q1", "pids": ["p1"]}, {"qid": "q0", "pids": ["p2"]}],
     r"c.parquet: row 2 \(qid=q0\): qid also in \S*c.parquet row 0"),
    ([{"qid": "q0", "pids": ["p1", " "]}], r"row 0 \(qid=q0\): field 'pids' holds an empty"),
    # several defects: the first bad row, whatever its kind
    ([{"qid": "q0", "pids": None}, {"qid": "", "pids": ["p1"]}], r"row 0 \(qid=q0\): field "
     r"'pids' is null"),
    ([{"qid": "q0", "pids": ["p1"]}, {"qid": "q0", "pids": ["p2"]}, {"qid": "q2", "pids": [
        "p3", "p3"]}], r"row 1 \(qid=q0\): qid also in \S*c.parquet row 0"),
    ([{"qid": "q0", "pids": ["p1"]}, {"qid": "q1", "pids": ["p2", "p2"]},
      {"qid": "q0", "pids": ["p3"]}], r"row 1 \(qid=q1\): field 'pids' lists a pid twice"),
])
def test_bad_candidate_lists_named(tmp_path, lists, error):
    f = str(tmp_path / "c.parquet")
    storage.write_parquet(f, pa.Table.from_pylist([{**r, "scores": None} for r in lists],
                                                  schema=CANDIDATES))
    with pytest.raises(DataError, match=error):
        candidate_pairs(f)


def test_candidate_pairs_across_files(tmp_path):
    """Pairs keep their file and row; the first ``first`` of each list; a qid in two files
    names both."""
    a, b = str(tmp_path / "a" / "part-00000.parquet"), str(tmp_path / "b" / "part-00000.parquet")
    storage.write_parquet(a, pa.Table.from_pylist(
        [{"qid": "q0", "pids": ["p1", "p2", "p3"], "scores": None},
         {"qid": "q1", "pids": ["p4"], "scores": None}], schema=CANDIDATES))
    storage.write_parquet(b, pa.Table.from_pylist(
        [{"qid": "q2", "pids": ["p2", "p5"], "scores": None}], schema=CANDIDATES))
    t = candidate_pairs([str(tmp_path / "a"), str(tmp_path / "b")], first=2)
    assert list(zip(*(t[c].to_pylist() for c in ("qid", "pid", "file", "row")),
                    strict=True)) == [("q0", "p1", a, 0), ("q0", "p2", a, 0), ("q1", "p4", a, 1),
                                      ("q2", "p2", b, 0), ("q2", "p5", b, 0)]
    storage.write_parquet(b, pa.Table.from_pylist(
        [{"qid": "q2", "pids": ["p2"], "scores": None},
         {"qid": "q1", "pids": ["p5"], "scores": None}], schema=CANDIDATES))
    with pytest.raises(DataError, match=r"b/part-00000.parquet: row 1 \(qid=q1\): qid also in "
                                        r"\S*a/part-00000.parquet row 1"):
        candidate_pairs([str(tmp_path / "a"), str(tmp_path / "b")])


def _pair_inputs(root: str, n_pass: int = 30, n_q: int = 40, k: int = 6) -> dict[str, str]:
    """Corpus (2 shards), queries (2 files) and candidate lists (3 files) without a model."""
    rng = random.Random(2)
    corpus = [{"pid": f"p{i}", "lang": "en", "title": f"T{i}" if i % 3 else "",
               "text": f"passage {i} text"} for i in range(n_pass)]
    queries = [{"qid": f"q{i}", "lang": rng.choice(["de", "es"]), "text": f"query {i}"}
               for i in range(n_q)]
    cands = [{"qid": q["qid"], "pids": rng.sample([c["pid"] for c in corpus], k),
              "scores": None} for q in queries]
    out = {name: storage.join(root, name) for name in ("corpus", "queries", "cands")}
    for i in range(2):
        storage.write_parquet(storage.join(out["corpus"], f"part-{i:05d}.parquet"),
                              pa.Table.from_pylist(corpus[i::2], schema=CORPUS))
        storage.write_parquet(storage.join(out["queries"], f"part-{i:05d}.parquet"),
                              pa.Table.from_pylist(queries[i::2], schema=QUERIES))
    for i in range(3):
        storage.write_parquet(storage.join(out["cands"], f"part-{i:05d}.parquet"),
                              pa.Table.from_pylist(cands[i::3], schema=CANDIDATES))
    return out


def test_ray_data_pair_join_equals_the_actor_join(ray_local, tmp_path):
    """Above ``ray_from`` candidate lists Ray Data workers write the pairs the actors' join
    writes (each list's first ``first``), every shard sorted so that a passage's pairs are
    adjacent; the manifests count the same pairs; a finished join is reused."""
    from qgscale.teacher.scoring import join_pairs

    d = _pair_inputs(str(tmp_path))
    sc = ScoreConfig(num_actors=1, cpus_per_actor=0.5)
    args = (d["cands"], d["queries"], d["corpus"])
    actors = join_pairs(*args, str(tmp_path / "a"), "k1", sc, 4, ray_from=10_000)
    ray_data = join_pairs(*args, str(tmp_path / "r"), "k1", sc, 4, ray_from=40,
                          num_partitions=3)
    assert ray_data["run"]["joined_by"] == "ray-data" and "joined_by" not in actors["run"]
    assert actors["rows"] == ray_data["rows"] == ray_data["pairs"] == 160
    want = storage.read_parquet(str(tmp_path / "a")).to_pylist()
    got_shards = [storage.read_parquet(storage.join(str(tmp_path / "r"), s["file"]))
                  for s in ray_data["shards"]]
    got = [r for t in got_shards for r in t.to_pylist()]
    assert sorted(got, key=str) == sorted(want, key=str)
    for t in got_shards:  # a passage's pairs adjacent: one run per pid
        pids = t.column("pid").to_pylist()
        assert len({p for p in pids}) == sum(1 for i, p in enumerate(pids)
                                             if i == 0 or p != pids[i - 1])
    cands = storage.read_parquet(d["cands"]).to_pylist()
    assert {(r["qid"], r["pid"]) for r in got} == {(c["qid"], p) for c in cands
                                                   for p in c["pids"][:4]}
    again = join_pairs(*args, str(tmp_path / "r"), "k1", sc, 4, ray_from=0)
    assert again == ray_data  # its manifest, not a second join
    other = join_pairs(*args, str(tmp_path / "r"), "k2", sc, None, ray_from=0,
                       num_partitions=2)  # another key: joined again, every candidate
    assert other["rows"] == 240 and other["config_hash"] == "k2"
    lost = storage.join(str(tmp_path / "r"), other["shards"][0]["file"])
    storage.remove(lost)  # a listed shard gone: joined again, not reused
    rebuilt = join_pairs(*args, str(tmp_path / "r"), "k2", sc, None, ray_from=0,
                         num_partitions=2)
    assert rebuilt["time"] > other["time"] and rebuilt["rows"] == 240
    every = join_pairs(*args, str(tmp_path / "a6"), "k2", sc, None, ray_from=10_000)
    assert every["rows"] == 240 and sorted(storage.read_parquet(str(tmp_path / "r")).to_pylist(),
                                           key=str) == sorted(
        storage.read_parquet(str(tmp_path / "a6")).to_pylist(), key=str)


def test_ray_data_pair_join_names_bad_input(ray_local, tmp_path):
    """The Ray Data join raises the actors' join's errors: a list defect, a qid listed in two
    files, a qid not in the queries, a pid not in the corpus (file and row of the list), a
    query on two rows, a passage on two corpus rows; nothing is finalized."""
    from qgscale.teacher.scoring import join_pairs

    d = _pair_inputs(str(tmp_path / "in"), n_q=6)
    sc = ScoreConfig(num_actors=1, cpus_per_actor=0.5)
    cand = storage.join(d["cands"], "part-00001.parquet")
    good = storage.read_parquet(cand).to_pylist()

    def fails(rows, match, **kw):
        storage.write_parquet(cand, pa.Table.from_pylist(rows, schema=CANDIDATES))
        out = str(tmp_path / "out")
        with pytest.raises(DataError, match=match):
            join_pairs(kw.get("cands", d["cands"]), kw.get("queries", d["queries"]),
                       kw.get("corpus", d["corpus"]), out, "k", sc, ray_from=0,
                       num_partitions=2)
        assert not storage.exists(storage.join(out, storage.MANIFEST))

    fails([good[0], {**good[1], "pids": ["p1", "p2", "p1"]}],
          r"cands/part-00001.parquet: row 1 \(qid=q4\): field 'pids' lists a pid twice")
    fails([good[0], {**good[1], "qid": " "}], r"cands/part-00001.parquet: row 1: empty field "
          r"'qid'")  # not "qid also in": the lists are checked before the qid count
    fails([good[0], {**good[1], "qid": "q0"}], r"cands/part-00001.parquet: row 1 \(qid=q0\): "
          r"qid also in \S*cands/part-00000.parquet row 0")
    fails([good[0], {**good[1], "qid": "zz"}],
          r"cands/part-00001.parquet: row 1: qid=zz not in queries")
    fails([good[0], {**good[1], "pids": ["p1", "nope"]}],
          r"cands/part-00001.parquet: row 1 \(qid=q4\): pid=nope not in corpus")
    queries = storage.read_parquet(d["queries"]).to_pylist()
    twice = storage.join(str(tmp_path), "queries2.parquet")
    storage.write_parquet(twice, pa.Table.from_pylist(queries + queries[:1], schema=QUERIES))
    fails(good, r"queries2.parquet: row 6 \(qid=q0\): qid also in \S*queries2.parquet row 0",
          queries=twice)
    corpus2 = storage.join(str(tmp_path), "corpus2")
    for k in range(2):  # every passage on two shards
        storage.write_parquet(storage.join(corpus2, f"part-{k:05d}.parquet"),
                              storage.read_parquet(d["corpus"]))
    fails(good, r"corpus2: pid=p\d+ \(a candidate of qid=q\d\) is on 2 corpus rows",
          corpus=corpus2)
    fails([good[0], {**good[1], "pids": [good[1]["pids"][0], "nope"]}], r"cands/part-00001"
          r".parquet: row 1 \(qid=q4\): pid=nope not in corpus", corpus=corpus2)
    with pytest.raises(MissingInputError, match="nowhere: queries not found"):
        join_pairs(d["cands"], str(tmp_path / "nowhere"), d["corpus"], str(tmp_path / "o"),
                   "k", sc, ray_from=0)
