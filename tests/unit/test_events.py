"""Raw event-log loaders: formats, ordering, k-core filtering, id mapping, error messages."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from compression.data.events import load_event_file
from compression.data.load import load_dataset
from compression.data.sequences import (
    DataError,
    SequenceDataset,
    read_item_mapping,
)
from model_store.store import sha256_file


def write(tmp_path: Path, name: str, text: str, encoding: str = "utf-8") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode(encoding))
    return path


def original(data: SequenceDataset) -> dict[str, list[str]]:
    """Each user's sequence in original item ids."""
    return {
        u: [data.item_ids[i - 1] for i in seq.tolist()]
        for u, seq in zip(data.user_ids, data.sequences, strict=True)
    }


# ----------------------------------------------------------------------------- formats


def test_movielens_dat(tmp_path: Path) -> None:
    path = write(
        tmp_path, "ratings.dat", "1::10::5::300\n1::9::3::100\r\n\n2::10::4::50\n1::2::1::200\n"
    )
    data = load_event_file(path)
    assert data.name == "ratings"
    assert data.sha256 == sha256_file(path)
    assert data.user_ids == ["1", "2"]
    assert data.item_ids == ["2", "9", "10"]  # numeric order, not string order
    assert original(data) == {"1": ["9", "2", "10"], "2": ["10"]}
    assert data.n_interactions == 4


def test_movielens_dat_line_by_line_path_agrees(tmp_path: Path) -> None:
    # A whitespace-only line sends the reader to its line-by-line path; same result.
    text = "1::10::5::300\n1::9::3::100\n2::10::4::50\n"
    fast = load_event_file(write(tmp_path, "a.dat", text))
    slow = load_event_file(write(tmp_path, "b.dat", text.replace("\n2::", "\n   \n2::")))
    assert slow.user_ids == fast.user_ids and slow.item_ids == fast.item_ids
    assert [s.tolist() for s in slow.sequences] == [s.tolist() for s in fast.sequences]


def test_movielens_dat_is_latin1_safe(tmp_path: Path) -> None:
    path = tmp_path / "ratings.dat"
    path.write_bytes(b"1::10::5::300\n1::\xe9::5::301\n")
    with pytest.raises(DataError, match=r"ratings\.dat:2: item id '\xe9' is not a non-negative"):
        load_event_file(path)


def test_movielens_csv(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "ratings.csv",
        "\ufeffuserId,movieId,rating,timestamp\r\n"
        "7,31,2.5,1260759144\r\n7,1029,3.0,1260759179\r\n3,31,4.0,1260759100\r\n",
    )
    data = load_event_file(path)
    assert data.user_ids == ["7", "3"]  # order of first appearance
    assert data.item_ids == ["31", "1029"]
    assert original(data) == {"7": ["31", "1029"], "3": ["31"]}


def test_movielens_csv_explicit_fmt_checks_header(tmp_path: Path) -> None:
    path = write(tmp_path, "log.csv", "user,item,rating,ts\n1,2,3,4\n")
    with pytest.raises(DataError, match=r"log\.csv:1: header 'user,item,rating,ts'"):
        load_event_file(path, fmt="movielens-csv")


def test_generic_csv_custom_columns(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "events.csv",
        "when,product,who,extra\n"
        "2024-01-02T10:00:00,B00X, alice ,x\n"
        "2024-01-01T10:00:00+01:00,A7,alice,\n"
        "2024-01-01,A7,bob,z\n"
        "2024-01-01 09:30:00Z,B00X,alice,\n",
    )
    data = load_event_file(path, user_col="who", item_col="product", time_col="when")
    assert data.user_ids == ["alice", "bob"]
    assert data.item_ids == ["A7", "B00X"]  # string order: ids are not all digits
    assert original(data) == {"alice": ["A7", "B00X", "B00X"], "bob": ["A7"]}


def test_generic_csv_numeric_timestamps_and_digit_ids(tmp_path: Path) -> None:
    path = write(tmp_path, "e.csv", "u,i,t\n1,20,5.5\n1,3,5.25\n2,100,1\n")
    data = load_event_file(path, fmt="csv", user_col="u", item_col="i", time_col="t")
    assert data.item_ids == ["3", "20", "100"]
    assert original(data) == {"1": ["3", "20"], "2": ["100"]}


def test_parquet(tmp_path: Path) -> None:
    path = tmp_path / "events.parquet"
    pd.DataFrame(
        {
            "user": ["u2", "u1", "u2", "u1"],
            "item": [5, 7, 6, 5],
            "time": pd.to_datetime(["2024-01-03", "2024-01-01", "2024-01-02", "2024-01-02"]),
            "other": [0.1, 0.2, 0.3, 0.4],
        }
    ).to_parquet(path)
    data = load_event_file(path, user_col="user", item_col="item", time_col="time")
    assert data.user_ids == ["u2", "u1"]
    assert data.item_ids == ["5", "6", "7"]
    assert original(data) == {"u2": ["6", "5"], "u1": ["7", "5"]}
    assert data.sha256 == sha256_file(path)


