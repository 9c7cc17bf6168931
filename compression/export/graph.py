"""The inference graph of a SASRec model, written node by node from its weights.

Why not `torch.onnx.export`: traced with dynamic batch and length axes, every reshape of the
model became shape arithmetic (`Shape`, `Gather`, `Unsqueeze`, `Concat`), the boolean mask
of `scaled_dot_product_attention` became `IsNaN`/`Where` guards, and the padding rows were
zeroed after every block. The ML-1M teacher's graph had 124 nodes after ONNX Runtime's own
optimizations, and ORT pays about a microsecond per node per call. This graph computes the
same scores with standard ONNX ops only (so FP16 conversion and TensorRT take it as before):

- reshapes copy the batch and length dimensions with `0` instead of computing them;
- queries are pre-scaled by 1/sqrt(head_dim) in the weights; the mask is additive
  (-10,000 where a key is hidden: `exp` of it is exactly 0 in fp32 and fp16);
- padding rows are not zeroed: they are never keys and their outputs are discarded, so no
  score of a non-empty history changes (checked against PyTorch on every export). A history
  with no item at all gets different, equally meaningless scores; the service answers it
  with the popularity fallback and never runs a model on it.

The ML-1M teacher: 82 nodes instead of 250, 72 instead of 124 after ORT's own optimizations;
1.08-1.39x faster per call for teachers, students and their INT8 variants, at batch 1 and 64
(`benchmarks/graph_writer.py`, README "ONNX graph"). Mixed-dimension item embeddings are
not written here (`supports` says so); `export_onnx` falls back to PyTorch's exporter.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from compression.model.sasrec import SASRec

OPSET = 17
PRODUCER = "recsys-compression"  # tells this writer's files from PyTorch's ("pytorch")
MASKED = -1e4  # additive score of a hidden key
# Above any position index; fits int32 (TensorRT narrows int64 constants).
_FAR = 2**30
_END = 2**31 - 1  # Slice end "to the end", also int32-safe


def supports(model: SASRec) -> bool:
    """True when `build` can write `model` (a plain or factorized item table)."""
    return isinstance(model.item_emb, nn.Embedding)


class _Graph:
    """Nodes and initializers with generated, unique names."""

    def __init__(self, state: dict[str, np.ndarray]) -> None:
        self.state = state  # the model's weights by module path
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._weights: dict[str, np.ndarray] = {}
        self.scope = ""  # module path of the nodes being written, as in their names

    def weight(self, name: str, value: np.ndarray) -> str:
        """Write `value` once under `name`; asking again with the same value (a block whose
        weights another layer shares) reuses it, with another value is a bug here."""
        array = np.asarray(value)
        known = self._weights.get(name)
        if known is not None:
            if known.dtype != array.dtype or not np.array_equal(known, array):
                raise ValueError(
                    f"initializer {name!r} asked for as {array!r}, written as {known!r}"
                )
            return name
        self._weights[name] = array
        self.initializers.append(numpy_helper.from_array(np.array(value, order="C"), name))
        return name

    def const(self, name: str, value: object, dtype: type = np.int64) -> str:
        """A small constant, written once under `name` and shared by every reader (asking for
        the same name with another value is a bug in this writer, not silently shared)."""
        return self.weight(name, np.array(value, dtype=dtype))

    def op(self, op_type: str, inputs: list[str], outputs: int = 1, **attrs: object) -> list[str]:
        i = len(self.nodes)
        names = [f"{op_type.lower()}{i}_{j}" for j in range(outputs)]
        name = f"{self.scope}/{op_type}_{i}"
        self.nodes.append(helper.make_node(op_type, inputs, names, name=name, **attrs))
        return names

    def one(self, op_type: str, inputs: list[str], **attrs: object) -> str:
        return self.op(op_type, inputs, **attrs)[0]

    def dense(self, x: str, prefix: str, weight: np.ndarray, bias: np.ndarray) -> str:
        """x @ weight.T + bias (a torch Linear's layout)."""
        outer, self.scope = self.scope, prefix
        y = self.one("MatMul", [x, self.weight(f"{prefix}.weight_t", weight.T)])
        y = self.one("Add", [y, self.weight(f"{prefix}.bias", bias)])
        self.scope = outer
        return y

    def linear(self, x: str, prefix: str) -> str:
        return self.dense(x, prefix, self.state[f"{prefix}.weight"], self.state[f"{prefix}.bias"])

    def norm(self, x: str, prefix: str, eps: float) -> str:
        gamma = self.weight(f"{prefix}.weight", self.state[f"{prefix}.weight"])
        beta = self.weight(f"{prefix}.bias", self.state[f"{prefix}.bias"])
        return self.one("LayerNormalization", [x, gamma, beta], axis=-1, epsilon=eps)

    def mask(self, allowed: str, axes: list[int]) -> str:
        """Additive attention bias from a boolean `allowed`, with `axes` unsqueezed."""
        visible, masked = (
            self.const("visible", 0.0, np.float32),
            self.const("masked", MASKED, np.float32),
        )
        bias = self.one("Where", [allowed, visible, masked])
        return self.one("Unsqueeze", [bias, self.const(f"axes_{'_'.join(map(str, axes))}", axes)])


def build(
    model: SASRec, input_name: str, output_name: str, user_vector: bool = False
) -> onnx.ModelProto:
    """The graph `item_ids [batch, length] -> scores [batch, n_items + 1]` of `model`, or
    with `user_vector` `-> [batch, width]`, the vector the item matrix is scored against
    (two-stage contract; successor lists, which add to the score row, are refused)."""
    if not supports(model):
        raise ValueError("this item table is not a plain embedding: use the PyTorch exporter")
    if user_vector and model.successors is not None:
        raise ValueError(
            "successor lists add to the score row, which a two-stage variant never computes: "
            "publish this model with the full-score contract"
        )
    cfg = model.cfg
    g = _Graph({k: v.detach().cpu().float().numpy() for k, v in model.state_dict().items()})
    # A bidirectional model reads one item less: the next slot holds its [mask].
    start = -(cfg.max_len - 1) if cfg.bidirectional else -cfg.max_len
    window = [g.const("window_start", [start]), g.const("end", [_END]), g.const("axis_1", [1])]
    ids = g.one("Slice", [input_name, *window])
    last_slot = [g.const("last_start", [-1]), g.const("end", [_END]), g.const("axis_1", [1])]
    if cfg.bidirectional:
        # A stand-in item (id 1) in the [mask] slot, counted and gathered like an item; its
        # vector is replaced by the [mask] vector below. Shapes follow the input: no Shape ops.
        last = g.one("Slice", [ids, *last_slot])
        stand_in = g.one("Add", [g.one("Mul", [last, g.const("zero", 0)]), g.const("one", 1)])
        ids = g.one("Concat", [ids, stand_in], axis=1)
    valid = g.one("Greater", [ids, g.const("zero", 0)])
    counts = g.one("CumSum", [g.one("Cast", [valid], to=TensorProto.INT64), g.const("axis", 1)])

    g.scope = "embed"
    items = g.weight("item_emb.weight", g.state["item_emb.weight"])
    x = g.one("Gather", [items, ids])
    if cfg.bidirectional:
        mask_vec = g.weight("mask_emb", g.state["mask_emb"].reshape(1, 1, -1))
        head = g.one("Slice", [x, g.const("first", [0]), g.const("last_start", [-1]), window[2]])
        zeroed = g.one("Mul", [g.one("Slice", [x, *last_slot]), g.const("zero_f", 0.0, np.float32)])
        x = g.one("Concat", [head, g.one("Add", [zeroed, mask_vec])], axis=1)
    scale = math.sqrt(cfg.hidden)
    if model.in_proj is not None:  # the sqrt(hidden) scale folded into the projection
        x = g.one("MatMul", [x, g.weight("in_proj.weight_t", g.state["in_proj.weight"].T * scale)])
    else:
        x = g.one("Mul", [x, g.const("sqrt_hidden", scale, np.float32)])
    table = g.weight("pos_emb.weight", g.state["pos_emb.weight"])
    x = g.one("Add", [x, g.one("Gather", [table, _positions(g, counts)])])

    n_blocks = len(model.blocks)
    # Key j is visible to query i when it is an item and not later: compare item counts,
    # padding keys pushed out of reach (also right for zeros inside a history).
    last_keys = g.mask(valid, [1, 2])  # [batch, 1, 1, L]: the last query sees every item
    causal = last_keys if cfg.bidirectional else ""  # bidirectional: every query, every item
    if n_blocks > 1 and not cfg.bidirectional:
        key_counts = g.one("Where", [valid, counts, g.const("far", _FAR)])
        k_row = g.one("Unsqueeze", [key_counts, g.const("axes_1", [1])])
        q_col = g.one("Unsqueeze", [counts, g.const("axes_2", [2])])
        causal = g.mask(g.one("LessOrEqual", [k_row, q_col]), [1])  # [batch, 1, L, L]
    for b in range(n_blocks):
        last = b == n_blocks - 1
        x = _block(g, model, b, x, last_keys if last else causal, last)

    g.scope = "output"
    query = g.one("Squeeze", [g.norm(x, "final_ln", model.final_ln.eps), g.const("axes_1", [1])])
    if model.out_proj is not None:
        query = g.one(
            "MatMul", [query, g.weight("out_proj.weight_t", g.state["out_proj.weight"].T)]
        )
    if user_vector:
        g.nodes.append(helper.make_node("Identity", [query], [output_name], name="user_vector"))
        width = cfg.emb_dim or cfg.hidden
        return _model(g, input_name, output_name, ["batch", width])
    # Gemm(transB=1) on the very matrix the input Gather reads: one copy of it in the file,
    # and the form `quantize_item_matrix` rewrites into an int8 product.
    n_rows = cfg.n_items + 1
    zero = g.weight("scores_bias", np.zeros(n_rows, np.float32))
    dense = output_name if model.successors is None else "dense_scores"
    g.nodes.append(helper.make_node("Gemm", [query, items, zero], [dense], name="scores", transB=1))
    if model.successors is not None:
        _successor_scores(g, model, ids, dense, output_name)
    return _model(g, input_name, output_name, ["batch", n_rows])


def _model(g: _Graph, input_name: str, output_name: str, out_dims: list[str | int]) -> Any:
    graph = helper.make_graph(
        g.nodes,
        "sasrec",
        [helper.make_tensor_value_info(input_name, TensorProto.INT64, ["batch", "length"])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, out_dims)],
        g.initializers,
    )
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    onnx_model.ir_version = 8  # readable by every ONNX Runtime this project supports
    onnx_model.producer_name = PRODUCER
    onnx.checker.check_model(onnx_model, full_check=True)
    return onnx_model


