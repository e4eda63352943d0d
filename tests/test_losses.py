"""Each loss against a hand computation on small tensors."""

from __future__ import annotations

import math

import pytest
import torch

from qgscale.train import losses


def _softmax(xs: list[float]) -> list[float]:
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * (math.log(a) - math.log(b)) for a, b in zip(p, q, strict=True) if a > 0)


def test_contrastive_matches_hand_computation():
    q = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    # per query: [pos, hard neg]; query 0 -> rows 0,1; query 1 -> rows 2,3
    p = torch.tensor([[1.0, 1.0], [0.5, 0.0], [0.0, 1.0], [2.0, 0.0]])
    tau = 0.5
    loss = losses.contrastive_loss(q, p, group_size=2, temperature=tau)
    s = (q @ p.T / tau).tolist()
    hand = -(math.log(_softmax(s[0])[0]) + math.log(_softmax(s[1])[2])) / 2
    assert loss.item() == pytest.approx(hand, rel=1e-6)


def test_contrastive_exclude_leaves_shared_positives_out_of_the_negatives():
    """Two queries on one passage (rows 0 and 2 are the same passage): each query's copy of
    the other's positive is no negative, and its own label stays whatever ``exclude`` says."""
    q = torch.tensor([[1.0, 0.0], [0.8, 0.6]])
    p = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.5, 0.5]])
    shared = losses.shared_positives(torch.tensor([[7], [7]]), torch.tensor([7, 3, 7, 4]))
    assert sorted(zip(*(t.tolist() for t in shared), strict=True)) == [
        (0, 0), (0, 2), (1, 0), (1, 2)]
    loss = losses.contrastive_loss(q, p, group_size=2, exclude=shared)  # labels stay
    s = (q @ p.T).tolist()
    hand = -(math.log(_softmax([s[0][0], s[0][1], s[0][3]])[0])
             + math.log(_softmax([s[1][1], s[1][2], s[1][3]])[1])) / 2
    assert loss.item() == pytest.approx(hand, rel=1e-6)
    assert losses.contrastive_loss(q, p, 2).item() > loss.item()  # the copy was a negative
    grad_q = q.clone().requires_grad_()
    losses.contrastive_loss(grad_q, p, 2, exclude=shared).backward()
    assert torch.isfinite(grad_q.grad).all()


def test_shared_positives_match_a_dense_comparison():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 12, (40,), generator=g)  # repeated ids: several copies each
    pos = torch.randint(0, 15, (6, 3), generator=g)
    pos[2, 1:] = -1  # padding matches nothing
    rows, cols = losses.shared_positives(pos, ids)
    dense = (pos[:, :, None] == ids[None, None, :]).any(1)
    got = torch.zeros_like(dense)
    got[rows, cols] = True
    assert torch.equal(got, dense) and len(rows) == int((pos[:, :, None] == ids).sum())
    empty = losses.shared_positives(torch.full((2, 1), -1), ids)
    assert len(empty[0]) == len(empty[1]) == 0
    assert torch.equal(losses.pad_across_workers(pos), pos)  # no process group: as is


def test_contrastive_checks_layout():
    with pytest.raises(ValueError, match="expected 4 passages"):
        losses.contrastive_loss(torch.zeros(2, 3), torch.zeros(3, 3), group_size=2)


def test_gather_without_distributed_is_identity():
    t = torch.randn(3, 4)
    assert losses.gather_across_workers(t) is t


def test_kd_matches_hand_computation():
    s = torch.tensor([[1.0, 2.0, 0.0], [0.5, -1.0, 3.0]])
    t = torch.tensor([[-1.0, -0.5, -3.0], [-2.0, -2.0, -1.0]])
    tau_s, tau_t = 0.5, 2.0
    loss = losses.kd_loss(s, t, tau_s=tau_s, tau_t=tau_t)
    hand = sum(_kl(_softmax([x / tau_t for x in t[i].tolist()]),
                   _softmax([x / tau_s for x in s[i].tolist()])) for i in range(2)) / 2
    assert loss.item() == pytest.approx(hand, rel=1e-5)


def test_kd_mask_ignores_padded_candidates():
    s = torch.tensor([[1.0, 2.0, 99.0]])
    t = torch.tensor([[-1.0, -0.5, -99.0]])
    mask = torch.tensor([[True, True, False]])
    loss = losses.kd_loss(s, t, mask=mask)
    hand = _kl(_softmax([-1.0, -0.5]), _softmax([1.0, 2.0]))
    assert loss.item() == pytest.approx(hand, rel=1e-5)


