"""One entry point for every data source a recipe or command names: a path (the format from
its suffix) or a synthetic spec. It sits above the loaders, which share `sequences`."""

from __future__ import annotations

from pathlib import Path

from compression.data.events import load_event_file
from compression.data.sequences import DataError, SequenceDataset, load_sequence_file
from compression.data.synthetic import parse_synthetic_spec, synthetic_dataset


def load_dataset(spec: str | Path, **kwargs: object) -> SequenceDataset:
    """Load by path (format from the name) or `synthetic[:key=value,...]`."""
    spec_str = str(spec)
    if spec_str == "synthetic" or spec_str.startswith("synthetic:"):
        return synthetic_dataset(parse_synthetic_spec(spec_str))
    path = Path(spec_str)
    suffix = path.suffix.lower()
    if suffix in {".dat", ".csv", ".parquet"}:
        return load_event_file(path, **kwargs)  # type: ignore[arg-type]
    if suffix in {".txt", ""}:
        return load_sequence_file(path)
    raise DataError(
        f"{path}: unknown data format {suffix!r}; use a .txt sequence file, "
        "a MovieLens .dat/.csv, a .csv/.parquet event log, or 'synthetic'"
    )