def _successor_scores(g: _Graph, model: SASRec, ids: str, dense: str, output_name: str) -> None:
    """`dense` plus the successor lists' scores of the window's last `lags` items, as one
    ScatterElements(add) into the score row (duplicates add up, as in PyTorch)."""
    table = model.successors
    assert table is not None
    g.scope = "successors"
    lags = table.lags
    padded = g.one("Pad", [ids, g.const("successor_pads", [0, lags, 0, 0])])
    start = g.const("successor_start", [-lags])
    recent = g.one("Slice", [padded, start, g.const("end", [_END]), g.const("axis_1", [1])])
    # int32 ids: half the bytes, and TensorRT narrows int64 anyway.
    succ = table.succ.cpu().numpy().astype(np.int32)
    found = g.one("Gather", [g.weight("successors.succ", succ), recent])  # [batch, lags, k]
    # `recent` runs oldest first; the weights' rows run most recent first.
    weight = table.weight.detach().cpu().float().numpy()[::-1]
    present = g.one("Greater", [found, g.const("zero_i32", 0, np.int32)])
    values = g.one(
        "Where",
        [present, g.weight("successors.weight", weight), g.const("zero_f", 0.0, np.float32)],
    )
    flat = g.const("flat_shape", [0, -1])
    g.nodes.append(
        helper.make_node(
            "ScatterElements",
            [dense, g.one("Reshape", [found, flat]), g.one("Reshape", [values, flat])],
            [output_name],
            name="successor_scores",
            axis=1,
            reduction="add",
        )
    )


