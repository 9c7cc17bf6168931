"""Adaptive INT8: keep the nodes that hurt validation NDCG@10 most in float until a
relative quality budget against the fp32 model is met (`adaptive_quantize`); and
`quantize_int8`, what a recipe's [quantize] table selects (dynamic, static, either adaptive)."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from compression.data.sequences import pad_left
from compression.evaluate.metrics import top_k_agreement
from compression.export.files import (
    ModelSummary,
    QuantizeError,
    ScorerEval,
    atomic_output,
    load_scoring_model,
    run_scores,
    score_width,
)
from compression.quantize.int8 import (
    QuantizeConfig,
    _ort_quantize,
    calibrate,
    calibration_batches,
    preprocess,
    quantizable_nodes,
    quantize_dynamic_int8,
    quantize_static_int8,
)
from model_store.runtime import ort_session


@dataclass(frozen=True)
class NodeSensitivity:
    """Harm of quantizing `node` alone, measured on the proxy histories against fp32."""

    node: str
    score_rel_mse: float  # mean squared score error / variance of the fp32 scores
    top10_agreement: float


@dataclass(frozen=True)
class AdaptiveResult:
    path: Path
    mode: str
    kept_float: tuple[str, ...]  # most sensitive first; record these in the manifest
    quantized: tuple[str, ...]
    fp32_ndcg: float
    final_ndcg: float
    relative_loss: float
    max_ndcg_loss: float
    evaluations: int  # full NDCG evaluations, the fp32 one included
    proxy_runs: int  # cheap per-node quantize-and-score runs
    sensitivities: tuple[NodeSensitivity, ...]  # most harmful first
    trace: tuple[tuple[int, float], ...] = field(default=())  # (nodes kept float, NDCG@10)

    def as_manifest(self) -> dict[str, Any]:
        return {
            "quantization": self.mode,
            "kept_float_nodes": list(self.kept_float),
            "valid_ndcg@10_fp32": self.fp32_ndcg,
            "valid_ndcg@10": self.final_ndcg,
            "relative_ndcg_loss": self.relative_loss,
            "max_ndcg_loss": self.max_ndcg_loss,
        }


def relative_loss(reference: float, value: float) -> float:
    """(reference - value) / reference; negative when quantization happened to help."""
    if reference > 0:
        return (reference - value) / reference
    return 0.0 if value >= reference else float("inf")


def _proxy_batches(histories: Sequence[np.ndarray], max_len: int, n: int) -> list[np.ndarray]:
    kept = [np.asarray(h, dtype=np.int64) for h in histories if len(h)][:n]
    kept.sort(key=lambda h: min(len(h), max_len))
    return [pad_left(kept[i : i + 128], max_len) for i in range(0, len(kept), 128)]


def adaptive_quantize(
    src: str | Path,
    dst: str | Path,
    cfg: QuantizeConfig,
    scorer_eval: ScorerEval,
    proxy_histories: Sequence[np.ndarray],
    max_len: int,
    calibration_histories: Sequence[np.ndarray] | None = None,
    threads: int | None = None,
) -> AdaptiveResult:
    """Quantize with `cfg.mode`, keeping the most harmful nodes in float until the relative
    validation NDCG@10 loss against the fp32 model is at most `cfg.max_ndcg_loss`.

    1. Ranking (cheap proxy, one ORT quantization per candidate): quantize ONE node alone and
       measure the score error on `cfg.proxy_sequences` of `proxy_histories` (validation
       histories) against fp32. One-node-alone was chosen over all-but-one because its error
       is attributable to that node only (no other node's noise masks the difference), the
       numbers read directly as "harm of quantizing X", and int8 rounding errors are small
       perturbations that add up roughly linearly, so the isolated harm ranks nodes the same
       way as their marginal harm. Relative score MSE ranks (it is continuous; top-10
       agreement of a single node is often exactly 1.0 and would tie).
    2. Greedy (real NDCG, `scorer_eval`): quantize all candidates; while the budget is missed,
       keep the next most harmful node in float and re-evaluate. At most N + 2 evaluations for
       N candidates (fp32, all quantized, one per kept node).

    Static mode calibrates once (`calibrate`) and reuses the ranges for every run.
    If even the model with every candidate in float misses the budget (only possible with a
    budget of 0 and float noise from the pre-processing, or a non-deterministic evaluator),
    QuantizeError is raised and nothing is written: a variant that breaks its quality
    contract must not land in `dst`.
    """
    src, dst = Path(src), Path(dst)
    n_scores = score_width(load_scoring_model(src), src)
    batches = None
    if cfg.mode == "static":
        if calibration_histories is None:
            raise QuantizeError(f"{src}: static adaptive quantization needs calibration_histories")
        batches = calibration_batches(calibration_histories, max_len, cfg, src)
    proxy = _proxy_batches(proxy_histories, max_len, cfg.proxy_sequences)
    if not proxy:
        raise QuantizeError(f"{src}: adaptive quantization needs non-empty proxy histories")

    with tempfile.TemporaryDirectory(prefix="recsys-quant-") as work_dir:
        work = Path(work_dir)
        pre = work / "pre.onnx"
        preprocess(src, pre)
        candidates = quantizable_nodes(pre, cfg)
        if not candidates:
            raise QuantizeError(f"{src}: no {'/'.join(cfg.quantized_op_types)} node to quantize")
        cache = work / "calibration.json"

        def build(out: Path, **kw: Any) -> None:
            try:
                if batches is not None and not cache.is_file():
                    calibrate(pre, cfg, batches, cache)  # once, reused by every build
                _ort_quantize(pre, out, cfg, calibration_cache=cache, **kw)
            except Exception as exc:
                raise QuantizeError(f"{src}: ONNX Runtime quantization failed ({exc})") from None

        reference = run_scores(ort_session(pre, threads), proxy)
        variance = float(reference[:, 1:].var()) or 1.0
        sensitivities = []
        for i, node in enumerate(candidates):
            one = work / f"one-{i}.onnx"
            build(one, only=[node])
            got = run_scores(ort_session(one, threads), proxy)
            mse = float(np.mean((got[:, 1:] - reference[:, 1:]) ** 2)) / variance
            sensitivities.append(NodeSensitivity(node, mse, top_k_agreement(got, reference)))
            one.unlink()
        sensitivities.sort(key=lambda s: (-s.score_rel_mse, s.top10_agreement, s.node))
        order = [s.node for s in sensitivities]

        fp32 = float(scorer_eval(src))
        evaluations, trace = 1, []
        for k in range(len(order) + 1):
            candidate = work / f"keep-{k}.onnx"
            build(candidate, exclude=order[:k])
            ndcg = float(scorer_eval(candidate))
            evaluations += 1
            trace.append((k, ndcg))
            loss = relative_loss(fp32, ndcg)
            if loss <= cfg.max_ndcg_loss + 1e-12:
                break
            candidate.unlink()
        else:
            raise QuantizeError(
                f"{src}: NDCG@10 budget {cfg.max_ndcg_loss:.4f} unreachable: even with all "
                f"{len(order)} candidate nodes in float the loss is {loss:.4f} "
                f"(fp32 {fp32:.5f}, got {ndcg:.5f}); nothing written to {dst}"
            )
        with atomic_output(dst, n_scores) as tmp:
            candidate.replace(tmp)
    return AdaptiveResult(
        path=dst,
        mode=cfg.mode,
        kept_float=tuple(order[:k]),
        quantized=tuple(order[k:]),
        fp32_ndcg=fp32,
        final_ndcg=ndcg,
        relative_loss=loss,
        max_ndcg_loss=cfg.max_ndcg_loss,
        evaluations=evaluations,
        proxy_runs=len(candidates),
        sensitivities=tuple(sensitivities),
        trace=tuple(trace),
    )


def quantize_int8(
    src: str | Path,
    dst: str | Path,
    cfg: QuantizeConfig,
    *,
    max_len: int,
    calibration_histories: Sequence[np.ndarray] | None = None,
    scorer_eval: ScorerEval | None = None,
    proxy_histories: Sequence[np.ndarray] | None = None,
) -> ModelSummary | AdaptiveResult:
    """Dispatch on `cfg.mode` and `cfg.adaptive` (what a recipe's [quantize] table selects)."""
    if cfg.adaptive:
        if scorer_eval is None or proxy_histories is None:
            raise QuantizeError(
                f"{src}: adaptive quantization needs scorer_eval and proxy_histories"
            )
        return adaptive_quantize(
            src, dst, cfg, scorer_eval, proxy_histories, max_len, calibration_histories
        )
    if cfg.mode == "dynamic":
        return quantize_dynamic_int8(src, dst, cfg)
    if calibration_histories is None:
        raise QuantizeError(f"{src}: static quantization needs calibration_histories")
    return quantize_static_int8(src, dst, cfg, calibration_histories, max_len)
