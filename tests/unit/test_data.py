"""Sequence-file loader, leave-one-out split, padding and the synthetic generator."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from compression.data.load import load_dataset
from compression.data.sequences import (
    DataError,
    leave_one_out,
    load_sequence_file,
    pad_left,
    read_item_mapping,
)
from compression.data.synthetic import SyntheticConfig, synthetic_dataset


def write(tmp_path: Path, text: str, name: str = "seq.txt") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_sequence_file_remaps_ids_and_keeps_order(tmp_path: Path) -> None:
    path = write(tmp_path, "1 30 10 20\n2 20 30\n\n7 100 10 30 20\n")
    data = load_sequence_file(path)
    assert data.n_users == 3 and data.n_items == 4
    assert data.item_ids == ["10", "20", "30", "100"]  # numeric sort, internal ids 1..4
    assert data.user_ids == ["1", "2", "7"]
    originals = [[data.item_ids[i - 1] for i in seq] for seq in data.sequences]
    assert originals == [["30", "10", "20"], ["20", "30"], ["100", "10", "30", "20"]]
    mapping = tmp_path / "items.json"
    data.save_item_mapping(mapping)
    assert read_item_mapping(mapping) == data.item_ids


@pytest.mark.parametrize(
    ("text", "line", "problem"),
    [
        ("1 2 3\n2 x 4\n", 2, "'x' is not a non-negative integer"),
        ("1 2 3\n2\n", 2, "has no items"),
        ("1 2 3\n1 4 5\n", 2, "appears twice"),
        ("1 2 -3\n", 1, "'-3' is not a non-negative integer"),
    ],
)
def test_sequence_file_errors_name_file_and_line(
    tmp_path: Path, text: str, line: int, problem: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(DataError) as info:
        load_sequence_file(path)
    message = str(info.value)
    assert f"{path}:{line}:" in message and problem in message
    assert "\n" not in message


def test_sequence_file_empty_missing_and_binary(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="empty"):
        load_sequence_file(write(tmp_path, "\n\n"))
    with pytest.raises(DataError, match="no such file"):
        load_sequence_file(tmp_path / "absent.txt")
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"1 2 3\n\xff\xfe 4\n")
    with pytest.raises(DataError, match="not UTF-8"):
        load_sequence_file(binary)


def test_load_dataset_dispatch_and_unknown_format(tmp_path: Path) -> None:
    assert load_dataset(write(tmp_path, "1 1 2 3\n")).n_items == 3
    assert load_dataset("synthetic:users=20,items=30,max_len=10").n_users == 20
    with pytest.raises(DataError, match=r"unknown data format '\.xlsx'"):
        load_dataset(tmp_path / "x.xlsx")
    with pytest.raises(DataError, match="users"):
        load_dataset("synthetic:users=-1")
    with pytest.raises(DataError, match="not key=value"):
        load_dataset("synthetic:users")


def test_leave_one_out_split(tmp_path: Path) -> None:
    data = load_sequence_file(write(tmp_path, "1 1 2 3 4 5\n2 6 7\n3 3 2 1\n"))
    split = leave_one_out(data)
    assert [s.tolist() for s in split.train] == [[1, 2, 3], [6, 7], [3]]
    assert split.valid_target.tolist() == [4, 0, 2]  # user 2 has < 3 items: train only
    assert split.test_target.tolist() == [5, 0, 1]
    hist, targets = split.eval_inputs("valid")
    assert [h.tolist() for h in hist] == [[1, 2, 3], [3]] and targets.tolist() == [4, 2]
    hist, targets = split.eval_inputs("test")  # test input includes the validation item
    assert [h.tolist() for h in hist] == [[1, 2, 3, 4], [3, 2]] and targets.tolist() == [5, 1]
    counts = split.item_counts()
    assert counts[0] == 0 and counts[3] == 2 and counts[4] == 0 and counts.sum() == 6
    with pytest.raises(ValueError, match="stage"):
        split.eval_inputs("train")


def test_pad_left_keeps_most_recent() -> None:
    out = pad_left([np.array([1, 2, 3, 4]), np.array([5])], max_len=3)
    assert out.tolist() == [[2, 3, 4], [0, 0, 5]]
    assert pad_left([np.array([7])], max_len=3, length=4).tolist() == [[0, 0, 0, 7]]
    assert out.dtype == np.int64


def test_synthetic_is_seeded_and_structured() -> None:
    a = synthetic_dataset(SyntheticConfig(users=50, items=40, max_len=12, seed=3))
    b = synthetic_dataset(SyntheticConfig(users=50, items=40, max_len=12, seed=3))
    c = synthetic_dataset(SyntheticConfig(users=50, items=40, max_len=12, seed=4))
    assert all(np.array_equal(x, y) for x, y in zip(a.sequences, b.sequences, strict=True))
    assert a.sha256 == b.sha256 != c.sha256
    for seq in a.sequences:
        assert 8 <= len(seq) <= 12 and len(set(seq.tolist())) == len(seq)
        assert seq.min() >= 1 and seq.max() <= 40
    with pytest.raises(DataError, match="exceeds"):
        synthetic_dataset(SyntheticConfig(items=10, max_len=20))


def test_synthetic_clusters_make_the_next_item_predictable_from_the_last() -> None:
    """The demo's form: the 3 most frequent followers of the previous item (counted on the
    other half of the users) hold the next item far more often than chance (3%) or the 3 most
    popular items do."""
    cfg = SyntheticConfig(users=300, items=100, min_len=10, max_len=40, clusters=5, seed=1)
    data = synthetic_dataset(cfg)
    assert data.sha256 == synthetic_dataset(cfg).sha256 != synthetic_dataset().sha256
    for seq in data.sequences:
        assert 10 <= len(seq) <= 40 and len(set(seq.tolist())) == len(seq)
        assert seq.min() >= 1 and seq.max() <= 100
    fit, held = data.sequences[:150], data.sequences[150:]
    follows = np.zeros((101, 101))
    for seq in fit:
        np.add.at(follows, (seq[:-1], seq[1:]), 1)
    top3_follow = np.argsort(-follows, axis=1, kind="stable")[:, :3]
    top3_popular = np.argsort(-np.bincount(np.concatenate(fit), minlength=101))[:3]
    pairs = np.concatenate([np.stack([s[:-1], s[1:]], 1) for s in held])
    by_last = float(np.mean((top3_follow[pairs[:, 0]] == pairs[:, 1:]).any(1)))
    by_popularity = float(np.mean(np.isin(pairs[:, 1], top3_popular)))
    assert by_last > 0.6 and by_last > 20 * 0.03 and by_last > 5 * by_popularity
    with pytest.raises(DataError, match="per cluster"):
        synthetic_dataset(SyntheticConfig(items=40, max_len=20, clusters=20))


@pytest.mark.realdata
def test_real_sequence_files_match_published_counts(shared_data: Path) -> None:
    data = load_sequence_file(shared_data / "ml-1m" / "ml-1m.txt")
    assert (data.n_users, data.n_items, data.n_interactions) == (6040, 3416, 999611)
    # ids in these files are already contiguous from 1: remapping keeps them unchanged
    assert data.item_ids[:3] == ["1", "2", "3"] and data.item_ids[-1] == "3416"
    beauty = load_sequence_file(shared_data / "amazon-beauty" / "Beauty.txt")
    assert (beauty.n_users, beauty.n_items, beauty.n_interactions) == (22363, 12101, 198502)
