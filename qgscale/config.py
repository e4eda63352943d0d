"""Typed configuration: one YAML file, one section per stage.

Every section forbids unknown keys, so a typo fails with the key path, e.g.
``configs/demo.yaml: teacher.score.batch_tokenz: Extra inputs are not permitted``.
"""

from __future__ import annotations

import os
from collections.abc import Hashable
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from qgscale import storage
from qgscale.errors import ConfigError, MissingInputError


def _unwrap(annotation: Any) -> Any:
    """``X`` of ``Annotated[X, ...]`` and of ``X | None``."""
    if get_origin(annotation) is Annotated:
        return _unwrap(get_args(annotation)[0])
    if get_origin(annotation) in (Union, UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        return _unwrap(args[0]) if len(args) == 1 else annotation
    return annotation


def _is_number(annotation: Any) -> bool:
    """int, float or a Literal of numbers, or any of these or None."""
    annotation = _unwrap(annotation)
    if get_origin(annotation) is Literal:
        return all(type(a) in (int, float) for a in get_args(annotation))
    return annotation in (int, float)


class Section(BaseModel):
    # unknown keys are errors; so are NaN and infinities (YAML reads .nan and .inf as floats)
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """A boolean is an error where a number is expected (a number field, or a list of
        numbers): pydantic would read YAML's ``true`` as 1 (``batch_size: yes`` -> 1). YAML
        reads an unquoted ``off`` as false: it is ``"off"`` where that is a choice."""
        ann = _unwrap(cls.model_fields[info.field_name].annotation)
        if value is False and get_origin(ann) is Literal and "off" in get_args(ann):
            return "off"
        items = value if isinstance(value, list) and get_origin(ann) is list else [value]
        if get_origin(ann) is list:
            ann = get_args(ann)[0]
        if _is_number(ann) and any(isinstance(v, bool) for v in items):
            raise ValueError(f"expected a number, got the boolean {value!r}")
        return value


class RunConfig(Section):
    name: str = "qgscale"
    root: str = "runs/qgscale"  # storage root of every stage's output (local path or s3://)
    seed: int = 13


class StorageConfig(Section):
    """S3 settings; unset fields fall back to the standard AWS environment variables."""

    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: str | None = Field(default=None, repr=False)
    secret_access_key: str | None = Field(default=None, repr=False)


class RayConfig(Section):
    address: str | None = None  # None: start a local Ray; "auto": join a running cluster
    num_cpus: int | None = Field(None, ge=0)  # for a local Ray only
    num_gpus: int | None = Field(None, ge=0)
    # forward every worker's stdout/stderr to this console (Ray's default). Off: the console
    # shows qgscale's progress lines; worker logs stay in Ray's session folder
    # (/tmp/ray/session_latest/logs) and errors still reach the driver as exceptions.
    log_to_driver: bool = False


DATA_FORMATS = Literal["xquad", "xor-tydi", "mkqa", "tatoeba", "beir", "dpr", "qas"]
# the data options some formats do not read (prepare.READ_ARGS), and what such a format does
# instead: given to one of them, an option is an error, not ignored (corpus_langs is left out:
# configs/mkqa.yaml names the language of the corpus it is evaluated against)
UNREAD = {"passages": "reads no passage collection",
          "lang": "takes each row's language from the data",
          "query_langs": "reads every query of its input",
          "answer_lang": "has one answer list per question"}


class DataConfig(Section):
    # a whole dataset (corpus, queries, qrels); a canonical JSONL file of one kind is imported
    # with the CLI (qgscale data prepare --format jsonl --kind ...)
    format: DATA_FORMATS = "xquad"
    input: str = ""  # raw input (file or folder); a relative path resolves against the working dir
    # the passage collection (psgs_w100.tsv, pyserini / BEIR JSONL), streamed as the corpus:
    # xor-tydi, qas; dpr (instead of the training file's inline passages, each one checked)
    passages: str | None = None
    # dpr: the questions' language where a record has none; qas: the questions'; beir: all
    lang: str = "und"
    query_langs: list[str] | None = None  # None: every language in the input
    corpus_langs: list[str] | None = None
    test_mod: int = Field(4, ge=1)  # xquad: article_idx % test_mod == 0 -> test split
    # mkqa: take every question's answers in this language (e.g. "en" for an English corpus);
    # None: each question's own language
    answer_lang: str | None = None
    shard_rows: int = Field(2000, ge=1)
    on_error: Literal["fail", "skip"] = "fail"
    # Training rows are joined on the driver below this many training queries, and the
    # teacher's scoring pairs on actors that hold every pair below this many candidate lists
    # (with kd_on_generated, the generated queries' too); from it on, Ray Data workers join
    # them (qgscale.train.rows_dataset, qgscale.teacher.pairs_dataset: the same rows; 0 =
    # always Ray Data). A runtime setting: not part of any stage's key.
    ray_rows_from: int = Field(1_000_000, ge=0)
    ray_rows_partitions: int = Field(64, ge=1)  # hash partitions of each Ray Data join

    @model_validator(mode="after")
    def _read_by_format(self) -> DataConfig:
        from qgscale.data.prepare import READ_ARGS  # which format reads which option

        if not self.lang.strip():
            raise ValueError("lang: empty")
        for name, why in UNREAD.items():
            value = getattr(self, name)
            if value and value != type(self).model_fields[name].default and \
                    name not in READ_ARGS[self.format]:
                by = [f for f in get_args(DATA_FORMATS) if name in READ_ARGS[f]]
                raise ValueError(f"{name}: format {self.format} {why} (read by "
                                 f"{', '.join(by)}: leave {name} out)")
        if self.format in ("dpr", "qas") and len(self.corpus_langs or []) > 1:
            raise ValueError(f"corpus_langs={self.corpus_langs}: a DPR file's passages carry "
                             "no language, so give one (the language of all its passages)")
        if self.format in ("dpr", "qas") and self.passages and not self.corpus_langs:
            raise ValueError("corpus_langs: give the passage collection's language (e.g. "
                             "[en] for psgs_w100)")
        if self.format == "qas" and not self.passages:
            raise ValueError("passages: a qas file holds questions and answers only: give the "
                             "passage collection they are answered from (psgs_w100.tsv)")
        return self


class ModelConfig(Section):
    """A model: a hub id, local path or fsspec URI; or built from ``init`` with random weights."""

    name_or_path: str | None = None
    init: dict[str, Any] | None = None  # HF config kwargs, e.g. {model_type: t5, d_model: 64}
    overrides: dict[str, Any] | None = None  # config changes for pretrained weights, e.g.
    # {num_hidden_layers: 3} keeps the first 3 layers
    tokenizer: str | None = None  # defaults to name_or_path

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        if not self.name_or_path and not self.init:
            raise ValueError("give name_or_path or init")
        return self


class TrainConfig(Section):
    """Shared knobs of every Ray Train + DeepSpeed run."""

    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1)
    batch_size: int = Field(8, ge=1)  # per worker micro-batch (queries)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(2e-5, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.1, ge=0, le=1)
    clip_grad: float = Field(1.0, ge=0)
    zero_stage: Literal[0, 1, 2, 3] = 0
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    checkpoint_every: int = Field(200, ge=1)  # steps; a checkpoint is also taken at the end
    max_failures: int = Field(0, ge=-1)
    log_every: int = Field(10, ge=1)
    max_query_len: int = Field(64, ge=1)
    max_passage_len: int = Field(256, ge=1)
    # DeepSpeed ZeRO communication (stages 1-3; see configs/xor-tydi.yaml for the reasons):
    # overlap the gradient reduction with the backward pass, copy gradients into one
    # contiguous buffer as they are produced, and reduce / all-gather in buckets of this many
    # elements (larger: fewer, longer messages, better across nodes; more memory)
    overlap_comm: bool = True
    contiguous_gradients: bool = True
    reduce_bucket_size: int = Field(200_000_000, gt=0)
    allgather_bucket_size: int = Field(200_000_000, gt=0)
    # input pipeline: micro-batches read and tokenised ahead of the step by a background
    # thread on every worker; 0 tokenises inside the step
    prefetch_batches: int = Field(2, ge=0)
    # resuming on a different worker count: "universal" converts the ZeRO checkpoint into a
    # DeepSpeed universal checkpoint (weights and optimizer state); "weights" reloads the
    # consolidated fp32 weights with a fresh optimizer state (Adam moments lost: warned)
    elastic_resume: Literal["universal", "weights"] = "universal"
    export_bf16: bool = False  # also write <stage>/model-bf16 (the fp32 master weights in bf16)
    # tracking: TensorBoard event files under <stage>/tensorboard always; MLflow when set
    # (a tracking URI, e.g. file:///path/mlruns or http://host:5000; needs qgscale[tracking])
    mlflow_uri: str | None = None
    mlflow_experiment: str = "qgscale"

    @model_validator(mode="after")
    def _low_precision_needs_zero(self) -> TrainConfig:
        if self.precision != "fp32" and self.zero_stage == 0:
            raise ValueError(f"precision: {self.precision} needs zero_stage >= 1: without "
                             "ZeRO, DeepSpeed's 16-bit optimizer keeps no fp32 master weights "
                             "that a checkpoint exports or resumes on another worker count "
                             "(ZeRO-1 holds the same memory on one GPU)")
        return self


