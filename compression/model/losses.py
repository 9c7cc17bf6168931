"""Training losses over the catalogue: the full softmax, and sampled losses whose cost per
step grows with the number of negatives instead of the catalogue.

- `full`: cross-entropy over every item at every position ("SASRec+"), in row chunks whose
  logits are recomputed in backward, so the `[positions, items]` matrix is never stored.
- `sampled-uniform` / `sampled-popularity`: sampled softmax (Jean et al. 2015; the log-Q
  correction of Yi et al., RecSys 2019). `negatives` items are drawn once per batch and shared
  by all its positions, uniformly or in proportion to their training count (+1, so every item
  is drawn now and then); each logit is corrected by -log(expected draws of its item), so the
  sampled softmax estimates the full one instead of over-penalising popular items; a negative
  equal to the position's target is masked.
- `gbce`: generalised binary cross-entropy (Petrov & Macdonald, "gSASRec", RecSys 2023):
  -beta log sigmoid(s+) - sum log(1 - sigmoid(s-)) over `negatives` uniform negatives drawn
  for each position (as in the paper: negatives shared by a batch push the same few items
  down with hundreds of positions at once, and a model trained so fell below popularity), with
  beta = alpha (t (1 - 1/alpha) + 1/alpha), alpha = negatives / (items - 1) and t = `GBCE_T`:
  it undoes the overconfidence that negative sampling gives plain BCE.

Successor-list scores (`model.successors`) are added to whichever logits a loss computes.

- `cloze_loss` (bidirectional models, BERT4Rec, Sun et al. CIKM 2019): each item of a
  training window is replaced by [mask] with probability `mask_prob`, or (`LAST_ONLY_SHARE`
  of the windows, and those that drew none) only its last item, the task served at
  inference; the full softmax predicts the original items at the masked positions. It learns
  from a few positions per window where next-item training uses all: on 2,000 synthetic users
  (15 epochs) 0.46-0.47 NDCG@10 against the causal model's 0.68, still rising.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from compression.model.successors import add_entries

if TYPE_CHECKING:
    from compression.model.sasrec import SASRec

LossName = Literal["full", "sampled-uniform", "sampled-popularity", "gbce"]
# gSASRec's calibration t: 0 is plain BCE, 1 fully calibrated; the paper's choice for
# ML-1M-like data.
GBCE_T = 0.75
# Positions per full cross-entropy chunk: bounds the logit memory (chunk x items).
LOSS_CHUNK_ROWS = 2048
# Logits held at once by any chunked pass over the catalogue (32 MB of fp32).
CHUNK_CELLS = 2**23


def chunk_rows_for(n_items: int, most: int = LOSS_CHUNK_ROWS) -> int:
    """Rows per chunk so a `[rows, n_items]` logit block stays near `CHUNK_CELLS`: `most` for
    catalogues of a few thousand items, a handful at a million."""
    return max(1, min(most, CHUNK_CELLS // max(n_items, 1)))


LossFn = Callable[..., Tensor]


def _ce_sum(
    hidden: Tensor, weight: Tensor, targets: Tensor, ids: Tensor | None, values: Tensor | None
) -> Tensor:
    logits = hidden @ weight.T
    if ids is not None and values is not None:
        logits = add_entries(logits, (ids, values))
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def full_softmax_ce(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    chunk_rows: int | None = None,
    entries: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """Mean cross-entropy of `hidden @ weight.T` (plus sparse successor `entries`, one row
    per hidden row) without keeping the full logit matrix.

    `weight` excludes the padding row, so `targets` are internal ids minus one. Each chunk is
    checkpointed: its logits are recomputed in backward instead of stored, which is what
    makes the full softmax over all items affordable in memory and time.
    """
    ids, values = entries if entries is not None else (None, None)
    chunk_rows = chunk_rows or chunk_rows_for(weight.shape[0])
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_rows):
        sl = slice(start, start + chunk_rows)
        total = total + checkpoint(
            _ce_sum,
            hidden[sl],
            weight,
            targets[sl],
            None if ids is None else ids[sl],
            None if values is None else values[sl],
            use_reentrant=False,
        )
    return total / hidden.shape[0]


class NegativeSampler:
    """`n` item ids (1..n_items) per call, drawn with replacement, and the log of how many
    times each item is expected among them (the log-Q correction)."""

    def __init__(
        self, n_items: int, n: int, counts: np.ndarray | None = None, seed: int = 0
    ) -> None:
        if counts is None:
            q = np.full(n_items, 1.0 / n_items)
        else:
            weights = np.asarray(counts, dtype=np.float64)[1:] + 1.0  # drop padding
            if weights.shape != (n_items,):
                raise ValueError(f"counts has {weights.shape[0] + 1} entries, need {n_items + 1}")
            q = weights / weights.sum()
        self.n = n
        self._q = torch.from_numpy(q)
        # Index 0 (padding) is never drawn; its entry only keeps ids and rows aligned.
        self.log_expected = torch.from_numpy(np.log(np.concatenate([[1.0], n * q]))).float()
        self.generator = torch.Generator().manual_seed(seed)

    def sample(self, rows: int | None = None) -> Tensor:
        """`[n]` ids shared by a batch, or `[rows, n]`: `n` for each of `rows` positions."""
        count = self.n * (rows or 1)
        drawn = torch.multinomial(self._q, count, replacement=True, generator=self.generator)
        return (drawn + 1) if rows is None else (drawn + 1).reshape(rows, self.n)


def _sampled_logits(
    query: Tensor,
    model: SASRec,
    targets: Tensor,
    negatives: Tensor,
    entries: tuple[Tensor, Tensor] | None,
) -> tuple[Tensor, Tensor]:
    """(positive logits [rows], negative logits [rows, n]) for `negatives` `[n]` shared by
    all rows or `[rows, n]` per row; embeddings are gathered with sparse gradients, so a step
    touches only the rows it read."""
    weight = model.item_emb.weight
    pos = (query * F.embedding(targets, weight, sparse=True)).sum(-1).float()
    vectors = F.embedding(negatives, weight, sparse=True)
    if negatives.dim() == 1:
        neg = (query @ vectors.T).float()
    else:
        neg = torch.einsum("rd,rnd->rn", query, vectors).float()
    if entries is not None:
        pos = pos + successor_scores_at(entries, targets[:, None])[:, 0]
        neg = neg + successor_scores_at(entries, negatives)
    return pos, neg


def successor_scores_at(entries: tuple[Tensor, Tensor], ids: Tensor) -> Tensor:
    """The successor-list score of each id in `ids` (`[n]` shared or `[rows, n]`) for each
    row of `entries` (`[rows, m]` successor ids and scores): `[rows, n]`."""
    found, values = entries
    drawn = ids if ids.dim() == 2 else ids[None, :]
    same = found[:, :, None] == drawn[:, None, :]  # [rows, m, n]
    return (values[:, :, None].float() * same).sum(1)


def sampled_softmax_ce(
    pos: Tensor, neg: Tensor, targets: Tensor, negatives: Tensor, log_expected: Tensor
) -> Tensor:
    """Mean sampled-softmax cross-entropy with the log-Q correction (module docstring):
    its gradient, not its value, estimates the full softmax's."""
    pos = pos - log_expected[targets]
    neg = neg - log_expected[negatives]
    neg = neg.masked_fill(negatives[None, :] == targets[:, None], float("-inf"))
    logits = torch.cat([pos[:, None], neg], dim=1)
    return (torch.logsumexp(logits, dim=1) - pos).mean()


