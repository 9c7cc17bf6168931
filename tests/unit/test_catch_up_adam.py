"""CatchUpAdam: dense Adam's weights from sparse gradients, rows updated only when read."""

from __future__ import annotations

import copy as copy_module

import pytest
import torch

from compression.model.catch_up_adam import CatchUpAdam

BETAS = (0.9, 0.98)  # compression/model/train.py's


def _sparse_run(steps: int, lazy: type[torch.optim.Optimizer] = CatchUpAdam, seed: int = 0):
    """The same sparse gradients (3 of 40 rows per step) into torch's dense Adam and into
    `lazy`; returns (dense weights, lazy weights, lazy optimizer, start)."""
    gen = torch.Generator().manual_seed(seed)
    start = torch.randn(40, 4, generator=gen)
    dense_w, sparse_w = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    dense_opt = torch.optim.Adam([dense_w], lr=1e-2, betas=BETAS)
    opt = lazy([sparse_w], lr=1e-2, betas=BETAS)
    for _ in range(steps):
        rows = torch.randperm(40, generator=gen)[:3]
        grad = torch.randn(3, 4, generator=gen)
        dense_w.grad = torch.zeros(40, 4).index_put_((rows,), grad)
        sparse_w.grad = torch.sparse_coo_tensor(rows[None], grad, (40, 4))
        dense_opt.step()
        opt.step()
    return dense_w.detach(), sparse_w.detach(), opt, start


@pytest.mark.parametrize("steps", [1, 7, 400])  # inside and past the bias corrections' drift
def test_flushed_weights_equal_dense_adams(steps: int) -> None:
    dense, caught_up, opt, start = _sparse_run(steps)
    opt.flush()
    moved = (dense - start).abs().max()
    assert (dense - caught_up).abs().max() <= 1e-5 * max(1.0, float(moved))
    assert float(moved) > 1e-3


def test_lazy_sparse_adam_is_what_it_replaces() -> None:
    """torch's SparseAdam leaves rows behind (why this optimizer exists)."""
    dense, lazy, _, start = _sparse_run(400, torch.optim.SparseAdam)
    assert (dense - lazy).abs().max() > 0.1 * (dense - start).abs().max()


def test_rows_read_by_a_step_are_current_without_a_flush() -> None:
    gen = torch.Generator().manual_seed(1)
    w_dense = torch.nn.Parameter(torch.randn(10, 3, generator=gen))
    w = torch.nn.Parameter(w_dense.detach().clone())
    dense_opt = torch.optim.Adam([w_dense], lr=0.1, betas=BETAS)
    opt = CatchUpAdam([w], lr=0.1, betas=BETAS)
    grad = torch.randn(10, 3, generator=gen)
    for step in range(30):
        row = 0 if step < 20 else 1 + step % 2  # row 0 read, then sits out 10 steps
        rows = torch.tensor([row, 9])
        w_dense.grad = torch.zeros(10, 3).index_put_((rows,), grad[rows])
        w.grad = torch.sparse_coo_tensor(rows[None], grad[rows], (10, 3))
        dense_opt.step()
        opt.step()
    assert torch.allclose(w[9], w_dense[9], atol=1e-6)  # read on every step
    assert not torch.allclose(w[0], w_dense[0], atol=1e-3)  # behind until read or flushed
    opt.flush()
    assert torch.allclose(w, w_dense, atol=1e-6)


def test_a_dense_gradient_is_plain_adam() -> None:
    gen = torch.Generator().manual_seed(2)
    a = torch.nn.Parameter(torch.randn(6, 5, generator=gen))
    b = torch.nn.Parameter(a.detach().clone())
    ref, opt = torch.optim.Adam([a], lr=0.05, betas=BETAS), CatchUpAdam([b], lr=0.05, betas=BETAS)
    for _ in range(20):
        a.grad = torch.randn(6, 5, generator=gen)
        b.grad = a.grad.clone()
        ref.step()
        opt.step()
    assert torch.allclose(a, b, atol=1e-6)


def test_a_saved_state_continues_as_the_uninterrupted_run() -> None:
    _, _, opt, _ = _sparse_run(50)
    weights = opt.param_groups[0]["params"][0]
    copy = torch.nn.Parameter(weights.detach().clone())
    resumed = CatchUpAdam([copy], lr=1e-2, betas=BETAS)
    resumed.load_state_dict(copy_module.deepcopy(opt.state_dict()))  # as read from a file
    assert resumed.state[copy]["last"].dtype == torch.int64  # torch casts it to float
    grad = torch.sparse_coo_tensor(torch.tensor([[3, 7]]), torch.ones(2, 4), (40, 4))
    for o, w in ((opt, weights), (resumed, copy)):
        w.grad = grad
        o.step()
        o.flush()
    assert torch.equal(weights, copy)


def test_bad_settings_name_the_value() -> None:
    with pytest.raises(ValueError, match="betas"):
        CatchUpAdam([torch.nn.Parameter(torch.zeros(3, 2))], betas=(0.99, 0.9))
    with pytest.raises(ValueError, match=r"2-D tables, got shape \(3,\)"):
        CatchUpAdam([torch.nn.Parameter(torch.zeros(3))])