class QGTrainConfig(TrainConfig):
    model: ModelConfig = ModelConfig(name_or_path="google/mt5-base")
    prompt: str = "generate {lang} query: {passage}"

    @field_validator("prompt")
    @classmethod
    def _prompt_fields(cls, v: str) -> str:
        if "{passage}" not in v or "{lang}" not in v:
            raise ValueError(f"{v!r} must contain {{lang}} and {{passage}}")
        return v


class QGRankConfig(TrainConfig):
    """``train qg-rank``: the teacher's ranking fine-tune (the paper's QG-as-ranker step).

    Starts from the QG (``train/qg/model``, or ``teacher.model`` when set) and minimises a
    listwise softmax cross-entropy over the length-normalised log-likelihoods
    ``log P(q|p) / |q|`` of each training query's positive and its first ``n_negatives``
    mined hard negatives (``mine/train``), plus ``gen_weight`` times the generation NLL of
    the positive, so the teacher still generates. The result is the teacher that ``score``
    and ``rerank`` use; ``generate`` keeps the generation-only QG. ``enabled: false``: the
    stage does nothing and the QG itself is the teacher.
    """

    enabled: bool = True
    n_negatives: int = Field(4, ge=1)
    gen_weight: float = Field(1.0, ge=0.0)
    tau: float = Field(1.0, gt=0.0)  # softmax temperature over the candidates' scores
    # None: the QG's own lengths (the qg section's, what scoring uses)
    max_query_len: int | None = Field(None, ge=1)  # type: ignore[assignment]
    max_passage_len: int | None = Field(None, ge=1)  # type: ignore[assignment]
    lr: float = Field(1e-4, gt=0)


