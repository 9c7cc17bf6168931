"""Smaller ONNX files that compute the same scores.

- `compact_names`: the exporter names every intermediate tensor and node after its module
  path (`/blocks.1/attn/Constant_8_output_0`); in a small INT8 student those names and the
  shape annotations (`value_info`) were 41 KB of a 176 KB file. Intermediate tensors, nodes
  and the exporter's generated initializer names (`onnx::MatMul_378_quantized`,
  `/Constant_2_output_0`) get short names; graph inputs, outputs and the named weights
  (`item_emb.weight`, `pos_emb.weight`, ...) keep theirs: the manifest, the item-matrix
  tools and people reading the graph refer to them.
- `shorten_context`: a variant that reads only the most recent `max_len` items truncates to
  `max_len` inside the graph too, and keeps only the `max_len` position vectors it can
  reach (positions count within the window, so they never exceed `max_len - 1`).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from compression.export.exporter import INPUT_NAME

POSITION_TABLE = "pos_emb.weight"


def _has_subgraphs(graph: onnx.GraphProto) -> bool:
    kinds = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
    return any(a.type in kinds for node in graph.node for a in node.attribute)


def _short(i: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        i, r = divmod(i, 36)
        out = digits[r] + out
        if i == 0:
            return "t" + out


def _generated(name: str) -> bool:
    """A name the exporter or a converter made up, not a weight's module path."""
    return name.startswith(("onnx::", "/"))


def compact_names(model: onnx.ModelProto) -> bool:
    """Rename intermediate tensors and nodes, drop `value_info`; False when the graph has
    subgraphs (their bodies may read outer names), which are then left as they are."""
    graph = model.graph
    if _has_subgraphs(graph):
        return False
    keep = {v.name for v in graph.input} | {v.name for v in graph.output}
    keep |= {t.name for t in graph.initializer if not _generated(t.name)}
    renamed: dict[str, str] = {}
    fresh = (n for n in map(_short, itertools.count()) if n not in keep)  # a rerun is safe

    def rename(name: str) -> str:
        if name not in renamed:
            renamed[name] = next(fresh)
        return renamed[name]

    for init in graph.initializer:
        if init.name not in keep:
            init.name = rename(init.name)
    for node in graph.node:
        for j, name in enumerate(node.output):
            if name and name not in keep:
                node.output[j] = rename(name)
    for i, node in enumerate(graph.node):
        node.name = f"n{i}"
        node.doc_string = ""
        for j, name in enumerate(node.input):
            node.input[j] = renamed.get(name, name)
    del graph.value_info[:]
    return True


def constant_value(graph: onnx.GraphProto, name: str) -> np.ndarray | None:
    """The value of `name` when it is an initializer or the output of a Constant node."""
    for init in graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            for attr in node.attribute:
                if attr.name == "value":
                    return numpy_helper.to_array(attr.t)
    return None


def shorten_context(model: onnx.ModelProto, max_len: int) -> list[str]:
    """Truncate the input to the last `max_len` items in the graph and cut the position
    table to `max_len` rows. Returns what was changed (for the manifest); raises when the
    graph does not have the exporter's input slice, since the table cut alone would make
    longer inputs fail."""
    graph = model.graph
    cut = next(
        (n for n in graph.node if n.op_type == "Slice" and n.input and n.input[0] == INPUT_NAME),
        None,
    )
    starts = constant_value(graph, cut.input[1]) if cut is not None and len(cut.input) > 1 else None
    if cut is None or starts is None or starts.shape != (1,) or starts[0] >= 0:
        raise ValueError(
            f"no `{INPUT_NAME}[:, -max_len:]` slice found in the graph; re-export the model "
            "with `recsys export` before making a context variant"
        )
    if -int(starts[0]) <= max_len:
        return []
    start = f"context_start_{max_len}"
    graph.initializer.append(numpy_helper.from_array(np.array([-max_len], np.int64), start))
    old, cut.input[1] = cut.input[1], start
    if not any(old in n.input for n in graph.node):  # drop the old start: ORT warns
        for t in [t for t in graph.initializer if t.name == old]:
            graph.initializer.remove(t)
        for n in [n for n in graph.node if n.op_type == "Constant" and n.output[0] == old]:
            graph.node.remove(n)
    changes = [f"input truncated to the last {max_len} items (was {-int(starts[0])})"]
    readers = [n for n in graph.node if POSITION_TABLE in n.input]
    table = next((t for t in graph.initializer if t.name == POSITION_TABLE), None)
    if table is not None and len(readers) == 1 and readers[0].op_type == "Gather":
        rows = numpy_helper.to_array(table)
        if rows.shape[0] > max_len:
            table.CopyFrom(
                numpy_helper.from_array(np.ascontiguousarray(rows[:max_len]), table.name)
            )
            changes.append(f"position table cut to {max_len} rows (was {rows.shape[0]})")
    return changes


def compact_file(path: str | Path, max_len: int | None = None) -> list[str]:
    """Apply `shorten_context` (when `max_len` is given) and `compact_names` in place."""
    path = Path(path)
    model = onnx.load(str(path))
    before = path.stat().st_size
    changes = shorten_context(model, max_len) if max_len is not None else []
    if compact_names(model):
        changes.append("short intermediate names, no value_info")
    onnx.save(model, str(path))
    changes.append(f"{before:,} -> {path.stat().st_size:,} bytes")
    return changes