def gbce_beta(negatives: int, n_items: int, t: float = GBCE_T) -> float:
    """gSASRec's exponent of sigmoid(s+): 1 at t = 0 (plain BCE), alpha at t = 1."""
    alpha = negatives / max(n_items - 1, 1)
    return alpha * (t * (1.0 - 1.0 / alpha) + 1.0 / alpha)


def gbce(pos: Tensor, neg: Tensor, targets: Tensor, negatives: Tensor, beta: float) -> Tensor:
    """Mean generalised BCE over positions (module docstring)."""
    drawn = negatives if negatives.dim() == 2 else negatives[None, :]
    hit = drawn == targets[:, None]
    negative_part = torch.where(hit, 0.0, F.softplus(neg)).sum(dim=1)  # -log(1 - sigmoid(s-))
    return (beta * F.softplus(-pos) + negative_part).mean()  # -beta log sigmoid(s+)


# Share of windows that mask only their last item (on 300 synthetic users, 0 / 0.2 / 0.5 gave
# NDCG@10 0.240 / 0.244 / 0.255 after 20 epochs: within noise; kept as the paper does it).
LAST_ONLY_SHARE = 0.2


def cloze_loss(mask_prob: float, seed: int = 0) -> LossFn:
    """`loss(model, inputs, targets, rows=None)` for a bidirectional model (module docstring).
    The window is the pair's input followed by its last target."""
    generator = torch.Generator().manual_seed(seed)

    def loss(model: SASRec, inputs: Tensor, targets: Tensor, rows: object = None) -> Tensor:
        # The window's items: the (left-padded) input, then its last target.
        seq = torch.cat([inputs, targets[:, -1:]], dim=1)[:, -model.cfg.max_len :]
        valid = seq > 0
        masked = (torch.rand(seq.shape, generator=generator) < mask_prob).to(seq.device) & valid
        # Some windows mask only their last item: the task served at inference, where the
        # [mask] has no item after it (BERT4Rec adds such samples for the same reason).
        last_only = (torch.rand(len(seq), generator=generator) < LAST_ONLY_SHARE).to(seq.device)
        last_only |= ~masked.any(dim=1)
        masked[last_only] = False
        masked[last_only, -1] = valid[last_only, -1]
        hidden = model.encode(torch.where(masked, model.mask_id, seq))
        query = model.query(hidden[masked])
        return full_softmax_ce(query, model.output_weight[1:], seq[masked] - 1)

    loss.sparse_embeddings = False  # type: ignore[attr-defined]
    return with_generator_state(loss, generator)