class EncoderConfig(Section):
    model: ModelConfig = ModelConfig(name_or_path="xlm-roberta-base")
    pooling: Literal["cls", "mean"] = "cls"
    normalize: bool = False
    shared: bool = True
    temperature: float = Field(1.0, gt=0)


class LossConfig(Section):
    """L = contrastive + alpha * KD + beta * align (see docs/method)."""

    alpha: float = Field(1.0, ge=0)
    beta: float = Field(1.0, ge=0)
    tau_t: float = Field(1.0, gt=0)
    tau_s: float = Field(1.0, gt=0)
    align: Literal["student_kl", "teacher_kl", "mse", "cosine"] = "student_kl"
    symmetric: bool = False  # False: only the generated query q' moves toward q (every kind)
    n_candidates: int = Field(8, ge=1)
    n_hard_negatives: int = Field(1, ge=0)
    kd_on_generated: bool = False  # KD also on generated queries (needs teacher scores for them)


class StudentTrainConfig(TrainConfig):
    loss: LossConfig = LossConfig()


class Actors(Section):
    """How a sharded stage runs on Ray: how many actors, their resources, retries. These
    settings change how fast a stage runs, not what it writes, so they are not part of any
    stage's key (:func:`key_values`): scaling out a crashed stage resumes it."""

    # None: as many as the nodes run at once (GPU actors: as the cluster can scale up to; CPU
    # actors: on the CPUs there now, one left to the driver): runtime.actor_resources
    num_actors: int | None = Field(None, ge=1)
    cpus_per_actor: float = Field(1.0, gt=0)  # CPUs per actor (fractions allowed)
    # GPUs per actor: None = 1 when the Ray cluster has (or can scale up to) GPUs, else CPU
    # only (logged); 0 = CPU only; > 0 = required (fails at once on a cluster without GPUs);
    # a fraction shares a GPU, above 1 whole GPUs
    gpus_per_actor: float | None = Field(None, ge=0)
    max_retries: int = Field(3, ge=0)  # re-runs of a shard whose actor died

    @field_validator("gpus_per_actor")
    @classmethod
    def _gpu_share_or_whole(cls, v: float | None) -> float | None:
        if v is not None and v > 1 and v != int(v):
            raise ValueError(f"{v:g}: expected a fraction of one GPU (0 to 1, shared) or whole "
                             "GPUs")
        return v


