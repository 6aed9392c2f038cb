"""Readers for the raw public Amazon review releases (2014, 2018, 2023) -> user sequences.

- 2014: `reviews_<Cat>_5.json.gz` (reviewerID, asin, unixReviewTime in s); `meta_<Cat>.json.gz`
  lines are Python literals (single quotes), parsed with ast.literal_eval, never eval.
- 2018: strict JSON lines, same review keys; meta has `asin`, `title`.
- 2023: JSON lines, reviews (user_id, parent_asin, timestamp in ms); meta joined on parent_asin.

Files may be gzip or plain (detected from the magic bytes, not the name). A malformed line raises
DataFormatError naming the file and the 1-based line number (or is skipped with on_error="skip").
Time units stay release-native: timestamps are only used to order each user's interactions.
"""

from __future__ import annotations

import ast
import gzip
import io
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from xkern.data.domain import DataFormatError, clean_title, write_processed
from xkern.data.splits import split_users
from xkern.errors import InputError, InputTypeError

RELEASES = ("2014", "2018", "2023")
_REVIEW_KEYS = {
    "2014": ("reviewerID", "asin", "unixReviewTime"),
    "2018": ("reviewerID", "asin", "unixReviewTime"),
    "2023": ("user_id", "parent_asin", "timestamp"),
}
_META_ITEM_KEY = {"2014": "asin", "2018": "asin", "2023": "parent_asin"}


class Interaction(NamedTuple):
    user: str
    item: str
    time: int
    order: int  # position in the file: a stable tie-break for equal timestamps


def open_text(path: str | Path) -> io.TextIOBase:
    """Open a gzip or plain UTF-8 text file."""
    p = Path(path)
    with open(p, "rb") as f:
        magic = f.read(2)
    if magic == b"\x1f\x8b":
        return io.TextIOWrapper(gzip.open(p, "rb"), encoding="utf-8")
    return open(p, encoding="utf-8")


def _parse(line: str, path: str | Path, lineno: int, literal: bool) -> dict:
    try:
        obj = json.loads(line)
    except RecursionError as e:
        raise DataFormatError(f"{path}:{lineno}: JSON nested too deeply to be a record") from e
    except json.JSONDecodeError as e:
        if not literal:
            raise DataFormatError(f"{path}:{lineno}: invalid JSON: {e.msg}") from e
        try:
            obj = ast.literal_eval(line.strip())
        except (ValueError, SyntaxError, MemoryError, RecursionError) as e2:
            raise DataFormatError(f"{path}:{lineno}: neither JSON nor a Python literal: {e2}") from e2
    if not isinstance(obj, dict):
        raise DataFormatError(f"{path}:{lineno}: expected an object, got {type(obj).__name__}")
    return obj


def iter_records(
    path: str | Path, literal: bool = False, on_error: str = "raise", progress: bool = False
) -> Iterator[tuple[int, dict]]:
    """(1-based line number, parsed object) for each non-blank line. Lines are JSON; with
    literal=True a line that is not JSON may be a Python literal (2014 meta).
    on_error="skip" drops unparsable lines instead of raising."""
    from tqdm import tqdm

    if on_error not in ("raise", "skip"):
        raise InputError(f"on_error must be raise or skip, got {on_error!r}")
    with open_text(path) as f:
        lines = tqdm(f, desc=Path(path).name, unit=" lines", disable=not progress, mininterval=1.0)
        try:
            yield from _records(lines, path, literal, on_error)
        except (EOFError, gzip.BadGzipFile) as e:  # a truncated or damaged .gz
            raise DataFormatError(f"{path}: the compressed file ends early or is damaged ({e})") from e


def _records(lines: Iterator[str], path: str | Path, literal: bool, on_error: str) -> Iterator[tuple[int, dict]]:
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = _parse(line, path, lineno, literal)
        except DataFormatError:
            if on_error == "skip":
                continue
            raise
        yield lineno, obj


def _check_release(release: str) -> str:
    release = str(release)
    if release not in RELEASES:
        raise InputError(f"unknown Amazon release {release!r} ({', '.join(RELEASES)})")
    return release


def read_reviews(
    path: str | Path, release: str, on_error: str = "raise", progress: bool = False
) -> list[Interaction]:
    """All (user, item, time) interactions of a review file, in file order."""
    release = _check_release(release)
    ukey, ikey, tkey = _REVIEW_KEYS[release]
    out: list[Interaction] = []
    for lineno, rec in iter_records(path, release == "2014", on_error, progress):
        try:
            user, item, t = rec[ukey], rec[ikey], rec[tkey]
            if not isinstance(user, str) or not isinstance(item, str) or not user or not item:
                raise InputTypeError("user and item ids must be non-empty strings")
            if isinstance(t, bool) or not isinstance(t, (int, float, str)):
                raise InputTypeError(f"{tkey} must be a number")
            t = int(t)
        except (KeyError, TypeError, ValueError) as e:
            if on_error == "skip":
                continue
            raise DataFormatError(f"{path}:{lineno}: bad {release} review record: {e!r}") from e
        out.append(Interaction(user, item, t, len(out)))
    return out