def test_parquet_string_and_numeric_timestamps(tmp_path: Path) -> None:
    iso = tmp_path / "iso.parquet"
    pd.DataFrame({"u": ["a", "a"], "i": ["x", "y"], "t": ["2024-05-01", "2023-05-01"]}).to_parquet(
        iso
    )
    assert original(load_event_file(iso, user_col="u", item_col="i", time_col="t")) == {
        "a": ["y", "x"]
    }
    num = tmp_path / "num.parquet"
    pd.DataFrame({"u": [1, 1], "i": [2.0, 3.0], "t": [20, 10]}).to_parquet(num)
    assert original(load_event_file(num, user_col="u", item_col="i", time_col="t")) == {
        "1": ["3", "2"]
    }


def test_load_dataset_dispatches_with_options(tmp_path: Path) -> None:
    path = write(tmp_path, "e.csv", "u,i,t\n1,2,3\n")
    data = load_dataset(path, user_col="u", item_col="i", time_col="t")
    assert data.user_ids == ["1"] and data.item_ids == ["2"]


# ----------------------------------------------------------------------------- ordering


def test_order_by_timestamp_ties_keep_file_order(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "ratings.dat",
        "1::50::5::30\n"
        "2::60::5::10\n"
        "1::40::5::20\n"
        "1::30::5::20\n"
        "1::20::5::10\n"
        "1::10::5::20\n"
        "2::70::5::10\n",
    )
    data = load_event_file(path)
    assert original(data) == {"1": ["20", "40", "30", "10", "50"], "2": ["60", "70"]}


def test_order_with_iso_datetimes_and_offsets(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "e.csv",
        "u,i,t\n"
        "a,late,2024-01-01T12:00:00+00:00\n"
        "a,early,2024-01-01T12:00:00+02:00\n"  # 10:00 UTC
        "a,tie,2024-01-01T10:00:00Z\n",
    )
    data = load_event_file(path, user_col="u", item_col="i", time_col="t")
    assert original(data) == {"a": ["early", "tie", "late"]}


# ----------------------------------------------------------------------------- k-core


def kcore_log(tmp_path: Path) -> Path:
    # A chain a-b-c-d that one pass of filtering does not remove, plus a stable core e, f.
    rows = [
        ("a", 1),
        ("a", 2),
        ("b", 2),
        ("b", 3),
        ("c", 3),
        ("c", 4),
        ("d", 4),
        ("d", 5),
        ("e", 6),
        ("e", 7),
        ("f", 6),
        ("f", 7),
    ]
    text = "u,i,t\n" + "".join(f"{u},{i},{t}\n" for t, (u, i) in enumerate(rows))
    return write(tmp_path, "kcore.csv", text)


def test_kcore_filtering_repeats_until_stable(tmp_path: Path) -> None:
    path = kcore_log(tmp_path)
    data = load_event_file(
        path, user_col="u", item_col="i", time_col="t", min_user_count=2, min_item_count=2
    )
    # One pass would keep b=[2, 3] and c=[3, 4]; repeating removes the whole chain.
    assert original(data) == {"e": ["6", "7"], "f": ["6", "7"]}
    assert data.n_items == 2
    items = Counter(i for seq in data.sequences for i in seq.tolist())
    assert min(items.values()) >= 2 and min(len(s) for s in data.sequences) >= 2


def test_kcore_defaults_keep_everything(tmp_path: Path) -> None:
    data = load_event_file(kcore_log(tmp_path), user_col="u", item_col="i", time_col="t")
    assert data.n_users == 6 and data.n_items == 7 and data.n_interactions == 12


def test_kcore_user_filter_only(tmp_path: Path) -> None:
    path = write(tmp_path, "ratings.dat", "1::1::5::1\n2::1::5::1\n2::2::5::2\n")
    data = load_event_file(path, min_user_count=2)
    assert data.user_ids == ["2"] and data.item_ids == ["1", "2"]


@pytest.mark.parametrize(("option", "value"), [("min_user_count", 3), ("min_item_count", 3)])
def test_kcore_that_empties_names_the_filter(tmp_path: Path, option: str, value: int) -> None:
    path = kcore_log(tmp_path)
    with pytest.raises(DataError, match=rf"kcore\.csv: no events left: {option}={value}"):
        load_event_file(path, user_col="u", item_col="i", time_col="t", **{option: value})


# ----------------------------------------------------------------------------- id mapping