class ScoreConfig(Actors):
    """``teacher.score``: log P(query | passage) / |query| of the candidate pairs that
    distillation reads (each list's first ``distill.loss.n_candidates``)."""

    batch_tokens: int = Field(16384, ge=1)
    shard_pairs: int = Field(2000, ge=1)
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"  # QG weight dtype on GPU (CPU: fp32)


class GenerateConfig(Actors):
    """``teacher.generate``: QG queries in other languages (alignment loss, KD on them)."""

    langs: list[str] = Field(default_factory=lambda: ["en"])
    num_queries: int = Field(1, ge=1)
    do_sample: bool = False
    num_beams: int = Field(1, ge=1)
    top_p: float = Field(0.95, gt=0, le=1)
    max_new_tokens: int = Field(32, ge=1)
    batch_size: int = Field(32, ge=1)
    # passages per work unit at most (fewer: 2 units per actor at least)
    shard_rows: int = Field(500, ge=1)
    passages: Literal["positives", "corpus"] = "positives"  # qrels positives or every passage
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"  # QG weight dtype on GPU (CPU: fp32)

    @model_validator(mode="after")
    def _queries_possible(self) -> GenerateConfig:
        if not self.langs:
            raise ValueError("langs is empty: give the languages to generate queries in")
        if not self.do_sample and self.num_beams < self.num_queries:
            raise ValueError(f"num_queries={self.num_queries} needs num_beams >= num_queries "
                             f"(num_beams={self.num_beams}) or do_sample: true")
        return self


class TeacherConfig(Section):
    model: ModelConfig | None = None  # None: the fine-tuned QG, <run root>/train/qg/model
    rerank_k: int = Field(20, ge=1)  # teacher quality: it reranks the warm-up student's top-k
    score: ScoreConfig = ScoreConfig()
    generate: GenerateConfig = GenerateConfig()


class EncodeConfig(Actors):
    """``index.encode``: the corpus embedded by Ray actors, one embedding shard per corpus
    shard (``gpus_per_actor`` as ``teacher.score``)."""

    batch_size: int = Field(64, ge=1)
    dtype: Literal["float32", "float16"] = "float32"  # stored embeddings
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # autocast dtype on GPU
    max_retries: int = Field(2, ge=0)


class BuildConfig(Actors):
    """``index.build``: train once, add the embedding shards in parallel (``num_actors`` add
    actors of ``cpus_per_actor``; ``gpus_per_actor``: the training task's, unset = GPU k-means
    where the cluster has GPUs; set > 0 the add actors run on GPUs too and faiss must have
    GPU support, see :mod:`qgscale.index.gpu`), merge."""

    factory: str = "auto"  # faiss index_factory string; "auto": by size and max_memory_gb
    metric: Literal["ip", "l2"] = "ip"
    train_samples: int = Field(100_000, ge=1)
    # index shards to search over; 1: one index; 0: every part its own
    num_shards: int = Field(1, ge=0)
    merge: Literal["memory", "ondisk"] = "memory"  # how IVF parts are merged into one index
    max_memory_gb: float = Field(8.0, gt=0)  # "auto" picks a factory whose index fits in this
    max_retries: int = Field(2, ge=0)


class SearchConfig(Section):
    """``index.search``: searching a built index (mine, eval, ``qgscale search``): one Ray
    actor per index shard, each holding its shard and the pids of its ids (FAISS on its GPUs
    when it has some, a Flat shard in fp16), alive beside the query encoder (an actor or
    task); each of them gets ``cpus_per_actor`` CPUs and ``gpus_per_actor`` GPUs. Unset: a GPU
    each when the cluster has GPUs, shared when they are fewer than the actors
    (:func:`qgscale.index.search.search_resources`)."""

    nprobe: int = Field(16, ge=1)
    ef_search: int = Field(64, ge=1)
    # re-rank the top k * k_factor with the exact vectors of the embedding shards
    # (faiss.IndexRefine): "flat" float32, "fp16" half the memory; "none" off
    refine: Literal["none", "flat", "fp16"] = "none"
    k_factor: float = Field(4.0, ge=1.0)
    batch_size: int = Field(128, ge=1)  # query encoding batch
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # query encoding autocast on GPU
    cpus_per_actor: float = Field(1.0, gt=0)
    gpus_per_actor: float | None = Field(None, ge=0)


