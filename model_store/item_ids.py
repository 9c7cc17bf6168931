"""Original item ids: strings end to end, and the rule that no two in a catalogue collide.

A catalogue id is a string of 1..`MAX_ITEM_ID_LENGTH` characters, kept exactly as spelled
in the data ("007" stays "007"); a request may also name an id by a JSON integer, which means
its decimal string (7 -> "7", never "007"). Two ids *collide* when they become equal after
Unicode NFKC, stripping surrounding whitespace and, for all-ASCII-digit ids, dropping
leading zeros: "007" and "7", a fullwidth "A1" and "A1", " x" and "x". Case is kept: "b1"
and "B1" are different SKUs. A colliding catalogue is refused when its mapping is written
(`compression`) and again when the service loads one (`app`), so a hand-edited store is
refused too. Stdlib only: both sides import this.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable
from numbers import Integral

MAX_ITEM_ID_LENGTH = 256

__all__ = [
    "MAX_ITEM_ID_LENGTH",
    "ItemIdError",
    "check_item_ids",
    "is_canonical_decimal",
    "item_id_key",
]


class ItemIdError(ValueError):
    """A catalogue that cannot be served: a bad id, or two ids that collide (one line)."""


def item_id_key(item_id: str) -> str:
    """The form two ids are compared in: NFKC, stripped, leading zeros of digit ids dropped."""
    return _zeros(unicodedata.normalize("NFKC", item_id).strip())


def is_canonical_decimal(item_id: str) -> bool:
    """ASCII digits without leading zeros ("0" itself allowed): what `str(int)` writes."""
    return item_id.isascii() and item_id.isdigit() and (item_id[0] != "0" or item_id == "0")


def _zeros(text: str) -> str:
    return (text.lstrip("0") or "0") if text.isascii() and text.isdigit() else text


_STEPS = (
    ("Unicode NFKC normalisation", lambda t: unicodedata.normalize("NFKC", t)),
    ("stripping surrounding whitespace", str.strip),
    ("dropping leading zeros", _zeros),
)


def _why(a: str, b: str) -> str:
    """Which normalisation steps make `a` and `b` equal (the steps of `item_id_key`)."""
    if a == b:
        return "the same id twice"
    used = []
    for name, step in _STEPS:
        na, nb = step(a), step(b)
        if (na, nb) != (a, b):
            used.append(name)
        a, b = na, nb
        if a == b:
            break
    return "equal after " + (", ".join(used[:-1]) + " and " if len(used) > 1 else "") + used[-1]


def check_item_ids(item_ids: Iterable[object], where: str, fix: str) -> list[str]:
    """The ids as strings (a non-negative int becomes its decimal string), or `ItemIdError`
    naming the first bad id or the first two colliding ids, where they are and `fix`."""
    out: list[str] = []
    seen: dict[str, int] = {}  # key -> position of the first id with that key
    for position, raw in enumerate(item_ids):
        if isinstance(raw, str):
            item = raw
        elif isinstance(raw, Integral) and not isinstance(raw, bool) and int(raw) >= 0:
            item = str(int(raw))  # Python or numpy integers
        else:
            raise ItemIdError(
                f"{where}: item id {raw!r} at position {position} is not a string; "
                f"expected strings of 1 to {MAX_ITEM_ID_LENGTH} characters (or non-negative "
                "integers, read as their decimal strings)"
            )
        if not 1 <= len(item) <= MAX_ITEM_ID_LENGTH:
            raise ItemIdError(
                f"{where}: item id {item[:40]!r} at position {position} has {len(item)} "
                f"characters; expected 1 to {MAX_ITEM_ID_LENGTH}"
            )
        first = seen.setdefault(item_id_key(item), position)
        if first != position:
            other = out[first]
            raise ItemIdError(
                f"{where}: item ids {other!r} and {item!r} collide ({_why(other, item)}); {fix}"
            )
        out.append(item)
    return out
