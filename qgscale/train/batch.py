"""Typed training batches: named tokenised blocks instead of offsets into one tensor.

A :class:`StudentBatch` is what :class:`qgscale.train.data.StudentCollator` makes of a batch of
training rows and what :func:`qgscale.train.tasks.student_step` consumes; build one by hand
(e.g. random ids in ``benchmarks/gpu_check.py``) from :class:`Tokens` blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


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