def test_ids_are_remapped_and_mapping_round_trips(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "ratings.csv",
        "userId,movieId,rating,timestamp\n5,1000,1,3\n5,7,1,1\n9,42,1,2\n9,1000,1,2\n9,007,1,9\n",
    )
    data = load_event_file(path)
    assert data.item_ids == ["7", "42", "1000"]  # "007" is MovieLens item 7
    assert sorted({i for s in data.sequences for i in s.tolist()}) == [1, 2, 3]
    assert all(s.dtype == np.int64 for s in data.sequences)
    assert original(data) == {"5": ["7", "1000"], "9": ["42", "1000", "7"]}
    mapping = tmp_path / "items.json"
    data.save_item_mapping(mapping)
    assert read_item_mapping(mapping) == data.item_ids


def test_generic_ids_stay_strings(tmp_path: Path) -> None:
    path = write(tmp_path, "e.csv", "u,i,t\nu1,007,1\nu1,B00ABC12,2\nu1,8,3\n")
    data = load_event_file(path, user_col="u", item_col="i", time_col="t")
    assert data.item_ids == ["007", "8", "B00ABC12"]  # as spelled in a generic log
    # "007" and "7" in one log collide (model_store.item_ids): refused before any training
    path = write(tmp_path, "e.csv", "u,i,t\nu1,007,1\nu1,7,2\n")
    with pytest.raises(DataError, match=r"e\.csv: item ids '007' and '7' collide"):
        load_event_file(path, user_col="u", item_col="i", time_col="t")


# ----------------------------------------------------------------------------- errors

ML_HEADER = "userId,movieId,rating,timestamp\n"
COLS = {"user_col": "u", "item_col": "i", "time_col": "t"}

BAD_FILES = [
    # (file name, content, options, line, words in the message)
    ("ratings.dat", "1::2::5::100\n1::3::5::101\n2::4::5\n", {}, 3, "3 '::'-separated fields"),
    ("ratings.dat", "1::2::5::100\n1::3::5::1::2\n", {}, 2, "5 '::'-separated fields"),
    ("ratings.dat", "1::2::5::100\n1::abc::5::101\n", {}, 2, "item id 'abc' is not"),
    ("ratings.dat", "1::2::5::100\n\n1.5::3::5::101\n", {}, 3, "user id '1.5' is not"),
    ("ratings.dat", "1::2::5::100\n1::3::5::noon\n", {}, 2, "timestamp 'noon' is not a number"),
    ("ratings.dat", "1::2::five::100\n", {}, 1, "rating 'five' is not a number"),
    ("ratings.dat", "1::2::5::100\n1::x::5::1\n1::2::5\n", {}, 2, "item id 'x'"),  # earliest
    ("ratings.dat", "", {}, 1, "empty file"),
    ("ratings.dat", "\n  \n", {}, 1, "empty file"),
    ("ratings.csv", ML_HEADER + "1,2,5,100\n1,2,5\n", {}, 3, "3 fields"),
    ("ratings.csv", ML_HEADER + "1,2,5,100\n\n1,2,5,100,9\n", {}, 4, "5 fields"),
    ("ratings.csv", ML_HEADER + "1,2,5,100\n1,-2,5,101\n", {}, 3, "item id '-2' is not"),
    ("ratings.csv", ML_HEADER + "1,2,5,100\n1,,5,101\n", {}, 3, "item id '' is not"),
    ("ratings.csv", ML_HEADER + "1,2,5,2024-01-01\n", {}, 2, "timestamp '2024-01-01'"),
    ("ratings.csv", ML_HEADER, {}, 2, "no events after the header"),
    ("ratings.csv", "", {}, 1, "empty file"),
    ("e.csv", "u,i,t\n", COLS, 2, "no events after the header"),
    (
        "e.csv",
        "u,i,t\na,b,1\na,b,2\na,b,yesterday\n",
        COLS,
        4,
        "timestamp 'yesterday' is not a number",
    ),
    (
        "e.csv",
        "u,i,t\na,b,2024-01-01\na,b,2024-13-01\n",
        COLS,
        3,
        "timestamp '2024-13-01' is not a number or an ISO 8601 datetime",
    ),
    ("e.csv", "u,i,t\na,b,5\na,b,2024-01-01\n", COLS, 3, "timestamp '2024-01-01' is not a"),
    ("e.csv", "u,i,t\na,b,5\n , b,6\n", COLS, 3, "empty user id"),
    ("e.csv", "u,i,t\na,b,5\na,b\n", COLS, 3, "2 fields"),
    ("e.csv", "u,i,t,x\na,b,5,1\na,b,6\n", COLS, 3, "3 fields"),  # short in an unused column
    (
        "e.csv",
        "user,item,t\na,b,5\n",
        COLS,
        1,
        "no column 'u' (user_col), 'i' (item_col); columns present: 'user', 'item', 't'",
    ),
    ("e.csv", "u,i,t,u\na,b,5,c\n", COLS, 1, "column 'u' appears more than once"),
]


