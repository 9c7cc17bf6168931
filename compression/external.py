"""Import an ONNX recommender trained elsewhere into the store, as a full-score model.

The teacher's graph (`compression.distill.external`'s contract: int64 history of its own ids
in, scores over its own catalogue out) is wrapped so it speaks the project's contract: the
input `item_ids` (data ids, left-padded) is cut to its last `context` items and mapped to the
teacher's ids (items it does not know become padding); its scores are mapped back to data
ids (`scores [batch, n_items + 1]`), items it does not know pushed down by 1e9: ranked below
every item it knows. Unknown items inside a history become padding where they stand. Then it
is one more stored model: evaluated with the project's protocol, served, compared, and
compressed by the same steps (INT8 dynamic / static / adaptive, FP16) as the project's own
graphs.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from compression.configs import DataSpec
from compression.distill.external import (
    TeacherContractError,
    load_external_teacher,
    parameter_count,
)
from compression.evaluate.metrics import eval_batch_size, evaluate_scorer
from compression.evaluate.onnx_scoring import onnx_scorer
from compression.export.exporter import INPUT_NAME, OUTPUT_NAME
from compression.pipeline import dataset_info, prefixed, signature, spec_split
from model_store.manifest import Manifest
from model_store.store import ModelStore

UNKNOWN_SCORE = -1e9  # an item the teacher does not know ranks below all it knows


def wrap(model: onnx.ModelProto, columns: np.ndarray, context: int) -> onnx.ModelProto:
    """`model` behind the project's contract; `columns[i]` = teacher id of data id i (0 =
    unknown or padding)."""
    g = model.graph
    initializers = {t.name for t in g.initializer}
    (old_in,) = [i.name for i in g.input if i.name not in initializers]
    (old_out,) = [o.name for o in g.output]
    # Its own names may be ours ("item_ids", "scores"): the wrapped graph renames them.
    inner_in, inner_out = "teacher/history", "teacher/scores"
    for node in g.node:
        node.input[:] = [inner_in if n == old_in else inner_out if n == old_out else n
                         for n in node.input]  # fmt: skip
        node.output[:] = [inner_out if n == old_out else n for n in node.output]
    to_teacher = numpy_helper.from_array(columns.astype(np.int64), "recsys_to_teacher")
    bias = np.where(columns > 0, 0.0, UNKNOWN_SCORE).astype(np.float32)
    bias[0] = UNKNOWN_SCORE
    consts = [
        to_teacher,
        numpy_helper.from_array(bias, "recsys_unknown_bias"),
        numpy_helper.from_array(np.array([-context], np.int64), "recsys_window_start"),
        numpy_helper.from_array(np.array([2**31 - 1], np.int64), "recsys_end"),
        numpy_helper.from_array(np.array([1], np.int64), "recsys_axis_1"),
    ]
    before = [
        helper.make_node(
            "Slice",
            [INPUT_NAME, "recsys_window_start", "recsys_end", "recsys_axis_1"],
            ["recsys_window"],
        ),
        helper.make_node("Gather", ["recsys_to_teacher", "recsys_window"], [inner_in]),
    ]
    after = [
        helper.make_node("Cast", [inner_out], ["recsys_float_scores"], to=TensorProto.FLOAT),
        helper.make_node(
            "Gather", ["recsys_float_scores", "recsys_to_teacher"], ["recsys_data_scores"], axis=1
        ),
        helper.make_node("Add", ["recsys_data_scores", "recsys_unknown_bias"], [OUTPUT_NAME]),
    ]
    nodes = [*before, *g.node, *after]
    del g.node[:]
    g.node.extend(nodes)
    g.initializer.extend(consts)
    kept_inputs = [i for i in g.input if i.name in initializers]
    del g.input[:]
    g.input.extend(
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.INT64, ["batch", "length"]),
         *kept_inputs]
    )  # fmt: skip
    del g.output[:]
    g.output.append(
        helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", len(columns)])
    )
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise TeacherContractError(f"the wrapped teacher graph is not valid ONNX ({exc})") from None
    return model


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def import_external(
    store: ModelStore,
    teacher_onnx: Path,
    teacher_items: Path,
    data_spec: DataSpec,
    name: str,
    *,
    context: int = 200,
    log: Callable[[str], None] = print,
) -> Manifest:
    """Publish the wrapped teacher as `name`, evaluated on `data_spec`'s test users."""
    data, split = spec_split(data_spec)
    teacher = load_external_teacher(teacher_onnx, teacher_items, data)
    log(f"{teacher_onnx.name}: {teacher.join.report()}")
    model = onnx.load(str(teacher_onnx))
    params = parameter_count(model)
    store.root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".import-", dir=store.root) as tmp:
        wrapped, items = Path(tmp) / "model.onnx", Path(tmp) / "items.json"
        onnx.save(wrap(model, teacher.join.columns, context), str(wrapped))
        data.save_item_mapping(items, split.item_counts())
        batch = eval_batch_size(data.n_items)
        test = evaluate_scorer(onnx_scorer(wrapped), split, "test", context, batch)
        log(f"{name}: test ndcg@10 {test['ndcg@10']:.4f}")
        return store.publish(
            name, {"model.onnx": wrapped, "items.json": items}, kind="teacher", parent=None,
            architecture={"n_items": data.n_items, "max_len": context, "external": True},
            recipe={"external_teacher": {"file": teacher_onnx.name, "sha256": teacher.sha256,
                                         "items_file": teacher_items.name,
                                         "items_sha256": _sha256(teacher_items),
                                         "context": context,
                                         "unknown_items": len(teacher.join.unknown_to_teacher)},
                    "data": data_spec.model_dump()},
            dataset=dataset_info(data),
            metrics={**prefixed("test", test), "params": float(params)},
            signature=signature(data.n_items),
        )  # fmt: skip