def test_mask_is_exact_whatever_the_scale_of_the_scores():
    # teacher log-probs / tau_t = -30000, -25000: far below any fixed "large negative" fill
    t, s = torch.tensor([[-3.0, -2.5]]), torch.tensor([[1.0, 2.0]])
    t_pad, s_pad = torch.tensor([[-3.0, -2.5, 0.0]]), torch.tensor([[1.0, 2.0, 5.0]])
    mask = torch.tensor([[True, True, False]])
    kd = losses.kd_loss(s, t, tau_t=1e-4)
    assert kd.item() == pytest.approx(-math.log(_softmax([1.0, 2.0])[1]), rel=1e-5)
    s_pad.requires_grad_(True)
    kd_pad = losses.kd_loss(s_pad, t_pad, tau_t=1e-4, mask=mask)
    assert kd_pad.item() == pytest.approx(kd.item(), rel=1e-6)
    kd_pad.backward()
    assert torch.isfinite(s_pad.grad).all() and s_pad.grad[0, 2] == 0
    # the other users of the mask: student alignment and the listwise (QG ranking) loss
    g, g_pad = t.flip(-1), torch.tensor([[-2.5, -3.0, 0.0]])
    al = losses.align_student_kl(t, g, tau_s=1e-4)
    assert al.item() == pytest.approx(5000.0, rel=1e-5)
    al_pad = losses.align_student_kl(t_pad, g_pad, tau_s=1e-4, mask=mask)
    assert al_pad.item() == pytest.approx(al.item(), rel=1e-6)
    lw = losses.listwise_loss(t, tau=1e-4)
    assert losses.listwise_loss(t_pad, mask, tau=1e-4).item() == pytest.approx(lw.item(), rel=1e-6)
    assert lw.item() == pytest.approx(5000.0, rel=1e-5)


def test_kd_zero_when_distributions_match_and_gradient_moves_toward_teacher():
    t = torch.tensor([[-1.0, -2.0, -0.5, -3.0]])
    # equal distributions (scores differ by a constant; temperatures scale the same)
    s_equal = (t * 2 + 7.0)
    assert losses.kd_loss(s_equal, t, tau_s=2.0, tau_t=1.0).item() == pytest.approx(0, abs=1e-6)

    s = torch.zeros(1, 4, requires_grad=True)
    before = losses.kd_loss(s, t).item()
    losses.kd_loss(s, t).backward()
    # gradient of KL wrt student logits is P_S - P_T: descent raises where teacher is higher
    p_t = torch.softmax(t, -1)
    assert torch.allclose(s.grad, torch.softmax(s.detach(), -1) - p_t, atol=1e-6)
    with torch.no_grad():
        s -= 1.0 * s.grad
    after = losses.kd_loss(s, t).item()
    assert after < before
    assert torch.argmax(s).item() == torch.argmax(t).item()


def test_align_student_kl_plain_and_symmetric():
    a = torch.tensor([[1.0, 0.0, -1.0]])
    b = torch.tensor([[0.0, 2.0, 0.0]])
    pa, pb = _softmax([x / 0.5 for x in a[0].tolist()]), _softmax([x / 0.5 for x in b[0].tolist()])
    plain = losses.align_student_kl(a, b, tau_s=0.5)
    assert plain.item() == pytest.approx(_kl(pa, pb), rel=1e-5)
    sym = losses.align_student_kl(a, b, tau_s=0.5, symmetric=True)
    assert sym.item() == pytest.approx(0.5 * (_kl(pa, pb) + _kl(pb, pa)), rel=1e-5)
    # non-symmetric: only the generated paraphrase moves (as with mse / cosine)
    a.requires_grad_(True)
    b.requires_grad_(True)
    losses.align_student_kl(a, b).backward()
    assert a.grad is None and b.grad.abs().sum() > 0
    losses.align_student_kl(a, b, symmetric=True).backward()  # symmetric: both sides move
    assert a.grad.abs().sum() > 0


def test_align_teacher_kl_targets_teacher_of_original_query():
    t_q = torch.tensor([[-1.0, -3.0]])
    s_gen = torch.tensor([[0.0, 1.0]])
    loss = losses.align_teacher_kl(t_q, s_gen, tau_t=1.0, tau_s=1.0)
    assert loss.item() == pytest.approx(_kl(_softmax([-1.0, -3.0]), _softmax([0.0, 1.0])),
                                        rel=1e-5)


def test_align_embedding_variants():
    e_q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    e_g = torch.tensor([[1.0, 1.0], [0.0, -1.0]], requires_grad=True)
    mse = losses.align_mse(e_q, e_g)
    assert mse.item() == pytest.approx((1 + 0 + 0 + 4) / 4)
    cos = losses.align_cosine(e_q, e_g)
    assert cos.item() == pytest.approx(((1 - 1 / math.sqrt(2)) + 2) / 2, rel=1e-6)
    e_q2 = e_q.clone().requires_grad_(True)
    losses.align_cosine(e_q2, e_g).backward()
    assert e_q2.grad is None  # non-symmetric: the original query is the fixed target
    losses.align_mse(e_q2, e_g, symmetric=True).backward()
    assert e_q2.grad is not None


