"""What every results script ends with: the numbers as JSON and a short markdown table."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any


def mean_sd(values: list[float]) -> dict[str, float | int]:
    """Mean, sample sd (NaN for one value) and count."""
    sd = statistics.stdev(values) if len(values) > 1 else float("nan")
    return {"mean": statistics.fmean(values), "sd": sd, "n": len(values)}


def write_results(out: str | Path, stem: str, payload: Any, lines: list[str]) -> None:
    """`<out>/<stem>.json` and `<out>/<stem>.md`, and the table on stdout."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}.json").write_text(json.dumps(payload, indent=2))
    (folder / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