def _positions(g: _Graph, counts: str) -> str:
    """Position of every slot: items counted from the window start (padding clamped to 0)."""
    return g.one("Max", [g.one("Sub", [counts, g.const("one", 1)]), g.const("zero", 0)])


def _block(g: _Graph, model: SASRec, b: int, x: str, bias: str, last: bool) -> str:
    """Pre-LN block `b`; in the `last` one only the last position queries (every position is
    still a key and a value) and the result is `[batch, 1, hidden]`."""
    cfg, block = model.cfg, model.blocks[b]
    p = f"blocks.{b}"
    heads, head_dim = cfg.n_heads, cfg.attn_head_dim
    inner = heads * head_dim
    g.scope = f"{p}/attn"
    qkv_w, qkv_b = g.state[f"{p}.attn.qkv.weight"].copy(), g.state[f"{p}.attn.qkv.bias"].copy()
    qkv_w[:inner] /= math.sqrt(head_dim)  # queries pre-scaled
    qkv_b[:inner] /= math.sqrt(head_dim)
    h = g.norm(x, f"{p}.ln1", block.ln1.eps)
    if last:
        last_only = [g.const("last_start", [-1]), g.const("end", [_END]), g.const("axis_1", [1])]
        x = g.one("Slice", [x, *last_only])
        q = g.dense(g.one("Slice", [h, *last_only]), f"{p}.attn.q", qkv_w[:inner], qkv_b[:inner])
        q = g.one("Reshape", [q, g.const("heads_shape", [0, 0, heads, head_dim])])
        kv = g.dense(h, f"{p}.attn.kv", qkv_w[inner:], qkv_b[inner:])
        kv = g.one("Reshape", [kv, g.const("kv_shape", [0, 0, 2 * heads, head_dim])])
        k, v = g.op("Split", [kv], outputs=2, axis=2)
    else:
        qkv = g.dense(h, f"{p}.attn.qkv", qkv_w, qkv_b)
        qkv = g.one("Reshape", [qkv, g.const("qkv_shape", [0, 0, 3 * heads, head_dim])])
        q, k, v = g.op("Split", [qkv], outputs=3, axis=2)
    q = g.one("Transpose", [q], perm=[0, 2, 1, 3])  # [batch, heads, queries, dim]
    k = g.one("Transpose", [k], perm=[0, 2, 3, 1])  # [batch, heads, dim, keys]
    v = g.one("Transpose", [v], perm=[0, 2, 1, 3])
    weights = g.one("Softmax", [g.one("Add", [g.one("MatMul", [q, k]), bias])], axis=-1)
    y = g.one("Transpose", [g.one("MatMul", [weights, v])], perm=[0, 2, 1, 3])
    y = g.one("Reshape", [y, g.const("inner_shape", [0, 0, inner])])
    x = g.one("Add", [x, g.linear(y, f"{p}.attn.proj")])
    g.scope = f"{p}/ffn"
    f = _gelu(g, g.linear(g.norm(x, f"{p}.ln2", block.ln2.eps), f"{p}.ffn.0"))
    return g.one("Add", [x, g.linear(f, f"{p}.ffn.2")])


def _gelu(g: _Graph, x: str) -> str:
    """Exact (erf) GELU as ONNX Runtime's GeluFusion expects it: x * (1 + erf(x / sqrt 2)) / 2."""
    one = g.one
    erf = one("Erf", [one("Div", [x, g.const("sqrt_2", math.sqrt(2.0), np.float32)])])
    inner = one("Mul", [x, one("Add", [erf, g.const("one_f", 1.0, np.float32)])])
    return one("Mul", [inner, g.const("half", 0.5, np.float32)])
