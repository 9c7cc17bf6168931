"""Teachers trained elsewhere: any ONNX graph with the history contract.

The contract (checked on load, each violation one line naming the input or output and the
fix): exactly one input, int64, rank 2 (`[batch, length]`: item ids of the teacher's own
catalogue, left-padded with 0, oldest first), and one float output of rank 2 (`[batch,
n_items + 1]`: a score per teacher item id, column 0 = padding). The teacher's item ids come
in a file, one per line in the order of its ids 1..n (or a CSV with a header and an `item_id`
column). They are joined to the data set's ids by the project's id rules
(`model_store.item_ids`): items the teacher does not know are reported, never guessed, and
its scores are read only for the data set's items.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from compression.data.sequences import SequenceDataset
from model_store.item_ids import item_id_key
from model_store.runtime import ort_session

if TYPE_CHECKING:
    import onnx


class TeacherContractError(ValueError):
    """A teacher file that does not fit the contract; the message names what and the fix."""


@dataclass(frozen=True)
class IdJoin:
    """How the data set's items map to the teacher's columns."""

    columns: np.ndarray  # [n_items + 1] int64: data id -> teacher column (0 = padding/none)
    unknown_to_teacher: list[str]  # data set items the teacher has no column for
    unused_teacher_items: int  # teacher items absent from the data set

    def report(self) -> str:
        shown = ", ".join(self.unknown_to_teacher[:5])
        more = "" if len(self.unknown_to_teacher) <= 5 else ", ..."
        unknown = f"; not known to the teacher: {len(self.unknown_to_teacher)} ({shown}{more})"
        return (
            f"{len(self.columns) - 1 - len(self.unknown_to_teacher)} items joined"
            + (unknown if self.unknown_to_teacher else "")
            + f"; teacher items not in the data: {self.unused_teacher_items}"
        )


def read_teacher_items(path: Path) -> list[str]:
    """The teacher's item ids in id order: one per line, or a CSV with an `item_id` column."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TeacherContractError(
            f"{path}: no such file; pass the teacher's item id file"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TeacherContractError(f"{path}: not a readable UTF-8 text file ({exc})") from None
    lines = text.splitlines()
    if lines and "," in lines[0]:
        rows = list(csv.DictReader(lines))
        if not rows or "item_id" not in rows[0]:
            raise TeacherContractError(
                f"{path}: a CSV teacher item file needs an 'item_id' column (found "
                f"{list(rows[0]) if rows else 'no rows'})"
            )
        ids = [(r.get("item_id") or "").strip() for r in rows]
        if not all(ids):
            line = ids.index("") + 2
            raise TeacherContractError(f"{path}: line {line} has no item_id; fill it or drop it")
    else:
        ids = [line.strip() for line in lines if line.strip()]
    if not ids:
        raise TeacherContractError(f"{path}: no item ids; one per line, in the teacher's id order")
    seen: dict[str, int] = {}
    for i, item in enumerate(ids):
        key = item_id_key(item)
        if key in seen:
            raise TeacherContractError(
                f"{path}: item {item!r} (line {i + 1}) repeats {ids[seen[key]]!r} "
                f"(line {seen[key] + 1}) under the id rules; each teacher id once"
            )
        seen[key] = i
    return ids


def join_items(data: SequenceDataset, teacher_items: list[str]) -> IdJoin:
    """Data id i -> teacher column (its position in `teacher_items` + 1), 0 where unknown."""
    column_of = {item_id_key(item): c + 1 for c, item in enumerate(teacher_items)}
    columns = np.zeros(data.n_items + 1, dtype=np.int64)
    unknown = []
    for i, item in enumerate(data.item_ids, start=1):
        c = column_of.get(item_id_key(item), 0)
        columns[i] = c
        if not c:
            unknown.append(item)
    used = int((columns > 0).sum())
    return IdJoin(columns, unknown, len(teacher_items) - used)


class ExternalTeacher:
    """An ONNX teacher behind the contract: `scores(histories)` in the data set's ids."""

    def __init__(self, path: Path, join: IdJoin, n_teacher_items: int, threads: int = 1) -> None:
        self.path = path
        self.join = join
        self.sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
        self._session = ort_session(path, threads)
        self._input = self._session.get_inputs()[0].name
        self._output = self._session.get_outputs()[0].name
        self._n_teacher_items = n_teacher_items
        # The teacher's column of each data item, for inputs (0 stays padding) and outputs.
        self._to_teacher = join.columns

    def scores(self, histories: np.ndarray) -> np.ndarray:
        """`[batch, n_items + 1]` scores in data ids for left-padded data-id histories; items
        the teacher does not know get -inf (it says nothing about them) and become padding
        (0) where they stand in its inputs."""
        out = self._session.run([self._output], {self._input: self._to_teacher[histories]})[0]
        if out.shape[1] != self._n_teacher_items + 1:
            raise TeacherContractError(
                f"{self.path}: output {self._output!r} has {out.shape[1]} columns at run time, "
                f"the item file lists {self._n_teacher_items} items (+1 padding column)"
            )
        scores = out[:, self._to_teacher].astype(np.float32)
        scores[:, self._to_teacher == 0] = -np.inf
        return scores


