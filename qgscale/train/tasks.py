"""What a training run trains: a task builds its model and collator and computes one step.

:class:`StudentTask` (the dual encoder: warm-up and distillation), :class:`QGTask` (the
query generator) and :class:`QGRankTask` (the teacher's ranking fine-tune) satisfy
:class:`Task`. The steps are plain torch functions of (model or
DeepSpeed engine, batch): :func:`student_step` runs without Ray or DeepSpeed too (see
``benchmarks/gpu_check.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from qgscale.config import (
    LossConfig,
    QGRankConfig,
    QGTrainConfig,
    StudentTrainConfig,
    TrainConfig,
)
from qgscale.errors import DataError
from qgscale.train import losses
from qgscale.train.batch import StudentBatch, StudentCollator, as_list


class Batch(Protocol):
    def to(self, device: torch.device) -> Batch: ...


class Task(Protocol):
    """A training task: its config section, model, collator and step."""

    @property
    def config(self) -> TrainConfig: ...

    def build_model(self, init_uri: str) -> nn.Module:
        """The model from the run's init folder, in training mode."""

    def collator(self, model: nn.Module) -> Callable[[dict[str, Any]], Batch]:
        """A micro-batch of training rows (columns of lists) -> a batch for :meth:`step`."""

    def step(self, engine: Any, batch: Any, world_size: int
             ) -> tuple[torch.Tensor, dict[str, float]]:
        """(loss to backpropagate, metrics to log) of one micro-batch on the device."""