@pytest.mark.parametrize(("name", "text", "options", "line", "words"), BAD_FILES)
def test_bad_input_names_file_and_line(
    tmp_path: Path, name: str, text: str, options: dict[str, str], line: int, words: str
) -> None:
    path = write(tmp_path, name, text)
    with pytest.raises(DataError) as err:
        load_event_file(path, **options)
    message = str(err.value)
    assert message.startswith(f"{path}:{line}: "), message
    assert words in message
    assert "; " in message and "\n" not in message


def test_parquet_errors_name_file_and_row(tmp_path: Path) -> None:
    path = tmp_path / "e.parquet"
    pd.DataFrame({"u": ["a", "a", "b"], "i": ["x", "y", "z"], "t": ["1", "2", "soon"]}).to_parquet(
        path
    )
    with pytest.raises(DataError, match=r"e\.parquet: row 3: timestamp 'soon' is not"):
        load_event_file(path, **COLS)
    with pytest.raises(
        DataError,
        match=r"e\.parquet: no column 'when' \(time_col\); "
        r"columns present: 'u', 'i', 't'",
    ):
        load_event_file(path, user_col="u", item_col="i", time_col="when")
    missing = tmp_path / "m.parquet"
    pd.DataFrame({"u": ["a", None], "i": ["x", "y"], "t": [1, 2]}).to_parquet(missing)
    with pytest.raises(DataError, match=r"m\.parquet: row 2: missing user id"):
        load_event_file(missing, **COLS)
    empty = tmp_path / "z.parquet"
    pd.DataFrame({"u": [], "i": [], "t": []}).to_parquet(empty)
    with pytest.raises(DataError, match=r"z\.parquet: the table has no rows"):
        load_event_file(empty, **COLS)
    junk = write(tmp_path, "junk.parquet", "not parquet")
    with pytest.raises(DataError, match=r"junk\.parquet: not a readable Parquet file"):
        load_event_file(junk, **COLS)


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"fmt": "json"}, "unknown fmt 'json'"),
        ({"fmt": "csv"}, "fmt='csv' needs user_col, item_col, time_col"),
        ({"min_user_count": 0}, "min_user_count=0 is invalid"),
        ({"min_item_count": -1}, "min_item_count=-1 is invalid"),
        ({"min_item_count": True}, "min_item_count=True is invalid"),
        ({"min_user_count": 2.5}, "min_user_count=2.5 is invalid"),
        ({"user_col": "userId"}, "drop user_col/item_col/time_col"),
        (
            {"fmt": "csv", "user_col": "u", "item_col": "u", "time_col": "t"},
            "expected three different columns",
        ),
    ],
)
def test_bad_options(tmp_path: Path, options: dict[str, object], words: str) -> None:
    path = write(tmp_path, "ratings.dat", "1::2::5::100\n")
    with pytest.raises(DataError, match=r"ratings\.dat") as err:
        load_event_file(path, **options)  # type: ignore[arg-type]
    assert words in str(err.value)


def test_bad_paths_and_suffixes(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.dat: no such file"):
        load_event_file(tmp_path / "nope.dat")
    with pytest.raises(DataError, match=r"log\.json: cannot infer the format from suffix"):
        load_event_file(write(tmp_path, "log.json", "{}"))
    other = write(tmp_path, "other.csv", "a,b,c\n1,2,3\n")
    with pytest.raises(DataError, match=r"other\.csv:1: header 'a,b,c' is not MovieLens'"):
        load_event_file(other)


def test_not_utf8_csv(tmp_path: Path) -> None:
    path = tmp_path / "e.csv"
    path.write_bytes(b"u,i,t\na,b,1\na,\xff,2\n")
    with pytest.raises(DataError, match=r"e\.csv:\d+: not UTF-8 text"):
        load_event_file(path, **COLS)


# ----------------------------------------------------------------------------- real data


@pytest.mark.realdata
def test_ml_latest_small(shared_data: Path) -> None:
    path = shared_data / "ml-latest-small" / "ratings.csv"
    data = load_event_file(path)
    assert (data.n_users, data.n_items, data.n_interactions) == (610, 9724, 100836)
    assert data.item_ids == sorted(data.item_ids, key=int)
    frame = pd.read_csv(path)
    assert not frame.duplicated(["userId", "movieId"]).any()
    stamp = {
        (str(u), str(m)): t
        for u, m, t in frame[["userId", "movieId", "timestamp"]].itertuples(index=False)
    }
    ordered = frame.sort_values(["userId", "timestamp"], kind="stable")
    expected = {str(u): [str(m) for m in g] for u, g in ordered.groupby("userId")["movieId"]}
    got = original(data)
    assert got == expected
    for user, seq in got.items():
        times = np.array([stamp[(user, m)] for m in seq])
        assert (np.diff(times) >= 0).all()
