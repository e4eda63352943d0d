"""BM25 with global statistics: shards merged == one index; scores == bm25s' (Lucene BM25)."""

from __future__ import annotations

import pickle

import numpy as np
import pyarrow as pa
import pytest

from qgscale.data import readers
from qgscale.data.schema import passage_text
from qgscale.retrieval import bm25

LANGS = ["en", "zh", "th", "hi"]


@pytest.fixture(scope="module")
def xquad():
    """The bundled XQuAD paragraphs (4 languages, 960 passages) and 400 of its questions."""
    t = readers.read_xquad(readers.bundled("xquad"), LANGS, LANGS)
    corpus = t["train/corpus"] + t["test/corpus"]
    queries = t["train/queries"] + t["test/queries"]
    pids = [p["pid"] for p in corpus]
    texts = [passage_text(p["title"], p["text"]) for p in corpus]
    return pids, texts, [q["text"] for q in queries[::len(queries) // 400]][:400]


def merge_topk(results: list, k: int) -> tuple[list, list]:
    """The shards' ``(pids, scores)`` of the same queries merged as the bm25 stages merge
    them (``sharded.merge_rows``)."""
    from qgscale.retrieval.sharded import HITS, merge_rows

    t = merge_rows([pa.table({"qid": [str(i) for i in range(len(p))], "lang": [""] * len(p),
                              "pids": p, "scores": [x.tolist() for x in s],
                              "hits": [[False] * len(x) for x in p]}, schema=HITS)
                    for p, s in results], k)
    return t.column("pids").to_pylist(), [np.asarray(x, np.float32)
                                          for x in t.column("scores").to_pylist()]


def test_tokenize_by_script():
    assert bm25.tokenize("Straße, COVID-19 and iPhone12!") == [
        "strasse", "covid", "19", "and", "iphone12"]
    assert bm25.tokenize("東京タワー") == ["東京", "京タ", "タワ", "ワー"]  # ja: bigrams
    assert bm25.tokenize("北京是首都") == ["北京", "京是", "是首", "首都"]  # zh
    assert bm25.tokenize("서울에서 살아요") == ["서울", "울에", "에서", "살아", "아요"]  # ko
    # th: bigrams of grapheme clusters (a tone mark stays on its consonant)
    assert bm25.tokenize("ง่าย") == ["ง่า", "าย"]
    assert bm25.tokenize("หิมะ") == ["หิม", "มะ"]
    # hi: vowel signs are marks, not separators (Python's \w would split the word)
    assert bm25.tokenize("हिन्दी भाषा") == ["हिन्दी", "भाषा"]
    assert bm25.tokenize("ｱｲ 日") == ["アイ", "日"]  # NFKC; a lone character is a unigram
    assert bm25.tokenize("日本iPhone") == ["日本", "iphone"]  # a script change splits


def test_three_shards_equal_one_index(xquad):
    pids, texts, queries = xquad
    k = 20
    one_pids, one_scores = bm25.search(texts, pids, queries, k)
    order = np.random.default_rng(0).permutation(len(pids))  # shards mix languages
    cuts = [0, 100, 550, len(pids)]  # uneven shard sizes
    shards = [([texts[i] for i in order[a:b]], [pids[i] for i in order[a:b]])
              for a, b in zip(cuts, cuts[1:], strict=False)]
    stats = bm25.merge_stats(pickle.loads(pickle.dumps(bm25.shard_stats(t)))
                             for t, _ in shards)
    whole = bm25.index_shard(texts, pids).stats()
    assert (stats.df, stats.n_docs, stats.total_len) == (whole.df, whole.n_docs,
                                                         whole.total_len)
    per_shard = [bm25.search_shard(t, p, queries, stats, k) for t, p in shards]
    got_pids, got_scores = merge_topk(per_shard, k)
    assert got_pids == one_pids
    for a, b in zip(got_scores, one_scores, strict=True):
        assert a.dtype == np.float32 and np.array_equal(a, b)  # bit for bit
    assert sum(len(p) == k for p in one_pids) > 350  # the test compares full top-k lists
    # Statistics of the query tokens only (small to ship and merge): the same results.
    vocab = bm25.query_vocab(queries)
    small = bm25.merge_stats(bm25.shard_stats(t, vocab) for t, _ in shards)
    assert len(small.df) < len(stats.df) / 5 and small.n_docs == stats.n_docs
    assert small.df == {t: n for t, n in stats.df.items() if t in vocab}
    assert bm25.index_shard(texts, pids).stats(vocab).df == small.df
    again = merge_topk([bm25.search_shard(t, p, queries, small, k) for t, p in shards], k)
    assert again[0] == one_pids
    assert all(np.array_equal(a, b) for a, b in zip(again[1], one_scores, strict=True))
    # Each shard's own statistics give other scores: merging those is not one index.
    local = [bm25.search_shard(t, p, queries, bm25.shard_stats(t), k) for t, p in shards]
    loc_pids, loc_scores = merge_topk(local, k)
    assert loc_pids != one_pids
    assert not all(np.array_equal(a, b) for a, b in zip(loc_scores, one_scores, strict=True))


def test_ties_are_broken_by_pid_in_shards_and_merge():
    texts = ["apple pie"] * 6 + ["apple"] * 2
    pids = ["p5", "p0", "p3", "p1", "p4", "p2", "q1", "q0"]
    one = bm25.search(texts, pids, ["apple pie"], 4)
    assert one[0] == [["p0", "p1", "p2", "p3"]]
    stats = bm25.shard_stats(texts)
    shards = [bm25.search_shard(texts[a:b], pids[a:b], ["apple pie"], stats, 4)
              for a, b in [(0, 3), (3, 5), (5, 8)]]
    merged = merge_topk(shards, 4)
    assert merged[0] == one[0] and np.array_equal(merged[1][0], one[1][0])


def test_scores_match_bm25s_lucene(xquad):
    import bm25s  # the reference implementation (test extra)
    pids, texts, queries = xquad
    tokens = [bm25.tokenize(t) for t in texts]
    ref = bm25s.BM25(method="lucene", k1=bm25.K1, b=bm25.B)
    ref.index(tokens, show_progress=False)
    got_pids, got_scores = bm25.search(texts, pids, queries, len(pids))
    pos = {p: i for i, p in enumerate(pids)}
    checked = 0
    for q, p, s in zip(queries, got_pids, got_scores, strict=True):
        q_tokens = bm25.tokenize(q)
        if not any(t in ref.vocab_dict for t in q_tokens):
            assert p == []
            continue
        expected = ref.get_scores(q_tokens)
        assert set(p) == {pids[i] for i in np.flatnonzero(expected)}  # every matching one
        np.testing.assert_allclose(s, expected[[pos[x] for x in p]], rtol=2e-6)
        checked += 1
    assert checked > 390


def test_stats_that_miss_a_shard_are_refused():
    a, b = ["red fish", "blue fish"], ["one fish", "two fish"]
    only_a = bm25.shard_stats(a)
    with pytest.raises(ValueError, match="do not include this shard"):
        bm25.search_shard(a + b, ["1", "2", "3", "4"], ["fish"], only_a, 2)
    with pytest.raises(ValueError, match="'blue' a document frequency of 0"):
        bm25.search_shard(a, ["1", "2"], ["blue"], bm25.shard_stats(a, {"red"}), 2)
    both = bm25.merge_stats([only_a, bm25.shard_stats(b)])
    assert both.n_docs == 4 and both.df["fish"] == 4 and both.avgdl == 2.0
    other = bm25.Stats(tokenizer="whitespace")
    with pytest.raises(ValueError, match="cannot merge"):
        bm25.merge_stats([only_a, other])
    with pytest.raises(ValueError, match="2 texts but 1 pids"):
        bm25.index_shard(a, ["1"])


def test_no_match_and_empty_inputs():
    pids, scores = bm25.search(["alpha beta", ""], ["a", "b"], ["gamma", "", "beta"], 5)
    assert pids == [[], [], ["a"]] and [len(s) for s in scores] == [0, 0, 1]
    empty = bm25.index_shard([], [])
    got = empty.search(["alpha"], bm25.shard_stats(["alpha"]), 3)
    assert got[0] == [[]] and len(got[1][0]) == 0


def test_ray_shard_jobs_equal_one_index_with_language_views_and_answer_hits(
        xquad, tmp_path, ray_local, monkeypatch):
    """The bm25 stages' driver (``qgscale.retrieval.sharded.retrieve``: statistics and search
    as Ray shard jobs over 4 parquet shards, folded top-k) gives one index's ranking; the
    per-language lists equal one index of that language searched with the whole corpus'
    statistics; answer hits are DPR's match on the passage text. Actors search in blocks of
    9 queries, merge the 10 shards' lists in a tree of fan-in 2 (10 -> 5 -> 3 -> 2 outputs,
    a merge job folding blocks of 6 rows) and the driver folds blocks of 7 queries (short
    last blocks): the same lists, in the queries' order. A rerun with the same key runs no
    job again."""
    from qgscale import storage
    from qgscale.config import BM25Config
    from qgscale.data.schema import CORPUS
    from qgscale.retrieval import sharded
    from qgscale.retrieval.answers import has_answer

    t = readers.read_xquad(readers.bundled("xquad"), LANGS, LANGS)
    corpus = t["train/corpus"] + t["test/corpus"]
    queries = (t["train/queries"] + t["test/queries"])[::97][:40]
    uri = str(tmp_path / "corpus")
    storage.ShardWriter(uri).write_rows(corpus, 100, CORPUS)
    qids, texts = [q["qid"] for q in queries], [q["text"] for q in queries]
    pids, ptexts = xquad[0], xquad[1]
    want_p, want_s = bm25.search(ptexts, pids, texts, 10)
    bare = {p["pid"]: p["text"] for p in corpus}
    # answers: two words of the 4th passage each query retrieves (a hit at rank 4 at least)
    answers = {q: [" ".join(bare[want_p[i][3]].split()[5:7])] if len(want_p[i]) > 3 else []
               for i, q in enumerate(qids)}
    shard_langs = [set(storage.read_parquet(f, ["lang"]).column("lang").to_pylist())
                   for f in storage.list_files(uri, ".parquet")]
    assert any(x != set(LANGS) for x in shard_langs)  # a shard without some language
    cfg = BM25Config(num_actors=1)
    monkeypatch.setattr(sharded, "SEARCH_BLOCK", 9)
    monkeypatch.setattr(sharded, "FOLD_ENTRIES", 130)  # a merge job's blocks: 6 rows
    runs: list[tuple[str, int, int]] = []

    def run_shards(job, units, *args, **kw):
        stats = sharded_run_shards(job, units, *args, **kw)
        runs.append((kw["desc"], len(units), stats["shards_run"]))
        return stats

    sharded_run_shards = sharded.run_shards
    monkeypatch.setattr(sharded, "run_shards", run_shards)
    blocks = list(sharded.retrieve(uri, qids, texts, 10, str(tmp_path / "work"), "k", cfg,
                                   langs=LANGS, answers=answers, block=7, fan_in=2))
    assert runs == [("bm25 statistics", 10, 10), ("bm25 search", 10, 10),
                    ("bm25 merge 1", 5, 5), ("bm25 merge 2", 3, 3), ("bm25 merge 3", 2, 2)]
    again = list(sharded.retrieve(uri, qids, texts, 10, str(tmp_path / "work"), "k", cfg,
                                  langs=LANGS, answers=answers, block=7, fan_in=2))
    assert again == blocks and [n for _, _, n in runs[5:]] == [0] * 5
    # other groups (fan-in 3: 10 -> 4 -> 2) are merges of other inputs: redone, not reused
    del runs[:]
    other = list(sharded.retrieve(uri, qids, texts, 10, str(tmp_path / "work"), "k", cfg,
                                  langs=LANGS, answers=answers, block=7, fan_in=3))
    assert other == blocks and runs[2:] == [("bm25 merge 1", 4, 4), ("bm25 merge 2", 2, 2)]
    with pytest.raises(ValueError, match="fan_in=1"):
        list(sharded.retrieve(uri, qids, texts, 10, str(tmp_path / "work"), "k", cfg,
                              fan_in=1))
    assert [len(b) for b in blocks] == [7 * (1 + len(LANGS))] * 5 + [5 * (1 + len(LANGS))]
    got = {key: ranked for b in blocks for key, ranked in b.items()}
    assert [q for q, lang in got if not lang] == qids  # the queries' order
    assert any(h for q in qids for _, _, h in got[(q, "")])  # some passage has an answer
    for i, q in enumerate(qids):
        ranked = got[(q, "")]
        assert [p for _, p, _ in ranked] == want_p[i]
        assert np.array_equal(np.float32([-s for s, _, _ in ranked]), want_s[i])
        assert [h for _, _, h in ranked] == [has_answer(answers[q], bare[p]) for _, p, _ in
                                             ranked]
    stats = bm25.merge_stats([bm25.shard_stats(ptexts)])
    for lang in LANGS:
        keep = [i for i, p in enumerate(corpus) if p["lang"] == lang]
        index = bm25.index_shard([ptexts[i] for i in keep], [pids[i] for i in keep])
        lp, _ = index.search(texts, stats, 10)
        assert [[p for _, p, _ in got[(q, lang)]] for q in qids] == lp
    # the same work folder and key for other queries: its rows are not theirs, an error
    from qgscale.errors import DataError

    with pytest.raises(DataError, match="not the queries x views of this search"):
        list(sharded.retrieve(uri, qids[::-1], texts[::-1], 10, str(tmp_path / "work"), "k",
                              cfg, langs=LANGS, answers=answers))


def test_bm25_eval_run_per_language_scored_in_blocks(tmp_path, ray_local):
    """Stage bm25-eval over a 4-language corpus (``eval.pairs``): each query's pooled row,
    then one row per corpus language, sorted by qid; the BM25 baseline reading that run 3
    queries at a time gives the metrics of one in-memory pass over the runs of one index
    (pooled) and one per language, all with the whole corpus' statistics."""
    from pathlib import Path

    from qgscale import config, storage
    from qgscale.data.schema import CORPUS, QRELS, QUERIES
    from qgscale.eval import metrics
    from qgscale.eval.evaluate import evaluate_baseline
    from qgscale.eval.metrics import metric_names
    from qgscale.retrieval.sharded import run_bm25_eval

    t = readers.read_xquad(readers.bundled("xquad"), LANGS, LANGS)
    corpus = t["test/corpus"]
    queries = [q for lang in LANGS for q in [x for x in t["test/queries"]
                                             if x["lang"] == lang][::31][:5]]
    assert {q["lang"] for q in queries} == set(LANGS)
    qids = [q["qid"] for q in queries]
    qrels = [r for r in t["test/qrels"] if r["qid"] in set(qids)]
    data = tmp_path / "data"
    for name, rows, schema, n in (("corpus", corpus, CORPUS, 50), ("queries", queries,
                                  QUERIES, 20), ("qrels", qrels, QRELS, 100)):
        storage.ShardWriter(str(data / "test" / name)).write_rows(rows, n, schema)
    cfg = config.load(Path(__file__).parents[1] / "configs" / "demo.yaml",
                      [f"run.root={tmp_path / 'run'}", "eval.top_k=10", "eval.k=[1,5,10]",
                       "bm25.num_actors=1"])
    out = str(tmp_path / "bm25-eval")
    manifest = run_bm25_eval(cfg, str(data / "test" / "queries"), str(data / "test" / "corpus"),
                             out, "k")
    assert manifest["by_lang"] and manifest["rows"] == 20 * 5
    run = storage.read_parquet(storage.join(out, "run.parquet")).to_pylist()
    assert [(r["qid"], r["lang"]) for r in run] == [(q, x) for q in sorted(qids)
                                                    for x in ["", *sorted(LANGS)]]
    got = evaluate_baseline(cfg, storage.join(out, "run.parquet"), str(data), "test",
                            str(data / "test" / "corpus"), str(tmp_path / "reports"), block=3)

    pids, ptexts = [p["pid"] for p in corpus], [passage_text(p["title"], p["text"])
                                                for p in corpus]
    texts = [q["text"] for q in queries]
    stats = bm25.merge_stats([bm25.shard_stats(ptexts)])

    def as_run(found: tuple, which: list[int]) -> dict:
        return {qids[i]: dict(zip(found[0][i], found[1][i].tolist(), strict=True))
                for i in which}

    everyone = list(range(len(qids)))
    pooled = as_run(bm25.search(ptexts, pids, texts, 10), everyone)
    pair_runs = {}
    for cl in LANGS:
        keep = [i for i, p in enumerate(corpus) if p["lang"] == cl]
        found = bm25.index_shard([ptexts[i] for i in keep], [pids[i] for i in keep]).search(
            texts, stats, 10)
        for ql in LANGS:
            pair_runs[(ql, cl)] = as_run(found, [i for i in everyone
                                                 if queries[i]["lang"] == ql])
    rels: dict = {}
    for r in qrels:
        rels.setdefault(r["qid"], {})[r["pid"]] = r["rel"]
    want = metrics.evaluate_languages(pair_runs, rels, {q["qid"]: q["lang"] for q in queries},
                                      {p["pid"]: p["lang"] for p in corpus}, pooled,
                                      metric_names([1, 5, 10]))
    assert set(got["pairs"]) == {f"{a}->{b}" for a in LANGS for b in LANGS}
    for key in ("pairs", "macro", "query_langs"):
        assert set(got[key]) == set(want[key]), key
        for name, row in want[key].items():
            assert got[key][name] == pytest.approx(row), (key, name)
    assert got["macro"]["monolingual"]["mrr@10"] > 0.5  # BM25 finds same-language positives

    # a query of the split without a BM25 result: an error naming it, and no run copy
    from qgscale.errors import DataError, MissingInputError

    storage.ShardWriter(str(data / "more" / "queries")).write_rows(
        [*queries, {"qid": "en:new", "lang": "en", "text": "a new question"}], 100, QUERIES)
    storage.ShardWriter(str(data / "more" / "qrels")).write_rows(qrels, 100, QRELS)
    with pytest.raises(DataError, match="no BM25 result for query 'en:new'"):
        evaluate_baseline(cfg, storage.join(out, "run.parquet"), str(data), "more",
                          str(data / "test" / "corpus"), str(tmp_path / "reports"))
    assert not storage.exists(str(tmp_path / "reports" / "more" / "run.parquet"))
    with pytest.raises(MissingInputError, match="BM25 run not found"):
        evaluate_baseline(cfg, str(tmp_path / "none.parquet"), str(data), "test",
                          str(data / "test" / "corpus"), str(tmp_path / "reports"))


    # stage bm25: answers that no passage contains give no training example, an error, and
    # no examples folder left behind as if it were output
    from qgscale.data.schema import ANSWERS
    from qgscale.retrieval.sharded import run_bm25_train

    storage.ShardWriter(str(data / "answers")).write_rows(
        [{"qid": q, "answers": ["zzqx nowhere"]} for q in qids], 100, ANSWERS)
    train_out = tmp_path / "bm25-train"
    with pytest.raises(DataError, match="no training query has an answer"):
        run_bm25_train(cfg, str(data / "test" / "queries"), str(data / "answers"),
                       str(data / "test" / "corpus"), str(train_out), "k")
    assert not (train_out / "examples").exists() and not (train_out / "qrels").exists()


def test_merge_job_refuses_outputs_of_another_search(tmp_path):
    """A merge job's inputs must be the same (qid, lang) rows: another search's output, or
    one with fewer rows, is a DataError naming it; the same rows merge (two of 3 entries)."""
    from qgscale import storage
    from qgscale.errors import DataError
    from qgscale.retrieval.sharded import HITS, MergeJob
    from qgscale.runtime import Shard

    def output(name: str, qids: list[str], pids: list[str]) -> str:
        uri = str(tmp_path / f"{name}.parquet")
        storage.write_parquet(uri, pa.table({
            "qid": qids, "lang": [""] * len(qids), "pids": [pids] * len(qids),
            "scores": [[2.0, 1.0][:len(pids)]] * len(qids),
            "hits": [[False] * len(pids)] * len(qids)}, schema=HITS))
        return uri

    a, b = output("a", ["q1", "q2"], ["p1", "p2"]), output("b", ["q1", "q2"], ["p0"])
    merged = MergeJob(2, 2, 1).run(None, Shard("m", 2, (a, b)))
    assert merged.column("pids").to_pylist() == [["p0", "p1"]] * 2
    for bad in (output("c", ["q1", "q3"], ["p3"]), output("d", ["q1"], ["p3"])):
        with pytest.raises(DataError, match=f"{bad}: its rows are not the queries x views"):
            MergeJob(2, 2, 1).run(None, Shard("m", 2, (a, bad)))


def test_eval_job_bm25_key_follows_the_corpus_files(tmp_path):
    """The eval job's BM25 baseline run is redone when the corpus at the same path is
    re-prepared (its key hashes the corpus's files), not only when its path changes."""
    import time

    from qgscale import storage
    from qgscale.config import parse
    from qgscale.eval.__main__ import bm25_run_key

    cfg = parse({})
    queries, corpus = str(tmp_path / "queries"), str(tmp_path / "corpus")
    for uri in (queries, corpus):
        storage.write_bytes(storage.join(uri, "part-00000.parquet"), b"a")
    key = bm25_run_key(cfg, queries, corpus)
    assert bm25_run_key(cfg, queries, corpus) == key
    time.sleep(0.01)
    storage.write_bytes(storage.join(corpus, "part-00000.parquet"), b"bb")
    assert bm25_run_key(cfg, queries, corpus) != key
