"""The answer metrics from per-passage features (one corpus pass) equal those on the texts."""

from __future__ import annotations

import os
import random

import pytest

from qgscale import storage
from qgscale.data.prepare import write_tables
from qgscale.data.schema import passage_text
from qgscale.errors import DataError
from qgscale.eval import metrics as M
from qgscale.eval.evaluate import BlockScorer, EvalData

WORDS = ["a", "b", "ab", "ba", "a,", ".", "aa", "b.", "Ab", "(b)"]
ANSWERS = ["a b", "b a", "ab a", "a a b", "b", "a . a", "yes", "ba ab", "a, b", " a", "a ",
           "b , a", "ab ba ab", "x", "a b a b a b a", "no", "", " "]


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}/") if isinstance(v, dict) else {prefix + k: v})
    return out


@pytest.mark.parametrize("tokenize", [str.split, M.word_tokenize], ids=["split", "nltk"])
def test_replay_of_passage_features_is_answer_hit(tokenize):
    """Random rankings of short passages whose answers cross passage boundaries (across one,
    two or more passages, some of no token), cut at every token count: the replay of each
    passage's features gives answer_hit's verdict."""
    rng = random.Random(7)
    crossing = 0
    for _ in range(3000):
        texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randrange(0, 5)))
                 for _ in range(rng.randrange(0, 6))]
        answers = rng.sample(ANSWERS, rng.randrange(1, 4))
        span = [a for a in answers if a not in M.YES_NO]
        # each passage's edges cut for the largest reach of its queries: at least this one's
        more = M.crossing_reach(span) + rng.choice([0, 0, 1, 5])
        feats = [M.kt_features(tokenize(t), span, more) for t in texts]
        for max_tokens in (1, 2, 3, 5, 8, 2000):
            want = M.answer_hit(texts, answers, max_tokens, tokenize)
            if want is None:
                assert not span
                continue
            assert M.replay_hit(feats, span, max_tokens) == want, (texts, answers, max_tokens)
            crossing += want and not any(f[1] and f[1] <= max_tokens for f in feats)
    assert crossing > 100  # hits that only a match across passages gives


def _corpus_and_runs(n_passages: int = 60, n_queries: int = 30, seed: int = 3):
    rng = random.Random(seed)
    corpus = [{"pid": f"p{i}", "lang": "en" if i % 3 else "de", "title": rng.choice(WORDS),
               "text": " ".join(rng.choice(WORDS) for _ in range(rng.randrange(1, 6)))}
              for i in range(n_passages)]
    plang = {r["pid"]: r["lang"] for r in corpus}
    qids = [f"q{i}" for i in range(n_queries)]
    qlang = {q: "de" if i % 4 == 0 else "en" for i, q in enumerate(qids)}
    answers = {q: rng.sample(ANSWERS, rng.randrange(1, 3)) for q in qids[:-3]}
    qrels = {q: {f"p{rng.randrange(n_passages)}": 1} for q in qids[::2]}
    pooled = {q: {f"p{p}": rng.random() for p in rng.sample(range(n_passages), 12)}
              for q in qids}
    pair_runs = {}
    for ql in ("de", "en"):
        for cl in ("de", "en"):
            pair_runs[(ql, cl)] = {q: {p: s for p, s in pooled[q].items() if plang[p] == cl}
                                   for q in qids if qlang[q] == ql}
    return corpus, plang, qids, qlang, answers, qrels, pooled, pair_runs