# --- the student ---------------------------------------------------------------------------
def _rows(t: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor | None:
    return None if t is None else t[rows]


def student_step(engine: Any, batch: StudentBatch, loss_cfg: LossConfig, temperature: float,
                 world_size: int) -> tuple[torch.Tensor, dict[str, float]]:
    """L = contrastive + alpha * KD + beta * align of one micro-batch of the dual encoder.

    ``engine``: the :class:`~qgscale.models.encoder.DualEncoder` or a DeepSpeed engine around
    it; one encoder pass over all queries and one over all passages. KD covers the queries
    and, where they have teacher scores, their generated queries; alignment the rows with a
    generated query. The contrastive term is backpropagated times ``world_size`` (negatives
    gathered from every worker, gradient through the local slice: see
    :func:`losses.contrastive_loss`); KD and alignment are means over the global batch's
    rows (:func:`losses.mean_over_workers`); the logged ``loss`` is the unscaled sum.
    """
    queries, passages = batch.encoder_inputs()
    q_emb, p_emb = engine(query=queries.inputs(), passage=passages.inputs())
    q, gen = batch.split_queries(q_emb.float())
    groups, cands = batch.split_passages(p_emb.float())
    exclude = None
    if batch.group_ids is not None:  # another query's copy of a positive is no negative
        exclude = losses.shared_positives(
            losses.gather_across_workers(losses.pad_across_workers(batch.positive_ids)),
            losses.gather_across_workers(batch.group_ids))
    all_q = losses.gather_across_workers(q)
    con = losses.contrastive_loss(all_q, losses.gather_across_workers(groups),
                                  batch.group_size, temperature, exclude)
    terms: dict[str, tuple[torch.Tensor, int]] = {}  # sum over this worker's rows, rows
    s_q = s_gen = None
    if cands is not None:
        s_q = losses.candidate_scores(q, cands, temperature)
        student, teacher, mask = s_q, batch.teacher_scores, batch.cand_mask
        if gen is not None:
            s_gen = losses.candidate_scores(gen, cands, temperature)
            if batch.gen_teacher_scores is not None:  # KD also on generated queries q'
                kd_rows = batch.gen_teacher_mask
                student = torch.cat([s_q, s_gen[kd_rows]])
                teacher = torch.cat([teacher, batch.gen_teacher_scores[kd_rows]])
                mask = torch.cat([mask, mask[kd_rows]])
        kd = losses.kd_loss(student, teacher, tau_s=loss_cfg.tau_s, tau_t=loss_cfg.tau_t,
                            mask=mask)
        terms["kd"] = (kd * student.shape[0], student.shape[0])
    if loss_cfg.beta:  # every worker, with or without generated queries in this micro-batch
        terms["align"] = (q.new_zeros(()), 0)
        if gen is not None:  # without candidates: embedding-level kinds only
            rows = batch.gen_mask
            align = losses.alignment_loss(
                loss_cfg.align, s_q=_rows(s_q, rows), s_gen=_rows(s_gen, rows),
                t_q=_rows(batch.teacher_scores, rows), e_q=q[rows], e_gen=gen[rows],
                tau_s=loss_cfg.tau_s, tau_t=loss_cfg.tau_t, symmetric=loss_cfg.symmetric,
                mask=_rows(batch.cand_mask, rows))
            n = int(rows.sum())
            terms["align"] = (align * n, n)
    means = dict(zip(terms, losses.mean_over_workers(list(terms.values())), strict=True)) \
        if terms else {}
    kd, kd_mean, kd_n = means.get("kd", (None, None, None))
    align, align_mean, align_n = means.get("align", (None, None, None))
    rest = losses.total_loss(torch.zeros((), device=q.device), kd, align, loss_cfg.alpha,
                             loss_cfg.beta)
    parts = {"contrastive": con.item()}
    if exclude is not None:  # per query: in-batch copies of its positives (label excluded)
        rows, cols = exclude
        parts["shared_positives"] = (cols != rows * batch.group_size).sum().item() / len(all_q)
    parts["loss"] = parts["contrastive"]
    for name, mean, n, weight in (("kd", kd_mean, kd_n, loss_cfg.alpha),
                                  ("align", align_mean, align_n, loss_cfg.beta)):
        if n:  # the global batch's mean, where it has rows
            parts[name] = mean
            parts["loss"] += weight * mean
    return con * world_size + rest, parts


@dataclass(frozen=True)
class StudentTask:
    """The dual encoder (``warmup`` or, with ``distill``, ``distill``: candidates + KD)."""

    config: StudentTrainConfig
    distill: bool = False

    def build_model(self, init_uri: str) -> nn.Module:
        from qgscale.models.encoder import DualEncoder

        return DualEncoder.from_pretrained(init_uri)

    def collator(self, model: nn.Module) -> StudentCollator:
        return StudentCollator.for_config(model.tokenizer, self.config, self.distill)

    def step(self, engine: Any, batch: StudentBatch, world_size: int
             ) -> tuple[torch.Tensor, dict[str, float]]:
        model = getattr(engine, "module", engine)  # DeepSpeed engine or the model itself
        return student_step(engine, batch, self.config.loss, model.temperature, world_size)


# --- the query generator -------------------------------------------------------------------
def qg_step(engine: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """Seq2seq cross-entropy of one QG micro-batch (``QueryGenerator.forward``)."""
    loss = engine(**batch)
    return loss, {"loss": loss.item()}


@dataclass
class _QGColumns:
    """Row columns ``{query, lang, passage}`` -> :class:`QGCollator` tensors."""

    collate_rows: Any

    def __call__(self, batch: dict[str, Any]) -> Any:
        from transformers import BatchEncoding  # a dict with .to(device)

        n = len(batch["query"])
        return BatchEncoding(self.collate_rows(
            [{k: str(batch[k][i]) for k in ("query", "lang", "passage")} for i in range(n)]))


def _trainable_qg(init_uri: str, precision: str, section: str) -> nn.Module:
    """The query generator at ``init_uri``, in training mode (QG and qg-rank tasks; fp16
    with a T5-family model is a ConfigError naming ``section.precision``)."""
    from qgscale.models.generator import QueryGenerator, check_precision

    model = QueryGenerator.from_pretrained(init_uri)
    check_precision(model.model, precision, f"{section}.precision")
    model.model.train()
    return model


@dataclass(frozen=True)
class QGTask:
    """Seq2seq fine-tuning of the query generator: prompt(lang, passage) -> query."""

    config: QGTrainConfig

    def build_model(self, init_uri: str) -> nn.Module:
        return _trainable_qg(init_uri, self.config.precision, "qg")

    def collator(self, model: nn.Module) -> _QGColumns:
        from qgscale.models.generator import QGCollator

        return _QGColumns(QGCollator(model.tokenizer, model.prompt, self.config.max_passage_len,
                                     self.config.max_query_len))

    def step(self, engine: Any, batch: dict[str, torch.Tensor], world_size: int
             ) -> tuple[torch.Tensor, dict]:
        return qg_step(engine, batch)


# --- the teacher's ranking fine-tune -------------------------------------------------------
def qg_rank_step(engine: Any, batch: dict[str, torch.Tensor], gen_weight: float,
                 tau: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
    """Listwise loss over the teacher scores of each query's positive and hard negatives plus
    ``gen_weight`` x the positive's generation NLL (:func:`losses.qg_rank_loss`).

    ``batch``: a :class:`QGRankCollator` batch: B x (1 + N) (prompted passage, query) rows,
    query-major, and ``cand_mask`` (B, 1 + N). One forward pass over all rows."""
    mask = batch["cand_mask"]
    sums, ntok = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        labels=batch["labels"], sequence_scores=True)
    sums, ntok = sums.view(mask.shape), ntok.view(mask.shape)
    loss, parts = losses.qg_rank_loss(sums, ntok, mask, gen_weight, tau)
    with torch.no_grad():  # the positive scores above every real negative
        s = (sums / ntok.clamp(min=1)).masked_fill(~mask, float("-inf"))
        first = (s[:, 1:] < s[:, :1]).all(-1).float().mean() if s.shape[1] > 1 else s.new_ones(())
    return loss, {"loss": loss.item(), "rank": parts["rank"].item(),
                  "gen": parts["gen"].item(), "pos_first": first.item()}


@dataclass
class QGRankCollator:
    """Rows ``{query, lang, passages}`` (``passages``: positive, then up to ``n_negatives``
    hard negatives) -> ``input_ids``/``attention_mask`` of the B x (1 + N) prompted passages
    (query-major), ``labels`` (each query repeated 1 + N times, -100 padding) and
    ``cand_mask`` (B, 1 + N; False where a row has fewer negatives)."""

    tokenizer: Any
    prompt: str
    max_passage_len: int
    max_query_len: int
    n_negatives: int

    def __call__(self, batch: dict[str, Any]) -> Any:
        from transformers import BatchEncoding  # a dict with .to(device)

        queries = [str(q) for q in as_list(batch["query"])]
        langs = [str(x) for x in as_list(batch["lang"])]
        width = 1 + self.n_negatives
        mask = torch.zeros(len(queries), width, dtype=torch.bool)
        sources = []
        for i, (lang, passages) in enumerate(zip(langs, as_list(batch["passages"]),
                                                 strict=True)):
            passages = [str(p) for p in as_list(passages)][:width]
            if not passages:
                raise DataError(f"qg-rank row qid={as_list(batch['qid'])[i]}: no passages")
            mask[i, :len(passages)] = True
            passages += [""] * (width - len(passages))  # masked out
            sources += [self.prompt.format(lang=lang, passage=p) for p in passages]
        enc = self.tokenizer(sources, truncation=True, max_length=self.max_passage_len,
                             padding=True, return_tensors="pt")
        tgt = self.tokenizer(queries, truncation=True, max_length=self.max_query_len,
                             padding=True, return_tensors="pt")
        labels = tgt["input_ids"].masked_fill(tgt["attention_mask"] == 0, -100)
        return BatchEncoding({"input_ids": enc["input_ids"],
                              "attention_mask": enc["attention_mask"],
                              "labels": labels.repeat_interleave(width, dim=0),
                              "cand_mask": mask})


@dataclass(frozen=True)
class QGRankTask:
    """The teacher's ranking fine-tune of the QG (``qg_rank``; its lengths resolved)."""

    config: QGRankConfig

    def build_model(self, init_uri: str) -> nn.Module:
        return _trainable_qg(init_uri, self.config.precision, "qg_rank")

    def collator(self, model: nn.Module) -> QGRankCollator:
        c = self.config
        return QGRankCollator(model.tokenizer, model.prompt,
                              c.max_passage_len or model.max_passage_len,
                              c.max_query_len or model.max_query_len, c.n_negatives)

    def step(self, engine: Any, batch: dict[str, torch.Tensor], world_size: int
             ) -> tuple[torch.Tensor, dict[str, float]]:
        return qg_rank_step(engine, batch, self.config.gen_weight, self.config.tau)
