"""Where a run keeps everything: one object resolves every URI under ``run.root``.

The pipeline, the CLI, ``python -m qgscale.eval`` and the benchmarks ask a :class:`Layout`
for paths; no stage function has path defaults of its own::

    data/[<split>/]{corpus,queries,qrels,answers}   prepare (XQuAD-style data has splits;
                                                    DPR-format data also has examples)
    bm25/train/{examples,qrels}                     answer-match training data (bm25)
    bm25/eval/<split>/run.parquet                   the BM25 baseline's run (bm25-eval)
    train/{qg,qg-rank,warmup,distill}/model         the trained models (HF format)
    train/warmup/init                               the student's untrained starting point
    index/<student>-<corpus>/{embeddings,faiss}     corpus embeddings and FAISS index
                                                    (<corpus>: the split, or all if unsplit)
    mine/{candidates,train}                         mined candidate lists, training examples
                                                    (work files: _ranked, _answer_hits)
    teacher/{generated,scores,generated_pairs}      teacher outputs
    eval/<student>/<split>/                         metrics.{json,md}, pairs.png
    eval/<split>.{md,png}                           all students side by side per lang pair
    rerank/<split>/metrics.{json,md}                teacher vs student order, same top-k
                                                    (work files: candidates, scores,
                                                    _answer_hits)
    _stages/<stage>.json                            the runner's record of each stage
"""

from __future__ import annotations

from typing import Any

from qgscale import storage
from qgscale.errors import ConfigError

# the models every eval compares: the untrained starting checkpoint (zero-shot), the warm-up
# and the distilled student
STUDENTS = ("init", "warmup", "distill")
BASELINE = "bm25"  # the eval tables' first row (eval/bm25/<split>/)
# data formats whose readers write answers and no positives: training examples come from
# BM25 + answer match (the bm25 stage) unless bm25.positives says otherwise
ANSWER_FORMATS = ("xor-tydi", "mkqa", "qas")


def answer_positives(cfg: Any) -> bool:
    """Whether the training positives are made by the bm25 stage (``bm25.positives``)."""
    mode = cfg.bm25.positives
    return mode == "answers" or (mode == "auto" and cfg.data.format in ANSWER_FORMATS)