def test_block_scorer_answer_metrics_equal_the_metrics_on_texts(tmp_path, monkeypatch):
    """Three blocks over a corpus of four shards, two corpus languages (pair and pooled
    views): every metric equals evaluate_languages on the texts, and the corpus's text is
    read once per shard, not once per block."""
    corpus, plang, qids, qlang, answers, qrels, pooled, pair_runs = _corpus_and_runs()
    write_tables({"corpus": corpus}, str(tmp_path / "data"), shard_rows=15)
    corpus_uri = str(tmp_path / "data" / "corpus")
    assert len(storage.list_files(corpus_uri, ".parquet")) == 4
    ks = [1, 3, 12]
    texts = {r["pid"]: r["text"] for r in corpus}  # R@kt matches texts without titles
    want = M.evaluate_languages(pair_runs, qrels, qlang, plang, pooled, M.metric_names(ks),
                                answers, texts, bodies=texts, accuracy_ks=ks)
    assert want["pairs"]["de->en"]["n_kt"] and want["pairs"]["en->de"]["n_acc"]
    titled = M.evaluate_languages(  # what "title text" would give: other R@kt numbers
        pair_runs, qrels, qlang, plang, pooled, M.metric_names(ks), answers,
        {r["pid"]: passage_text(r["title"], r["text"]) for r in corpus}, bodies=texts,
        accuracy_ks=ks)
    assert any(titled["pairs"][p]["r@2kt"] != want["pairs"][p]["r@2kt"] for p in want["pairs"])

    reads = []
    real = storage.read_parquet

    def counting(uri, columns=None, *a, **kw):
        reads.append((uri, tuple(columns or ())))
        return real(uri, columns, *a, **kw)

    monkeypatch.setattr(storage, "read_parquet", counting)
    data = EvalData(qids, qids, qlang, qrels, corpus_uri, answers)
    scorer = BlockScorer(data, ks)
    for start in range(0, len(qids), 10):
        block = qids[start:start + 10]
        scorer.add(block, {q: pooled[q] for q in block},
                   {k: {q: r[q] for q in block if q in r} for k, r in pair_runs.items()})
    scratch = scorer.answer_runs.dir
    assert len(list(scratch.iterdir())) == 3  # the blocks' rankings
    got = scorer.result()
    assert not scratch.exists()
    assert _flat(got) == pytest.approx(_flat(want))
    text_reads = [u for u, cols in reads if "text" in cols]
    assert sorted(text_reads) == sorted(storage.list_files(corpus_uri, ".parquet"))


def test_answer_metrics_name_a_missing_or_repeated_passage(tmp_path):
    corpus, plang, qids, qlang, answers, qrels, pooled, pair_runs = _corpus_and_runs()
    write_tables({"corpus": corpus[:50]}, str(tmp_path / "short"), shard_rows=25)
    data = EvalData(qids, qids, qlang, {}, str(tmp_path / "short" / "corpus"), answers)
    run = {"q0": {"p1": 2.0, "p55": 1.0}}
    scorer = BlockScorer(data, [1])
    scorer.add(["q0"], run, {("de", "en"): run})
    with pytest.raises(KeyError, match="'p55' \\(query q0\\).*built from this corpus"):
        scorer.result()

    twice = corpus[:50] + [dict(corpus[7], text="another text")]
    write_tables({"corpus": twice}, str(tmp_path / "twice"), shard_rows=25)
    data = EvalData(qids, qids, qlang, {}, str(tmp_path / "twice" / "corpus"), answers)
    scorer = BlockScorer(data, [1])
    scorer.add(["q0"], {"q0": {"p7": 1.0}}, {("de", "en"): {"q0": {"p7": 1.0}}})
    with pytest.raises(DataError, match="pid=p7 is on several corpus rows"):
        scorer.result()


def test_eval_metrics_benchmark_reads_each_shard_once(tmp_path, capsys, monkeypatch):
    """benchmarks/eval_metrics.py on a small corpus of 3 shards, queries in 3 blocks: each
    answer setting reads each shard's text once (a scan per block would read 9), the ranking
    metrics read none, and both settings together give each one's numbers."""
    import json

    from tests.conftest import load_benchmark

    monkeypatch.setattr(storage, "read_parquet", storage.read_parquet)  # the child wraps it
    bench = load_benchmark("eval_metrics")
    bench.write_data(tmp_path, 900, 24, shard_rows=300)
    (tmp_path / "block.json").write_text("8")
    got = {}
    for setting in bench.SETTINGS:
        bench.child(setting, str(tmp_path), "")
        got[setting] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {s: r["text_reads"] for s, r in got.items()} == {
        "ranking": 0, "rkt": 3, "acc": 3, "both": 3}
    both = got["both"]["metrics"]
    assert {k: both[k] for k in got["rkt"]["metrics"]} == got["rkt"]["metrics"]
    assert {k: both[k] for k in got["acc"]["metrics"]} == got["acc"]["metrics"]
    assert both["n_kt"] == both["n_acc"] == 24 and 0 < both["acc@100"] <= 1


