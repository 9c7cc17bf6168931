"""Knowledge distillation from a SASRec teacher into a smaller SASRec student.

Per student position i (every position, the whole catalogue unless `top_k` is set):

    L_i = w_i * [ alpha * T^2 * KL(softmax(z_t/T) || softmax(z_s/T))
                  + (1 - alpha) * mean_j (y_s,j - y_t,j)^2 ]
          + u_i * CE(z_s, label_i)

    L = mean_i L_i

`y` are logits (the L2 term between probabilities measured no better, docs/distillation.md);
the squared error is averaged over the items so its scale does not grow with the catalogue. With the
`fixed` strategy w_i = 1 and u_i = beta, which for beta = 0 is exactly the design formula
alpha*KL + (1-alpha)*L2.

Adaptive strategies (`DistillConfig.strategy`):

- `reliability`: per-position trust in the teacher. With r_i the teacher's 0-based rank of
  the true next item among all items (ties count against it, `evaluate.target_rank`),
  w_i = 1 / log2(2 + r_i) (1 when the teacher ranks it first, 0.5 at rank 2, ~0.1 at
  rank 1000) and the weight it loses goes to the labels:
  u_i = beta + (1 - w_i). Where the teacher is wrong, the student learns from the data.
- `plateau`: a schedule driven by the student's validation NDCG@10. When it has not improved
  for `plateau_patience` evaluations, `PLATEAU_STEP` of the teacher weight moves to the labels
  (the teacher multiplier m drops by `PLATEAU_STEP`, floored at `PLATEAU_FLOOR`, and
  u = beta + (1 - m)). When the student reaches `NEAR_TEACHER` (97%, the project's bar) of
  the teacher's validation NDCG@10, T is halved (`TEMPERATURE_DECAY`, floored at 1): sharper
  targets to close the last gap. Both rules act at most once per evaluation.

`top_k`: the teacher's K best items per position become the soft targets, plus one "rest"
category holding the probability of every other item (K + 1 categories, for teacher and
student alike; the softmaxes themselves are over the full catalogue), so the targets per
position are bounded by K + 1 numbers and the student still learns to keep the other items
low; the L2 term compares the K logits; the label term uses the full catalogue.

With `top_k` the teacher's targets (its top-K logits, the normaliser at
T, the rank of each label) are computed once for every training position before the first
epoch (`TeacherTargets`) instead of on every batch: the teacher is frozen, so they never
change between epochs, and on 2 CPU cores its forward pass made a distillation epoch 4-5x
as long as a labels-only one. The `plateau` schedule rebuilds them when it changes T.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from compression.configs import DistillConfig
from compression.data.sequences import pad_left
from compression.distill.sampled import sampled_cached_terms, student_logits_at
from compression.distill.terms import cached_terms, distill_terms
from compression.evaluate.metrics import target_rank_torch
from compression.model.losses import chunk_rows_for
from compression.model.sasrec import SASRec
from compression.model.successors import add_entries

# The plateau strategy sharpens T (x TEMPERATURE_DECAY) once the student reaches this share of
# the teacher's validation NDCG@10: the project's own bar.
NEAR_TEACHER = 0.97
TEMPERATURE_DECAY = 0.5
# The plateau strategy's step and floor: what its one measured run used (docs/distillation.md:
# on par with `fixed`), constants since issue 26 needed their two settings.
PLATEAU_STEP = 0.25
PLATEAU_FLOOR = 0.25
# Student positions per loss chunk: bounds the [chunk, items] logit memory of each term
# (fewer for large catalogues: `chunk_rows_for`).
CHUNK_ROWS = 1024


@dataclass
class TeacherTargets:
    """The teacher's view of every training position a student sees, flattened pair by pair
    (pair p owns rows `offsets[p]:offsets[p + 1]`, its last positions in order)."""

    offsets: np.ndarray
    top_ids: Tensor  # [positions, K], int16 when the catalogue allows (memory)
    top_logits: Tensor  # [positions, K] float16
    lse: Tensor  # [positions] float32: logsumexp(z_t / T) over the catalogue
    rank: Tensor  # [positions] int32: the teacher's 0-based rank of the label
    temperature: float

    def rows_of(self, pairs: np.ndarray) -> Tensor:
        return torch.from_numpy(
            np.concatenate([np.arange(self.offsets[p], self.offsets[p + 1]) for p in pairs])
        )


@torch.no_grad()
def teacher_targets(
    teacher: SASRec,
    inputs: Sequence[np.ndarray],
    targets: Sequence[np.ndarray],
    width: int,
    top_k: int,
    temperature: float,
    bf16: bool = False,
    batch_size: int = 256,
    chunk_rows: int | None = None,
) -> TeacherTargets:
    """One teacher pass over the training pairs; the student reads the last `width` steps.
    Logits are computed `chunk_rows` positions at a time (by default as many as keep a block
    near 32 MB), so a million-item teacher needs no more memory than a small one."""
    teacher.eval()
    seen = np.array([min(len(t), width) for t in targets])
    offsets = np.concatenate([[0], np.cumsum(seen)]).astype(np.int64)
    n, n_items = int(offsets[-1]), teacher.cfg.n_items
    id_dtype = torch.int16 if n_items < 2**15 else torch.int32
    top_ids = torch.empty((n, top_k), dtype=id_dtype)
    top_logits = torch.empty((n, top_k), dtype=torch.float16)
    lse = torch.empty(n, dtype=torch.float32)
    rank = torch.empty(n, dtype=torch.int32)
    weight = teacher.output_weight[1:]
    chunk_rows = chunk_rows or chunk_rows_for(n_items, 4096)
    order = np.argsort([len(x) for x in inputs], kind="stable")  # similar lengths together
    for start in range(0, len(order), batch_size):
        pairs = order[start : start + batch_size]
        x = torch.from_numpy(
            pad_left([inputs[p] for p in pairs], max(len(inputs[p]) for p in pairs))
        )
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            hidden = teacher.encode(x)
        rows = [hidden[j, hidden.shape[1] - seen[p] :] for j, p in enumerate(pairs)]
        query = teacher.query(torch.cat(rows)).float()
        entries = teacher.successor_entries(x)
        if entries is not None:
            ids, values = (
                torch.cat([e[j, e.shape[1] - seen[p] :] for j, p in enumerate(pairs)])
                for e in entries
            )
        labels = torch.from_numpy(np.concatenate([targets[p][-seen[p] :] for p in pairs]) - 1)
        where = torch.from_numpy(
            np.concatenate([np.arange(offsets[p], offsets[p + 1]) for p in pairs])
        )
        for c in range(0, query.shape[0], chunk_rows):
            sl = slice(c, c + chunk_rows)
            logits = query[sl] @ weight.T.float()
            if entries is not None:
                logits = add_entries(logits, (ids[sl], values[sl].float()))
            top = logits.topk(top_k, dim=1)
            at = where[sl]
            top_ids[at] = top.indices.to(id_dtype)
            top_logits[at] = top.values.half()
            lse[at] = torch.logsumexp(logits / temperature, dim=1)
            rank[at] = target_rank_torch(logits, labels[sl]).int()
    return TeacherTargets(offsets, top_ids, top_logits, lse, rank, temperature)


def _at(entries: tuple[Tensor, Tensor] | None, index: object) -> tuple[Tensor, Tensor] | None:
    """Index both tensors of optional successor entries alike."""
    return None if entries is None else (entries[0][index], entries[1][index])  # type: ignore[index]


def reliability_weight(rank: Tensor) -> Tensor:
    """Trust in the teacher at a position: 1 / log2(2 + rank of the true item)."""
    return 1.0 / torch.log2(rank.float() + 2.0)


@dataclass
class DistillState:
    """What the adaptive schedule may change during training."""

    temperature: float
    teacher_weight: float = 1.0
    best_ndcg: float = -1.0
    stalled: int = 0
    events: list[str] = field(default_factory=list)


# (inputs, targets, width, top_k, temperature) -> the teacher's cached targets.
TargetsFn = Callable[[Sequence[np.ndarray], Sequence[np.ndarray], int, int, float], TeacherTargets]


class DistillLoss:
    """Callable `(student, inputs, targets) -> loss` for `compression.model.train.train`.

    The teacher is a stored SASRec (`teacher`), or any source of cached top-K targets
    (`targets_of`, e.g. an external ONNX teacher: `compression.distill.external_targets`),
    which needs `top_k` since the whole catalogue per position is never cached."""

    def __init__(
        self,
        cfg: DistillConfig,
        teacher: SASRec | None,
        teacher_valid_ndcg: float,
        targets_of: TargetsFn | None = None,
        negatives: int | None = None,
        seed: int = 0,
    ) -> None:
        if teacher is None and (targets_of is None or cfg.top_k is None):
            raise ValueError(
                "a teacher given only as cached targets (an external or bidirectional "
                "teacher) needs "
                "[distill] top_k: set it, e.g. top_k = 128"
            )
        if negatives is not None and cfg.top_k is None:
            raise ValueError(
                "a sampled [train] loss distils from the teacher's cached top-K targets: set "
                "[distill] top_k (e.g. 128) or use loss = 'full'"
            )
        if teacher is not None and teacher.cfg.bidirectional:
            raise ValueError(
                "a bidirectional teacher predicts at an appended [mask], one pass per "
                "position: give its targets as `targets_of` (`distill_student` does)"
            )
        self.cfg = cfg
        self.teacher = teacher.eval() if teacher is not None else None
        if self.teacher is not None:
            for p in self.teacher.parameters():
                p.requires_grad_(False)
        self._targets_of = targets_of or self._own_targets
        # With `negatives`, the student's normaliser is estimated from that many uniform
        # draws per batch (compression.distill.sampled): a step ignores the catalogue size.
        self.negatives = negatives
        self.sparse_embeddings = negatives is not None
        self._generator = torch.Generator().manual_seed(seed)
        self.teacher_valid_ndcg = teacher_valid_ndcg
        self.state = DistillState(temperature=cfg.temperature)
        # The teacher's cached targets for the training pairs (None: not cached).
        self.targets: TeacherTargets | None = None
        self._built_at = cfg.temperature  # the temperature `targets` were cached at
        self._pairs: tuple[Sequence[np.ndarray], Sequence[np.ndarray], int] | None = None

    def prepare(
        self, inputs: Sequence[np.ndarray], targets: Sequence[np.ndarray], width: int
    ) -> None:
        """Called by `train` with its training pairs: cache the teacher's targets (top-K only;
        the whole catalogue per position would not fit in memory on large data sets)."""
        cfg = self.cfg
        if cfg.top_k is None:
            return
        whole = self.teacher is not None and cfg.top_k >= self.teacher.cfg.n_items
        if whole and self.negatives is None:
            return  # the whole catalogue: on the fly is as cheap
        self._pairs = (inputs, targets, width)
        self._build()

    def _own_targets(
        self,
        inputs: Sequence[np.ndarray],
        targets: Sequence[np.ndarray],
        width: int,
        top_k: int,
        temperature: float,
    ) -> TeacherTargets:
        assert self.teacher is not None
        top_k = min(top_k, self.teacher.cfg.n_items)
        return teacher_targets(self.teacher, inputs, targets, width, top_k, temperature)

    def _build(self) -> None:
        assert self._pairs is not None and self.cfg.top_k is not None
        inputs, targets, width = self._pairs
        self.targets = self._targets_of(
            inputs, targets, width, self.cfg.top_k, self.state.temperature
        )
        self._built_at = self.state.temperature

    def state_dict(self) -> dict[str, object]:
        """The schedule and the sampler, for a resumed run (`compression.model.resume`)."""
        return {"schedule": asdict(self.state), "generator": self._generator.get_state()}

    def load_state_dict(self, saved: dict[str, object]) -> None:
        self.state = DistillState(**saved["schedule"])  # type: ignore[arg-type]
        self._generator.set_state(saved["generator"])  # type: ignore[arg-type]
        if self.targets is not None and self._built_at != self.state.temperature:
            self._build()  # the schedule had cooled the targets before the run was cut

    def combine(self, kl: Tensor, l2: Tensor, ce: Tensor, rank: Tensor | None) -> Tensor:
        """Sum over positions of the weighted per-position loss (see module docstring)."""
        cfg, m = self.cfg, self.state.teacher_weight
        teacher_part = cfg.alpha * kl + (1.0 - cfg.alpha) * l2
        if cfg.strategy == "reliability":
            assert rank is not None, "the reliability strategy needs the teacher's ranks"
            w = reliability_weight(rank)
            return (w * teacher_part + (cfg.beta + (1.0 - w)) * ce).sum()
        return (m * teacher_part + (cfg.beta + (1.0 - m)) * ce).sum()

    def _chunk(
        self,
        s_query: Tensor,
        s_weight: Tensor,
        t_query: Tensor,
        labels: Tensor,
        t_weight: Tensor,
        s_entries: tuple[Tensor, Tensor] | None,
        t_entries: tuple[Tensor, Tensor] | None,
    ) -> Tensor:
        s_logits = add_entries(s_query @ s_weight.T, s_entries)
        with torch.no_grad():
            t_logits = add_entries(t_query @ t_weight.T, t_entries)
        terms = distill_terms(
            s_logits,
            t_logits,
            labels,
            self.state.temperature,
            self.cfg.top_k,
            with_rank=self.cfg.strategy == "reliability",
        )
        return self.combine(*terms)

    def _cached_chunk(
        self,
        s_query: Tensor,
        s_weight: Tensor,
        rows: Tensor,
        labels: Tensor,
        t: TeacherTargets,
        s_entries: tuple[Tensor, Tensor] | None,
    ) -> Tensor:
        kl, l2, ce = cached_terms(
            add_entries(s_query @ s_weight.T, s_entries),
            t.top_ids[rows].long(),
            t.top_logits[rows].float(),
            t.lse[rows],
            labels,
            self.state.temperature,
        )
        return self.combine(kl, l2, ce, t.rank[rows])

    def __call__(
        self, student: SASRec, inputs: Tensor, targets: Tensor, rows: np.ndarray | None = None
    ) -> Tensor:
        """`rows`: which training pairs (as given to `prepare`) the batch holds; with cached
        targets the teacher does not run at all."""
        if student.cfg.bidirectional:
            raise ValueError(
                "a bidirectional student trains by cloze from labels; distil into a causal "
                "student (bidirectional = false)"
            )
        if self.targets is not None and rows is not None:
            return self._cached(student, inputs, targets, rows)
        if self.teacher is None:
            raise RuntimeError("cached teacher targets are missing; call prepare() first")
        width = student.cfg.max_len
        with torch.no_grad():
            t_hidden = self.teacher.encode(inputs)[:, -width:]
            t_entries = _at(
                self.teacher.successor_entries(inputs), (slice(None), slice(-width, None))
            )
        s_hidden = student.encode(inputs[:, -width:])
        y = targets[:, -width:]
        valid = y > 0
        s_entries = _at(student.successor_entries(inputs[:, -width:]), valid)
        t_entries = _at(t_entries, valid)
        s_query = student.query(s_hidden[valid])
        t_query = self.teacher.query(t_hidden[valid])
        labels = y[valid] - 1
        s_weight, t_weight = student.output_weight[1:], self.teacher.output_weight[1:]
        total = s_query.new_zeros((), dtype=torch.float32)
        rows = chunk_rows_for(s_weight.shape[0], CHUNK_ROWS)
        for start in range(0, s_query.shape[0], rows):
            sl = slice(start, start + rows)
            total = total + checkpoint(
                self._chunk,
                s_query[sl],
                s_weight,
                t_query[sl],
                labels[sl],
                t_weight,
                _at(s_entries, sl),
                _at(t_entries, sl),
                use_reentrant=False,
            )
        return total / max(s_query.shape[0], 1)

    def _cached(
        self, student: SASRec, inputs: Tensor, targets: Tensor, pairs: np.ndarray
    ) -> Tensor:
        t = self.targets
        assert t is not None
        width = student.cfg.max_len
        s_hidden = student.encode(inputs[:, -width:])
        y = targets[:, -width:]
        valid = y > 0
        s_query = student.query(s_hidden[valid])
        s_entries = _at(student.successor_entries(inputs[:, -width:]), valid)
        labels = y[valid] - 1
        rows = t.rows_of(pairs)
        if rows.shape[0] != s_query.shape[0]:
            raise RuntimeError("cached teacher targets do not match the batch; call prepare()")
        if self.negatives is not None:
            return self._cached_sampled(student, s_query, rows, labels, t, s_entries)
        s_weight = student.output_weight[1:]
        total = s_query.new_zeros((), dtype=torch.float32)
        step = chunk_rows_for(s_weight.shape[0], CHUNK_ROWS)
        for start in range(0, s_query.shape[0], step):
            sl = slice(start, start + step)
            total = total + checkpoint(
                self._cached_chunk, s_query[sl], s_weight, rows[sl], labels[sl], t,
                _at(s_entries, sl), use_reentrant=False,
            )  # fmt: skip
        return total / max(s_query.shape[0], 1)

    def _cached_sampled(
        self,
        student: SASRec,
        s_query: Tensor,
        rows: Tensor,
        labels: Tensor,
        t: TeacherTargets,
        s_entries: tuple[Tensor, Tensor] | None,
    ) -> Tensor:
        assert self.negatives is not None
        n_items = student.cfg.n_items
        weight = student.item_emb.weight
        drawn = torch.randint(0, n_items, (self.negatives,), generator=self._generator)
        top_ids = t.top_ids[rows].long()
        kl, l2, ce = sampled_cached_terms(
            student_logits_at(s_query, weight, top_ids, s_entries),
            student_logits_at(s_query, weight, labels[:, None], s_entries)[:, 0],
            student_logits_at(s_query, weight, drawn, s_entries),
            top_ids, labels, drawn, n_items, t.top_logits[rows].float(), t.lse[rows],
            self.state.temperature,
        )  # fmt: skip
        return self.combine(kl, l2, ce, t.rank[rows]) / max(s_query.shape[0], 1)

    def on_eval(self, epoch: int, valid: dict[str, float]) -> None:
        """The `plateau` schedule; a no-op for the other strategies."""
        if self.cfg.strategy != "plateau":
            return
        state, cfg = self.state, self.cfg
        ndcg = valid["ndcg@10"]
        if ndcg > state.best_ndcg:
            state.best_ndcg, state.stalled = ndcg, 0
        else:
            state.stalled += 1
        if state.stalled >= cfg.plateau_patience and state.teacher_weight > PLATEAU_FLOOR:
            state.teacher_weight = max(PLATEAU_FLOOR, state.teacher_weight - PLATEAU_STEP)
            state.stalled = 0
            state.events.append(
                f"epoch {epoch}: stalled, teacher weight -> {state.teacher_weight:.2f}"
            )
        near = self.teacher_valid_ndcg * NEAR_TEACHER
        if ndcg >= near and state.temperature > 1.0:
            state.temperature = max(1.0, state.temperature * TEMPERATURE_DECAY)
            state.events.append(f"epoch {epoch}: near teacher, T -> {state.temperature:.2f}")
            if self.targets is not None:  # cached at the old temperature
                self._build()
