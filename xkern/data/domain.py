"""One domain's sequential-recommendation data, and the processed per-domain folder format.

Every source of data (the amazon-xcross folders, raw Amazon releases, the synthetic generator) ends
up as a `DomainData`, so splits, negatives, prompts and evaluation are written once.

Processed folder format (that of the X-Cross paper's processed Amazon domains, one folder per domain):
`train.json` / `test.json` map user index -> item indices in time order (split by user);
`smap.json` maps raw item id -> item index; `umap.json` raw user id -> user index;
`meta_data.json` raw item id -> title.
"""

from __future__ import annotations

import html
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median
from typing import Any

from xkern.commands import DATA_ENV
from xkern.errors import FormatError, InputError, NotFoundError
from xkern.fileio import atomic_write_text

Sequences = dict[int, list[int]]

_TAG = re.compile(r"<[^>]{0,200}>")
_SPACE = re.compile(r"\s+")

REPO_ROOT = Path(__file__).resolve().parents[2]
# a source checkout's own data root (not versioned): processed domain folders put or linked there
CHECKOUT_DATA_ROOT = REPO_ROOT / "data"


def default_data_root() -> Path | None:
    """``$XKERN_DATA`` if set; else the ``data/`` folder of a source checkout if it exists; else ``None``.

    A wheel install lives in ``site-packages``, where a path relative to the package means nothing, so
    there the user names the data (``--data`` or ``XKERN_DATA``) and is told so when they do not.
    """
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env).expanduser()
    if (REPO_ROOT / "pyproject.toml").is_file() and CHECKOUT_DATA_ROOT.is_dir():
        return CHECKOUT_DATA_ROOT.resolve()
    return None


def require_data_root(root: str | Path | None) -> str:
    """``root``, or the default root; a clear error when there is neither."""
    if root is not None:
        return str(root)
    found = default_data_root()
    if found is None:
        raise NotFoundError(f"no data folder given: pass --data DIR (a root of processed domain folders) or "
                            f"--data synthetic, or set {DATA_ENV}=DIR")
    return str(found)


class DataFormatError(FormatError):
    """Malformed input file; the message names the file and, where known, the line."""


@dataclass
class DomainData:
    """Sequences of one domain, already split.

    `train` holds training sequences. `val` and `test` hold evaluation sequences whose LAST item is
    the target and whose earlier items are the history. Item indices are 0..n_items-1 and index
    `titles`. User indices of different splits may coincide only for leave-one-out data.
    """

    name: str
    n_items: int
    titles: list[str]
    train: Sequences
    val: Sequences
    test: Sequences
    item_ids: list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.titles) != self.n_items:
            raise InputError(f"{self.name}: {len(self.titles)} titles for {self.n_items} items")
        for split in ("train", "val", "test"):
            for user, seq in getattr(self, split).items():
                bad = [i for i in seq if not 0 <= i < self.n_items]
                if bad:
                    raise InputError(f"{self.name}/{split}: user {user} has item {bad[0]} out of range")

    def split(self, name: str) -> Sequences:
        if name not in ("train", "val", "test"):
            raise InputError(f"unknown split {name!r} (train, val, test)")
        return getattr(self, name)

    def examples(self, split: str) -> tuple[list[int], list[list[int]], list[int]]:
        """(users, histories, targets) of an evaluation split, users in ascending order."""
        seqs = self.split(split)
        users = sorted(u for u, s in seqs.items() if len(s) >= 2)
        return users, [list(seqs[u][:-1]) for u in users], [seqs[u][-1] for u in users]

    def user_items(self, user: int) -> set[int]:
        """Every item the user has in this domain (any split): excluded from negatives."""
        items: set[int] = set()
        for split in (self.train, self.val, self.test):
            items.update(split.get(user, ()))
        return items

    def item_counts(self) -> list[int]:
        """Interaction count per item over the training sequences (the popularity signal)."""
        counts = [0] * self.n_items
        for seq in self.train.values():
            for i in seq:
                counts[i] += 1
        return counts

    def stats(self) -> dict[str, Any]:
        lens = {s: [len(q) for q in self.split(s).values()] for s in ("train", "val", "test")}
        all_lens = [n for v in lens.values() for n in v]
        n_inter = sum(all_lens)
        n_users = len(self.train.keys() | self.val.keys() | self.test.keys())
        used = set()
        for s in ("train", "val", "test"):
            for q in self.split(s).values():
                used.update(q)
        return {
            "domain": self.name,
            "users_train": len(lens["train"]),
            "users_val": len(lens["val"]),
            "users_test": len(lens["test"]),
            "items": self.n_items,
            "items_used": len(used),
            "interactions": n_inter,
            "mean_seq_len": round(n_inter / max(len(all_lens), 1), 3),
            "median_seq_len": float(median(all_lens)) if all_lens else 0.0,
            "min_seq_len": min(all_lens, default=0),
            "max_seq_len": max(all_lens, default=0),
            "density": round(n_inter / max(n_users * self.n_items, 1), 6),
            "titled_items": sum(1 for t in self.titles if t),
        }