def with_generator_state(loss: LossFn, generator: torch.Generator) -> LossFn:
    """`loss` with `state_dict` / `load_state_dict` for its random generator, so a resumed
    run draws what the uninterrupted one would have (`compression.model.resume`)."""
    loss.state_dict = lambda: {"generator": generator.get_state()}  # type: ignore[attr-defined]
    loss.load_state_dict = lambda saved: generator.set_state(saved["generator"])  # type: ignore[attr-defined]
    return loss


def sasrec_loss(
    name: LossName = "full",
    n_items: int | None = None,
    negatives: int = 256,
    counts: np.ndarray | None = None,
    seed: int = 0,
) -> LossFn:
    """`loss(model, inputs, targets, rows=None)` for `train`: the named loss at every
    position of the model's window (`counts`: training counts per id, for popularity)."""
    sampler = None
    if name != "full":
        if n_items is None:
            raise ValueError(f"loss {name!r} needs n_items")
        popular = counts if name == "sampled-popularity" else None
        sampler = NegativeSampler(n_items, negatives, popular, seed)
        beta = gbce_beta(negatives, n_items)

    def loss(model: SASRec, inputs: Tensor, targets: Tensor, rows: object = None) -> Tensor:
        width = model.cfg.max_len  # inputs may be wider than the model reads
        hidden = model.encode(inputs[:, -width:])
        targets = targets[:, -width:]
        valid = targets > 0
        entries = model.successor_entries(inputs[:, -width:])
        entries = None if entries is None else (entries[0][valid], entries[1][valid])
        query = model.query(hidden[valid])
        if sampler is None:
            weight = model.output_weight[1:]
            return full_softmax_ce(query, weight, targets[valid] - 1, None, entries)
        labels = targets[valid]
        drawn = sampler.sample(len(labels) if name == "gbce" else None).to(query.device)
        pos, neg = _sampled_logits(query, model, labels, drawn, entries)
        if name == "gbce":
            return gbce(pos, neg, labels, drawn, beta)
        log_q = sampler.log_expected.to(query.device)
        return sampled_softmax_ce(pos, neg, labels, drawn, log_q)

    loss.sparse_embeddings = sampler is not None  # type: ignore[attr-defined]
    return loss if sampler is None else with_generator_state(loss, sampler.generator)
