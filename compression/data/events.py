"""Raw event logs (MovieLens `.dat`/`.csv`, generic CSV/Parquet) -> `SequenceDataset`.

An event log has one interaction per line or row: a user, an item and a timestamp. The
loader orders each user's events by timestamp (ties keep file order), optionally applies
k-core filtering, and maps item ids to internal ids 1..n with
`compression.data.sequences.remap_items`.

Every problem raises `compression.data.sequences.DataError` with a one-line message
`"<file>:<line>: <problem>; <what was expected>"` (Parquet: `"<file>: row <n>: ..."`).
Nothing is half-loaded: a call returns a complete dataset or raises.

Reading is vectorised: a fast path (pyarrow's CSV reader) handles well-formed files; when it
meets anything it cannot judge, the file is re-read line by line, which is slower but names
the first bad line exactly. pandas and pyarrow are imported only when a file is read, so
importing this module costs nothing for the serving process.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np

from compression.data.sequences import DataError, SequenceDataset, remap_items
from model_store.store import sha256_file

if TYPE_CHECKING:
    import pandas as pd

FORMATS = ("movielens-dat", "movielens-csv", "csv", "parquet")
MOVIELENS_CSV_HEADER = ("userId", "movieId", "rating", "timestamp")
MOVIELENS_DAT_LAYOUT = "UserID::MovieID::Rating::Timestamp"

__all__ = ["FORMATS", "MOVIELENS_CSV_HEADER", "load_event_file"]


def load_event_file(
    path: str | Path,
    *,
    fmt: str | None = None,
    user_col: str | None = None,
    item_col: str | None = None,
    time_col: str | None = None,
    min_user_count: int = 1,
    min_item_count: int = 1,
    name: str | None = None,
) -> SequenceDataset:
    """Load an event log into one chronological item sequence per user.

    Formats (`fmt`; inferred from the file when None):

    - ``"movielens-dat"`` (``*.dat``): MovieLens-1M/10M ``ratings.dat``,
      ``UserID::MovieID::Rating::Timestamp``, no header, read as latin-1.
    - ``"movielens-csv"`` (``*.csv`` whose header is ``userId,movieId,rating,timestamp``):
      MovieLens ml-latest(-small), 20M, 25M ``ratings.csv``.
    - ``"csv"`` (any other ``*.csv``, UTF-8, with a header) and ``"parquet"`` (``*.parquet``):
      `user_col`, `item_col` and `time_col` name the columns; other columns are ignored.

    MovieLens ids must be non-negative integers (kept as their decimal strings, so "007"
    becomes "7") and timestamps numbers. In generic files ids are any non-empty strings,
    read as text and kept as spelled ("007" stays "007", "B00ABC12" stays itself; only
    surrounding whitespace is stripped), and timestamps are numbers or ISO 8601 datetimes
    (one kind per file; datetimes without an offset are taken as UTC). Item ids that collide
    under `model_store.item_ids` ("007" and "7" in one file) raise `DataError`.

    Each user's events are sorted by timestamp with a stable sort, so ties keep file order.
    Users appear in the order of their first event in the file; `user_ids` and `item_ids`
    hold the original ids as strings. Item ids that are all digit strings are numbered in
    numeric order (`remap_items(..., numeric=True)`), otherwise in string order.

    Minimum-count filtering (k-core, as in SASRec-style preprocessing): items with fewer
    than `min_item_count` events and users with fewer than `min_user_count` events are
    dropped, and both filters are applied again until nothing changes, because dropping
    items can push users under the threshold and vice versa. Counts are events, so a user
    who rated an item twice counts twice. The result is the largest subset of the log in
    which every user and every item meets its minimum. Users left with no events are
    dropped. The defaults (1 and 1) keep everything.

    Raises `DataError` for unknown `fmt`, counts below 1, a missing file, missing or
    duplicated columns, any malformed line (wrong number of fields, non-integer MovieLens
    id, empty id, unparseable timestamp), an empty or header-only file, and for filters
    that leave no events.
    """
    path = Path(path)
    for option, value in (("min_user_count", min_user_count), ("min_item_count", min_item_count)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise DataError(f"{path}: {option}={value!r} is invalid; expected an integer >= 1")
    if fmt is not None and fmt not in FORMATS:
        raise DataError(f"{path}: unknown fmt {fmt!r}; expected one of {', '.join(FORMATS)}")
    if not path.is_file():
        raise DataError(
            f"{path}: no such file; pass the path of an event log (.dat, .csv or .parquet)"
        )
    columns = (user_col, item_col, time_col)
    named = any(c is not None for c in columns)
    if fmt is None:
        fmt = _infer_format(path, named)
    if fmt.startswith("movielens"):
        if named:
            raise DataError(
                f"{path}: fmt={fmt!r} has fixed columns; drop user_col/item_col/"
                "time_col or use fmt='csv' or 'parquet' to name columns"
            )
        layout = _movielens_layout(fmt)
    else:
        missing = [
            opt
            for opt, c in zip(("user_col", "item_col", "time_col"), columns, strict=True)
            if c is None
        ]
        if missing:
            raise DataError(
                f"{path}: fmt={fmt!r} needs {', '.join(missing)}; pass the names "
                "of the user, item and timestamp columns"
            )
        if len(set(columns)) < 3:
            raise DataError(
                f"{path}: user_col={user_col!r}, item_col={item_col!r}, "
                f"time_col={time_col!r}; expected three different columns"
            )
        layout = _Layout(
            fmt,
            user_col,
            item_col,
            time_col,
            rating=None,  # type: ignore[arg-type]
            integer_ids=False,
            datetimes=True,
        )
    if fmt == "movielens-dat":
        events = _read_dat(path, layout)
    elif fmt == "parquet":
        events = _read_parquet(path, layout)
    else:
        events = _read_csv(path, layout)
    return _assemble(name or path.stem, path, events, min_user_count, min_item_count)


# ----------------------------------------------------------------------------- plumbing


@dataclass(frozen=True)
class _Layout:
    fmt: str
    user: str  # column names, used to read generic files and in messages
    item: str
    time: str
    rating: str | None  # MovieLens only: must be numeric, otherwise ignored
    integer_ids: bool
    datetimes: bool

    def columns(self) -> list[str]:
        cols = [self.user, self.item, self.time]
        return [*cols, self.rating] if self.rating else cols


def _movielens_layout(fmt: str) -> _Layout:
    return _Layout(
        fmt, "userId", "movieId", "timestamp", rating="rating", integer_ids=True, datetimes=False
    )


@dataclass
class _Events:
    user_codes: np.ndarray  # int64, 0..n_users-1 in order of first appearance
    user_names: list[str]
    item_codes: np.ndarray
    item_names: list[str]
    times: np.ndarray  # int64 or float64; only the order matters


class _Retry(Exception):
    """The fast path met something it cannot judge; re-read line by line."""


class _Bad(Exception):
    """A value problem in row `row` (0-based), to be reported with its line number."""

    def __init__(self, row: int, problem: str, expected: str) -> None:
        super().__init__(problem)
        self.row, self.problem, self.expected = row, problem, expected


@dataclass(frozen=True)
class _Where:
    """Turns a row index into a location; without line numbers (fast path) it retries."""

    path: Path
    lines: np.ndarray | None
    unit: str = "line"

    def fail(self, bad: _Bad) -> NoReturn:
        if self.lines is None:
            raise _Retry from bad
        n = int(self.lines[bad.row])
        where = f"{self.path}:{n}" if self.unit == "line" else f"{self.path}: row {n}"
        raise DataError(f"{where}: {bad.problem}; {bad.expected}")


def _clip(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _one_line(exc: BaseException) -> str:
    return _clip(" ".join(str(exc).split()), 200)


def _first(mask: np.ndarray) -> int:
    return int(np.argmax(mask))


def _infer_format(path: Path, named: bool) -> str:
    suffix = path.suffix.lower()
    if suffix == ".dat":
        return "movielens-dat"
    if suffix == ".parquet":
        return "parquet"
    if suffix == ".csv":
        if named:
            return "csv"
        header = _read_header(path)
        if tuple(header) == MOVIELENS_CSV_HEADER:
            return "movielens-csv"
        raise DataError(
            f"{path}:1: header {_clip(','.join(header))!r} is not MovieLens' "
            f"({','.join(MOVIELENS_CSV_HEADER)}); pass user_col, item_col and "
            "time_col to name the columns"
        )
    raise DataError(
        f"{path}: cannot infer the format from suffix {suffix!r}; pass fmt= one "
        f"of {', '.join(FORMATS)}"
    )


# ----------------------------------------------------------------------------- validation


def _series(values: Any) -> pd.Series:
    import pandas as pd

    return values if isinstance(values, pd.Series) else pd.Series(values)


def _ids(values: Any, what: str, layout: _Layout) -> tuple[np.ndarray, list[str]]:
    """Factorize one id column: codes in order of first appearance, canonical strings."""
    import pandas as pd

    column = layout.user if what == "user" else layout.item
    if layout.integer_ids:
        expected = f"expected a non-negative integer {what} id"
    else:
        expected = f"expected a non-empty {what} id in column {column!r}"
    s = _series(values)
    kind = s.dtype.kind
    if kind in "iu":
        arr = s.to_numpy()
        if layout.integer_ids and kind == "i" and (arr < 0).any():
            i = _first(arr < 0)
            raise _Bad(i, f"{what} id {int(arr[i])} is negative", expected)
        codes, uniques = pd.factorize(arr)
        return codes.astype(np.int64), np.asarray(uniques).astype(str).tolist()
    if kind == "f":
        arr = s.to_numpy()
        with np.errstate(invalid="ignore"):
            bad = ~np.isfinite(arr) | (arr != np.floor(arr))
        if bad.any():
            i = _first(bad)
            problem = (
                f"missing {what} id"
                if np.isnan(arr[i])
                else f"{what} id {arr[i]!r} is not an integer"
            )
            raise _Bad(i, problem, expected)
        return _ids(arr.astype(np.int64), what, layout)
    missing = s.isna().to_numpy()
    if missing.any():
        raise _Bad(_first(missing), f"missing {what} id", expected)
    codes, uniques = pd.factorize(s)
    names: list[str] = []
    for k, raw in enumerate(uniques):
        text = str(raw).strip()
        if layout.integer_ids:
            if not (text.isascii() and text.isdigit()):
                raise _Bad(
                    _first(codes == k),
                    f"{what} id {_clip(str(raw))!r} is not a non-negative integer",
                    expected,
                )
            text = str(int(text))
        elif not text:
            raise _Bad(_first(codes == k), f"empty {what} id", expected)
        names.append(text)
    if len(set(names)) < len(names):  # " 5" and "5" (or "05" and "5") are the same id
        merged, uniq = pd.factorize(np.asarray(names, dtype=object))
        codes, names = merged[codes], [str(u) for u in uniq]
    return codes.astype(np.int64), names


def _times(values: Any, layout: _Layout) -> np.ndarray:
    import pandas as pd

    if layout.datetimes:
        expected = (
            f"expected a number or an ISO 8601 datetime in column {layout.time!r}, "
            "the same kind on every line"
        )
    else:
        expected = "expected a numeric timestamp (e.g. Unix seconds)"
    s = _series(values)
    kind = s.dtype.kind
    if kind in "iu":
        return s.to_numpy()
    if kind == "f":
        arr = s.to_numpy()
        if not np.isfinite(arr).all():
            i = _first(~np.isfinite(arr))
            problem = (
                "missing timestamp"
                if np.isnan(arr[i])
                else f"timestamp {arr[i]!r} is not a finite number"
            )
            raise _Bad(i, problem, expected)
        return arr
    missing = s.isna().to_numpy()
    if missing.any():
        raise _Bad(_first(missing), "missing timestamp", expected)
    s = s.astype(str)
    num = pd.to_numeric(s, errors="coerce").to_numpy()
    ok = np.isfinite(num)
    if ok.all():
        return num
    if not layout.datetimes or ok[0]:
        i = _first(~ok)
        raise _Bad(i, f"timestamp {_clip(s.iloc[i])!r} is not a number", expected)
    stamps = pd.to_datetime(s.str.strip(), format="ISO8601", utc=True, errors="coerce")
    bad = stamps.isna().to_numpy()
    if bad.any():
        i = _first(bad)
        raise _Bad(
            i, f"timestamp {_clip(s.iloc[i])!r} is not a number or an ISO 8601 datetime", expected
        )
    return stamps.astype("int64").to_numpy()


def _ratings(values: Any) -> None:
    import pandas as pd

    expected = "expected a numeric rating"
    s = _series(values)
    if s.dtype.kind in "iu":
        return
    if s.dtype.kind == "f":
        num = s.to_numpy()
    else:
        num = pd.to_numeric(s.astype(str), errors="coerce").to_numpy(dtype=float)
    if not np.isfinite(num).all():
        i = _first(~np.isfinite(num))
        raise _Bad(i, f"rating {_clip(str(s.iloc[i]))!r} is not a number", expected)


def _to_events(
    where: _Where, layout: _Layout, users: Any, items: Any, times: Any, ratings: Any = None
) -> _Events:
    """Validate the columns; report the earliest bad row of any of them."""
    results: dict[str, Any] = {}
    problems: list[_Bad] = []
    checks = [
        ("users", lambda: _ids(users, "user", layout)),
        ("items", lambda: _ids(items, "item", layout)),
        ("times", lambda: _times(times, layout)),
    ]
    if ratings is not None:
        checks.append(("ratings", lambda: _ratings(ratings)))
    for key, check in checks:
        try:
            results[key] = check()
        except _Bad as bad:
            problems.append(bad)
    if problems:
        where.fail(min(problems, key=lambda b: b.row))
    (ucodes, unames), (icodes, inames) = results["users"], results["items"]
    return _Events(ucodes, unames, icodes, inames, np.asarray(results["times"]))


def _check_prefix(where: _Where, layout: _Layout, columns: list[list[str]]) -> None:
    """Before reporting a structural error, report any bad value on an earlier line."""
    if columns and columns[0]:
        _to_events(where, layout, *columns)


# ----------------------------------------------------------------------------- readers


def _read_dat(path: Path, layout: _Layout) -> _Events:
    try:
        return _read_dat_fast(path, layout)
    except _Retry:
        return _read_dat_lines(path, layout)


def _read_dat_fast(path: Path, layout: _Layout) -> _Events:
    # "1::1193::5::978300760" split on ":" is 7 fields whose odd ones must be empty.
    import pyarrow as pa
    import pyarrow.csv as pacsv

    names = [f"f{i}" for i in range(7)]
    types = {
        "f0": pa.int64(),
        "f1": pa.null(),
        "f2": pa.int64(),
        "f3": pa.null(),
        "f4": pa.float64(),
        "f5": pa.null(),
    }
    try:
        table = pacsv.read_csv(
            path,
            read_options=pacsv.ReadOptions(column_names=names, encoding="latin1"),
            parse_options=pacsv.ParseOptions(
                delimiter=":", quote_char=False, ignore_empty_lines=True
            ),
            convert_options=pacsv.ConvertOptions(column_types=types),
        )
    except (pa.ArrowException, ValueError, OSError) as exc:
        raise _Retry from exc
    if table.num_rows == 0 or any(table[c].null_count for c in ("f0", "f2", "f4", "f6")):
        raise _Retry
    ftype = table["f6"].type
    if not (pa.types.is_integer(ftype) or pa.types.is_floating(ftype)):
        raise _Retry
    cols = [table[c].to_numpy() for c in ("f0", "f2", "f6", "f4")]
    return _to_events(_Where(path, None), layout, *cols)


def _read_dat_lines(path: Path, layout: _Layout) -> _Events:
    text = path.read_bytes().decode("latin-1")  # every byte decodes
    columns: list[list[str]] = [[], [], [], []]  # user, item, time, rating
    lines: list[int] = []
    # split("\n") rather than splitlines(): latin-1 \x85 and \x1c..\x1e are not line breaks.
    for n, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        fields = line.rstrip("\r").split("::")
        if len(fields) != 4:
            _check_prefix(_Where(path, np.asarray(lines)), layout, columns)
            raise DataError(
                f"{path}:{n}: {len(fields)} '::'-separated fields in "
                f"{_clip(line.strip())!r}; expected 4 fields "
                f"'{MOVIELENS_DAT_LAYOUT}'"
            )
        user, item, rating, stamp = fields
        columns[0].append(user)
        columns[1].append(item)
        columns[2].append(stamp)
        columns[3].append(rating)
        lines.append(n)
    if not lines:
        raise DataError(f"{path}:1: empty file; expected '{MOVIELENS_DAT_LAYOUT}' lines")
    return _to_events(_Where(path, np.asarray(lines)), layout, *columns)


def _read_header(path: Path) -> list[str]:
    """The first line of a CSV file as stripped field names."""
    try:
        with path.open("r", encoding="utf-8-sig", newline="") as fh:
            header = next(csv.reader(fh), None)
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path}:1: not UTF-8 text ({exc.reason}); expected a UTF-8 CSV file with a header line"
        ) from exc
    except csv.Error as exc:
        raise DataError(f"{path}:1: {_one_line(exc)}; expected a CSV header line") from exc
    if header is None:
        raise DataError(f"{path}:1: empty file; expected a CSV header line naming the columns")
    fields = [f.strip() for f in header]
    if not any(fields):
        raise DataError(
            f"{path}:1: empty header line; expected a CSV header line naming the columns"
        )
    return fields


def _check_columns(path: Path, present: list[str], layout: _Layout, where: str) -> None:
    wanted = [("user_col", layout.user), ("item_col", layout.item), ("time_col", layout.time)]
    missing = [f"{col!r} ({opt})" for opt, col in wanted if col not in present]
    if missing:
        listing = ", ".join(repr(c) for c in present)
        raise DataError(f"{where}: no column {', '.join(missing)}; columns present: {listing}")
    twice = [col for _, col in wanted if present.count(col) > 1]
    if twice:
        raise DataError(
            f"{where}: column {twice[0]!r} appears more than once; expected unique column names"
        )


def _read_csv(path: Path, layout: _Layout) -> _Events:
    header = _read_header(path)
    if layout.fmt == "movielens-csv":
        if tuple(header) != MOVIELENS_CSV_HEADER:
            raise DataError(
                f"{path}:1: header {_clip(','.join(header))!r}; expected "
                f"{','.join(MOVIELENS_CSV_HEADER)!r} (use fmt='csv' with "
                "user_col/item_col/time_col for other layouts)"
            )
    else:
        _check_columns(path, header, layout, f"{path}:1")
    try:
        return _read_csv_fast(path, layout, header)
    except _Retry:
        return _read_csv_lines(path, layout, header)


def _read_csv_fast(path: Path, layout: _Layout, header: list[str]) -> _Events:
    import pyarrow as pa
    import pyarrow.csv as pacsv

    if layout.integer_ids:
        types = {layout.user: pa.int64(), layout.item: pa.int64(), "rating": pa.float64()}
    else:
        types = {c: pa.string() for c in layout.columns()}
    try:
        table = pacsv.read_csv(
            path,
            read_options=pacsv.ReadOptions(column_names=header, skip_rows=1),
            parse_options=pacsv.ParseOptions(ignore_empty_lines=True),
            convert_options=pacsv.ConvertOptions(
                column_types=types, include_columns=layout.columns()
            ),
        )
    except (pa.ArrowException, ValueError, OSError) as exc:
        raise _Retry from exc
    if table.num_rows == 0 or any(table[c].null_count for c in layout.columns()):
        raise _Retry
    if layout.integer_ids:
        ttype = table[layout.time].type
        if not (pa.types.is_integer(ttype) or pa.types.is_floating(ttype)):
            raise _Retry
        cols = [table[c].to_numpy() for c in layout.columns()]
    else:
        cols = [table[c].to_pandas() for c in layout.columns()]
    return _to_events(_Where(path, None), layout, *cols)


def _read_csv_lines(path: Path, layout: _Layout, header: list[str]) -> _Events:
    picks = [header.index(c) for c in layout.columns()]
    ncols = len(header)
    columns: list[list[str]] = [[] for _ in picks]
    lines: list[int] = []
    with path.open("r", encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh)
        try:
            next(reader)  # the header, already checked
            for row in reader:
                n = reader.line_num
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue
                if len(row) != ncols:
                    _check_prefix(_Where(path, np.asarray(lines)), layout, columns)
                    raise DataError(
                        f"{path}:{n}: {len(row)} fields in "
                        f"{_clip(','.join(row))!r}; expected {ncols} fields as in "
                        f"the header {_clip(','.join(header))!r}"
                    )
                for col, i in zip(columns, picks, strict=True):
                    col.append(row[i])
                lines.append(n)
        except UnicodeDecodeError as exc:
            raise DataError(
                f"{path}:{reader.line_num + 1}: not UTF-8 text ({exc.reason}); "
                "expected a UTF-8 CSV file"
            ) from exc
        except csv.Error as exc:
            raise DataError(
                f"{path}:{reader.line_num}: {_one_line(exc)}; expected comma-separated fields"
            ) from exc
    if not lines:
        raise DataError(
            f"{path}:2: no events after the header; expected one event per line "
            f"with columns {', '.join(layout.columns()[:3])}"
        )
    return _to_events(_Where(path, np.asarray(lines)), layout, *columns)


def _read_parquet(path: Path, layout: _Layout) -> _Events:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
        _check_columns(path, list(schema.names), layout, str(path))
        table = pq.read_table(path, columns=layout.columns())
    except (pa.ArrowException, OSError) as exc:
        raise DataError(
            f"{path}: not a readable Parquet file ({_one_line(exc)}); expected "
            "a Parquet table of events"
        ) from exc
    if table.num_rows == 0:
        raise DataError(f"{path}: the table has no rows; expected one event per row")
    where = _Where(path, np.arange(1, table.num_rows + 1), unit="row")
    cols: list[Any] = []
    for c in layout.columns():
        col = table[c]
        if pa.types.is_dictionary(col.type):
            col = col.cast(col.type.value_type)
        if c == layout.time and (pa.types.is_timestamp(col.type) or pa.types.is_date(col.type)):
            if col.null_count:
                nulls = col.is_null().to_numpy(zero_copy_only=False)
                where.fail(
                    _Bad(
                        _first(nulls), "missing timestamp", f"expected a timestamp in column {c!r}"
                    )
                )
            cols.append(col.cast(pa.int64()).to_numpy())
        else:
            cols.append(col.to_pandas())
    return _to_events(where, layout, *cols)


# ----------------------------------------------------------------------------- assembly


def _assemble(
    name: str, path: Path, events: _Events, min_user_count: int, min_item_count: int
) -> SequenceDataset:
    ucodes, icodes = events.user_codes, events.item_codes
    keep = np.ones(len(ucodes), dtype=bool)
    if min_user_count > 1 or min_item_count > 1:
        n_users, n_items = len(events.user_names), len(events.item_names)
        rounds = 0
        while True:
            rounds += 1
            before = int(keep.sum())
            item_counts = np.bincount(icodes[keep], minlength=n_items)
            keep &= item_counts[icodes] >= min_item_count
            if not keep.any():
                _emptied(path, "min_item_count", min_item_count, rounds)
            user_counts = np.bincount(ucodes[keep], minlength=n_users)
            keep &= user_counts[ucodes] >= min_user_count
            if not keep.any():
                _emptied(path, "min_user_count", min_user_count, rounds)
            if int(keep.sum()) == before:
                break
    idx = np.flatnonzero(keep)
    idx = idx[np.argsort(events.times[idx], kind="stable")]
    idx = idx[np.argsort(ucodes[idx], kind="stable")]  # stable: time order within a user
    users_sorted = ucodes[idx]
    starts = np.concatenate(([0], np.flatnonzero(np.diff(users_sorted)) + 1))
    item_names = np.asarray(events.item_names, dtype=object)
    groups = np.split(item_names[icodes[idx]], starts[1:])
    raw_sequences = [g.tolist() for g in groups]
    users = [events.user_names[u] for u in users_sorted[starts].tolist()]
    used = np.unique(icodes[idx]).tolist()
    numeric = all(events.item_names[c].isascii() and events.item_names[c].isdigit() for c in used)
    return remap_items(
        name, users, raw_sequences, sha256_file(path), numeric=numeric, where=str(path)
    )


def _emptied(path: Path, option: str, value: int, rounds: int) -> NoReturn:
    raise DataError(
        f"{path}: no events left: {option}={value} removed the last ones "
        f"(k-core filtering, pass {rounds}); expected a smaller {option}"
    )