def clean_title(raw: Any, max_words: int | None = 8, max_chars: int | None = 200) -> str:
    """HTML-unescape (twice: Amazon titles are often double-escaped), drop tags, collapse spaces,
    then truncate to `max_words` words and `max_chars` characters. Non-strings -> ''."""
    if isinstance(raw, list):  # a few releases store titles as one-element lists
        raw = raw[0] if raw else ""
    if not isinstance(raw, str):
        return ""
    text = html.unescape(html.unescape(raw))
    text = _SPACE.sub(" ", _TAG.sub(" ", text)).strip()
    if max_words is not None:
        text = " ".join(text.split(" ")[:max_words])
    if max_chars is not None and len(text) > max_chars:
        text = text[:max_chars].rstrip()
    return text


def read_json(path: Path) -> Any:
    """json.load with an error that names the file, line and column."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError as e:
        raise NotFoundError(f"{path} not found (a processed domain folder holds train.json, test.json, "
                            "smap.json and optionally meta_data.json)") from e
    except json.JSONDecodeError as e:
        raise DataFormatError(f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from e
    except UnicodeDecodeError as e:
        raise DataFormatError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    except RecursionError as e:
        raise DataFormatError(f"{path}: JSON nested too deeply to be data") from e


def _read_sequences(path: Path, n_items: int) -> Sequences:
    obj = read_json(path)
    if not isinstance(obj, dict):
        raise DataFormatError(f"{path}: expected an object of user index -> item list")
    out: Sequences = {}
    for user, seq in obj.items():
        try:
            uid = int(user)
            items = [int(i) for i in seq]
        except (TypeError, ValueError) as e:
            raise DataFormatError(f"{path}: user {user!r}: not a list of integer item indices") from e
        bad = [i for i in items if not 0 <= i < n_items]
        if bad:
            raise DataFormatError(f"{path}: user {user!r}: item {bad[0]} not in smap.json (0..{n_items - 1})")
        out[uid] = items
    return out


def check_usable(data: DomainData, *, titles: bool = False, candidates: int | None = None) -> None:
    """Refuse, before any training or scoring starts, a domain the command cannot use honestly: no training
    users, no item titles where a language model reads them, fewer items than the candidates of a user."""
    if not data.train:
        raise InputError(f"domain {data.name} has no training users")
    if titles and not any(data.titles):
        raise InputError(f"domain {data.name}: no item has a title (meta_data.json missing or empty); the language "
                         "model reads titles")
    if candidates is not None and data.n_items < candidates:
        raise InputError(f"domain {data.name} has {data.n_items} items; ranking needs {candidates} candidates per "
                         "user (1 + negatives)")


def load_processed(
    root: str | Path,
    domain: str,
    val_frac: float = 0.1,
    seed: int = 0,
    mode: str = "by-user",
    max_words: int | None = 8,
) -> DomainData:
    """Load `<root>/<domain>` in the processed folder format.

    mode "by-user" (the folder's own split): test = test.json; validation = last item of a seeded
    `val_frac` of train.json users, who are removed from training. mode "loo": train.json and
    test.json sequences are pooled and split leave-one-out.
    """
    from xkern.data.splits import by_user, leave_one_out

    if not domain or Path(domain).name != domain or domain in (".", ".."):
        raise InputError(f"domain must be the name of a folder inside the data root, got {domain!r}")
    folder = Path(root) / domain
    if not folder.is_dir():
        hint = ""
        if Path(root).is_dir():
            found = sorted(p.name for p in Path(root).iterdir() if (p / "train.json").is_file())
            hint = f" (domains there: {', '.join(found)})" if found else " (no domain folders with train.json there)"
        else:
            hint = " (the data root does not exist)"
        raise NotFoundError(f"no domain folder {folder}{hint}")
    smap = read_json(folder / "smap.json")
    if not isinstance(smap, dict) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                             for v in smap.values()):
        raise DataFormatError(f"{folder / 'smap.json'}: expected an object of item id -> non-negative integer index")
    n_items = len(smap)
    if sorted(smap.values()) != list(range(n_items)):  # a gap or a repeat: items without an id, or two ids in one
        seen = set(smap.values())
        gap = next((i for i in range(n_items) if i not in seen), None)
        what = f"index {gap} is missing" if gap is not None else "an index appears twice"
        raise DataFormatError(f"{folder / 'smap.json'}: item indices must be 0..{n_items - 1}, each once ({what})")
    item_ids = [""] * n_items
    for asin, idx in smap.items():
        item_ids[int(idx)] = asin
    meta_path = folder / "meta_data.json"
    meta = read_json(meta_path) if meta_path.exists() else {}
    if not isinstance(meta, dict):
        raise DataFormatError(f"{meta_path}: expected an object of item id -> title, got a {type(meta).__name__}")
    titles = [clean_title(meta.get(a), max_words=max_words) for a in item_ids]
    train = _read_sequences(folder / "train.json", n_items)
    test = _read_sequences(folder / "test.json", n_items)
    if mode == "by-user":
        s = by_user(train, test, val_frac=val_frac, seed=seed)
    elif mode == "loo":
        pooled = dict(train)
        overlap = pooled.keys() & test.keys()
        if overlap:
            raise DataFormatError(f"{folder}: {len(overlap)} users in both train.json and test.json")
        pooled.update(test)
        s = leave_one_out(pooled)
    else:
        raise InputError(f"unknown split mode {mode!r} (by-user, loo)")
    return DomainData(
        name=domain,
        n_items=n_items,
        titles=titles,
        train=s.train,
        val=s.val,
        test=s.test,
        item_ids=item_ids,
        meta={"source": str(folder), "mode": mode, "val_frac": val_frac, "seed": seed},
    )


def write_processed(
    out_dir: str | Path,
    train: Sequences,
    test: Sequences,
    titles: list[str],
    item_ids: list[str] | None = None,
    user_ids: dict[int, str] | None = None,
) -> Path:
    """Write a processed domain folder (train/test/smap/umap/meta_data .json)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    item_ids = item_ids or [f"item{i}" for i in range(len(titles))]
    users = sorted(train.keys() | test.keys())
    user_ids = user_ids or {u: f"user{u}" for u in users}

    def dump(name: str, obj: Any) -> None:
        atomic_write_text(out / name, json.dumps(obj, ensure_ascii=False))

    dump("train.json", {str(u): train[u] for u in sorted(train)})
    dump("test.json", {str(u): test[u] for u in sorted(test)})
    dump("smap.json", {a: i for i, a in enumerate(item_ids)})
    dump("umap.json", {user_ids[u]: u for u in users})
    dump("meta_data.json", {a: t for a, t in zip(item_ids, titles, strict=True)})
    return out
