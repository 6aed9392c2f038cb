"""Raw Amazon release readers (2014 / 2018 / 2023, gzip and plain) and the processed folder loader."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from xkern.data.amazon import build_sequences, load_release, read_reviews, read_titles, write_domain_folder
from xkern.data.domain import DataFormatError, clean_title, load_processed, write_processed


def _write(path: Path, lines: list[str], gz: bool) -> Path:
    text = "\n".join(lines) + "\n"
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


# (user, item, time in seconds); file order deliberately not time order
EVENTS = [
    ("A", "i1", 30),
    ("A", "i2", 10),
    ("A", "i3", 20),
    ("B", "i2", 5),
    ("B", "i1", 6),
    ("C", "i3", 1),
    ("C", "i4", 2),
]
TITLES = {"i1": "Red &amp; Blue Ball", "i2": "Big   <b>Green</b> Kite", "i3": "Tiny Saw", "i4": "Odd Thing"}


def _review_lines(release: str) -> list[str]:
    if release == "2023":
        return [
            json.dumps({"user_id": u, "parent_asin": i, "asin": i + "x", "timestamp": t * 1000, "rating": 5})
            for u, i, t in EVENTS
        ]
    return [
        json.dumps({"reviewerID": u, "asin": i, "unixReviewTime": t, "overall": 5.0}) for u, i, t in EVENTS
    ]


def _meta_lines(release: str) -> list[str]:
    if release == "2014":  # Python literals, single quotes, as in the 2014 release
        return [repr({"asin": a, "title": t, "salesRank": {"Toys": 3}}) for a, t in TITLES.items()]
    key = "parent_asin" if release == "2023" else "asin"
    return [json.dumps({key: a, "title": t}) for a, t in TITLES.items()]


@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "plain"])
@pytest.mark.parametrize("release", ["2014", "2018", "2023"])
def test_release_roundtrip(tmp_path, release, gz):
    rev = _write(tmp_path / "reviews.json", _review_lines(release), gz)  # no .gz suffix: sniffed by magic
    meta = _write(tmp_path / "meta.json", _meta_lines(release), gz)
    assert len(read_reviews(rev, release)) == 7
    titles = read_titles(meta, release)
    assert titles["i1"] == "Red & Blue Ball"
    assert titles["i2"] == "Big Green Kite"
    # 2-core: i4 has 1 interaction -> dropped; then C has 1 -> dropped; then i3 has 1 -> dropped
    raw = load_release(rev, meta, release, k_core=2)
    assert raw.sequences == {"A": ["i2", "i1"], "B": ["i2", "i1"]}  # time-ordered: i2 (t=10) before i1
    assert raw.titles == {"i1": "Red & Blue Ball", "i2": "Big Green Kite"}
    raw1 = load_release(rev, meta, release, k_core=1)
    assert raw1.sequences["A"] == ["i2", "i3", "i1"]
    assert raw1.sequences["C"] == ["i3", "i4"]


def test_2014_meta_must_be_literal_not_code(tmp_path):
    meta = _write(
        tmp_path / "m.json", [repr({"asin": "a", "title": "ok"}), "__import__('os').getcwd()"], False
    )
    with pytest.raises(DataFormatError, match=r"m\.json:2"):
        read_titles(meta, "2014")


@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "plain"])
@pytest.mark.parametrize(
    "release,bad,why",
    [
        ("2018", '{"reviewerID": "A", "asin": "i1", "unixReviewTime": 5', "invalid JSON"),
        ("2018", '{"reviewerID": "A", "asin": "i1"}', "unixReviewTime"),
        ("2023", '{"user_id": "A", "parent_asin": "i1", "timestamp": "soon"}', "bad 2023"),
        ("2014", "['not', 'a', 'dict']", "expected an object"),
    ],
)
def test_malformed_review_names_file_and_line(tmp_path, release, bad, why, gz):
    good = _review_lines(release)
    path = _write(tmp_path / "rev.jsonl", [good[0], "", good[1], bad, good[2]], gz)  # bad is line 4
    with pytest.raises(DataFormatError) as e:
        read_reviews(path, release)
    assert f"{path}:4" in str(e.value)
    assert why in str(e.value)
    assert len(read_reviews(path, release, on_error="skip")) == 3


def test_2018_meta_must_be_strict_json(tmp_path):
    meta = _write(
        tmp_path / "meta.json", [json.dumps({"asin": "a", "title": "x"}), repr({"asin": "b"})], True
    )
    with pytest.raises(DataFormatError, match=r"meta\.json:2: invalid JSON"):
        read_titles(meta, "2018")


def test_untitled_items_dropped_before_kcore(tmp_path):
    rev = _write(tmp_path / "r.json", _review_lines("2018"), False)
    meta = _write(tmp_path / "m.json", [json.dumps({"asin": "i1", "title": "Only Titled"})], False)
    raw = load_release(rev, meta, "2018", k_core=1)
    assert raw.sequences == {"A": ["i1"], "B": ["i1"]}
    keep = load_release(rev, meta, "2018", k_core=1, require_title=False)
    assert keep.sequences["C"] == ["i3", "i4"] and keep.titles["i3"] == ""


def test_dedup_modes():
    from xkern.data.amazon import Interaction

    x = [
        Interaction("u", "a", 1, 0),
        Interaction("u", "b", 2, 1),
        Interaction("u", "a", 3, 2),
        Interaction("u", "a", 3, 3),
        Interaction("u", "c", 2, 4),
    ]
    # equal timestamps keep file order: b (order 1) before c (order 4)
    assert build_sequences(x, k_core=1, dedup="pair") == {"u": ["a", "b", "c"]}
    assert build_sequences(x, k_core=1, dedup="exact") == {"u": ["a", "b", "c", "a"]}
    assert build_sequences(x, k_core=1, dedup="none") == {"u": ["a", "b", "c", "a", "a"]}
    assert build_sequences(x, k_core=1, dedup="none", max_len=2) == {"u": ["a", "a"]}


def test_clean_title():
    assert clean_title("Tom &amp;amp; Jerry&#39;s   <i>Big</i> Set") == "Tom & Jerry's Big Set"
    assert (
        clean_title("one two three four five six seven eight nine ten")
        == "one two three four five six seven eight"
    )
    assert clean_title("abcdef", max_words=None, max_chars=3) == "abc"
    assert clean_title(["List Title"]) == "List Title"
    assert clean_title(None) == "" and clean_title(3.5) == ""


# --- processed folder format ----------------------------------------------------------------------


def test_processed_roundtrip_and_val_carve_out(tmp_path):
    train = {u: [u % 7, (u + 1) % 7, (u + 2) % 7] for u in range(20)}
    test = {20: [1, 2, 3], 21: [4, 5]}
    titles = ["A &amp; B", "b", "c", "d", "e", "f", "g"]
    write_processed(tmp_path / "Dom", train, test, titles, [f"asin{i}" for i in range(7)])
    d = load_processed(tmp_path, "Dom", val_frac=0.1, seed=3)
    assert d.n_items == 7 and d.titles[0] == "A & B"
    assert len(d.val) == 2 and len(d.train) == 18  # round(0.1 * 20) held out
    assert d.val.keys().isdisjoint(d.train.keys())
    assert all(d.val[u] == train[u] for u in d.val)
    assert d.test == test
    users, hist, tgt = d.examples("test")
    assert users == [20, 21] and hist == [[1, 2], [4]] and tgt == [3, 5]
    again = load_processed(tmp_path, "Dom", val_frac=0.1, seed=3)
    assert again.val == d.val
    loo = load_processed(tmp_path, "Dom", mode="loo")
    assert loo.test[20] == [1, 2, 3] and loo.val[20] == [1, 2] and loo.train[20] == [1]
    assert 21 not in loo.test  # 2 items: too short for leave-one-out


def test_processed_malformed_json_names_file_and_line(tmp_path):
    write_processed(tmp_path / "Dom", {0: [0, 1]}, {1: [1, 0]}, ["a", "b"])
    (tmp_path / "Dom" / "train.json").write_text('{"0": [0, 1],\n "1": [1, }', encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"train\.json:2:"):
        load_processed(tmp_path, "Dom")


def test_processed_item_out_of_range(tmp_path):
    write_processed(tmp_path / "Dom", {0: [0, 1]}, {1: [1, 0]}, ["a", "b"])
    (tmp_path / "Dom" / "test.json").write_text('{"1": [1, 9]}', encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"test\.json: user '1': item 9"):
        load_processed(tmp_path, "Dom")


def test_convert_writes_loadable_folder(tmp_path):
    rev = _write(tmp_path / "r.json.gz", _review_lines("2023"), True)
    meta = _write(tmp_path / "m.json.gz", _meta_lines("2023"), True)
    raw = load_release(rev, meta, "2023", k_core=1)
    write_domain_folder(raw, tmp_path / "out" / "D", test_frac=0.34, seed=0)
    d = load_processed(tmp_path / "out", "D", val_frac=0.0)
    assert d.n_items == 4 and d.item_ids == ["i1", "i2", "i3", "i4"]
    assert len(d.test) == 1 and len(d.train) == 2  # round(0.34 * 3) = 1 test user
    by_title = {tuple(d.titles[i] for i in s) for s in [*d.train.values(), *d.test.values()]}
    assert by_title == {
        ("Big Green Kite", "Tiny Saw", "Red & Blue Ball"),
        ("Big Green Kite", "Red & Blue Ball"),
        ("Tiny Saw", "Odd Thing"),
    }
    umap = json.loads((tmp_path / "out" / "D" / "umap.json").read_text())
    assert sorted(umap) == ["A", "B", "C"] and sorted(umap.values()) == [0, 1, 2]


def test_real_tools_folder(real_data_root):
    d = load_processed(real_data_root, "Tools", val_frac=0.1, seed=0)
    # README: 8,769 train users, 2,193 test users, 5,820 items
    assert len(d.train) + len(d.val) == 8769
    assert len(d.val) == 877
    assert len(d.test) == 2193
    assert d.n_items == 5820
    assert all(5 <= len(s) <= 15 for s in d.test.values())
    assert not any("&amp;" in t for t in d.titles)
    assert sum(1 for t in d.titles if t) > 5800
