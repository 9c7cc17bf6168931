"""Distillation loss against the formula, its limits, and each adaptive rule."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from compression.configs import ModelConfig
from compression.data.sequences import pad_left
from compression.distill import loss as distill_module
from compression.distill.loss import DistillConfig, DistillLoss, reliability_weight
from compression.distill.terms import distill_terms
from compression.model.sasrec import SASRec

S = torch.tensor([[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]])
T = torch.tensor([[2.0, 0.5, 0.0], [0.0, 1.0, 3.0]])
LABELS = torch.tensor([0, 2])


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def by_hand(temperature: float) -> tuple[list[float], list[float], list[float]]:
    kl, l2, ce = [], [], []
    for s, t, y in zip(S.double().numpy(), T.double().numpy(), LABELS.numpy(), strict=True):
        pt, ps = softmax(t / temperature), softmax(s / temperature)
        kl.append(float((pt * np.log(pt / ps)).sum()) * temperature**2)
        l2.append(float(((s - t) ** 2).mean()))
        ce.append(float(-np.log(softmax(s)[y])))
    return kl, l2, ce


def test_terms_equal_hand_computed_formula() -> None:
    kl, l2, ce, rank = distill_terms(S, T, LABELS, temperature=2.0)
    hand_kl, hand_l2, hand_ce = by_hand(2.0)
    assert kl.tolist() == pytest.approx(hand_kl, rel=1e-4)
    assert l2.tolist() == pytest.approx(hand_l2, rel=1e-6)
    assert ce.tolist() == pytest.approx(hand_ce, rel=1e-6)
    assert rank.tolist() == [0, 0]  # the teacher ranks both labels first


def test_temperature_squared_scaling() -> None:
    kl4, *_ = distill_terms(S, T, LABELS, temperature=4.0)
    plain = [k / 16 for k in by_hand(4.0)[0]]  # KL of the softened distributions
    assert (kl4 / 16).tolist() == pytest.approx(plain, rel=1e-4)
    # T^2 keeps gradient magnitudes comparable across temperatures
    grads = []
    for temp in (1.0, 8.0):
        s = S.clone().requires_grad_(True)
        distill_terms(s, T, LABELS, temperature=temp)[0].sum().backward()
        grads.append(s.grad.abs().sum().item())
    assert 0.2 < grads[1] / grads[0] < 5.0


def make_loss(cfg: DistillConfig, teacher_ndcg: float = 0.2) -> DistillLoss:
    teacher = SASRec(ModelConfig(n_items=20, max_len=8, hidden=8))
    return DistillLoss(cfg, teacher, teacher_valid_ndcg=teacher_ndcg)


def loss_of(cfg: DistillConfig) -> float:
    return float(make_loss(cfg).combine(*distill_terms(S, T, LABELS, cfg.temperature)))


def test_alpha_limits_and_beta() -> None:
    kl, l2, ce = (sum(x) for x in by_hand(2.0))
    assert loss_of(DistillConfig(alpha=1.0, temperature=2.0)) == pytest.approx(kl, rel=1e-4)
    assert loss_of(DistillConfig(alpha=0.0, temperature=2.0)) == pytest.approx(l2, rel=1e-4)
    mixed = loss_of(DistillConfig(alpha=0.3, beta=0.5, temperature=2.0))
    assert mixed == pytest.approx(0.3 * kl + 0.7 * l2 + 0.5 * ce, rel=1e-4)


def test_identical_student_has_zero_teacher_loss() -> None:
    kl, l2, _, _ = distill_terms(T, T, LABELS, temperature=3.0)
    assert kl.abs().max() < 1e-6 and l2.abs().max() < 1e-9


def test_top_k_restricts_soft_targets_to_teacher_best() -> None:
    kl_full, *_ = distill_terms(S, T, LABELS, 1.0)
    kl_top, _, ce_top, _ = distill_terms(S, T, LABELS, 1.0, top_k=2)
    # Row 0: the teacher's top-2 are items 0 and 1; item 2 goes to the "rest" category.
    pt_full, ps_full = softmax(T[0].double().numpy()), softmax(S[0].double().numpy())
    pt = np.array([pt_full[0], pt_full[1], pt_full[2]])
    ps = np.array([ps_full[0], ps_full[1], ps_full[2]])
    assert kl_top[0].item() == pytest.approx(float((pt * np.log(pt / ps)).sum()), rel=1e-4)
    big_s = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    big_t = torch.randn(4, 50, generator=torch.Generator().manual_seed(1)) * 3
    labels = torch.tensor([0, 1, 2, 3])
    kl_k, *_ = distill_terms(big_s, big_t, labels, 1.0, top_k=5)
    pt5 = torch.softmax(big_t, 1)
    top = pt5.topk(5, dim=1).indices
    ps5 = torch.softmax(big_s, 1)
    cat_t = torch.cat([pt5.gather(1, top), 1 - pt5.gather(1, top).sum(1, keepdim=True)], 1)
    cat_s = torch.cat([ps5.gather(1, top), 1 - ps5.gather(1, top).sum(1, keepdim=True)], 1)
    want = (cat_t * (cat_t / cat_s).log()).sum(1)
    assert kl_k.tolist() == pytest.approx(want.tolist(), rel=1e-4)
    assert not torch.allclose(kl_k, distill_terms(big_s, big_t, labels, 1.0)[0])
    assert torch.allclose(kl_top, kl_full)  # 3 items: top-2 + a one-item rest = the full KL
    assert ce_top.tolist() == pytest.approx(by_hand(1.0)[2], rel=1e-6)  # labels: full catalogue


def test_reliability_trusts_teacher_less_where_it_ranks_the_label_poorly() -> None:
    assert reliability_weight(torch.tensor([0, 2, 1022])).tolist() == pytest.approx([1.0, 0.5, 0.1])
    cfg = DistillConfig(alpha=1.0, beta=0.0, temperature=1.0, strategy="reliability")
    d = make_loss(cfg)
    kl, l2, ce = torch.tensor([1.0, 1.0]), torch.tensor([0.0, 0.0]), torch.tensor([3.0, 3.0])
    loss = d.combine(kl, l2, ce, torch.tensor([0, 2]))
    # position 0: teacher right -> all teacher; position 1: rank 2 -> half teacher, half labels
    assert float(loss) == pytest.approx(1.0 + (0.5 * 1.0 + 0.5 * 3.0))


def test_plateau_schedule_moves_weight_to_labels_then_sharpens() -> None:
    loss = make_loss(
        DistillConfig(
            strategy="plateau",
            plateau_patience=2,
            temperature=4.0,
        )
    )
    for epoch, ndcg in enumerate([0.10, 0.12, 0.11, 0.115], start=1):
        loss.on_eval(epoch, {"ndcg@10": ndcg})
    assert loss.state.teacher_weight == pytest.approx(0.75)  # two stalls after the best
    assert loss.state.temperature == 4.0
    loss.on_eval(5, {"ndcg@10": 0.195})  # >= 0.97 * 0.2
    assert loss.state.temperature == 2.0
    assert any("T -> 2.00" in e for e in loss.state.events)
    fixed = make_loss(DistillConfig(strategy="fixed", temperature=4.0))
    for epoch in range(1, 6):
        fixed.on_eval(epoch, {"ndcg@10": 0.19})
    assert (fixed.state.teacher_weight, fixed.state.temperature) == (1.0, 4.0)


def test_distill_loss_backpropagates_to_student_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(distill_module, "CHUNK_ROWS", 16)  # several chunks per batch
    torch.manual_seed(0)
    loss = make_loss(DistillConfig(alpha=0.5, beta=0.1))
    student = SASRec(ModelConfig(n_items=20, max_len=4, hidden=8, emb_dim=4))
    x = torch.randint(0, 21, (3, 8))
    y = torch.randint(1, 21, (3, 8))
    value = loss(student, x, y)
    value.backward()
    assert math.isfinite(value.item()) and value.item() > 0
    assert student.item_emb.weight.grad is not None
    assert all(p.grad is None for p in loss.teacher.parameters())


@pytest.mark.parametrize(
    ("strategy", "successors"),
    [
        ("fixed", None),
        ("reliability", None),
        ("fixed", 3),  # both add successor-list scores
    ],
)
def test_cached_teacher_targets_give_the_on_the_fly_loss(
    strategy: str, successors: int | None
) -> None:
    torch.manual_seed(0)
    teacher = SASRec(ModelConfig(n_items=30, max_len=10, hidden=16, successors=successors)).eval()
    # reads fewer steps, through a factorized item matrix
    student = SASRec(ModelConfig(n_items=30, max_len=6, hidden=8, emb_dim=4, successors=successors))
    rng = np.random.default_rng(0)
    seqs = [rng.integers(1, 31, size=n) for n in rng.integers(2, 12, size=20)]
    for model in (teacher, student):
        if model.successors is not None:  # so do the successor weights
            model.successors.fit(seqs)
            torch.nn.init.normal_(model.successors.weight, std=1.0)
    student.eval()
    inputs, targets = [s[:-1] for s in seqs], [s[1:] for s in seqs]
    cfg = DistillConfig(top_k=5, temperature=2.0, alpha=0.7, beta=0.3, strategy=strategy)
    loss = DistillLoss(cfg, teacher, teacher_valid_ndcg=0.2)
    loss.prepare(inputs, targets, width=student.cfg.max_len)
    assert loss.targets is not None
    assert loss.targets.offsets[-1] == sum(min(len(t), 6) for t in targets)
    rows = np.array([3, 0, 17, 9, 12])
    x = torch.from_numpy(pad_left([inputs[r] for r in rows], 10))
    y = torch.from_numpy(pad_left([targets[r] for r in rows], 10))
    cached = loss(student, x, y, rows=rows)
    on_the_fly = loss(student, x, y)  # no rows: the teacher runs on the batch
    assert cached.item() == pytest.approx(on_the_fly.item(), rel=2e-3)
    cached.backward()  # gradients reach the student through the cached path
    assert student.item_emb.weight.grad is not None
    if successors is not None:
        assert student.successors.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_no_cache_without_top_k_or_with_the_whole_catalogue() -> None:
    teacher = SASRec(ModelConfig(n_items=30, max_len=10, hidden=16))
    pairs = ([np.array([1, 2, 3])], [np.array([2, 3, 4])])
    for cfg in (DistillConfig(top_k=None), DistillConfig(top_k=30)):
        loss = DistillLoss(cfg, teacher, teacher_valid_ndcg=0.2)
        loss.prepare(*pairs, width=10)
        assert loss.targets is None


def test_sampled_terms_equal_the_full_ones_when_every_item_is_drawn() -> None:
    from compression.distill.sampled import sampled_cached_terms
    from compression.distill.terms import cached_terms

    torch.manual_seed(0)
    n, rows, k = 40, 6, 5
    logits = torch.randn(rows, n) * 2
    top_ids = torch.stack([torch.randperm(n)[:k] for _ in range(rows)])
    labels = torch.tensor([top_ids[0, 2].item(), 7, 11, 0, 39, 3])  # one label among the K
    top_logits, lse = torch.randn(rows, k), torch.randn(rows) + 5
    every = torch.arange(n)
    for temperature in (1.0, 2.0):
        want = cached_terms(logits, top_ids, top_logits, lse, labels, temperature)
        got = sampled_cached_terms(
            logits.gather(1, top_ids), logits.gather(1, labels[:, None])[:, 0], logits,
            top_ids, labels, every, n, top_logits, lse, temperature,
        )  # fmt: skip
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
