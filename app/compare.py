"""Full vs compressed variants side by side: offline quality from the manifests, live latency
from the service's own histograms, shadow agreement. JSON for tools, HTML for people (inline
SVG, no external CDN: the page works offline).
"""

from __future__ import annotations

import html
import math
from typing import Any

from prometheus_client import Histogram

QUANTILES = (0.5, 0.95, 0.99)


def _buckets(hist: Histogram, labels: dict[str, str]) -> list[tuple[float, float]]:
    """Cumulative (upper bound, count) pairs of one labelled series, +Inf last."""
    out = []
    for metric in hist.collect():
        for sample in metric.samples:
            if sample.name.endswith("_bucket") and all(
                sample.labels.get(k) == v for k, v in labels.items()
            ):
                out.append((float(sample.labels["le"]), sample.value))
    return sorted(out)


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus' `histogram_quantile`: linear interpolation inside the matching bucket."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound  # above the last finite bucket: its bound is all we know
            width = count - lower_count
            frac = (rank - lower_count) / width if width > 0 else 1.0
            return lower_bound + (bound - lower_bound) * frac
        lower_bound, lower_count = bound, count
    return lower_bound


def _mean(hist: Histogram, labels: dict[str, str]) -> tuple[float | None, int]:
    total = count = 0.0
    for metric in hist.collect():
        for sample in metric.samples:
            if all(sample.labels.get(k) == v for k, v in labels.items()):
                if sample.name.endswith("_sum"):
                    total += sample.value
                elif sample.name.endswith("_count"):
                    count += sample.value
    return (total / count if count else None), int(count)


def comparison(service: Any) -> dict[str, Any]:
    """One row per loaded variant; retention is NDCG@10 over the reference variant's."""
    m = service.metrics
    rows: dict[str, dict[str, Any]] = {}
    reference = service.settings.reference_variant or _largest(service.variants)
    ref_ndcg = None
    if reference in service.variants:
        ref_ndcg = service.variants[reference].model.manifest.metrics.get("test_ndcg@10")
    for name, variant in sorted(service.variants.items()):
        model = variant.model
        metrics = model.manifest.metrics
        ndcg = metrics.get("test_ndcg@10")
        buckets = _buckets(m.request_duration, {"variant": name})
        latency = {f"p{round(q * 100)}_s": histogram_quantile(q, buckets) for q in QUANTILES}
        agreement, shadow_n = _mean(m.shadow_agreement, {"candidate": name})
        rows[name] = {
            "model_version": model.ref,
            "kind": model.manifest.kind,
            "engine": model.engine.name,
            "precision": model.precision,
            "size_bytes": model.size_bytes,
            "params": metrics.get("params"),
            "hr@10": metrics.get("test_hr@10"),
            "ndcg@10": ndcg,
            "ndcg_retention": (ndcg / ref_ndcg) if ndcg is not None and ref_ndcg else None,
            "latency": {**latency, "requests": int(buckets[-1][1]) if buckets else 0},
            "shadow_agreement": agreement,
            "shadow_requests": shadow_n,
            "weight": service.router.weights.get(name, 0.0),
        }
    return {"reference_variant": reference, "variants": rows}


def _largest(variants: dict[str, Any]) -> str | None:
    if not variants:
        return None
    return max(variants, key=lambda n: variants[n].model.manifest.metrics.get("params", 0.0))


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _ms(seconds: float | None) -> str:
    return _fmt(None if seconds is None else seconds * 1e3, ".2f")


def render_html(report: dict[str, Any]) -> str:
    """The comparison as a page: a table and a p99-latency vs NDCG@10 scatter (inline SVG)."""
    rows = report["variants"]
    head = (
        "<tr><th>variant</th><th>model</th><th>engine</th><th>precision</th><th>size MB</th>"
        "<th>HR@10</th><th>NDCG@10</th><th>retention</th><th>p50 ms</th><th>p95 ms</th>"
        "<th>p99 ms</th><th>requests</th><th>shadow agreement</th><th>weight</th></tr>"
    )
    body = []
    for name, r in rows.items():
        lat = r["latency"]
        cells = [
            name, r["model_version"], r["engine"], r["precision"],
            _fmt(r["size_bytes"] / 1e6, ".2f"), _fmt(r["hr@10"], ".4f"), _fmt(r["ndcg@10"], ".4f"),
            _fmt(r["ndcg_retention"], ".1%"),
            *(_ms(lat[p]) for p in ("p50_s", "p95_s", "p99_s")),
            str(lat["requests"]), _fmt(r["shadow_agreement"], ".3f"), _fmt(r["weight"], ".2f"),
        ]  # fmt: skip
        body.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>recsys: variants compared"
        "</title><style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}</style></head><body>"
        "<h1>Variants: quality vs live latency</h1>"
        f"<p>Reference (full model): {html.escape(str(report['reference_variant']))}. "
        "Quality is offline test NDCG@10 from each manifest; latency is measured by this "
        "service since it started (request histograms).</p>"
        f"<table>{head}{''.join(body)}</table>{_scatter(rows)}</body></html>"
    )


def _scatter(rows: dict[str, dict[str, Any]]) -> str:
    points = [
        (name, r["latency"]["p99_s"] * 1e3, r["ndcg@10"])
        for name, r in rows.items()
        if r["latency"]["p99_s"] is not None and r["ndcg@10"] is not None
    ]
    if not points:
        return "<p>No chart yet: it needs served requests and NDCG@10 in the manifests.</p>"
    w, h, pad = 640, 400, 60
    xs, ys = [p[1] for p in points], [p[2] for p in points]
    x_max, y_min, y_max = max(xs) * 1.15, min(ys) * 0.9, max(ys) * 1.05

    def sx(v: float) -> float:
        return pad + (w - 2 * pad) * v / x_max

    def sy(v: float) -> float:
        return h - pad - (h - 2 * pad) * (v - y_min) / max(y_max - y_min, 1e-9)

    marks = "".join(
        f"<circle cx='{sx(x):.1f}' cy='{sy(y):.1f}' r='6' fill='#1f77b4'/>"
        f"<text x='{sx(x) + 9:.1f}' y='{sy(y) + 4:.1f}' font-size='12'>{html.escape(n)}</text>"
        for n, x, y in points
    )
    return (
        f"<h2>p99 latency vs NDCG@10</h2><svg width='{w}' height='{h}' "
        "xmlns='http://www.w3.org/2000/svg'>"
        f"<line x1='{pad}' y1='{h - pad}' x2='{w - pad}' y2='{h - pad}' stroke='black'/>"
        f"<line x1='{pad}' y1='{pad}' x2='{pad}' y2='{h - pad}' stroke='black'/>"
        f"<text x='{w / 2}' y='{h - 15}' text-anchor='middle'>p99 latency (ms), 0 to "
        f"{x_max:.2f}</text><text x='15' y='{h / 2}' transform='rotate(-90 15 {h / 2})' "
        f"text-anchor='middle'>NDCG@10 ({y_min:.3f} to {y_max:.3f})</text>{marks}</svg>"
    )