def test_alignment_dispatch_and_total():
    s_q, s_g, t_q = torch.randn(2, 3), torch.randn(2, 3), torch.randn(2, 3)
    e_q, e_g = torch.randn(2, 4), torch.randn(2, 4)
    kw = dict(s_q=s_q, s_gen=s_g, t_q=t_q, e_q=e_q, e_gen=e_g)
    assert losses.alignment_loss("student_kl", **kw) == losses.align_student_kl(s_q, s_g)
    assert losses.alignment_loss("teacher_kl", **kw) == losses.align_teacher_kl(t_q, s_g)
    assert losses.alignment_loss("mse", **kw) == losses.align_mse(e_q, e_g)
    assert losses.alignment_loss("cosine", **kw) == losses.align_cosine(e_q, e_g)
    with pytest.raises(ValueError, match="unknown alignment"):
        losses.alignment_loss("nope", **kw)
    c, k, a = torch.tensor(1.0), torch.tensor(2.0), torch.tensor(3.0)
    assert losses.total_loss(c, k, a, alpha=0.5, beta=0.1).item() == pytest.approx(2.3)
    assert losses.total_loss(c, None, None).item() == 1.0


def test_listwise_loss_matches_hand_computation_and_masks():
    s = torch.tensor([[-1.0, -2.0, -0.5], [-0.2, -3.0, 5.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    loss = losses.listwise_loss(s, mask, tau=0.5)
    hand = -(math.log(_softmax([-2.0, -4.0, -1.0])[0]) + math.log(_softmax([-0.4, -6.0])[0])) / 2
    assert loss.item() == pytest.approx(hand, rel=1e-5)  # the masked 5.0 does not count


def test_qg_rank_loss_normalises_by_length_and_adds_generation_nll():
    sums = torch.tensor([[-4.0, -3.0], [-6.0, -20.0]], requires_grad=True)
    ntok = torch.tensor([[4, 2], [3, 10]])
    loss, parts = losses.qg_rank_loss(sums, ntok, gen_weight=0.5)
    # scores log P / |q|: [-1, -1.5] and [-2, -2]; generation NLL of the positives 10 / 7
    rank = -(math.log(_softmax([-1.0, -1.5])[0]) + math.log(_softmax([-2.0, -2.0])[0])) / 2
    assert parts["rank"].item() == pytest.approx(rank, rel=1e-6)
    assert parts["gen"].item() == pytest.approx(10 / 7, rel=1e-6)
    assert loss.item() == pytest.approx(rank + 0.5 * 10 / 7, rel=1e-6)
    loss.backward()
    assert sums.grad[0, 0] < 0 < sums.grad[0, 1]  # raise the positive, lower the negative


def _two_workers(rank: int, port: int, out: str) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        positive = [torch.tensor([[5], [6]]), torch.tensor([[5, 9], [8, -1]])][rank]
        groups = [torch.tensor([5, 1, 6, 2]), torch.tensor([5, 3, 8, 9])][rank]
        rows, cols = losses.shared_positives(
            losses.gather_across_workers(losses.pad_across_workers(positive)),
            losses.gather_across_workers(groups))
        torch.save(sorted(zip(rows.tolist(), cols.tolist(), strict=True)), f"{out}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


def test_shared_positives_across_workers_of_different_widths(tmp_path):
    """Two gloo workers whose queries have 1 and 2 positives: both find the same index pairs
    over the gathered batch (queries 0-3, passages 0-7)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_two_workers, args=(port, str(tmp_path / "pairs")), nprocs=2)
    want = [(0, 0), (0, 4), (1, 2), (2, 0), (2, 4), (2, 7), (3, 6)]
    assert [torch.load(tmp_path / f"pairs.{r}") for r in (0, 1)] == [want, want]


def _uneven_workers(rank: int, port: int, out: str) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        rows = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([4.0])][rank].requires_grad_()
        none = torch.zeros(())  # a term this worker has no rows of
        (term, mean, n), (_, empty_mean, empty_n) = losses.mean_over_workers(
            [(rows.sum(), len(rows)), (none, 0)])
        term.backward()
        torch.save({"mean": mean, "n": n, "grad": rows.grad.tolist(),
                    "empty": (empty_mean, empty_n)}, f"{out}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


def test_mean_over_workers_of_uneven_rows(tmp_path):
    """Two gloo workers with 3 rows and 1 row of a loss (KD rows, generated-query rows): both
    log the mean over all 4 rows (2.5), and each row's gradient, after data-parallel
    averaging (/ 2), is 1/4 on either worker: the global mean's (a per-worker mean gave the
    lone row 3 times the weight of each other)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_uneven_workers, args=(port, str(tmp_path / "m")), nprocs=2)
    got = [torch.load(tmp_path / f"m.{r}") for r in (0, 1)]
    for g in got:
        assert g["mean"] == pytest.approx(2.5) and g["n"] == 4 and g["empty"] == (0.0, 0.0)
    assert [x / 2 for g in got for x in g["grad"]] == pytest.approx([0.25] * 4)