class IndexConfig(Section):
    encode: EncodeConfig = EncodeConfig()
    build: BuildConfig = BuildConfig()
    search: SearchConfig = SearchConfig()


class MineConfig(Section):
    # candidates kept per query; the teacher scores the first distill.loss.n_candidates
    top_k: int = Field(30, ge=1)
    n_negatives: int = Field(8, ge=0)
    skip_top: int = Field(0, ge=0)  # rank window start (skip possible false negatives)
    split: str = "train"  # queries/qrels split to mine for
    shard_rows: int = Field(5000, ge=1)


class BM25Config(Actors):
    """The BM25 first stage (``qgscale.retrieval.bm25``: Lucene BM25, global statistics over
    the corpus shards). Stage ``bm25``: training examples from answers (a retrieved passage
    containing an answer is a positive, the top non-matching ones hard negatives), for data
    with answers but no gold passages. Stage ``bm25-eval``: the BM25 row of every eval table.
    """

    # training positives: "answers" (answer match over BM25's top_k), "off" (the data's own
    # qrels / examples), "auto": "answers" for the formats whose readers write answers and no
    # positives (xor-tydi, mkqa, qas), else "off"
    positives: Literal["auto", "answers", "off"] = "auto"
    # the training split's BM25 query: the question alone, or the question followed by its
    # answers (distant supervision: a question in another language than the corpus shares
    # few tokens with it; never used for the eval baseline)
    train_query: Literal["question", "question+answers"] = "question+answers"
    top_k: int = Field(100, ge=1)  # passages retrieved per training query
    n_negatives: int = Field(8, ge=0)  # hard negatives: the first non-matching passages
    n_positives: int | None = Field(None, ge=1)  # the first n matching ones (None: all)
    match: Literal["dpr", "dpr-chars"] = "dpr"  # qgscale.retrieval.answers
    k1: float = Field(0.9, ge=0)
    b: float = Field(0.4, ge=0, le=1)
    baseline: bool = True  # bm25-eval: a BM25 row in the eval tables (eval.top_k passages)
    gpus_per_actor: float | None = Field(0, ge=0)  # CPU work
    max_retries: int = Field(2, ge=0)


class EvalConfig(Section):
    # recall@k cut-offs
    k: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [1, 5, 10, 20, 100])
    top_k: int = Field(100, ge=1)  # passages retrieved per query (and per language pair)
    splits: list[str] = Field(default_factory=lambda: ["test"])
    # `python -m qgscale.eval` (the eval job): what to evaluate; None: what the pipeline wrote
    model: str | None = None  # student; None: <root>/train/distill/model
    index: str | None = None  # its FAISS index; None: <root>/index/distill-<split or all>/faiss
    out: str | None = None  # report folder; None: <root>/eval-job (not the eval stage's)
    data: str | None = None  # prepared data (queries, qrels/answers) to evaluate; <root>/data
    # zero-shot: the run root (local or s3://) whose students, indexes and corpus are
    # evaluated on this config's data (MKQA with the XOR-TyDi run); None: this run
    students_from: str | None = None
    pairs: bool = True  # also search each corpus language alone: per (query, corpus) lang pair
    answer_recall: bool = True  # R@2kt / R@5kt when the split has answers (XOR-TyDi, MKQA)
    # acc@k for each k: DPR's top-k retrieval accuracy (an answer in the text of one of the
    # first k passages) when the split has answers, with this answer match
    # (qgscale.retrieval.answers; dpr-chars for corpora written without spaces); off: none
    answer_accuracy: Literal["dpr", "dpr-chars", "off"] = "dpr"
    # metric of the per-pair bar chart; None: mrr@10, or on a split without qrels (answers
    # only: XOR-TyDi, MKQA, DPR's qas files) its first answer metric (r@2kt, else acc@k)
    chart_metric: str | None = None

    @model_validator(mode="after")
    def _metrics(self) -> EvalConfig:
        from qgscale.eval.metrics import report_names

        if self.k and max(self.k) > self.top_k:
            raise ValueError(f"k: recall@{max(self.k)} needs top_k >= {max(self.k)} passages "
                             f"per query (top_k={self.top_k})")
        names = report_names(self.k, self.answer_recall, self.answer_accuracy != "off")
        if self.chart_metric is not None and self.chart_metric not in names:
            raise ValueError(f"chart_metric: {self.chart_metric!r} is not one of {names}")
        return self


