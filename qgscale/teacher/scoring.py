"""``qgscale teacher score``: teacher scores of every (query, candidate passage) pair.

Input: candidate shards ``{qid, pids, scores?}`` + queries ``{qid, lang, text}`` + corpus
``{pid, lang, title, text}`` (parquet, local or ``s3://``). Output: shards
``{qid, pid, score, ntok}`` (``qgscale.data.schema.SCORES``), one per ~``shard_pairs`` pairs,
in candidate order, with done markers and a manifest. Scoring runs as a shard job
(:func:`qgscale.runtime.run_shards`) with the passage-grouped fast path of
:func:`qgscale.models.generator.score_pairs`; a re-run only does unfinished shards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from qgscale import storage
from qgscale.config import ScoreConfig
from qgscale.data.schema import SCORES
from qgscale.errors import DataError, MissingInputError
from qgscale.runtime import Shard, connect, run_shards
from qgscale.teacher.common import QGSpec, load_corpus, load_queries, qg_spec


@dataclass
class CandidateSlice:
    uri: str  # candidate shard file
    start: int  # row range [start, stop)
    stop: int


def _files(uri: str) -> list[str]:
    fs, path = storage.url_to_fs(uri)
    if not fs.exists(path):
        raise MissingInputError(f"{uri}: candidates not found (run `qgscale index mine` "
                                "first)")
    files = storage.list_files(uri, ".parquet") if fs.isdir(path) else [uri]
    if not files:
        raise MissingInputError(f"{uri}: no parquet shards")
    return files


def plan_units(candidates_uri: str | list[str], shard_pairs: int) -> list[Shard]:
    """Split the candidate shards into output shards of about ``shard_pairs`` pairs.

    Validates the lists on the way (null/empty qid, null list or pid, a pid twice in one list,
    a qid in two rows), naming file, row and field.
    """
    uris = [candidates_uri] if isinstance(candidates_uri, str) else candidates_uri
    files = [f for u in uris for f in _files(u)]
    units, seen = [], {}
    for fi, f in enumerate(files):
        t = storage.read_parquet(f, ["qid", "pids"])
        for r, (qid, pids) in enumerate(zip(t["qid"].to_pylist(), t["pids"].to_pylist(),
                                            strict=True)):
            where = f"{f}: row {r} (qid={qid})"
            if not qid:
                raise DataError(f"{f}: row {r}: empty field 'qid'")
            if qid in seen:
                raise DataError(f"{where}: qid also in {seen[qid]} (one candidate list per qid)")
            seen[qid] = f"{f} row {r}"
            if pids is None:
                raise DataError(f"{where}: field 'pids' is null")
            if any(not p for p in pids):
                raise DataError(f"{where}: field 'pids' holds an empty/null pid")
            if len(set(pids)) != len(pids):
                raise DataError(f"{where}: field 'pids' lists a pid twice")
        lens = pc.fill_null(pc.list_value_length(t["pids"]), 0).to_pylist()
        start, pairs, k = 0, 0, 0
        for r, n in enumerate(lens):
            pairs += n
            if pairs >= shard_pairs or r == len(lens) - 1:
                units.append(Shard(f"part-{fi:05d}-{k:04d}", pairs,
                                  CandidateSlice(f, start, r + 1)))
                start, pairs, k = r + 1, 0, k + 1
    return units


@dataclass
class ScoreJob:
    """The shard job: load QG + texts once per actor; per shard read its candidate rows and
    score them."""

    qg: QGSpec
    queries_uri: str | list[str]
    corpus_uri: str
    batch_tokens: int = 16384
    precision: str = "bf16"

    def setup(self, device: str, threads: int) -> dict[str, Any]:
        queries: dict[str, tuple[str, str]] = {}
        for uri in [self.queries_uri] if isinstance(self.queries_uri, str) else self.queries_uri:
            queries.update(load_queries(uri))
        return {"qg": self.qg.load(device, threads, self.precision), "queries": queries,
                "corpus": load_corpus(self.corpus_uri)}

    def run(self, st: dict[str, Any], shard: Shard) -> tuple[pa.Table, dict]:
        sl: CandidateSlice = shard.payload
        t = storage.read_parquet(sl.uri, ["qid", "pids"]).slice(sl.start, sl.stop - sl.start)
        qids, pids, pairs = [], [], []
        for r, (qid, plist) in enumerate(zip(t["qid"].to_pylist(), t["pids"].to_pylist(),
                                             strict=True)):
            if qid not in st["queries"]:
                raise DataError(f"{sl.uri}: row {sl.start + r}: qid={qid} not in queries "
                                f"{self.queries_uri}")
            lang, text = st["queries"][qid]
            for pid in plist:
                if pid not in st["corpus"]:
                    raise DataError(f"{sl.uri}: row {sl.start + r} (qid={qid}): pid={pid} not "
                                    f"in corpus {self.corpus_uri}")
                qids.append(qid)
                pids.append(pid)
                pairs.append((text, st["corpus"][pid], lang))
        s = st["qg"].score(pairs, batch_tokens=self.batch_tokens, precision=self.precision)
        table = pa.table({"qid": qids, "pid": pids, "score": s.mean.astype("float32"),
                          "ntok": s.ntok.astype("int32")}, schema=SCORES)
        return table, {"source": sl.uri, "rows_from": sl.start, "rows_to": sl.stop}


def generated_candidates(candidates_uri: str, queries_uri: str, qrels_uri: str,
                         generated_uri: str, out_uri: str) -> tuple[str, str]:
    """Inputs to score the QG-generated queries too (KD on generated queries).

    A generated query g (language l) from passage p gets qid ``generated_qid(p, l, g)`` and, as
    candidate list, the union of C(q) over the training queries q with positive p and
    language != l (the lists the student pairs it with). Writes ``out_uri/{candidates,
    queries}/part-00000.parquet``; returns their URIs.
    """
    from qgscale.data.schema import CANDIDATES, QUERIES
    from qgscale.train.data import generated_qid

    lang = {q: v[0] for q, v in load_queries(queries_uri).items()}
    cands = {}
    for f in _files(candidates_uri):
        t = storage.read_parquet(f, ["qid", "pids"])
        cands.update(zip(t["qid"].to_pylist(), t["pids"].to_pylist(), strict=True))
    by_pid: dict[str, list[str]] = {}
    for r in read_table_rows(qrels_uri, "qrels"):
        if (r["rel"] or 0) > 0 and r["qid"] in cands:
            by_pid.setdefault(r["pid"], []).append(r["qid"])
    lists: dict[str, list[str]] = {}
    texts: dict[str, tuple[str, str]] = {}
    for r in read_table_rows(generated_uri, "generated queries"):
        if not (r["query"] or "").strip():
            raise DataError(f"{generated_uri}: pid={r['pid']} lang={r['lang']}: empty query")
        gid = generated_qid(r["pid"], r["lang"], r["query"])
        texts[gid] = (r["lang"], r["query"])
        pids = lists.setdefault(gid, [])
        for q in by_pid.get(r["pid"], []):
            if lang.get(q) != r["lang"]:
                pids.extend(p for p in cands[q] if p not in pids)
    q_uri, c_uri = storage.join(out_uri, "queries"), storage.join(out_uri, "candidates")
    storage.write_parquet(storage.join(q_uri, "part-00000.parquet"), pa.Table.from_pylist(
        [{"qid": g, "lang": lt[0], "text": lt[1]} for g, lt in texts.items()], schema=QUERIES))
    storage.write_parquet(storage.join(c_uri, "part-00000.parquet"), pa.Table.from_pylist(
        [{"qid": g, "pids": p, "scores": None} for g, p in lists.items() if p],
        schema=CANDIDATES))
    return c_uri, q_uri


def read_table_rows(uri: str, what: str) -> list[dict[str, Any]]:
    from qgscale.teacher.common import read_table

    return read_table(uri, what).to_pylist()


def score_candidates(qg: QGSpec, candidates_uri: str | list[str],
                     queries_uri: str | list[str], corpus_uri: str, out_uri: str,
                     config_hash: str, sc: ScoreConfig | None = None) -> dict[str, Any]:
    """Plain API: score every candidate pair into ``out_uri`` (settings ``sc``, the
    ``teacher.score`` section; defaults if None); returns the manifest.

    Skips every shard with a done marker of the same ``config_hash`` (resume). Needs a
    running Ray (or starts a local one); actors as :func:`qgscale.runtime.run_shards`.
    Several candidate sets (with their queries) may be given as lists.
    """
    sc = sc or ScoreConfig()
    inputs = {"candidates": candidates_uri, "queries": queries_uri, "corpus": corpus_uri}
    units = plan_units(candidates_uri, sc.shard_pairs)
    job = ScoreJob(qg, queries_uri, corpus_uri, sc.batch_tokens, sc.precision)
    stats = run_shards(job, units, out_uri, config_hash, sc, stage="teacher.score",
                       desc="teacher score", unit="pair")
    pairs = sum(u.size for u in units)
    manifest = storage.ShardWriter(out_uri, config_hash).finalize(
        [u.name for u in units], stage="teacher-score", inputs=inputs, pairs=pairs, run=stats)
    if manifest["rows"] != pairs:
        raise RuntimeError(f"{out_uri}: {manifest['rows']} scored rows for {pairs} pairs")
    return manifest


def run_score(cfg: Any, model: Any, *, candidates_uri: str, queries_uri: str, corpus_uri: str,
              out_uri: str, key: str, generated_uri: str | None = None,
              qrels_uri: str | None = None, pairs_uri: str | None = None) -> dict[str, Any]:
    """Stage function ``teacher score`` (``cfg.teacher.score``): every pair of
    ``candidates_uri`` scored by the QG ``model`` (a ``ModelConfig``) into ``out_uri``.

    With ``generated_uri`` (``distill.loss.kd_on_generated``) the generated queries are scored
    as well, on the candidate lists of :func:`generated_candidates` (written to ``pairs_uri``,
    using the positives of ``qrels_uri``), into the same output.
    """
    sc = cfg.teacher.score
    connect(cfg.ray)
    cands, queries = [candidates_uri], [queries_uri]
    if generated_uri:
        if not storage.exists(storage.join(generated_uri, storage.MANIFEST)):
            raise MissingInputError(f"{generated_uri}: no generated queries; with distill.loss."
                                    "kd_on_generated run `qgscale teacher generate` first")
        if not (qrels_uri and pairs_uri):
            raise ValueError("scoring generated queries needs qrels_uri and pairs_uri")
        c, q = generated_candidates(cands[0], queries[0], qrels_uri, generated_uri, pairs_uri)
        cands.append(c)
        queries.append(q)
    return score_candidates(
        qg_spec(cfg, model), cands if len(cands) > 1 else cands[0],
        queries if len(queries) > 1 else queries[0], corpus_uri, out_uri, key, sc)
