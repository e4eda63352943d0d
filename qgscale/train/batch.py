"""Typed training batches: named tokenised blocks instead of offsets into one tensor.

A :class:`StudentBatch` is what :class:`StudentCollator` makes of a batch of
training rows and what :func:`qgscale.train.tasks.student_step` consumes; build one by hand
(e.g. random ids in ``benchmarks/gpu_check.py``) from :class:`Tokens` blocks.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from qgscale.config import StudentTrainConfig
from qgscale.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class Tokens:
    """A tokenised block of texts, ``(n, length)`` each."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: torch.device | str) -> Tokens:
        return Tokens(self.input_ids.to(device), self.attention_mask.to(device))

    def inputs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments of an encoder call."""
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}

    @staticmethod
    def cat(*blocks: Tokens | None) -> Tokens:
        """The non-None blocks stacked into one encoder input (right-padded with 0 /
        mask 0 to the longest; the collator's blocks already share their length)."""
        parts = [b for b in blocks if b is not None]
        if len(parts) == 1:
            return parts[0]
        n = max(b.input_ids.shape[1] for b in parts)
        ids, mask = zip(*[(F.pad(b.input_ids, (0, n - b.input_ids.shape[1])),
                           F.pad(b.attention_mask, (0, n - b.input_ids.shape[1])))
                          for b in parts], strict=True)
        return Tokens(torch.cat(ids), torch.cat(mask))


def _to(t: torch.Tensor | None, device: torch.device | str) -> torch.Tensor | None:
    return None if t is None else t.to(device)


@dataclass
class StudentBatch:
    """One micro-batch of the dual encoder (B training queries), in named blocks.

    - ``queries`` (B) and ``groups`` (B x G: each query's positive, then its hard negatives):
      the contrastive part;
    - ``candidates`` (B x C passages, query-major: each query's list C(q), padded to C),
      ``cand_mask`` (B, C; False = padding) and ``teacher_scores`` (B, C): distillation,
      None without candidates;
    - ``generated`` (B: each query's generated paraphrase q', the query itself where it has
      none) and ``gen_mask`` (B; True = the row has a q'): None / all False when no row has
      one; ``gen_teacher_scores`` (B, C) with ``gen_teacher_mask`` (B; the row has a q' and
      teacher scores for it): None when no row has them;
    - ``group_ids`` (B x G) and ``positive_ids`` (B, P; -1 = padding): ids of the groups'
      passages and of each query's positives (:func:`qgscale.train.data.pid_key`), to keep
      another query's copy of a query's positive out of its negatives
      (:func:`qgscale.train.losses.shared_positives`);
      None for rows written without them.
    """

    queries: Tokens
    groups: Tokens
    group_size: int
    candidates: Tokens | None = None
    cand_mask: torch.Tensor | None = None
    teacher_scores: torch.Tensor | None = None
    generated: Tokens | None = None
    gen_mask: torch.Tensor | None = None
    gen_teacher_scores: torch.Tensor | None = None
    gen_teacher_mask: torch.Tensor | None = None
    group_ids: torch.Tensor | None = None
    positive_ids: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.gen_mask is None:
            self.gen_mask = torch.zeros(len(self.queries), dtype=torch.bool,
                                        device=self.queries.input_ids.device)

    def __len__(self) -> int:
        return len(self.queries)

    @property
    def n_candidates(self) -> int:
        return 0 if self.cand_mask is None else self.cand_mask.shape[1]

    def encoder_inputs(self) -> tuple[Tokens, Tokens]:
        """All queries ``[queries; generated]`` and all passages ``[groups; candidates]``:
        one encoder pass each."""
        return Tokens.cat(self.queries, self.generated), Tokens.cat(self.groups, self.candidates)

    def split_queries(self, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Embeddings of ``encoder_inputs()[0]`` -> queries (B, d), generated (B, d) or None."""
        b = len(self)
        return emb[:b], (emb[b:] if self.generated is not None else None)

    def split_passages(self, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Embeddings of ``encoder_inputs()[1]`` -> groups (B x G, d), candidates (B, C, d)
        or None."""
        n = len(self) * self.group_size
        if self.candidates is None:
            return emb[:n], None
        return emb[:n], emb[n:].view(len(self), self.n_candidates, -1)

    def to(self, device: torch.device | str) -> StudentBatch:
        return StudentBatch(
            queries=self.queries.to(device), groups=self.groups.to(device),
            group_size=self.group_size,
            candidates=self.candidates.to(device) if self.candidates is not None else None,
            cand_mask=_to(self.cand_mask, device), teacher_scores=_to(self.teacher_scores, device),
            generated=self.generated.to(device) if self.generated is not None else None,
            gen_mask=_to(self.gen_mask, device),
            gen_teacher_scores=_to(self.gen_teacher_scores, device),
            gen_teacher_mask=_to(self.gen_teacher_mask, device),
            group_ids=_to(self.group_ids, device), positive_ids=_to(self.positive_ids, device))


# --- the collator (runs on the workers; no Ray needed) ---------------------------------------
def as_list(x: Any) -> list:
    """A row field as a list (Ray Data hands numpy arrays, pyarrow lists)."""
    return list(x.tolist() if isinstance(x, np.ndarray) else x)


def _passage_ids(batch: dict[str, Iterable], g: int) -> dict[str, torch.Tensor]:
    """``group_ids`` (B x G) and ``positive_ids`` (B, P; padded with -1) of rows that carry
    ``passage_ids`` / ``positive_ids``; a row without them is a DataError (rows are
    written with both, or, before they existed, neither)."""
    qids = as_list(batch["qid"])
    ids = [None if a is None else as_list(a) for a in as_list(batch["passage_ids"])]
    pos = [None if b is None else as_list(b)
           for b in as_list(batch.get("positive_ids", [None] * len(qids)))]
    for i, (a, b) in enumerate(zip(ids, pos, strict=True)):
        if a is None or b is None or len(a) != g or not b:
            raise DataError(f"training row qid={qids[i]}: fields 'passage_ids' / "
                            f"'positive_ids' missing or not matching its {g} passages")
    positive = torch.full((len(pos), max(map(len, pos))), -1, dtype=torch.long)
    for i, b in enumerate(pos):
        positive[i, :len(b)] = torch.tensor(b, dtype=torch.long)
    return {"group_ids": torch.tensor([x for a in ids for x in a], dtype=torch.long),
            "positive_ids": positive}


@dataclass
class StudentCollator:
    """Batch of :data:`STUDENT_ROWS` -> :class:`StudentBatch`.

    Queries and generated queries are tokenised together (one padded length), as are the
    passage groups and candidates, so that the step encodes each side in one pass.
    ``n_candidates`` > 0 (distillation): candidate lists are cut or padded to that length.
    """

    tokenizer: Any
    max_query_len: int
    max_passage_len: int
    n_candidates: int = 0
    _warned: bool = dataclasses.field(default=False, init=False, repr=False, compare=False)

    @classmethod
    def for_config(cls, tokenizer: Any, cfg: StudentTrainConfig,
                   distill: bool) -> StudentCollator:
        """The collator of a stage: lengths from ``cfg``, candidates when ``distill``."""
        return cls(tokenizer, cfg.max_query_len, cfg.max_passage_len,
                   cfg.loss.n_candidates if distill else 0)

    def _tok(self, texts: list[str], max_len: int, sizes: list[int]) -> list[Tokens]:
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=max_len,
                             return_tensors="pt")
        ids, mask = enc["input_ids"].split(sizes), enc["attention_mask"].split(sizes)
        return [Tokens(i, m) for i, m in zip(ids, mask, strict=True)]

    def _candidates(self, batch: dict[str, Iterable], b: int) -> tuple[list[str], dict]:
        """Candidate texts (B x C, padded with "") and the named score tensors."""
        c = self.n_candidates
        mask = torch.zeros(b, c, dtype=torch.bool)
        teacher = torch.zeros(b, c)
        gen_teacher = torch.zeros(b, c)
        has_gen_scores = torch.zeros(b, dtype=torch.bool)
        cand_texts: list[str] = []
        for i, (texts, scores, gscores) in enumerate(zip(
                as_list(batch["cand_texts"]), as_list(batch["cand_scores"]),
                as_list(batch["gen_scores"]), strict=True)):
            texts, scores, gscores = as_list(texts), as_list(scores), as_list(gscores)
            if not texts:
                raise DataError(f"training row qid={as_list(batch['qid'])[i]}: "
                                "empty candidate list")
            texts, scores = texts[:c], scores[:c]
            n = len(texts)
            mask[i, :n] = True
            teacher[i, :n] = torch.tensor(scores, dtype=torch.float32)
            if gscores:
                gen_teacher[i, :n] = torch.tensor(gscores[:c], dtype=torch.float32)
                has_gen_scores[i] = True
            cand_texts += texts + [""] * (c - n)
        return cand_texts, {"cand_mask": mask, "teacher_scores": teacher,
                            "gen_teacher_scores": gen_teacher, "gen_teacher_mask": has_gen_scores}

    def __call__(self, batch: dict[str, Iterable]) -> StudentBatch:
        queries = [str(x) for x in as_list(batch["query"])]
        groups = [as_list(p) for p in as_list(batch["passages"])]
        sizes = {len(g) for g in groups}
        if len(sizes) != 1:
            raise DataError(f"rows have different passage group sizes {sorted(sizes)}")
        b, g = len(queries), sizes.pop()
        passages = [p for grp in groups for p in grp]
        gens = [str(x) for x in as_list(batch.get("gen_query", [""] * b))]
        gen_mask = torch.tensor([bool(x) for x in gens], dtype=torch.bool)
        fields: dict[str, Any] = {}
        if self.n_candidates:
            cand_texts, fields = self._candidates(batch, b)
            passages += cand_texts
        q_texts = queries
        if gen_mask.any():
            q_texts = queries + [x if x else q for x, q in zip(gens, queries, strict=True)]
        q_blocks = self._tok(q_texts, self.max_query_len, [b] * (len(q_texts) // b))
        p_blocks = self._tok(passages, self.max_passage_len,
                             [b * g] + ([b * self.n_candidates] if self.n_candidates else []))
        if self.n_candidates:
            fields["gen_teacher_mask"] = fields["gen_teacher_mask"] & gen_mask
            if not (gen_mask.any() and fields["gen_teacher_mask"].any()):
                fields["gen_teacher_scores"] = fields["gen_teacher_mask"] = None
        if "passage_ids" in batch:
            fields.update(_passage_ids(batch, g))
        elif not self._warned:
            self._warned = True
            log.warning("training rows without passage_ids (written before qgscale masked "
                        "shared positives): in-batch copies of a query's positive count as "
                        "its negatives; delete the stage's rows folder to rebuild them")
        return StudentBatch(
            queries=q_blocks[0], groups=p_blocks[0], group_size=g,
            candidates=p_blocks[1] if self.n_candidates else None,
            generated=q_blocks[1] if gen_mask.any() else None, gen_mask=gen_mask, **fields)