class Config(Section):
    run: RunConfig = RunConfig()
    storage: StorageConfig = StorageConfig()
    ray: RayConfig = RayConfig()
    data: DataConfig = DataConfig()
    qg: QGTrainConfig = QGTrainConfig()
    qg_rank: QGRankConfig = QGRankConfig()
    encoder: EncoderConfig = EncoderConfig()
    warmup: StudentTrainConfig = StudentTrainConfig(loss=LossConfig(alpha=0.0, beta=0.0))
    distill: StudentTrainConfig = StudentTrainConfig()
    teacher: TeacherConfig = TeacherConfig()
    index: IndexConfig = IndexConfig()
    mine: MineConfig = MineConfig()
    bm25: BM25Config = BM25Config()
    eval: EvalConfig = EvalConfig()

    def uri(self, *parts: str) -> str:
        """URI of a stage folder under the run root."""
        return storage.join(self.run.root, *parts)

    @model_validator(mode="after")
    def _qg_rank_negatives_mined(self) -> Config:
        if self.qg_rank.enabled and self.qg_rank.n_negatives > self.mine.n_negatives:
            raise ValueError(f"qg_rank.n_negatives={self.qg_rank.n_negatives} > mine.n_negatives="
                             f"{self.mine.n_negatives}: the mined examples hold at most "
                             f"{self.mine.n_negatives} hard negatives per query")
        return self

    @model_validator(mode="after")
    def _l2_needs_normalized(self) -> Config:
        if self.index.build.metric == "l2" and not self.encoder.normalize:
            raise ValueError("index.build.metric: l2 ranks by distance, the student's "
                             "dot-product order only for unit vectors: set encoder.normalize: "
                             "true, or metric: ip")
        return self

    @model_validator(mode="after")
    def _dpr_eval_data(self) -> Config:
        if self.data.format == "qas" and self.bm25.positives == "off":
            raise ValueError("bm25.positives: off leaves a qas file without training "
                             "positives (it has answers only): use auto or answers")
        if self.data.format in ("dpr", "qas") and not (self.eval.data or
                                                       self.eval.students_from):
            raise ValueError(f"eval.data: a {self.data.format} file is training data with no "
                             "eval split: set eval.data to a prepared eval set (e.g. `qgscale "
                             "data prepare --format qas` of DPR's nq-test.qas.csv)")
        return self


# how a stage runs, not what it writes: not in stage keys, so changing one resumes the stage
RUNTIME_FIELDS = {
    "ray_rows_from", "ray_rows_partitions",
    # training (TrainConfig): resources, retries, logging, tracking, checkpoint cadence, input
    # prefetch, DeepSpeed communication, and how to resume on another worker count
    "cpus_per_worker", "max_failures", "log_every", "checkpoint_every", "mlflow_uri",
    "mlflow_experiment", "prefetch_batches", "overlap_comm", "contiguous_gradients",
    "reduce_bucket_size", "allgather_bucket_size", "elastic_resume"}
EVAL_JOB_FIELDS = {"model", "index", "out"}  # the eval job's (python -m qgscale.eval) only


def key_values(value: Any) -> Any:
    """``value`` (a section, or a plain value) as JSON data for a stage key: every field
    except the runtime settings named as in :class:`Actors` (actors, CPUs, GPUs, retries) and
    :data:`RUNTIME_FIELDS`. A training section keys its samples per micro-step
    (``num_workers x batch_size``: the in-batch negatives and the samples of each step, see
    ``qgscale.train.order``) instead of the two factors, so a crashed run resumes on another
    worker count with the same samples per micro-step (``elastic_resume``)."""
    if isinstance(value, BaseModel):  # the runtime settings of any section (search's too)
        skip = set(Actors.model_fields) | RUNTIME_FIELDS
        if isinstance(value, EvalConfig):
            skip |= EVAL_JOB_FIELDS
        out = {k: key_values(getattr(value, k)) for k in type(value).model_fields
               if k not in skip}
        if isinstance(value, TrainConfig):
            out["samples_per_micro_step"] = out.pop("num_workers") * out.pop("batch_size")
        return out
    if isinstance(value, list | tuple):
        return [key_values(v) for v in value]
    if isinstance(value, dict):
        return {k: key_values(v) for k, v in value.items()}
    return value


