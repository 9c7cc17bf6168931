"""The comparison report of one model family: a teacher and everything made from it.

`compare_family(store, "ml1m-teacher@2")` finds every stored model whose parent chain leads to
the teacher (students, quantized / FP16 / pruned variants of the teacher or of a student),
keeps those with a `model.onnx`, and measures them side by side:

- quality from the manifests (test HR@10 / NDCG@10, full ranking), NDCG@10 retention computed
  against the teacher's manifest;
- top-10 agreement with the teacher, measured here: the teacher's and the variant's ONNX
  graphs score the same real test histories, each padded to its own model's `max_len`;
- ONNX Runtime CPU latency p50 / p99 per batch size, all variants with the same
  `intra_op_num_threads` (default 1, the service's setting), measured in one loop that
  visits the variants round-robin (A B C A B C ...) so that machine noise (other jobs,
  frequency changes) hits all alike. Each visit makes `visit_runs` consecutive calls and
  times all but the first: a service runs one model call after call, so its weights sit in
  the core's cache; timing single calls in rotation instead charges every call for
  refilling the cache after the other variants (~0.1-0.3 ms per call on ML-1M at batch 1,
  more for the small variants than their compute). `visit_runs=1` times that cold case.
  Inputs are real test histories (batch b = b histories) padded to the model's `max_len`.

`write_report` writes the report as JSON, markdown (one table) and a PNG chart of latency
against NDCG@10 with the Pareto front. Only the ONNX Runtime CPU provider is used.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from compression.data.sequences import pad_left
from compression.evaluate.metrics import Scorer, score_all, top_k_agreement
from compression.export.exporter import INPUT_NAME, OUTPUT_NAME
from compression.quantize.cpu_int8 import RESULT_FLAGS, cpu_summary
from model_store.manifest import Manifest
from model_store.runtime import ort_session
from model_store.store import ModelStore, StoreError

ONNX_FILE = "model.onnx"
DEFAULT_BATCH_SIZES = (1, 64)
DEFAULT_HISTORIES = 512
MIN_RETENTION = 0.97  # the project's acceptance criterion: keep >= 97% of the teacher's NDCG@10
TARGET_SPEEDUP = 10.0  # ... at >= 10x the teacher's speed at batch 1 and 64
WARMUP_RUNS = 3  # untimed runs per variant and batch size before the timed loop
VISIT_RUNS = 11  # consecutive calls per visit of a variant; the first is not timed
_SCORE_BATCH = 256  # histories per ONNX call when measuring agreement
_MAX_DISTINCT_BATCHES = 64  # distinct input batches cycled through per batch size
MAX_LABELLED_POINTS = 12  # a chart with more variants names only the teacher and the front


def default_repeats(batch_size: int) -> int:
    """Timed runs per variant: 200 at batch 1 (a stable p99 needs ~100+ samples), 50 above."""
    return 200 if batch_size <= 1 else 50


@dataclass
class Latency:
    """Milliseconds of one variant at one batch size, over `runs` timed runs."""

    runs: int
    p50_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float


@dataclass
class VariantResult:
    ref: str  # name@version
    kind: str
    parent: str | None
    is_teacher: bool
    precision: str  # of the model.onnx artifact
    max_len: int
    params: float | None  # metrics["params"] (a quantized variant reports its parent's count)
    onnx_bytes: int
    test_hr10: float | None
    test_ndcg10: float | None
    ndcg_retention: float | None  # test NDCG@10 / teacher's test NDCG@10 (computed here)
    top10_agreement: float  # vs the teacher, measured here on the same histories
    latency: dict[int, Latency] = field(default_factory=dict)  # batch size -> latency
    speedup: dict[int, float] = field(default_factory=dict)  # teacher p50 / variant p50
    pareto: dict[int, bool] = field(default_factory=dict)  # on the front at that batch size
    on_pareto_front: bool = False  # at the report's `pareto_batch_size`


@dataclass
class Report:
    family: str  # the teacher, name@version
    dataset: dict[str, Any]
    threads: int
    batch_sizes: list[int]
    repeats: dict[int, int]
    agreement_histories: int
    latency_histories: int
    created_at: str
    environment: dict[str, Any]
    variants: list[VariantResult]
    skipped: list[dict[str, str]]  # family members left out, and why
    pareto_batch_size: int
    best: dict[str, Any] | None  # fastest non-teacher variant keeping >= MIN_RETENTION
    min_retention: float = MIN_RETENTION
    target_speedup: float = TARGET_SPEEDUP

    def to_dict(self) -> dict[str, Any]:
        return _json_keys(asdict(self))

    def markdown(self) -> str:
        return render_markdown(self)


# -- family discovery --------------------------------------------------------------------------


def _ref(m: Manifest) -> str:
    return f"{m.name}@{m.version}"


def _resolve(store: ModelStore, ref: str) -> Manifest:
    try:
        return store.resolve(ref)[0]
    except StoreError as exc:
        raise ValueError(str(exc)) from None


def find_family(
    store: ModelStore, teacher_ref: str, *, all_versions: bool = False
) -> tuple[Manifest, list[Manifest], list[dict[str, str]]]:
    """The teacher, its descendants to compare, and the members left out (with the reason).

    A descendant is any stored version whose chain of `parent` references (followed through
    every stored manifest, transitively) reaches the teacher. Only versions with a
    `model.onnx` are compared; of several versions of one name, only the newest, unless
    `all_versions`. Other versions of the teacher's own name (re-exports, retrains) are left
    out by default too: the teacher is the reference the family is measured against.
    """
    teacher = _resolve(store, teacher_ref)
    t_ref = _ref(teacher)
    if ONNX_FILE not in teacher.artifacts:
        raise ValueError(
            f"{t_ref}: has no {ONNX_FILE} to compare against; run `recsys export {t_ref}`"
        )
    by_ref = {_ref(m): m for m in store.list()}
    # `recsys export` republishes a checkpoint-only teacher with its ONNX graph: the same
    # weights under a new version, so models distilled from the old version belong here too.
    same_weights = {t_ref}
    origin: Manifest | None = teacher
    while (
        origin is not None and origin.parent and origin.recipe.get("exported_from") == origin.parent
    ):
        same_weights.add(origin.parent)
        origin = by_ref.get(origin.parent)

    def leads_to_teacher(m: Manifest) -> bool:
        seen = {_ref(m)}
        parent = m.parent
        while parent is not None and parent not in seen:
            if parent in same_weights:
                return True
            seen.add(parent)
            up = by_ref.get(parent)
            parent = up.parent if up is not None else None
        return False

    members = [m for r, m in by_ref.items() if r not in same_weights and leads_to_teacher(m)]
    skipped: list[dict[str, str]] = []
    with_onnx = []
    for m in members:
        if ONNX_FILE in m.artifacts:
            with_onnx.append(m)
        else:
            skipped.append({"ref": _ref(m), "reason": f"no {ONNX_FILE}"})
    chosen = []
    for m in with_onnx:
        newer = [o for o in with_onnx if o.name == m.name and o.version > m.version]
        if all_versions:
            chosen.append(m)
        elif m.name == teacher.name:
            skipped.append({"ref": _ref(m), "reason": "another version of the teacher's name"})
        elif newer:
            newest = max(newer, key=lambda o: o.version)
            skipped.append({"ref": _ref(m), "reason": f"older than {_ref(newest)}"})
        else:
            chosen.append(m)
    if not chosen:
        left = f" ({len(skipped)} left out: {_skipped_text(skipped)})" if skipped else ""
        raise ValueError(
            f"{t_ref}: no stored variant with a {ONNX_FILE} descends from it{left}; "
            f"publish one with `recsys distill` or `recsys quantize {t_ref}`"
        )
    chosen.sort(key=lambda m: (m.name, m.version))
    skipped.sort(key=lambda s: s["ref"])
    return teacher, chosen, skipped


def _skipped_text(skipped: list[dict[str, str]]) -> str:
    return ", ".join(f"{s['ref']}: {s['reason']}" for s in skipped[:3]) + (
        ", ..." if len(skipped) > 3 else ""
    )


# -- pure summaries ----------------------------------------------------------------------------


def pareto_front(latency: Sequence[float], quality: Sequence[float]) -> list[bool]:
    """True for points no other point dominates in (lower latency, higher quality).

    A point is dominated when another is at least as fast and at least as good and strictly
    better in one of the two; identical points do not dominate each other.
    """
    if len(latency) != len(quality):
        raise ValueError(f"{len(latency)} latencies for {len(quality)} quality values")
    out = []
    for i, (li, qi) in enumerate(zip(latency, quality, strict=True)):
        dominated = any(
            lj <= li and qj >= qi and (lj < li or qj > qi)
            for j, (lj, qj) in enumerate(zip(latency, quality, strict=True))
            if j != i
        )
        out.append(not dominated)
    return out


def ndcg_retention(variant_ndcg: float | None, teacher_ndcg: float | None) -> float | None:
    """Variant test NDCG@10 / teacher test NDCG@10; None when either is unknown or zero."""
    if variant_ndcg is None or not teacher_ndcg:
        return None
    return variant_ndcg / teacher_ndcg


def fastest_keeping(
    variants: Sequence[VariantResult],
    batch_size: int,
    min_retention: float = MIN_RETENTION,
    target_speedup: float = TARGET_SPEEDUP,
) -> dict[str, Any] | None:
    """The fastest non-teacher variant (p50 at `batch_size`) whose NDCG@10 retention is at
    least `min_retention`, with its speedup at every measured batch size; None if none."""
    keep = [
        v
        for v in variants
        if not v.is_teacher
        and v.ndcg_retention is not None
        and v.ndcg_retention >= min_retention
        and batch_size in v.latency
    ]
    if not keep:
        return None
    best = min(keep, key=lambda v: v.latency[batch_size].p50_ms)
    speedups = dict(best.speedup)
    return {
        "ref": best.ref,
        "ndcg_retention": best.ndcg_retention,
        "speedup": speedups,
        "meets_target": bool(speedups) and all(s >= target_speedup for s in speedups.values()),
    }


# -- measurement -------------------------------------------------------------------------------


def _scorer(session: Any) -> Scorer:
    def score(batch: np.ndarray) -> np.ndarray:
        return session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]

    return score


def _input_batches(
    histories: Sequence[np.ndarray], batch_size: int, repeats: int
) -> list[list[np.ndarray]]:
    """Distinct batches of `batch_size` real histories, consecutive and wrapping around."""
    n = len(histories)
    count = max(1, min(repeats, _MAX_DISTINCT_BATCHES, n // batch_size or 1))
    return [[histories[(b * batch_size + i) % n] for i in range(batch_size)] for b in range(count)]


def measure_latency(
    sessions: Sequence[Any],
    max_lens: Sequence[int],
    histories: Sequence[np.ndarray],
    batch_sizes: Sequence[int],
    repeats: Mapping[int, int],
    warmup: int = WARMUP_RUNS,
    visit_runs: int = VISIT_RUNS,
) -> list[dict[int, Latency]]:
    """Per session, the latency at each batch size, measured round-robin: in round r, visit
    session (r + i) % n for i = 0..n-1, so each session follows every other equally often.
    A visit makes `visit_runs` consecutive calls and times all but the first (warm cache);
    with `visit_runs=1` every call is timed right after another session's (cold cache).

    Each session gets the same histories in the same order, padded to its own `max_len`
    (inputs are built before timing starts)."""
    if visit_runs < 1:
        raise ValueError(f"visit_runs must be >= 1, got {visit_runs}")
    n = len(sessions)
    timed_per_visit = max(1, visit_runs - 1)
    untimed = visit_runs - timed_per_visit
    out: list[dict[int, Latency]] = [{} for _ in range(n)]
    for bs in batch_sizes:
        reps = repeats[bs]
        batches = _input_batches(histories, bs, reps)
        inputs = [
            [pad_left(batch, max_len, length=max_len) for batch in batches] for max_len in max_lens
        ]
        for k in range(n):
            for w in range(warmup):
                sessions[k].run([OUTPUT_NAME], {INPUT_NAME: inputs[k][w % len(batches)]})
        times = np.zeros((n, reps))
        done = 0  # timed runs per session so far: every session has the same count
        for r in range(-(-reps // timed_per_visit)):
            count = min(timed_per_visit, reps - done)
            for i in range(n):
                k = (r + i) % n
                for j in range(untimed):  # another batch than the timed ones: warm the
                    # weights, not the rows of the items about to be looked up
                    feed = {INPUT_NAME: inputs[k][(done + count + j) % len(batches)]}
                    sessions[k].run([OUTPUT_NAME], feed)
                for j in range(done, done + count):
                    feed = {INPUT_NAME: inputs[k][j % len(batches)]}
                    start = time.perf_counter_ns()
                    sessions[k].run([OUTPUT_NAME], feed)
                    times[k, j] = (time.perf_counter_ns() - start) / 1e6
            done += count
        for k in range(n):
            t = times[k]
            out[k][bs] = Latency(
                runs=reps,
                p50_ms=float(np.percentile(t, 50)),
                p99_ms=float(np.percentile(t, 99)),
                mean_ms=float(t.mean()),
                min_ms=float(t.min()),
            )
    return out


def test_histories(teacher: Manifest) -> list[np.ndarray]:
    from compression.pipeline import model_split

    return model_split(teacher)[1].eval_inputs("test")[0]


def compare_family(
    store: ModelStore,
    family: str,
    *,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    threads: int = 1,
    repeats: Mapping[int, int] | int | None = None,
    histories: Sequence[np.ndarray] | None = None,
    n_histories: int = DEFAULT_HISTORIES,
    all_versions: bool = False,
    warmup: int = WARMUP_RUNS,
    visit_runs: int = VISIT_RUNS,
    log: Callable[[str], None] | None = None,
) -> Report:
    """Measure a teacher (`NAME`, `NAME@latest` or `NAME@VERSION`) and its family.

    `repeats`: timed runs per variant, one number for every batch size or a mapping batch
    size -> runs (missing sizes: `default_repeats`). `histories`: the inputs for agreement
    and latency; by default the first `n_histories` test histories of the teacher's data
    set (reloaded and checked against its sha256 by `load_model_data`).
    """
    batch_sizes = sorted(set(int(b) for b in batch_sizes))
    if not batch_sizes or batch_sizes[0] < 1:
        raise ValueError(f"batch sizes must be >= 1, got {list(batch_sizes)}")
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    if visit_runs < 1:
        raise ValueError(f"visit_runs must be >= 1, got {visit_runs}")
    if n_histories < 1:
        raise ValueError(f"n_histories must be >= 1, got {n_histories}")
    if isinstance(repeats, int):
        reps = dict.fromkeys(batch_sizes, repeats)
    else:
        given = dict(repeats or {})
        reps = {b: int(given.get(b, default_repeats(b))) for b in batch_sizes}
    if min(reps.values()) < 1:
        raise ValueError(f"repeats must be >= 1, got {reps}")
    say = log or (lambda _msg: None)

    teacher, members, skipped = find_family(store, family, all_versions=all_versions)
    models = [teacher, *members]
    for m in members:
        if m.dataset.sha256 != teacher.dataset.sha256:
            raise ValueError(
                f"{_ref(m)}: trained on data {m.dataset.sha256[:12]}…, not the teacher's "
                f"({teacher.dataset.sha256[:12]}…); its item ids do not line up"
            )
    paths = []
    for m in models:
        try:
            _, folder = store.load(_ref(m))  # sha256 check: time what the service would load
        except StoreError as exc:
            raise ValueError(str(exc)) from None
        paths.append(folder / ONNX_FILE)

    if histories is None:
        say(f"loading the test histories of {teacher.dataset.name}")
        histories = test_histories(teacher)
    histories = [np.asarray(h, dtype=np.int64) for h in histories if len(h)][:n_histories]
    if not histories:
        raise ValueError(f"{_ref(teacher)}: no non-empty test histories to measure on")

    max_lens = [int(m.architecture["max_len"]) for m in models]
    say(f"scoring {len(histories)} histories with {len(models)} models")
    sessions = [ort_session(p, threads) for p in paths]
    scorers = [_scorer(s) for s in sessions]
    teacher_scores = score_all(scorers[0], histories, max_lens[0], _SCORE_BATCH)
    # The teacher against itself too: a sanity check of the measurement (always 1.0).
    agreements = [top_k_agreement(teacher_scores, teacher_scores)] + [
        top_k_agreement(teacher_scores, score_all(s, histories, n, _SCORE_BATCH))
        for s, n in zip(scorers[1:], max_lens[1:], strict=True)
    ]

    say(
        f"timing batch sizes {batch_sizes} ({reps} runs each, {threads} threads, "
        f"round-robin visits of {visit_runs} calls)"
    )
    latencies = measure_latency(
        sessions, max_lens, histories, batch_sizes, reps, warmup, visit_runs=visit_runs
    )

    teacher_ndcg = teacher.metrics.get("test_ndcg@10")
    results = []
    for k, m in enumerate(models):
        ndcg = m.metrics.get("test_ndcg@10")
        results.append(
            VariantResult(
                ref=_ref(m),
                kind=m.kind,
                parent=m.parent,
                is_teacher=k == 0,
                precision=m.artifacts[ONNX_FILE].precision,
                max_len=max_lens[k],
                params=m.metrics.get("params"),
                onnx_bytes=int(paths[k].stat().st_size),
                test_hr10=m.metrics.get("test_hr@10"),
                test_ndcg10=ndcg,
                ndcg_retention=ndcg_retention(ndcg, teacher_ndcg),
                top10_agreement=agreements[k],
                latency=latencies[k],
                speedup={b: latencies[0][b].p50_ms / latencies[k][b].p50_ms for b in batch_sizes},
            )
        )
    pareto_bs = 1 if 1 in batch_sizes else batch_sizes[0]
    mark_pareto(results)
    for v in results:
        v.on_pareto_front = v.pareto.get(pareto_bs, False)

    import onnxruntime as ort

    return Report(
        family=_ref(teacher),
        dataset={
            "name": teacher.dataset.name,
            "n_users": teacher.dataset.n_users,
            "n_items": teacher.dataset.n_items,
            "sha256": teacher.dataset.sha256,
        },
        threads=threads,
        batch_sizes=batch_sizes,
        repeats=reps,
        agreement_histories=len(histories),
        latency_histories=len(histories),
        created_at=datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        environment={
            "provider": "CPUExecutionProvider",
            "onnxruntime": ort.__version__,
            "cpu_count": os.cpu_count(),
            "machine": platform.machine(),
            "processor": platform.processor() or platform.machine(),
            "cpu": cpu_summary(),
            "python": platform.python_version(),
            "warmup_runs": warmup,
            "allow_spinning": False,
            "inputs": "real test histories, each padded to its model's max_len",
            "order": "round-robin visits, start rotated every round",
            "visit_runs": visit_runs,
        },
        variants=results,
        skipped=skipped,
        pareto_batch_size=pareto_bs,
        best=fastest_keeping(results, pareto_bs),
    )


def _cpu_text(environment: dict[str, Any]) -> str:
    cpu = environment.get("cpu")  # reports written before it was recorded have none
    if not cpu:
        return "model and flags not recorded"
    return f"{cpu['model']}, flags: {' '.join(cpu['flags']) or 'none of ' + ' '.join(RESULT_FLAGS)}"


def mark_pareto(variants: Sequence[VariantResult]) -> None:
    """Set `pareto[b]` of every variant: on the (p50 at b, NDCG@10) front. A variant without
    a test NDCG@10 is never on the front."""
    sizes = sorted({b for v in variants for b in v.latency})
    for b in sizes:
        rated = [v for v in variants if v.test_ndcg10 is not None and b in v.latency]
        front = pareto_front([v.latency[b].p50_ms for v in rated], [v.test_ndcg10 for v in rated])  # type: ignore[misc]
        for v in variants:
            v.pareto[b] = False
        for v, on in zip(rated, front, strict=True):
            v.pareto[b] = on


# -- output ------------------------------------------------------------------------------------


def _json_keys(value: Any) -> Any:
    """Integer dict keys (batch sizes) as strings, so the JSON reads back the same way."""
    if isinstance(value, dict):
        return {str(k): _json_keys(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_keys(v) for v in value]
    return value


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _bytes(n: int) -> str:
    for unit, size in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def _order(report: Report) -> str:
    visit = int(report.environment.get("visit_runs", 1))
    if visit <= 1:
        return "variants interleaved round-robin one call at a time (cold cache)"
    return (
        f"variants visited round-robin, {visit} consecutive calls per visit with the first "
        f"untimed (warm cache, as in a service)"
    )


def render_markdown(report: Report) -> str:
    b = report.batch_sizes
    reps = ", ".join(f"{report.repeats[x]} at batch {x}" for x in b)
    lines = [
        f"# Comparison: family of {report.family}",
        "",
        f"Data set {report.dataset['name']} ({report.dataset['n_users']:,} users, "
        f"{report.dataset['n_items']:,} items); quality: test set, full ranking, history masked "
        f"(from the manifests). Top-10 agreement with the teacher measured on "
        f"{report.agreement_histories} test histories. Latency: ONNX Runtime CPU, "
        f"{report.threads} intra-op threads, batch sizes {', '.join(map(str, b))}, timed runs "
        f"{reps}, {_order(report)}, real test histories padded to each model's "
        f"max_len. {report.created_at}, ONNX Runtime {report.environment['onnxruntime']}, "
        f"{report.environment['cpu_count']} CPUs ({_cpu_text(report.environment)}).",
        "",
    ]
    head = ["variant", "kind", "precision", "params", "ONNX size", "HR@10", "NDCG@10",
            "retention", "top-10 agr."]  # fmt: skip
    for x in b:
        head += [f"p50 / p99 ms (b={x})", f"speedup (b={x})"]
    head.append(f"Pareto (b={report.pareto_batch_size})")
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for v in report.variants:
        name = f"**{v.ref}** (teacher)" if v.is_teacher else v.ref
        row = [
            name,
            v.kind,
            v.precision,
            _num(v.params, ",.0f"),
            _bytes(v.onnx_bytes),
            _num(v.test_hr10, ".4f"),
            _num(v.test_ndcg10, ".4f"),
            "-" if v.ndcg_retention is None else f"{v.ndcg_retention:.1%}",
            f"{v.top10_agreement:.3f}",
        ]
        for x in b:
            lat = v.latency[x]
            row += [f"{lat.p50_ms:.3f} / {lat.p99_ms:.3f}", f"{v.speedup[x]:.2f}x"]
        row.append("★" if v.on_pareto_front else "")
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", summary_line(report)]
    if report.skipped:
        left = "; ".join(f"{s['ref']} ({s['reason']})" for s in report.skipped)
        lines += ["", f"Left out: {left}."]
    return "\n".join(lines) + "\n"


def summary_line(report: Report) -> str:
    pct = f"{report.min_retention:.0%}"
    best = report.best
    if best is None:
        return f"No variant keeps ≥ {pct} of the teacher's NDCG@10."
    speed = ", ".join(f"{s:.2f}x at batch {b}" for b, s in sorted(best["speedup"].items()))
    verdict = "meets" if best["meets_target"] else "misses"
    return (
        f"Fastest variant keeping ≥ {pct} of the teacher's NDCG@10: **{best['ref']}** "
        f"(retention {best['ndcg_retention']:.1%}), p50 speedup {speed}; it {verdict} the "
        f"≥ {report.target_speedup:g}x target (needed at every measured batch size)."
    )


def chart_labels(variants: Sequence[VariantResult], batch_size: int) -> list[str]:
    """The variants a chart panel names: all of them up to `MAX_LABELLED_POINTS`; past that
    the names overlap into noise, so only the teacher and the Pareto front (every point is
    in the table next to the chart)."""
    if len(variants) <= MAX_LABELLED_POINTS:
        return [v.ref for v in variants]
    return [v.ref for v in variants if v.is_teacher or v.pareto.get(batch_size)]


def render_png(report: Report, path: Path) -> None:
    """Latency (log x, p50 with a bar to p99) vs NDCG@10, one panel per batch size (at most
    two: the Pareto batch size and the largest), labelled points, the front as a step line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogFormatter

    sizes = [report.pareto_batch_size]
    if report.batch_sizes[-1] != sizes[0]:
        sizes.append(report.batch_sizes[-1])
    rated = [v for v in report.variants if v.test_ndcg10 is not None]
    fig = Figure(figsize=(6.5 * len(sizes), 5.0), layout="constrained")
    FigureCanvasAgg(fig)
    for col, bs in enumerate(sizes):
        ax = fig.add_subplot(1, len(sizes), col + 1)
        named = set(chart_labels(rated, bs))
        for v in rated:
            lat = v.latency[bs]
            style = (
                {"marker": "*", "s": 220, "color": "crimson", "zorder": 4}
                if v.is_teacher
                else {
                    "marker": "o" if v.pareto.get(bs) else "s",
                    "s": 60,
                    "color": "tab:blue" if v.pareto.get(bs) else "tab:gray",
                    "zorder": 3,
                }
            )
            ax.errorbar(lat.p50_ms, v.test_ndcg10, xerr=[[0.0], [lat.p99_ms - lat.p50_ms]],
                        fmt="none", ecolor="lightgray", elinewidth=1, zorder=2)  # fmt: skip
            ax.scatter([lat.p50_ms], [v.test_ndcg10], **style)
            if v.ref in named:
                label = f"{v.ref} (teacher)" if v.is_teacher else v.ref
                ax.annotate(label, (lat.p50_ms, v.test_ndcg10), textcoords="offset points",
                            xytext=(5, 5), fontsize=8)  # fmt: skip
        teacher = next((v for v in rated if v.is_teacher), None)
        if teacher is not None and teacher.test_ndcg10:
            floor = report.min_retention * teacher.test_ndcg10
            ax.axhline(floor, color="crimson", ls=":", lw=1,
                       label=f"{report.min_retention:.0%} of the teacher")  # fmt: skip
        ax.set_xscale("log")
        ax.margins(x=0.15, y=0.1)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _pos: f"{x:g}"))
        ax.xaxis.set_minor_formatter(LogFormatter(minor_thresholds=(1, 0.4)))
        front = sorted((v.latency[bs].p50_ms, v.test_ndcg10) for v in rated if v.pareto.get(bs))
        if front:
            # Steps up from the fastest front member; flat beyond the slowest (nothing slower
            # is better), to the right edge of the panel.
            left, right = ax.get_xlim()
            xs, ys = zip(*front, (right, front[-1][1]), strict=True)
            ax.plot(xs, ys, drawstyle="steps-post", color="tab:blue", lw=1.2, label="Pareto front")
            ax.set_xlim(left, right)
        ax.set_xlabel(f"p50 latency at batch {bs}, ms (log; bar to p99)")
        ax.set_ylabel("test NDCG@10")
        threads = f"{report.threads} thread{'s' if report.threads > 1 else ''}"
        ax.set_title(f"{report.family} family, batch {bs}, {threads}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.savefig(path, dpi=110)


def write_report(report: Report, out_dir: str | Path, stem: str | None = None) -> dict[str, Path]:
    """Write `<stem>.json`, `<stem>.md` and `<stem>.png` into `out_dir` (created if needed);
    default stem `compare-<teacher name>-<version>`. Returns the three paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = stem or "compare-" + report.family.replace("@", "-")
    paths = {"json": out / f"{stem}.json", "md": out / f"{stem}.md", "png": out / f"{stem}.png"}
    paths["json"].write_text(json.dumps(report.to_dict(), indent=2, allow_nan=False) + "\n")
    paths["md"].write_text(report.markdown())
    render_png(report, paths["png"])
    return paths
