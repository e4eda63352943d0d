"""Losses of the method (README: "The method, as implemented"). One function per loss.

Every function takes scores or embeddings and returns a scalar (mean over queries). Scores are
float32 ``(B, C)`` matrices; ``mask`` (bool, True = real candidate) marks padded candidates.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _one_worker() -> bool:
    """No ``torch.distributed`` process group, or one of a single worker."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1


def gather_across_workers(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` from every worker along dim 0 (local slice keeps its gradient).

    Without ``torch.distributed`` (or with one worker) returns ``t``. The other workers'
    slices are constants here; see :func:`contrastive_loss` for the gradient scaling.
    """
    if _one_worker():
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.detach().contiguous())
    parts[dist.get_rank()] = t
    return torch.cat(parts)


def pad_across_workers(t: torch.Tensor, value: int = -1) -> torch.Tensor:
    """``t`` (B, P) right-padded with ``value`` to the widest P of any worker (one scalar
    all-reduce), so that :func:`gather_across_workers` can stack it; ``t`` itself without
    ``torch.distributed``."""
    if _one_worker():
        return t
    width = torch.tensor([t.shape[1]], device=t.device)
    dist.all_reduce(width, op=dist.ReduceOp.MAX)
    return F.pad(t, (0, int(width.item()) - t.shape[1]), value=value)


def mean_over_workers(terms: list[tuple[torch.Tensor, int]]
                      ) -> list[tuple[torch.Tensor, float, int]]:
    """For each ``(sum over this worker's rows, with gradient; its row count)``: ``(term to
    backpropagate, the mean over every worker's rows, their number)``, with one all-reduce
    and one read to the host for all terms.
    The term is ``sum x world / rows of every worker``: data-parallel averaging then gives
    the gradient of the mean over the global batch (as :func:`contrastive_loss`), whatever
    rows each worker has (a per-worker mean weighed a worker's few rows as much as another's
    many). Every worker must call it with the same terms (a count of 0 where it has none)."""
    sums = torch.stack([t.detach().float() for t, _ in terms])
    counts = torch.tensor([float(n) for _, n in terms], device=sums.device)
    world = 1
    if not _one_worker():
        both = torch.cat([sums, counts])
        dist.all_reduce(both)
        sums, counts, world = both[:len(terms)], both[len(terms):], dist.get_world_size()
    n = counts.clamp(min=1)
    means, rows = torch.stack([sums / n, counts]).tolist()
    return [(t * world / n[i], means[i], int(rows[i])) for i, (t, _) in enumerate(terms)]


def shared_positives(positive_ids: torch.Tensor, passage_ids: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, cols)``: the passages ``passage_ids`` (N,) that are one of query b's
    ``positive_ids`` (B, P; ids >= 0, -1 = padding), as index pairs found by binary search
    in the sorted ids: O(N log N + matches) memory, not a (B, N) mask (at 64 workers x 128
    queries x 8 passages that mask would be 0.5 GB per step)."""
    sorted_ids, order = passage_ids.sort()
    flat = positive_ids.reshape(-1)
    lo = torch.searchsorted(sorted_ids, flat)
    n = torch.searchsorted(sorted_ids, flat, right=True) - lo  # matches of each entry
    rows = torch.arange(positive_ids.shape[0], device=flat.device).repeat_interleave(
        positive_ids.shape[1]).repeat_interleave(n)
    offset = torch.arange(int(n.sum()), device=flat.device) - (n.cumsum(0) - n
                                                               ).repeat_interleave(n)
    return rows, order[lo.repeat_interleave(n) + offset]


def contrastive_loss(q: torch.Tensor, p: torch.Tensor, group_size: int,
                     temperature: float = 1.0,
                     exclude: tuple[torch.Tensor, torch.Tensor] | None = None
                     ) -> torch.Tensor:
    r"""InfoNCE with in-batch and hard negatives.

    ``q``: (B, d) queries; ``p``: (B * group_size, d) passages laid out per query as
    ``[pos_i, hardneg_i1, ..., hardneg_i(g-1)]``, so query i's positive is row ``i * g``.
    Every other passage in the batch is a negative:

    .. math::
        L = -\frac{1}{B} \sum_i \log
            \frac{\exp(\langle q_i, p_{ig} \rangle / \tau)}
                 {\sum_j \exp(\langle q_i, p_j \rangle / \tau)}

    To use negatives from all workers, pass ``gather_across_workers(q)`` and
    ``gather_across_workers(p)`` and multiply the loss by the world size before backward
    (each worker gets gradients only through its own slice; data-parallel averaging then
    yields the gradient of this loss over the global batch).

    ``exclude``: ``(rows, cols)`` of passages that are no negatives of their query (another
    query's copy of one of its positives, :func:`shared_positives`); they leave the
    denominator, a query's own label stays.
    """
    if p.shape[0] != q.shape[0] * group_size:
        raise ValueError(f"expected {q.shape[0] * group_size} passages for {q.shape[0]} "
                         f"queries x group {group_size}, got {p.shape[0]}")
    scores = q.float() @ p.float().T / temperature
    labels = torch.arange(q.shape[0], device=q.device) * group_size
    if exclude is not None:
        rows, cols = exclude
        other = cols != labels[rows]
        scores.index_put_((rows[other], cols[other]),  # in place: no second (B, N) matrix
                          torch.tensor(float("-inf"), device=scores.device))
    return F.cross_entropy(scores, labels)


def candidate_scores(q: torch.Tensor, candidates: torch.Tensor,
                     temperature: float = 1.0) -> torch.Tensor:
    r"""Student scores of each query's own candidate list: ``q`` (B, d), ``candidates``
    (B, C, d) -> :math:`\langle q_b, c_{bj} \rangle / \tau`, shape (B, C)."""
    return torch.einsum("bd,bcd->bc", q, candidates) / temperature


def _log_softmax(scores: torch.Tensor, tau: float, mask: torch.Tensor | None) -> torch.Tensor:
    """Log-softmax of ``scores / tau`` over the last dim; padded candidates get probability 0.

    Each row is first shifted so its largest real entry is 0 (softmax is shift-invariant),
    then padded entries are set to the dtype's most negative finite value: exp underflows to
    exactly 0 whatever the scale of the scores, and the log stays finite, which keeps
    ``0 * -inf`` (NaN) out of the KL and its gradient. A row with no real entry is uniform.
    """
    s = scores.float() / tau
    if mask is not None:
        top = s.masked_fill(~mask, float("-inf")).amax(dim=-1, keepdim=True).detach()
        s = (s - top.nan_to_num(0.0, neginf=0.0)).masked_fill(~mask, torch.finfo(s.dtype).min)
    return F.log_softmax(s, dim=-1)


def _kl(log_p: torch.Tensor, log_q: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over rows of KL(p || q) = sum_c p_c (log p_c - log q_c), from log-probabilities."""
    terms = log_p.exp() * (log_p - log_q)
    if mask is not None:
        terms = terms.masked_fill(~mask, 0.0)
    return terms.sum(-1).mean()


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, tau_s: float = 1.0,
            tau_t: float = 1.0, mask: torch.Tensor | None = None) -> torch.Tensor:
    r"""Distillation from teacher scores over each query's candidate list.

    .. math::
        L_{KD} = \frac{1}{B} \sum_q KL\big(\mathrm{softmax}(s_T(q, C)/\tau_T)
                 \,\|\, \mathrm{softmax}(s_S(q, C)/\tau_S)\big)

    ``student``/``teacher``: (B, C) scores; the teacher side gets no gradient.
    """
    log_t = _log_softmax(teacher.detach(), tau_t, mask)
    log_s = _log_softmax(student, tau_s, mask)
    return _kl(log_t, log_s, mask)


def align_student_kl(s_q: torch.Tensor, s_gen: torch.Tensor, tau_s: float = 1.0,
                     symmetric: bool = False, mask: torch.Tensor | None = None) -> torch.Tensor:
    r"""Cross-lingual alignment, qgscale formulation (default).

    With the student's distributions over the same candidates C(q) for the query q and its
    generated cross-lingual paraphrase q':

    .. math::
        L_{align} = KL\big(P_S(\cdot|q) \,\|\, P_S(\cdot|q')\big), \quad
        P_S(c|x) = \mathrm{softmax}_c(s_S(x, c)/\tau_S)

    ``symmetric=False`` treats P_S(.|q) as a fixed target (only q' moves, as in the
    embedding-level kinds: the labelled query is not pulled toward its noisier generated
    paraphrase); ``symmetric``: :math:`\frac12 [KL(P_S(.|q)||P_S(.|q')) +
    KL(P_S(.|q')||P_S(.|q))]`, both sides receiving gradients.
    """
    log_q = _log_softmax(s_q if symmetric else s_q.detach(), tau_s, mask)
    log_g = _log_softmax(s_gen, tau_s, mask)
    loss = _kl(log_q, log_g, mask)
    if symmetric:
        loss = 0.5 * (loss + _kl(log_g, log_q, mask))
    return loss


def align_teacher_kl(t_q: torch.Tensor, s_gen: torch.Tensor, tau_t: float = 1.0,
                     tau_s: float = 1.0, mask: torch.Tensor | None = None) -> torch.Tensor:
    r"""Alignment variant: the target is the teacher's distribution for the original query.

    .. math:: L_{align} = KL\big(\mathrm{softmax}(s_T(q, C)/\tau_T) \,\|\, P_S(\cdot|q')\big)
    """
    return kd_loss(s_gen, t_q, tau_s=tau_s, tau_t=tau_t, mask=mask)


def align_mse(e_q: torch.Tensor, e_gen: torch.Tensor, symmetric: bool = False) -> torch.Tensor:
    r"""Embedding-level alignment: :math:`\frac1B \sum_i \frac1d \|E_q(q_i) - E_q(q'_i)\|^2`.

    ``symmetric=False`` treats E_q(q) as a fixed target (only q' moves).
    """
    target = e_q.float() if symmetric else e_q.float().detach()
    return F.mse_loss(e_gen.float(), target)


def align_cosine(e_q: torch.Tensor, e_gen: torch.Tensor,
                 symmetric: bool = False) -> torch.Tensor:
    r"""Embedding-level alignment: :math:`\frac1B \sum_i 1 - \cos(E_q(q_i), E_q(q'_i))`.

    ``symmetric=False`` treats E_q(q) as a fixed target (only q' moves).
    """
    target = e_q.float() if symmetric else e_q.float().detach()
    return (1 - F.cosine_similarity(e_gen.float(), target, dim=-1)).mean()


def alignment_loss(kind: str, *, s_q: torch.Tensor, s_gen: torch.Tensor, t_q: torch.Tensor,
                   e_q: torch.Tensor, e_gen: torch.Tensor, tau_s: float = 1.0,
                   tau_t: float = 1.0, symmetric: bool = False,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """Dispatch on ``LossConfig.align``: student_kl | teacher_kl | mse | cosine."""
    if kind == "student_kl":
        return align_student_kl(s_q, s_gen, tau_s=tau_s, symmetric=symmetric, mask=mask)
    if kind == "teacher_kl":
        return align_teacher_kl(t_q, s_gen, tau_t=tau_t, tau_s=tau_s, mask=mask)
    if kind == "mse":
        return align_mse(e_q, e_gen, symmetric=symmetric)
    if kind == "cosine":
        return align_cosine(e_q, e_gen, symmetric=symmetric)
    raise ValueError(f"unknown alignment loss {kind!r}")


def total_loss(contrastive: torch.Tensor, kd: torch.Tensor | None = None,
               align: torch.Tensor | None = None, alpha: float = 1.0,
               beta: float = 1.0) -> torch.Tensor:
    r""":math:`L = L_{contrastive} + \alpha L_{KD} + \beta L_{align}` (missing terms count 0)."""
    loss = contrastive
    if kd is not None and alpha:
        loss = loss + alpha * kd
    if align is not None and beta:
        loss = loss + beta * align
    return loss


def listwise_loss(scores: torch.Tensor, mask: torch.Tensor | None = None,
                  tau: float = 1.0) -> torch.Tensor:
    r"""Listwise softmax cross-entropy with the positive at index 0 of every row.

    .. math:: L = -\frac1B \sum_b \log \mathrm{softmax}(s_b / \tau)_0

    ``scores``: (B, 1 + N) (positive, then N negatives); ``mask`` (B, 1 + N) marks real
    candidates (a row may have fewer negatives; the positive must be real).
    """
    return -_log_softmax(scores, tau, mask)[:, 0].mean()


def qg_rank_loss(logp_sum: torch.Tensor, ntok: torch.Tensor, mask: torch.Tensor | None = None,
                 gen_weight: float = 1.0, tau: float = 1.0
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""The teacher's ranking fine-tune: listwise loss over its scores plus generation NLL.

    ``logp_sum``/``ntok``: (B, 1 + N) summed target log-probabilities of query b given each
    of its passages (the positive at index 0, then its hard negatives) and the query's token
    count. The teacher score is the length-normalised :math:`s = \log P(q|p) / |q|`, and

    .. math:: L = L_{list}(s) + w_{gen} \cdot
              \Big(-\frac{\sum_b \log P(q_b | p_b^+)}{\sum_b |q_b|}\Big)

    (the generation term is the token-mean NLL of the positives, as in QG training).
    Returns (loss, parts ``{rank, gen}``).
    """
    ntok = ntok.to(logp_sum.dtype).clamp(min=1)
    rank = listwise_loss(logp_sum / ntok, mask, tau)
    gen = -logp_sum[:, 0].sum() / ntok[:, 0].sum()
    return rank + gen_weight * gen, {"rank": rank, "gen": gen}