def test_an_answers_table_with_a_qid_twice_is_an_error(tmp_path):
    """Every reader of a split's answers sees one row per query: a repeated qid is named."""
    import pyarrow as pa

    from qgscale.index.mine import AnswerFilter
    from qgscale.retrieval.answers import read_answers

    uri = str(tmp_path / "answers.parquet")
    storage.write_parquet(uri, pa.table({"qid": ["q1", "q2", "q1"],
                                         "answers": [["a"], ["b"], ["c"]]}))
    for read in (read_answers, lambda u: AnswerFilter.read(u, str(tmp_path))):
        with pytest.raises(DataError, match=r"rows 0 and 2: qid 'q1' twice"):
            read(uri)


def test_rerank_of_a_split_with_empty_qrels_and_no_answers_compares_nothing(tmp_path):
    """A split whose qrels folder is empty and that has no answers: no relevant passage, so
    no teacher rerank (its metrics say so), and no answer check is attempted."""
    from types import SimpleNamespace

    import pyarrow as pa

    from qgscale.data.schema import QRELS
    from qgscale.eval.rerank import run_rerank

    corpus, _, qids, qlang, *_ = _corpus_and_runs()
    data = tmp_path / "data"
    write_tables({"test/corpus": corpus[:20], "test/queries": [
        {"qid": q, "lang": qlang[q], "text": f"question {q}"} for q in qids[:3]]}, str(data))
    storage.write_parquet(str(data / "test" / "qrels" / "part-00000.parquet"),
                          QRELS.empty_table())
    run = str(tmp_path / "run.parquet")
    storage.write_parquet(run, pa.table({"qid": qids[:3], "pids": [["p1", "p2"]] * 3,
                                         "scores": [[2.0, 1.0]] * 3}))
    cfg = SimpleNamespace(teacher=SimpleNamespace(rerank_k=2, score=None), bm25=None)
    out = run_rerank(cfg, None, run, str(data), "test", str(tmp_path / "rerank"), "k")
    assert out["n_queries"] == 0 and not storage.exists(str(tmp_path / "rerank" / "_answer_hits"))


def test_a_killed_evals_scratch_folder_is_swept(tmp_path, monkeypatch):
    """An eval worker killed mid-split (SIGKILL: no clean-up ran) leaves its scratch folder;
    the next ``AnswerRuns`` on the node removes it, and keeps a live process's and another
    host's (a temp folder several hosts share)."""
    import signal
    import socket
    import subprocess
    import sys
    import tempfile

    from qgscale.eval.answer_metrics import SCRATCH, AnswerRuns

    code = ("from qgscale.eval.answer_metrics import AnswerRuns; import sys, time; "
            "r = AnswerRuns({}, {}, 'c', True, (), 'dpr'); (r.dir / 'block').write_text('x'); "
            "print(r.dir, flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "TMPDIR": str(tmp_path)})
    left = proc.stdout.readline().strip()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    host = socket.gethostname().replace("-", "_")
    assert os.path.isdir(left) and os.path.basename(left).startswith(
        f"{SCRATCH}{host}-{proc.pid}-")
    other = tmp_path / "qgscale-answer-runs-notes"  # not a scratch folder's name
    other.mkdir()
    elsewhere = tmp_path / f"{SCRATCH}otherhost-{proc.pid}-x"  # another host's (shared TMPDIR)
    elsewhere.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    mine = AnswerRuns({}, {}, "c", True, (), "dpr")
    assert not os.path.exists(left) and other.is_dir() and mine.dir.is_dir()
    assert elsewhere.is_dir()
    again = AnswerRuns({}, {}, "c", True, (), "dpr")  # this live process's folder is kept
    assert mine.dir.is_dir() and again.dir.is_dir()
    mine.close()
    again.close()