def read_titles(
    path: str | Path, release: str, max_words: int | None = 8, on_error: str = "raise", progress: bool = False
) -> dict[str, str]:
    """item id -> cleaned title (items without a usable title are left out). The first record of
    an item wins (the 2018 meta files contain duplicates)."""
    release = _check_release(release)
    ikey = _META_ITEM_KEY[release]
    titles: dict[str, str] = {}
    for lineno, rec in iter_records(path, release == "2014", on_error, progress):
        item = rec.get(ikey)
        if not isinstance(item, str) or not item:
            if on_error == "skip":
                continue
            raise DataFormatError(f"{path}:{lineno}: meta record without a string {ikey!r}")
        title = clean_title(rec.get("title"), max_words=max_words)
        if title and item not in titles:
            titles[item] = title
    return titles


def build_sequences(
    interactions: list[Interaction], k_core: int = 5, dedup: str = "pair", max_len: int | None = None
) -> dict[str, list[str]]:
    """Per-user item sequences, oldest first.

    dedup: "pair" keeps each user's first interaction with an item, "exact" drops repeated
    (user, item, time) records only, "none" keeps all. k-core filtering is iterated until every
    user and every item has >= k_core interactions. max_len keeps each user's most recent items.
    """
    if dedup not in ("pair", "exact", "none"):
        raise InputError(f"dedup must be pair, exact or none, got {dedup!r}")
    ordered = sorted(interactions, key=lambda x: (x.user, x.time, x.order))
    if dedup != "none":
        seen: set[tuple] = set()
        kept = []
        for x in ordered:
            key = (x.user, x.item) if dedup == "pair" else (x.user, x.item, x.time)
            if key not in seen:
                seen.add(key)
                kept.append(x)
        ordered = kept
    while k_core > 1:
        ucount = Counter(x.user for x in ordered)
        icount = Counter(x.item for x in ordered)
        kept = [x for x in ordered if ucount[x.user] >= k_core and icount[x.item] >= k_core]
        if len(kept) == len(ordered):
            break
        ordered = kept
    seqs: dict[str, list[str]] = {}
    for x in ordered:
        seqs.setdefault(x.user, []).append(x.item)
    if max_len is not None:
        seqs = {u: s[-max_len:] for u, s in seqs.items()}
    return seqs


@dataclass
class RawDomain:
    """Sequences keyed by raw user id (items as raw ids) and titles keyed by raw item id."""

    sequences: dict[str, list[str]]
    titles: dict[str, str]
    stats: dict[str, int]


def load_release(
    reviews: str | Path,
    meta: str | Path | None,
    release: str,
    k_core: int = 5,
    dedup: str = "pair",
    require_title: bool = True,
    max_words: int | None = 8,
    max_len: int | None = None,
    on_error: str = "raise",
    progress: bool = False,
) -> RawDomain:
    """Read one category of a raw release. With require_title, interactions with items that have
    no title are dropped BEFORE k-core filtering (a text model cannot use an untitled item)."""
    inter = read_reviews(reviews, release, on_error=on_error, progress=progress)
    titles = read_titles(meta, release, max_words, on_error, progress) if meta is not None else {}
    n_raw = len(inter)
    if require_title:
        if meta is None:
            raise InputError("require_title=True needs a meta file")
        inter = [x for x in inter if x.item in titles]
    seqs = build_sequences(inter, k_core=k_core, dedup=dedup, max_len=max_len)
    items = {i for s in seqs.values() for i in s}
    stats = {
        "raw_interactions": n_raw,
        "titled_interactions": len(inter),
        "users": len(seqs),
        "items": len(items),
        "interactions": sum(len(s) for s in seqs.values()),
    }
    return RawDomain(seqs, {i: titles.get(i, "") for i in sorted(items)}, stats)


def write_domain_folder(raw: RawDomain, out_dir: str | Path, test_frac: float = 0.2, seed: int = 0) -> Path:
    """Write a RawDomain in the processed folder format: items indexed in sorted raw-id order,
    users split by a seeded draw; train users get indices 0.., test users follow."""
    item_ids = sorted(raw.titles)
    item_index = {a: i for i, a in enumerate(item_ids)}
    raw_users = sorted(raw.sequences)
    by_idx = {n: [item_index[a] for a in raw.sequences[u]] for n, u in enumerate(raw_users)}
    train, test = split_users(by_idx, test_frac=test_frac, seed=seed)
    order = sorted(train) + sorted(test)  # renumber: train users first, like amazon-xcross
    renum = {old: new for new, old in enumerate(order)}
    return write_processed(
        out_dir,
        {renum[u]: s for u, s in train.items()},
        {renum[u]: s for u, s in test.items()},
        [raw.titles[a] for a in item_ids],
        item_ids,
        {renum[n]: raw_users[n] for n in order},
    )