class Layout:
    """Every URI of the run configured by ``cfg``."""

    def __init__(self, cfg: Any):
        self.cfg = cfg
        self.root = cfg.run.root

    def uri(self, *parts: str) -> str:
        return storage.join(self.root, *parts)

    # --- data
    @property
    def data_root(self) -> str:
        return self.uri("data")

    def data(self, split: str, kind: str) -> str:
        """``data/<split>/<kind>`` when the dataset is split (XQuAD), else ``data/<kind>``."""
        return storage.first_existing(self.uri("data", split, kind), self.uri("data", kind))

    def train(self, kind: str, split: str = "train") -> str:
        """The training ``split``'s ``kind`` (queries, corpus, answers, qrels, examples): the
        bm25 stage's ``qrels`` / ``examples`` when it makes the positives
        (:func:`answer_positives`), else the prepared data's."""
        if kind in ("qrels", "examples") and answer_positives(self.cfg):
            return storage.join(self.bm25_train, kind)
        return self.data(split, kind)

    def training_data(self, examples: bool = False) -> dict[str, str]:
        """The training split's queries, corpus and qrels (keyword arguments of the trainers);
        with ``examples``, its training examples too where there are any (the bm25 stage's,
        or a DPR-format dataset's ``examples``), else ``examples_uri`` None."""
        out = {f"{kind}_uri": self.train(kind) for kind in ("queries", "corpus", "qrels")}
        if examples:
            uri = self.train("examples")
            out["examples_uri"] = (uri if answer_positives(self.cfg) or storage.exists(uri)
                                   else None)
        return out

    # --- BM25
    @property
    def bm25_train(self) -> str:
        """``bm25/train``: answer-match training examples and their qrels."""
        return self.uri("bm25", "train")

    def bm25_eval(self, split: str | None = None) -> str:
        """``bm25/eval[/<split>]``: the BM25 baseline's run of an eval split."""
        return self.uri("bm25", "eval", *([split] if split else []))

    def eval_data(self) -> str:
        """The prepared data the eval splits are read from: ``eval.data``, else the run's own
        (``data/<split>/``). A run that trains on its data and names no ``eval.data`` while
        that data has no such split (``data/queries`` only: XOR-TyDi, DPR) would evaluate on
        its training queries: a ConfigError. (With ``eval.students_from`` the run's data is
        an eval set: MKQA zero-shot.)"""
        if self.cfg.eval.data:
            return self.cfg.eval.data
        if not getattr(self.cfg.eval, "students_from", None) and \
                storage.exists(self.uri("data", "queries")):
            for split in self.cfg.eval.splits:
                if not storage.exists(self.uri("data", split, "queries")):
                    raise ConfigError(
                        f"eval.splits: the run's data {self.data_root} has no {split!r} split "
                        f"(its queries, {self.uri('data', 'queries')}, are the training "
                        "queries): set eval.data to a prepared eval set (e.g. `qgscale data "
                        "prepare` of the dev file)")
        return self.data_root

    def students(self) -> Layout:
        """The layout of the run whose students (and their indexes and corpus) are evaluated:
        ``eval.students_from`` (zero-shot, e.g. MKQA with the XOR-TyDi run), else this one."""
        src = getattr(self.cfg.eval, "students_from", None)
        if not src or src == self.root:
            return self
        other = Layout.__new__(Layout)
        other.cfg, other.root = self.cfg, src
        return other

    # --- models
    def train_dir(self, stage: str) -> str:
        return self.uri("train", stage)

    def model(self, stage: str) -> str:
        """The trained model of ``qg``, ``qg-rank``, ``warmup`` or ``distill``; ``init``: the
        untrained starting checkpoint of the student (saved by the warm-up stage)."""
        if stage == "init":
            return self.uri("train", "warmup", "init")
        return self.uri("train", stage, "model")

    def qg_model(self) -> Any:
        """The query generator as a ``ModelConfig``: ``teacher.model``, else the fine-tuned QG
        (``train/qg/model``). It generates queries, and the ranking fine-tune starts from it."""
        from qgscale.config import ModelConfig

        return self.cfg.teacher.model or ModelConfig(name_or_path=self.model("qg"))

    def teacher_model(self) -> Any:
        """The teacher that scores pairs, as a ``ModelConfig``: the ranking fine-tuned QG
        (``train/qg-rank/model``) when ``qg_rank.enabled``, else :meth:`qg_model`."""
        from qgscale.config import ModelConfig

        if self.cfg.qg_rank.enabled:
            return ModelConfig(name_or_path=self.model("qg-rank"))
        return self.qg_model()

    # --- index and mining
    def corpus_tag(self, split: str) -> str:
        """``split`` when the data has a corpus of that split, else ``all`` (one corpus for
        every split, as XOR-TyDi and MKQA: a model encodes it once, not once per split)."""
        return split if storage.exists(self.uri("data", split, "corpus")) else "all"

    def index_dir(self, student: str, split: str) -> str:
        """``index/<student>-<corpus tag>``: the student's embeddings and index of the corpus
        that ``split``'s queries search."""
        return self.uri("index", f"{student}-{self.corpus_tag(split)}")

    def embeddings(self, student: str, split: str) -> str:
        return storage.join(self.index_dir(student, split), "embeddings")

    def faiss(self, student: str, split: str) -> str:
        return storage.join(self.index_dir(student, split), "faiss")

    @property
    def mine_dir(self) -> str:
        return self.uri("mine")

    @property
    def candidates(self) -> str:
        return self.uri("mine", "candidates")

    @property
    def mined_train(self) -> str:
        return self.uri("mine", "train")

    # --- teacher
    @property
    def generated(self) -> str:
        return self.uri("teacher", "generated")

    @property
    def scores(self) -> str:
        return self.uri("teacher", "scores")

    @property
    def generated_pairs(self) -> str:
        return self.uri("teacher", "generated_pairs")

    # --- eval and the runner's records
    def eval_dir(self, student: str) -> str:
        return self.uri("eval", student)

    def comparison(self, split: str, ext: str) -> str:
        """``eval/<split>.{md,png}``: every student side by side per language pair."""
        return self.uri("eval", f"{split}.{ext}")

    def rerank_dir(self, split: str) -> str:
        """``rerank/<split>``: the teacher's reranking of the warm-up student's top-k."""
        return self.uri("rerank", split)

    def record(self, stage: str) -> str:
        return self.uri("_stages", f"{stage}.json")