def _format_errors(source: str, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "<root>"
        lines.append(f"{source}: {path}: {e['msg']}")
    return "\n".join(lines)


def parse(raw: dict[str, Any], source: str = "<config>") -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_errors(source, e)) from None


def _resolve_relative(cfg: Config, base: Path, source: str) -> None:
    """Make relative local paths absolute (Ray workers may run in another folder).

    Inside a ``ray job submit`` job the working dir is a temporary unpacked copy, so a
    relative ``run.root`` would write the run there and lose it: that is an error."""
    in_job = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ
    for section, key in [("data", "input"), ("data", "passages"), ("run", "root"),
                         ("eval", "data"), ("eval", "students_from"), ("eval", "model"),
                         ("eval", "index"), ("eval", "out")]:
        part = getattr(cfg, section)
        value = getattr(part, key)
        if value and "://" not in value and not Path(value).is_absolute():
            if in_job and key in ("root", "students_from", "out"):
                raise ConfigError(
                    f"{source}: {section}.{key}: {value!r} is relative, and this is a `ray job "
                    "submit` job running in a temporary copy of the working dir: set an "
                    "absolute path or an s3:// URI (e.g. --set run.root=$PWD/runs/NAME from "
                    "the submitting shell)")
            setattr(part, key, str((base / value).resolve()))


def _annotation(path: list[str]) -> Any:
    """The type annotation of the config field at ``path`` (None: not a field)."""
    model: Any = Config
    for i, part in enumerate(path):
        field = model.model_fields.get(part) if isinstance(model, type) else None
        if field is None:
            return None
        if i == len(path) - 1:
            return field.annotation
        model = field.annotation
    return None


def _is_text(annotation: Any) -> bool:
    """str, a Literal of strings, a list of them, or any of these or None."""
    args = [a for a in get_args(annotation) if a is not type(None)]
    if annotation is str:
        return True
    if get_origin(annotation) is Literal:
        return all(isinstance(a, str) for a in args)
    if get_origin(annotation) is list:
        return len(args) == 1 and _is_text(args[0])
    return isinstance(annotation, UnionType) and len(args) == 1 and _is_text(args[0])


def _override_value(path: list[str], value: str) -> Any:
    """An override's value: YAML, except that a text field (str, a Literal of strings, or a
    list of them) keeps its words as written: ``qg.prompt=q in {lang}: {passage}`` is not a
    mapping, ``run.name=2024`` not a number and ``bm25.positives=off`` not False. ``null``
    (or nothing) is None where the field allows it."""
    ann = _annotation(path)
    if not _is_text(ann):
        return yaml.safe_load(value)
    text = value.strip()
    if text in ("", "null", "~") and type(None) in get_args(ann):
        return None
    if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":  # quoted: YAML's string
        return yaml.safe_load(text)
    if get_origin(ann) is list or list in map(get_origin, get_args(ann)):
        return yaml.load(text, Loader=yaml.BaseLoader)  # noqa: S506 (a list of strings)
    return value


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, but a key given twice in one mapping is an error (the plain
    loader keeps the last one: a second ``run:`` block would silently replace the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice (first on line {seen[key] + 1})",
                    key_node.start_mark)
            if isinstance(key, Hashable):
                seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def load(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Load a YAML config; ``overrides`` are ``a.b.c=value`` strings (YAML-parsed values)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MissingInputError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a YAML config file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a UTF-8 text file ({e.reason} at byte {e.start})"
                          ) from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file: {e.strerror or e}") from None
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader) or {}  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r}: expected key.path=value")
        node = raw
        *parents, leaf = key.split(".")
        for i, p in enumerate(parents):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(parents[:i + 1])} is not a "
                                  "section")
        try:
            node[leaf] = _override_value(key.split("."), value)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: invalid YAML value: {e}") from None
    cfg = parse(raw, str(path))
    _resolve_relative(cfg, Path.cwd(), str(path))
    storage.configure(**cfg.storage.model_dump())
    return cfg