def load_external_teacher(
    path: Path, items_path: Path, data: SequenceDataset, threads: int = 1
) -> ExternalTeacher:
    """Check `path` against the contract and join its item ids to `data`'s."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except FileNotFoundError:
        raise TeacherContractError(f"{path}: no such file; pass an ONNX teacher") from None
    except Exception as exc:  # protobuf errors of many kinds: never a stack trace
        raise TeacherContractError(f"{path}: not an ONNX model ({exc})") from None
    teacher_items = read_teacher_items(items_path)
    check_contract(model, path, len(teacher_items))
    join = join_items(data, teacher_items)
    if len(join.unknown_to_teacher) == data.n_items:
        raise TeacherContractError(
            f"{items_path}: none of the data set's {data.n_items} items is among the teacher's "
            f"{len(teacher_items)}; is it the item file of this teacher and this catalogue?"
        )
    teacher = ExternalTeacher(path, join, len(teacher_items), threads)
    check_runs(teacher._session, path, len(teacher_items))
    return teacher


def check_contract(model: object, path: Path, n_teacher_items: int) -> None:
    """One int64 `[batch, length]` input, one float `[batch, n_items + 1]` output."""
    from onnx import TensorProto

    graph = model.graph  # type: ignore[attr-defined]
    initializers = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(inputs) != 1:
        names = [i.name for i in inputs]
        raise TeacherContractError(
            f"{path}: has {len(inputs)} inputs {names}; a teacher takes exactly one, the "
            "int64 item-id history [batch, length] (fold the others into the graph)"
        )
    (inp,) = inputs
    if inp.type.tensor_type.elem_type != TensorProto.INT64:
        got = TensorProto.DataType.Name(inp.type.tensor_type.elem_type)
        raise TeacherContractError(
            f"{path}: input {inp.name!r} is {got}; the history must be int64 item ids "
            "[batch, length] (cast inside the graph)"
        )
    if len(inp.type.tensor_type.shape.dim) != 2:
        raise TeacherContractError(
            f"{path}: input {inp.name!r} has rank {len(inp.type.tensor_type.shape.dim)}; "
            "expected [batch, length]"
        )
    fixed = [d.dim_value for d in inp.type.tensor_type.shape.dim]
    if any(fixed):
        raise TeacherContractError(
            f"{path}: input {inp.name!r} has fixed sizes {fixed}; batch and length must be "
            "dynamic (export with dynamic axes for both)"
        )
    if len(graph.output) != 1:
        names = [o.name for o in graph.output]
        raise TeacherContractError(
            f"{path}: has {len(graph.output)} outputs {names}; a teacher returns exactly one, "
            "the scores [batch, n_items + 1]"
        )
    (out,) = graph.output
    if out.type.tensor_type.elem_type not in (TensorProto.FLOAT, TensorProto.FLOAT16):
        got = TensorProto.DataType.Name(out.type.tensor_type.elem_type)
        raise TeacherContractError(f"{path}: output {out.name!r} is {got}; scores must be float")
    dims = out.type.tensor_type.shape.dim
    if len(dims) != 2:
        raise TeacherContractError(
            f"{path}: output {out.name!r} has rank {len(dims)}; expected [batch, n_items + 1]"
        )
    width = dims[1].dim_value
    if width and width != n_teacher_items + 1:
        raise TeacherContractError(
            f"{path}: output {out.name!r} is {width} wide; the item file lists "
            f"{n_teacher_items} items, so it must be {n_teacher_items + 1} (column 0 = padding)"
        )


# History batches a teacher must score: shapes a graph traced with its example's sizes baked in
# (a common `torch.onnx.export` outcome) fails on.
PROBE_SHAPES = ((1, 1), (3, 2), (5, 9))


def check_runs(session: Any, path: Path, n_teacher_items: int) -> None:
    """Score a few batches of other sizes than any export example with the teacher's own
    session; a graph that fails or answers another shape is refused in one line."""
    name = session.get_inputs()[0].name
    for batch, length in PROBE_SHAPES:
        ids = np.ones((batch, length), dtype=np.int64)
        try:
            out = session.run(None, {name: ids})[0]
        except Exception as exc:  # ONNX Runtime's errors carry no common type
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:200]
            raise TeacherContractError(
                f"{path}: fails on a [{batch}, {length}] history batch ({reason}); export "
                "it with dynamic batch and length (sizes of the example input baked in?)"
            ) from None
        if out.shape != (batch, n_teacher_items + 1):
            raise TeacherContractError(
                f"{path}: a [{batch}, {length}] history batch gave scores of shape "
                f"{list(out.shape)}, expected [{batch}, {n_teacher_items + 1}]"
            )


def parameter_count(model: onnx.ModelProto) -> int:
    """The model's parameters: its initializers' sizes, a matrix counted once when another
    initializer holds the same values or their transpose. torch.onnx.export writes a tied
    item matrix twice (the input Gather's table and the output MatMul's transposed copy):
    one set of parameters, which counted twice would flatter every student's size ratio."""
    from onnx import numpy_helper

    seen: dict[tuple[tuple[int, ...], str], list[np.ndarray]] = {}
    total = 0
    for init in model.graph.initializer:
        weights = numpy_helper.to_array(init)
        if weights.ndim == 2:  # only matrices: equal vectors (fresh biases, norms) are not ties
            alike = seen.setdefault((tuple(sorted(weights.shape)), str(weights.dtype)), [])
            if any(np.array_equal(weights, m) or np.array_equal(weights, m.T) for m in alike):
                continue
            alike.append(weights)
        total += weights.size
    return total
