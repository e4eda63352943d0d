"""Teacher quality: the QG teacher's reranking of the warm-up student's top-k, on eval data.

Distillation only helps when the teacher ranks better than the student it teaches. For each
eval split this scores every (query, passage) pair of the warm-up student's top
``teacher.rerank_k`` (its pooled ``run.parquet``) with the teacher (the same Ray actor job as
``teacher score``) and compares, on the *same* lists, the student's order with the teacher's
order (``log P(q|p) / |q|``): MRR@10 and Recall@k per query language and macro. Queries whose
relevant passage is not in the list count as misses for both orders.

The run is read as Arrow, its lists cut to ``rerank_k``; the orders are compared
:data:`RERANK_BLOCK` queries at a time (their lists and teacher scores as Python, running means
of the metrics), so the process holds queries x ``rerank_k`` Arrow entries, not the run as
Python objects.

Writes ``<out>/{candidates,scores}`` and ``<out>/metrics.{json,md}``.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from qgscale import storage
from qgscale.data.keyindex import KeyIndex
from qgscale.data.schema import CANDIDATES
from qgscale.errors import DataError
from qgscale.eval import metrics as M

log = logging.getLogger("qgscale.eval")


def rerank_metric_names(k: int) -> list[str]:
    return ["mrr@10"] + [f"recall@{c}" for c in (1, 5, 10) if c <= k]


RERANK_BLOCK = 16_384  # queries whose orders are compared at a time
ANSWER_HITS = "_answer_hits"  # under the output: the answer check's pairs, per corpus shard
WHO = ("student", "teacher")


class OrderMetrics:
    """The metrics of :func:`compare_orders`, added a block of queries at a time (running
    means per query language, :class:`qgscale.eval.metrics.Means`)."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.acc: dict[str, dict[str, M.Means]] = {w: defaultdict(M.Means) for w in WHO}
        self.n = 0

    def add(self, lists: dict[str, list[str]], student: dict[str, dict[str, float]],
            teacher: dict[str, dict[str, float]], qrels: dict[str, dict[str, int]],
            query_lang: dict[str, str]) -> None:
        for who, scores in (("student", student), ("teacher", teacher)):
            run = {q: {p: scores[q][p] for p in pids} for q, pids in lists.items()}
            rows = M.per_query(run, {q: qrels.get(q, {}) for q in lists}, self.names)
            for q, row in rows.items():
                self.acc[who][query_lang[q]].add({q: row})
        self.n += len(lists)

    def result(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for who in WHO:
            per_lang = {lang: m.result(self.names) for lang, m in sorted(self.acc[who].items())}
            out[who] = {"query_langs": per_lang, "macro": M.macro(per_lang.values())}
        out["n_queries"] = self.n
        return out


def compare_orders(lists: dict[str, list[str]], student: dict[str, dict[str, float]],
                   teacher: dict[str, dict[str, float]], qrels: dict[str, dict[str, int]],
                   query_lang: dict[str, str], names: list[str]) -> dict[str, Any]:
    """Metrics of the student's and the teacher's order of the same candidate lists, per
    query language and as a macro average over languages (:class:`OrderMetrics` of one
    block)."""
    acc = OrderMetrics(names)
    acc.add(lists, student, teacher, qrels, query_lang)
    return acc.result()


def markdown(result: dict[str, Any], names: list[str], k: int) -> str:
    lines = [f"| top-{k} of the warm-up student | order | " + " | ".join(names) + " |",
             "|---|---|" + "---|" * len(names)]
    langs = ["macro", *result["student"]["query_langs"]]
    for lang in langs:
        for who in ("student", "teacher"):
            row = (result[who]["macro"] if lang == "macro"
                   else result[who]["query_langs"][lang])
            lines.append(f"| {lang} | {who} | " + " | ".join(f"{row[n]:.4f}" for n in names)
                         + " |")
    return "\n".join(lines) + "\n"


def answer_qrels(cfg: Any, run_uri: str, k: int, data: Any, work_uri: str, key: str
                 ) -> dict[str, dict[str, int]]:
    """For a split with answers and no qrels (XOR-TyDi, MKQA): the passages of each query's
    top ``k`` in ``run_uri`` that contain an answer (DPR's match, ``qgscale.retrieval.answers``,
    on "title text") are its relevant ones; queries without any are left out. One pass over
    the corpus on the answer check's actors (:meth:`qgscale.index.mine.AnswerFilter.hits`,
    ``cfg.bm25``'s actors, resumable under ``work_uri`` with ``key``, which must change
    with the run; ``k`` is added to it)."""
    from qgscale.index.mine import AnswerFilter

    check = AnswerFilter.read(data.source["answers"], data.corpus_uri, actors=cfg.bm25)
    hits = check.hits([run_uri], None, work_uri, f"{key}-top{k}", top=k).table
    out: dict[str, dict[str, int]] = defaultdict(dict)
    for q, p in zip(hits.column("qid").to_pylist(), hits.column("pid").to_pylist(), strict=True):
        out[q][p] = 1
    return dict(out)


def run_rerank(cfg: Any, teacher_model: Any, run_uri: str, data_uri: str, split: str,
               out_uri: str, key: str, corpus_uri: str | None = None) -> dict[str, Any]:
    """Stage function ``rerank`` for one split: teacher vs student order on the student's
    top ``cfg.teacher.rerank_k`` of ``run_uri`` (``CANDIDATES`` rows, ranked); ``corpus_uri``:
    the corpus the run retrieved from (default: the split's own)."""
    from qgscale.eval.evaluate import load_split
    from qgscale.teacher.common import qg_spec
    from qgscale.teacher.scoring import score_candidates

    k, sc = cfg.teacher.rerank_k, cfg.teacher.score
    run = storage.read_parquet(run_uri, ["qid", "pids", "scores"])
    if pc.count_distinct(run.column("qid")).as_py() != run.num_rows:
        raise DataError(f"{run_uri}: a qid on two rows (one ranked list per query)")
    data = load_split(data_uri, split, corpus_uri)
    run = pa.table({"qid": run.column("qid"), "pids": pc.list_slice(run.column("pids"), 0, k),
                    "scores": pc.list_slice(run.column("scores"), 0, k)})
    qrels = data.qrels or (answer_qrels(cfg, run_uri, k, data,
                                        storage.join(out_uri, ANSWER_HITS), key)
                           if data.answers is not None else {})
    lists = run.filter(pc.is_in(run.column("qid"), value_set=pa.array(list(qrels),
                                                                       pa.string())))
    del run
    if not lists.num_rows:  # nothing to compare: say so instead of scoring
        log.warning("split %s: no query has a relevant passage in the warm-up student's top-%d:"
                    " no teacher rerank", split, k)
        result = {"split": split, "rerank_k": k, "student_run": run_uri, "n_queries": 0,
                  "student": {"macro": {}}, "teacher": {"macro": {}}}
        storage.write_json(storage.join(out_uri, "metrics.json"), result)
        return result
    cand_uri = storage.join(out_uri, "candidates")
    storage.write_parquet(storage.join(cand_uri, "part-00000.parquet"), pa.table({
        "qid": lists.column("qid"), "pids": lists.column("pids"),
        "scores": pa.nulls(lists.num_rows, CANDIDATES.field("scores").type)}, schema=CANDIDATES))
    scores_uri = storage.join(out_uri, "scores")
    score_candidates(qg_spec(cfg, teacher_model), cand_uri, data.source["queries"],
                     data.corpus_uri, scores_uri, key, sc)
    by_qid = KeyIndex.build(storage.read_parquet(scores_uri, ["qid", "pid", "score"]), "qid")
    names = rerank_metric_names(k)
    acc = OrderMetrics(names)
    for start in range(0, lists.num_rows, RERANK_BLOCK):
        block = lists.slice(start, RERANK_BLOCK)
        qids, pids, scores = (block.column(c).to_pylist() for c in ("qid", "pids", "scores"))
        mine = by_qid.table.take(pa.array(by_qid.find(block.column("qid"))[1]))
        teacher: dict[str, dict[str, float]] = defaultdict(dict)
        for q, p, s in zip(*(mine.column(c).to_pylist() for c in ("qid", "pid", "score")),
                           strict=True):
            teacher[q][p] = s
        acc.add(dict(zip(qids, pids, strict=True)),
                {q: dict(zip(ps, ss, strict=True)) for q, ps, ss in zip(qids, pids, scores,
                                                                        strict=True)},
                teacher, qrels, data.query_lang)
    result = acc.result()
    result.update(split=split, rerank_k=k, student_run=run_uri)
    storage.write_json(storage.join(out_uri, "metrics.json"), result)
    storage.write_bytes(storage.join(out_uri, "metrics.md"), markdown(result, names, k).encode())
    s_mrr, t_mrr = result["student"]["macro"]["mrr@10"], result["teacher"]["macro"]["mrr@10"]
    if t_mrr <= s_mrr:
        log.warning("split %s: the teacher reranks the warm-up student's top-%d WORSE than the "
                    "student orders it (MRR@10 %.4f vs %.4f): distillation from this teacher "
                    "cannot improve the student", split, k, t_mrr, s_mrr)
    else:
        log.info("split %s: teacher rerank MRR@10 %.4f vs student %.4f on its top-%d", split,
                 t_mrr, s_mrr, k)
    return result
