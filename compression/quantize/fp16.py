"""Float16 variant of an exported SASRec graph (`convert_fp16`), for GPU execution."""

from __future__ import annotations

from pathlib import Path

from compression.export.files import (
    ModelSummary,
    QuantizeError,
    atomic_output,
    describe,
    load_scoring_model,
    save_model,
    score_width,
)


def convert_fp16(src: str | Path, dst: str | Path) -> ModelSummary:
    """Float16 weights and compute; `item_ids` stays int64 and `scores` float32.

    Uses `onnxruntime.transformers.float16.convert_float_to_float16(keep_io_types=True)`
    (bundled with onnxruntime, no onnxconverter-common needed). Halves the weights. Meant for
    GPUs, not this CPU: ORT's CPU provider lacks fp16 kernels for most of these ops and wraps
    them in casts back to fp32 (the Beauty teacher's 11 Casts become 36 in ORT's optimized
    graph), so it gains nothing and is a little slower - measured on the Beauty teacher, 2
    threads, length 50: 0.244 vs 0.217 ms at batch 1, 24.2 vs 23.1 ms at batch 64
    (`benchmarks/quantize_check.py`, on a machine shared with a training run). Top-10
    agreement with fp32 was 0.9995. Masks in the model use `torch.where`, which is why the
    conversion succeeds at all (DESIGN §8: a float-cast mask breaks it).
    """
    from onnxruntime.transformers.float16 import (
        DEFAULT_OP_BLOCK_LIST,
        convert_float_to_float16,
    )

    src, dst = Path(src), Path(dst)
    model = load_scoring_model(src)
    n_scores = score_width(model, src)
    try:
        # ORT's CPU provider has no fp16 ScatterElements(add) (successor lists); it stays
        # fp32 between two casts, on a [batch, lags * k] update only.
        half = convert_float_to_float16(
            model,
            keep_io_types=True,
            op_block_list=[*DEFAULT_OP_BLOCK_LIST, "ScatterElements"],
        )
    except Exception as exc:
        raise QuantizeError(f"{src}: float16 conversion failed ({exc})") from None
    with atomic_output(dst, n_scores) as tmp:
        save_model(half, tmp)
    return describe(dst)
