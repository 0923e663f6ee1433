"""preprocess.py against SPEC §1: filter and cleaning rules, window back-off, K-core, samples and
split, output name and atomic save, downloads from a loopback HTTP server, one-line user errors,
and the committed sample data. Offline; run: python -m pytest -q tests/test_preprocess.py
"""
import collections
import errno
import gzip
import http.server
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import types
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pytest

import preprocess as P
from dataset import category_of, dataset_name
from errors import UserError, run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "data", "sample")
SAMPLE_FILES = ("Video_Games.csv.gz", "meta_Video_Games.jsonl.gz")
SAMPLE_COLUMNS = ["user_id", "item_asins", "item_asin", "history_item_id", "item_id",
                  "history_item_title", "item_title", "history_rating", "rating",
                  "history_timestamp", "timestamp", "interaction_id"]
ITEM_INFO_COLUMNS = ["main_category", "title", "subtitle", "average_rating", "rating_number",
                     "features", "description", "price", "store", "categories", "details",
                     "parent_asin", "item_id"]


def ms(year, month, day=1):
    """Milliseconds of a UTC midnight, computed apart from preprocess.py."""
    return int(datetime(year, month, day, tzinfo=timezone.utc).timestamp()) * 1000


def copy_sample(folder):
    for name in SAMPLE_FILES:
        shutil.copy(os.path.join(SAMPLE, name), os.path.join(folder, name))


def write_gz(path, text):
    with gzip.open(path, "wt") as f:
        f.write(text)


def meta(asin, title, price=9.99, **more):
    return json.dumps({"main_category": "Games", "title": title, "price": price,
                       "parent_asin": asin, **more})


def write_raw(folder, ratings, metas, category="Toy"):
    """Raw pair in the real format: ratings = [(user, asin, rating, ms)], metas = JSON lines."""
    os.makedirs(folder, exist_ok=True)
    write_gz(os.path.join(folder, f"{category}.csv.gz"), "user_id,parent_asin,rating,timestamp\n"
             + "".join(f"{u},{a},{r},{t}\n" for u, a, r, t in ratings))
    write_gz(os.path.join(folder, f"meta_{category}.jsonl.gz"), "".join(m + "\n" for m in metas))


NOWHERE = os.environ[P.BASE_URL_ENV]  # conftest's closed loopback port, also the default download host here


def run_main(folder, *flags, category="Toy"):
    return P.main(["--category", category, "--data_root_dir", str(folder), "--base_url", NOWHERE,
                   *flags])


def user_error(capsys, argv):
    """Run main through run_cli; return the one stderr line after checking exit code 2."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(P.main, argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]

# ---------------------------------------------------------------------------------------------
# Item filter and cleaning


@pytest.mark.parametrize("title, kept", [
    (None, None),                                                    # 1. null title
    (123, None),                                                     # 1. not a string
    ('<span id="a">Racing Kit</span>', None),                        # 2.
    (" ".join(["w"] * 20), " ".join(["w"] * 20)),                    # 3. 20 words stay
    (" ".join(["w"] * 21), None),                                    # 3. 21 words go
    ('  "' + " ".join(["w"] * 20) + '"  ', " ".join(["w"] * 20)),   # 3. counted after stripping
    ("a  " + " ".join(["w"] * 19), None),                           # 3. split on single spaces
    ("&quot;A &amp; B&quot;", "A & B"),                              # entities, then quotes
    ('"X"', None),                                                   # 4. one character left
    ("XY", "XY"),
    ("&lt;b&gt;Game&lt;/b&gt;", "&lt;b&gt;Game&lt;/b&gt;"),          # only &quot; and &amp; here
])
def test_filter_title(title, kept):
    assert P.filter_title(title) == kept


@pytest.mark.parametrize("price, ok", [(None, False), ("—", False), ("from 12.99", False),
                                       ("", False), (12.99, True), ("24.50", True), (20, True)])
def test_price_must_convert_to_float(price, ok):
    assert P.price_is_float(price) is ok


def test_clean_text_order():
    # unescape; strip; tags; newline/tab -> space; squeeze spaces; non-ASCII -> space (unsqueezed)
    assert P.clean_text("  &lt;b&gt;Caf\u00e9\tNoir&lt;/b&gt;\n") == "Caf  Noir"
    assert P.clean_text("a\n\n b &amp;   c") == "a b & c"
    assert P.clean_text("\u2122 Game") == "  Game"


def test_item_row_cleans_top_level_strings_only():
    # the title loses its leading quote only: the trailing one is followed by " \u2122"
    line = json.dumps({
        "main_category": " Video &amp; Games ", "title": '&quot;Turbo\tRacing&quot; \u2122',
        "average_rating": 4.5, "rating_number": 12, "features": ["<b>fast</b>"],
        "description": ["<p>x</p>", "y", "<p>x</p>"], "price": "24.50", "images": [1],
        "videos": [], "store": "Sony<br/>", "categories": ["Games"], "details": {"ESRB": "\u00e9"},
        "parent_asin": "B01", "bought_together": None, "author": {"name": "n"}})
    assert P.item_row(line.encode()) == {
        "main_category": "Video & Games", "title": 'Turbo Racing"  ', "subtitle": "",
        "average_rating": 4.5, "rating_number": 12, "features": ["<b>fast</b>"],
        "description": ["<p>x</p>", "y"], "price": 24.5, "store": "Sony",
        "categories": ["Games"], "details": '{"ESRB": "\\u00e9"}', "parent_asin": "B01"}


def test_item_info_types_and_defaults():
    table = P.build_item_info([meta("B1", "Alpha", rating_number=None).encode()])
    assert table.schema.field("rating_number").type == pa.int64()
    assert table.to_pylist()[1]["rating_number"] == 0 and table.to_pylist()[1]["details"] == "{}"
    for bad in (dict(average_rating="four"), dict(price=[1]),  # refused by pyarrow, by item_row
                dict(rating_number=float("inf")),  # written Infinity: int() overflows
                dict(rating_number=2 ** 64)):  # beyond int64: pyarrow overflows
        with pytest.raises(UserError, match="^the metadata of item B2 holds a field of an unexpected type"):
            P.build_item_info([meta("B1", "Alpha").encode(), meta("B2", "Beta", **bad).encode()])
    # Two bad items in one batch: the first is named, with its own fault, not the batch's.
    with pytest.raises(UserError) as caught:
        P.build_item_info([meta("B1", "Alpha", average_rating="four").encode(),
                           meta("B2", "Beta", subtitle=["a list"]).encode()])
    message = str(caught.value)
    assert message.startswith("the metadata of item B1 holds") and "'four'" in message and "list" not in message
    row = P.build_item_info([meta("B1", "Alpha", description="One paragraph.", features="fast",
                                  categories="Games").encode()]).to_pylist()[1]
    assert (row["description"], row["features"], row["categories"]) == (["One paragraph."], ["fast"], ["Games"])
    row = P.build_item_info([meta("B1", "Alpha", features=7).encode()]).to_pylist()[1]
    assert row["features"] == ["7"]


def test_scan_metadata_filters_in_file_order(tmp_path):
    path = tmp_path / "meta_Toy.jsonl.gz"
    write_gz(path, "\n".join([
        meta("B3", "Gamma"), meta("B9", "Never rated"), meta("B1", None), meta("B2", "Beta", None),
        meta("B4", "Delta", "from 12.99"), meta("B5", "Epsilon"), meta("B5", "Epsilon again"),
        json.dumps({"parent_asin": "B6", "price": 1.0}), meta("B7", "Eta", "3.50"),
        meta("B\ud800", "A lone surrogate, never rated"),  # json.dumps escapes it: read once parsed (was a traceback)
        '{"title": "Theta", "price": 1.0, "parent_asin": "B\\u0038"}']) + "\n")  # "B8", escaped
    with P.GzipLines(path) as lines:
        kept = P.scan_metadata(lines, ["B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8"], path)
    assert list(kept) == ["B3", "B5", "B7", "B8"]
    assert json.loads(kept["B5"])["title"] == "Epsilon"  # a repeated parent_asin keeps its first line


def test_scan_metadata_rejects_bad_lines(tmp_path):
    path = tmp_path / "meta_Toy.jsonl.gz"
    for text, message in [('{"title": "no asin", "price": 1}\n', "line 1 has no parent_asin"),
                          (meta("B1", "ok") + '\n{"parent_asin": "B2", \n', "line 2 is not valid JSON")]:
        write_gz(path, text)
        with pytest.raises(UserError, match=message), P.GzipLines(path) as lines:
            P.scan_metadata(lines, ["B1", "B2"], path)
    with open(os.path.join(SAMPLE, SAMPLE_FILES[1]), "rb") as f:
        data = f.read()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated or corrupt"), P.GzipLines(path) as lines:
        P.scan_metadata(lines, ["B1"], path)

# ---------------------------------------------------------------------------------------------
# Window, back-off, K-core


def window(ratings, start, end, k=0):
    users, items, times = (np.array(c) for c in zip(*ratings))
    mask, start = P.select_window(users, items, times, start, end, k)
    return sorted(map(tuple, np.array(ratings)[mask].tolist())), start


def test_window_bounds_are_inclusive():
    ratings = [(0, 0, ms(2022, 10) - 1), (0, 1, ms(2022, 10)), (0, 2, ms(2023, 10)),
               (0, 3, ms(2023, 10) + 1), (1, 4, ms(2022, 9))]
    kept, start = window(ratings, (2022, 10), (2023, 10))
    assert kept == [(0, 1, ms(2022, 10)), (0, 2, ms(2023, 10))] and start == (2022, 10)


def test_a_window_after_the_last_rating_is_refused():
    """A mistyped year: the back-off would take every rating into a folder named for 2030."""
    ratings = [(0, 0, ms(2021, 3)), (0, 1, ms(2023, 9) + 5)]
    with pytest.raises(UserError, match="the window starts 2030-01, after the last rating \\(2023-09-01\\) — pick a "
                                        "window within the ratings, 2021-03 to 2023-09"):
        window(ratings, (2030, 1), (2030, 6))
    assert window(ratings, (2023, 9), (2030, 6))[0] == [(0, 1, ms(2023, 9) + 5)]  # starting before it: kept


def test_a_window_before_the_first_rating_names_the_ratings_span():
    ratings = [(0, 0, ms(2021, 3)), (0, 1, ms(2023, 9) + 5)]
    with pytest.raises(UserError, match="the window ends 2020-12, before the first rating \\(2021-03-01\\) — pick a "
                                        "window within the ratings, 2021-03 to 2023-09"):
        window(ratings, (2019, 1), (2020, 12))


@pytest.mark.parametrize("scale, unit", [(1 / 1000, "seconds"), (1000, "micro- or nanoseconds"),
                                         (1_000_000, "micro- or nanoseconds")])
def test_timestamps_in_another_unit_are_named_as_such(scale, unit):
    ratings = [(0, 0, int(ms(2021, 3) * scale)), (0, 1, int(ms(2023, 9) * scale))]
    with pytest.raises(UserError, match=f"the ratings' last timestamp, {int(ms(2023, 9) * scale)}, is no date in "
                                        f"milliseconds \\(Amazon Reviews 2023's unit\\): {unit}\\? — check"):
        window(ratings, (2022, 10), (2023, 10))


def test_backoff_stops_once_10000_items_are_reached():
    # 4,000 items in the window, 4,000 more in each 3-month step back, first rating in 2015
    ratings = [(i, i, ms(2023, 1)) for i in range(4000)]
    ratings += [(i, i, ms(2022, 8)) for i in range(4000, 8000)]
    ratings += [(i, i, ms(2022, 5)) for i in range(8000, 12000)]
    ratings += [(i, i, ms(2022, 2)) for i in range(12000, 16000)] + [(0, 0, ms(2015, 6))]
    kept, start = window(ratings, (2022, 10), (2023, 10))
    assert start == (2022, 4) and len(kept) == 12000


def test_backoff_reaches_the_earliest_year_and_stops_there():
    # the earliest rating is from May 2020: the start moves back to 2020-10, not further
    ratings = [(0, 0, ms(2020, 5)), (0, 1, ms(2020, 9, 30)), (0, 2, ms(2020, 10)), (1, 3, ms(2023, 1))]
    kept, start = window(ratings, (2022, 10), (2023, 10))
    assert start == (2020, 10) and [r[1] for r in kept] == [2, 3]
    assert window([*ratings, (2, 4, -5), (2, 5, 0)], (2022, 10), (2023, 10)) == (kept, start)  # stray dates: ignored


def test_k_core_repeats_until_nothing_changes():
    # K=2: u4 goes, which leaves d with one rating, then u3, then c, then u2 ... a, b with u0, u1 stay
    a, b, c, d = range(4)
    ratings = [(0, a), (0, b), (1, a), (1, b), (2, b), (2, c), (3, c), (3, d), (4, d)]
    users, items = (np.array(x) for x in zip(*ratings))
    keep = P.k_core(users, items, 2)
    assert [r for r, k in zip(ratings, keep) if k] == [(0, a), (0, b), (1, a), (1, b)]
    assert P.k_core(users, items, 0).all()

# ---------------------------------------------------------------------------------------------
# Samples, ids, split: a hand-built input with every expected row written out


HAND_META = [meta("I5", "Late"), meta("I3", "Gamma"), meta("I1", "Alpha"), meta("I6", "No price", None),
             meta("I4", "&quot;Delta&quot;"), meta("I2", "Beta")]
T = ms(2023, 1)
HAND_RATINGS = [  # file order matters: users by first appearance, stable sorts
    ("uB", "I1", 4.0, T + 300), ("uA", "I2", 5.0, T + 100), ("uA", "I1", 3.0, T + 200),
    ("uB", "I3", 2.0, T + 100), ("uA", "I6", 5.0, T + 150), ("uA", "I3", 1.0, T + 200),
    ("uA", "I7", 4.0, T + 250), ("uA", "I4", 5.0, T + 400), ("uB", "I2", 4.0, T + 200),
    ("uC", "I4", 3.0, T + 500), ("uC", "I5", 2.0, ms(2023, 12, 2))]
# ids follow metadata order over window items: I3=1, I1=2, I4=3, I2=4 (I5 lies after the window,
# I6 has no price, I7 no metadata)
NAMES = {1: "Gamma", 2: "Alpha", 3: "Delta", 4: "Beta"}
ASINS = {1: "I3", 2: "I1", 3: "I4", 4: "I2"}


def row(i, user, history, target):
    """history/target: (item id, rating, time offset)."""
    return {"user_id": user, "item_asins": [ASINS[h[0]] for h in history],
            "item_asin": ASINS[target[0]], "history_item_id": [h[0] for h in history],
            "item_id": target[0], "history_item_title": [NAMES[h[0]] for h in history],
            "item_title": NAMES[target[0]], "history_rating": [h[1] for h in history],
            "rating": target[1], "history_timestamp": [T + h[2] for h in history],
            "timestamp": T + target[2], "interaction_id": i}


EXPECTED = [  # window_size 2; ties at +200 keep uB (seen first) before uA, and uA's I1 before I3
    row(0, "uB", [(1, 2.0, 100)], (4, 4.0, 200)),
    row(1, "uA", [(4, 5.0, 100)], (2, 3.0, 200)),
    row(2, "uA", [(4, 5.0, 100), (2, 3.0, 200)], (1, 1.0, 200)),
    row(3, "uB", [(1, 2.0, 100), (4, 4.0, 200)], (2, 4.0, 300)),
    row(4, "uA", [(2, 3.0, 200), (1, 1.0, 200)], (3, 5.0, 400)),
]  # uC has one rating in the window: no sample


def test_samples_ids_and_split_on_a_hand_built_input(tmp_path, capsys):
    import datasets

    late_user = [("uD", "I3", 3.0, T + 550), ("uD", "I1", 5.0, T + 600)]  # one more sample, the latest
    write_raw(tmp_path, HAND_RATINGS + late_user, HAND_META)
    target = run_main(tmp_path, "--st_year", "2023", "--st_month", "1", "--ed_year", "2023",
                      "--ed_month", "12", "--window_size", "2")
    assert os.path.basename(target) == "Toy_0_2023-1-2023-12"
    d = datasets.load_from_disk(target)
    assert [d[s].num_rows for s in ("train", "valid", "test")] == [4, 1, 1]  # int(0.8*6), int(0.9*6)
    rows = [r for s in ("train", "valid", "test") for r in d[s]]
    assert rows == EXPECTED + [row(5, "uD", [(1, 3.0, 550)], (2, 5.0, 600))]
    info = d["item_info"]
    assert info["item_id"] == [0, 1, 2, 3, 4]
    assert info["parent_asin"] == ["pad_asin", "I3", "I1", "I4", "I2"]
    assert info["title"] == ["pad_title", "Gamma", "Alpha", "Delta", "Beta"]
    out = capsys.readouterr().out
    assert "users: 4  items: 4  interactions: 6" in out and "train: 4  valid: 1  test: 1" in out


def test_titles_that_cleaning_leaves_blank_are_counted(tmp_path, capsys):
    import datasets

    metas = [line.replace('"Beta"', '"\u6771\u4eac"').replace('"&quot;Delta&quot;"', '"<b></b>"') for line in HAND_META]
    write_raw(tmp_path, HAND_RATINGS + [("uD", "I3", 3.0, T + 550), ("uD", "I1", 5.0, T + 600)], metas)
    target = run_main(tmp_path, "--st_year", "2023", "--st_month", "1", "--ed_year", "2023", "--ed_month", "12",
                      "--window_size", "2")
    assert datasets.load_from_disk(target)["item_info"]["title"] == ["pad_title", "Gamma", "Alpha", "", "  "]
    assert json.load(open(os.path.join(target, "preprocess.json")))["blank_titles"] == 2
    assert "2 items have a title that cleaning left blank" in capsys.readouterr().out


@pytest.mark.parametrize("n, bounds", [(5, (4, 4)), (10, (8, 9)), (63_502, (50_801, 57_151)),
                                       (13_435, (10_748, 12_091)), (34_373, (27_498, 30_935))])
def test_split_bounds_match_the_paper(n, bounds):
    assert P.split_bounds(n) == bounds  # Table 5: 50,801/6,350/6,351 and the others


def test_dataset_name_and_the_category_read_back_from_it():
    assert dataset_name("CDs_and_Vinyl", 0, 2022, 10, 2023, 10) == "CDs_and_Vinyl_0_2022-10-2023-10"
    assert dataset_name("Video_Games", 5, 2022, 1, 2023, 2, "v2") == "Video_Games_5_2022-1-2023-2_v2"
    assert category_of("data/CDs_and_Vinyl_0_2022-10-2023-10/") == "CDs_and_Vinyl"
    assert category_of("/x/All_Beauty_12_2021-3-2023-10_with_2_years") == "All_Beauty"
    assert category_of("data/my_games") is None and category_of("data/Video_Games_0_2022-10") is None

# ---------------------------------------------------------------------------------------------
# Atomic output


def write_part(fail):
    def write(folder):
        with open(os.path.join(folder, "part.arrow"), "w") as f:
            f.write("new")
        if fail:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C half-way
    return write


def test_save_is_atomic_and_replaces_the_old_dataset(tmp_path):
    target = tmp_path / "Toy_0_2022-10-2023-10"
    target.mkdir()
    (target / "old.arrow").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        P.save_atomically(write_part(fail=True), str(target))
    assert os.listdir(tmp_path) == [target.name] and os.listdir(target) == ["old.arrow"]
    P.save_atomically(write_part(fail=False), str(target))
    assert os.listdir(tmp_path) == [target.name] and os.listdir(target) == ["part.arrow"]
    umask = os.umask(0o022)
    try:
        P.save_atomically(write_part(fail=False), str(target))
    finally:
        os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o755  # as a plain mkdir would make it


def test_a_save_stopped_between_its_two_renames_keeps_the_earlier_dataset(tmp_path, monkeypatch):
    target = tmp_path / "Toy_0_2022-10-2023-10"
    target.mkdir()
    (target / "old.arrow").write_text("old")
    replace = os.replace

    def stopped_at_the_second(source, destination):
        if os.path.basename(source).endswith(".tmp"):  # moving the new dataset in
            raise KeyboardInterrupt
        replace(source, destination)

    monkeypatch.setattr(P.os, "replace", stopped_at_the_second)
    with pytest.raises(KeyboardInterrupt):
        P.save_atomically(write_part(fail=False), str(target))
    assert os.listdir(tmp_path) == [target.name] and os.listdir(target) == ["old.arrow"]


def test_a_dataset_folder_holding_other_files_is_not_replaced(tmp_path, capsys):
    """A run saved into the dataset folder would go with the folder: refused before any download."""
    target = tmp_path / "Toy_0_2022-10-2023-10"
    (target / "run1").mkdir(parents=True)
    (target / "dataset_dict.json").write_text("{}")
    (target / ".DS_Store").write_text("")  # hidden entries do not count
    line = user_error(capsys, ["--category", "Toy", "--data_root_dir", str(tmp_path)])
    assert line == (f"error: {target} holds run1, which preprocess.py did not write, and the new dataset replaces the "
                    "folder as a whole — move them out of it, or pass --postfix for a dataset folder of another name")
    assert sorted(os.listdir(tmp_path)) == [target.name]


@pytest.mark.parametrize("kind", ["a file", "a link"])
def test_a_file_or_link_where_the_dataset_goes_is_not_replaced(tmp_path, capsys, kind):
    target = tmp_path / "Toy_0_2022-10-2023-10"
    if kind == "a file":
        target.write_text("important")
    else:
        (tmp_path / "elsewhere").mkdir()
        target.symlink_to(tmp_path / "elsewhere")
    line = user_error(capsys, ["--category", "Toy", "--data_root_dir", str(tmp_path)])
    assert line == (f"error: {target} is {kind}, not a dataset folder, and the new dataset would replace it — move it "
                    "away, or pass --postfix for a dataset folder of another name")
    assert target.is_symlink() if kind == "a link" else target.read_text() == "important"


SIGTERM_MID_SAVE = """
import sys, time
sys.path.insert(0, {root!r})
import preprocess
from errors import run_cli

def write(folder):
    open(folder + "/part.arrow", "w").write("new")
    print("writing", flush=True)
    time.sleep(60)

run_cli(preprocess.save_atomically, write, {target!r})
"""


def test_sigterm_mid_save_leaves_no_temporary_folder(tmp_path):
    """`kill` (or a scheduler's time limit) while the dataset is written: exits as Ctrl-C does
    and removes its hidden temporary folder; the earlier dataset stays."""
    target = tmp_path / "Toy_0_2022-10-2023-10"
    target.mkdir()
    (target / "old.arrow").write_text("old")
    script = SIGTERM_MID_SAVE.format(root=ROOT, target=str(target))
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout.readline() == "writing\n"
    assert len(os.listdir(tmp_path)) == 2  # the dataset and the temporary folder beside it
    process.terminate()
    assert process.wait(timeout=30) == 130
    assert process.stderr.read() == "error: interrupted\n"
    assert os.listdir(tmp_path) == [target.name] and os.listdir(target) == ["old.arrow"]


def test_run_cli_sets_sigterm_only_while_main_runs_and_not_for_launched_training():
    before, seen = signal.signal(signal.SIGTERM, signal.SIG_DFL), []  # as in a launched process (errors.launched)
    try:
        run_cli(lambda: seen.append(signal.getsignal(signal.SIGTERM)))
        run_cli(lambda: seen.append(signal.getsignal(signal.SIGTERM)), interrupt_on_sigterm=False)  # launched
        assert seen == [signal.default_int_handler, signal.SIG_DFL]
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, before)


# ---------------------------------------------------------------------------------------------
# Downloads from a loopback server


class Server(http.server.ThreadingHTTPServer):
    """Serves `files` {url path: bytes} with Range support; `drop` {path: n} cuts the first
    response for that path after n bytes; `stall` {path: s} answers it with headers only, then
    stays silent for s seconds. Every request's (path, Range header) is logged."""

    def __init__(self, files, drop=None, stall=None):
        self.files, self.drop, self.stall, self.log = files, dict(drop or {}), dict(stall or {}), []
        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}/data/"


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        path = self.path.removeprefix("/data/")
        self.server.log.append((path, self.headers.get("Range")))
        if path not in self.server.files:
            self.send_error(404)
            return
        body, start = self.server.files[path], 0
        if self.headers.get("Range"):
            start = int(self.headers["Range"].removeprefix("bytes=").rstrip("-"))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        if path in self.server.stall:
            self.wfile.flush()
            time.sleep(self.server.stall.pop(path))
            return
        cut = self.server.drop.pop(path, None)
        self.wfile.write(body[start:cut])
        if cut is not None:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)  # the rest never comes: a short body


def sample_files():
    files = {}
    for (remote, local), name in zip(P.raw_files("Video_Games"), SAMPLE_FILES):
        with open(os.path.join(SAMPLE, name), "rb") as f:
            files[remote] = f.read()
    return files


@pytest.fixture
def server():
    servers = []

    def start(files, drop=None, stall=None):
        servers.append(Server(files, drop, stall))
        return servers[-1]

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


def test_download_full_transfer_then_no_network(tmp_path, server):
    files = sample_files()
    s = server(files)
    paths = P.fetch_raw("Video_Games", str(tmp_path), s.url)
    assert [open(p, "rb").read() for p in paths] == list(files.values())
    assert sorted(os.listdir(tmp_path)) == sorted(SAMPLE_FILES)  # no .part left
    s.log.clear()
    assert P.fetch_raw("Video_Games", str(tmp_path), s.url) == paths and s.log == []


def test_download_resumes_after_the_connection_drops(tmp_path, server):
    files = sample_files()
    meta_remote = P.raw_files("Video_Games")[1][0]
    cut = len(files[meta_remote]) // 2
    s = server(files, drop={meta_remote: cut})
    P.fetch_raw("Video_Games", str(tmp_path), s.url)
    with open(tmp_path / SAMPLE_FILES[1], "rb") as f:
        assert f.read() == files[meta_remote]
    assert [entry for entry in s.log if entry[0] == meta_remote] == [
        (meta_remote, None), (meta_remote, f"bytes={cut}-")]


def test_download_resumes_a_part_file_left_by_an_interrupted_run(tmp_path, server):
    files = sample_files()
    ratings_remote = P.raw_files("Video_Games")[0][0]
    (tmp_path / (SAMPLE_FILES[0] + ".part")).write_bytes(files[ratings_remote][:1000])
    s = server(files)
    P.fetch_raw("Video_Games", str(tmp_path), s.url)
    assert (tmp_path / SAMPLE_FILES[0]).read_bytes() == files[ratings_remote]
    assert (ratings_remote, "bytes=1000-") in s.log


def test_a_server_that_answers_then_stalls_is_named_as_such(tmp_path, server, monkeypatch):
    """Not "unreachable": it answered. Nothing is left but what a rerun resumes."""
    monkeypatch.setattr(P, "READ_TIMEOUT_S", 0.5)
    ratings_remote = P.raw_files("Video_Games")[0][0]
    s = server(sample_files(), stall={ratings_remote: 3})
    with pytest.raises(UserError) as error:
        P.fetch_raw("Video_Games", str(tmp_path), s.url)
    assert str(error.value) == (f"cannot download {SAMPLE_FILES[0]}: 127.0.0.1 answered, then sent nothing for 0.5 s "
                                f"— rerun later (a partial download resumes), or point --base_url / "
                                f"{P.BASE_URL_ENV} at a mirror")
    assert os.listdir(tmp_path) in ([], [SAMPLE_FILES[0] + ".part"])


def test_download_404_names_the_known_categories(tmp_path, server):
    s = server(sample_files())
    with pytest.raises(UserError, match=r"HTTP 404.*did you mean Video_Games\?.*CDs_and_Vinyl"):
        P.fetch_raw("Video_Gmaes", str(tmp_path), s.url)
    assert os.listdir(tmp_path) == []


def test_download_404_of_a_known_category_names_the_mirror_layout(tmp_path, server, monkeypatch):
    flat = {os.path.basename(remote): data for remote, data in sample_files().items()}  # files at the top
    s = server(flat)
    with pytest.raises(UserError, match=r"HTTP 404\) — a mirror must keep the Amazon host's layout "
                                        r"\(benchmark/5core/rating_only/Video_Games.csv.gz and "
                                        r"raw/meta_categories/meta_Video_Games.jsonl.gz under --base_url\)"):
        P.fetch_raw("Video_Games", str(tmp_path), s.url)
    assert os.listdir(tmp_path) == []
    monkeypatch.setattr(P, "DEFAULT_BASE_URL", s.url)  # the Amazon host itself: no mirror to blame
    with pytest.raises(UserError, match=r"HTTP 404\): the Amazon host no longer serves this file — put both "
                                        r"files into --data_root_dir, or pass --base_url a mirror$"):
        P.fetch_raw("Video_Games", str(tmp_path), s.url)


def test_download_rejects_a_corrupt_gzip_and_keeps_nothing(tmp_path, server):
    files = sample_files()
    for remote in files:
        files[remote] = files[remote][:-30]  # cut short, but served as a complete response
    s = server(files)
    with pytest.raises(UserError, match="truncated or corrupt"):
        P.fetch_raw("Video_Games", str(tmp_path), s.url)
    assert os.listdir(tmp_path) == []


def test_unreachable_host_without_local_files(tmp_path):
    with pytest.raises(UserError, match="127.0.0.1 is unreachable.*--base_url"):
        P.fetch_raw("Video_Games", str(tmp_path), NOWHERE)
    with pytest.raises(UserError, match="'Vidoe_Games' is not a known category.*did you mean Video_Games"):
        P.fetch_raw("Vidoe_Games", str(tmp_path), NOWHERE)


def test_https_to_a_plain_http_mirror_is_named(tmp_path, server):
    """The host answered, so "unreachable — check your network" sent the user the wrong way."""
    s = server(sample_files())
    with pytest.raises(UserError) as caught:
        P.fetch_raw("Video_Games", str(tmp_path), s.url.replace("http://", "https://"))
    assert str(caught.value).startswith("cannot download Video_Games.csv.gz: 127.0.0.1 answered, but no secure "
                                        "(https) connection was made (")
    assert str(caught.value).endswith("— check the scheme of --base_url / R2EC_AMAZON_BASE_URL (http:// for a "
                                      "plain mirror) and its certificate")
    assert os.listdir(tmp_path) == []


def test_base_url_from_the_environment(monkeypatch):
    monkeypatch.setenv(P.BASE_URL_ENV, "http://mirror.example/amazon_2023/")
    assert P.parse_args([]).base_url == "http://mirror.example/amazon_2023/"
    assert P.parse_args(["--base_url", "http://other/"]).base_url == "http://other/"
    monkeypatch.delenv(P.BASE_URL_ENV)
    assert P.parse_args([]).base_url == P.DEFAULT_BASE_URL

# ---------------------------------------------------------------------------------------------
# One-line user errors


@pytest.mark.parametrize("flags, message", [
    (["--st_month", "13"], "--st_month 13 is outside 1-12"),
    (["--ed_month", "0"], "--ed_month 0 is outside 1-12"),
    (["--st_year", "2024"], "ends (2023-10) before it starts (2024-10)"),
    (["--window_size", "0"], "--window_size 0 is outside 1-100000 — pass the history length, e.g. 20"),
    (["--window_size", str(2 ** 64)], f"--window_size {2 ** 64} is outside 1-100000"),  # overflowed numpy
    (["--K", "-1"], "--K -1 is negative"),
    (["--category", "../etc"], "is not a category name"),
])
def test_bad_flags(tmp_path, capsys, flags, message):
    assert message in user_error(capsys, ["--data_root_dir", str(tmp_path), *flags])
    assert os.listdir(tmp_path) == []


def test_window_without_samples(tmp_path, capsys):
    write_raw(tmp_path, HAND_RATINGS, HAND_META)
    line = user_error(capsys, ["--category", "Toy", "--data_root_dir", str(tmp_path),
                               "--st_year", "2023", "--st_month", "1", "--K", "50"])
    assert "leaves no samples — widen the window or lower --K" in line
    assert sorted(os.listdir(tmp_path)) == ["Toy.csv.gz", "meta_Toy.jsonl.gz"]


def test_too_few_samples_for_valid_and_test(tmp_path, capsys):
    ratings = [("uA", "I1", 4.0, T + 100), ("uA", "I2", 5.0, T + 200), ("uA", "I3", 3.0, T + 300),
               ("uB", "I4", 2.0, T + 100), ("uB", "I2", 4.0, T + 400)]  # 2 + 1 samples: 80/10/10 gives 2/0/1
    write_raw(tmp_path, ratings, HAND_META)
    line = user_error(capsys, ["--category", "Toy", "--data_root_dir", str(tmp_path)])
    assert "leaves 3 samples, too few for the 80/10/10 split to give valid and test any" in line
    assert line.endswith("— widen the window")  # not "or lower --K": K is 0
    assert sorted(os.listdir(tmp_path)) == ["Toy.csv.gz", "meta_Toy.jsonl.gz"]


@pytest.mark.parametrize("root", ["new", "new/sub/deeper"])  # every folder made for it goes
def test_a_data_root_made_for_a_failed_download_is_removed(tmp_path, capsys, server, root):
    files = {remote: content[:-30] for remote, content in sample_files().items()}  # fail the gzip check
    s = server(files)
    (tmp_path / "kept").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(P.main, ["--category", "Video_Games", "--data_root_dir", str(tmp_path / root), "--base_url", s.url])
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the download's progress bar
    assert exit_info.value.code == 2 and last.startswith("error: ") and "truncated or corrupt" in last
    assert os.listdir(tmp_path) == ["kept"]


def test_a_flag_of_the_wrong_type_is_one_line(tmp_path, capsys):
    line = user_error(capsys, ["--data_root_dir", str(tmp_path), "--K", "many"])
    assert "argument --K: invalid int value: 'many' — python preprocess.py --help lists the flags" in line


@pytest.mark.parametrize("csv, message", [
    ("user_id,parent_asin,rating\nu,I1,5.0\n", "lacks a required column"),
    ("user_id,parent_asin,rating,timestamp\nu,I1,5.0,1\nu,I2,5.0\n", "missing or malformed"),
    ("user_id,parent_asin,rating,timestamp\nu,I1,5.0,1\n,I2,5.0,2\n", "line 3 has no user_id"),
    ("user_id,parent_asin,rating,timestamp\nu,I1,5.0,soon\n", "missing or malformed"),
    ("user_id,parent_asin,rating,timestamp\n", "Toy.csv.gz has a header but no ratings — delete the file"),
    ("", "Toy.csv.gz is empty (no header, no ratings) — delete the file"),
])
def test_bad_ratings_csv(tmp_path, capsys, csv, message):
    write_raw(tmp_path, [], [meta("I1", "Alpha")])
    write_gz(tmp_path / "Toy.csv.gz", csv)
    assert message in user_error(capsys, ["--category", "Toy", "--data_root_dir", str(tmp_path)])


@pytest.mark.parametrize("content", [None, "", "\n\n"])  # 0 bytes; a gzip of nothing; blank lines
def test_an_empty_metadata_file_is_named(tmp_path, capsys, content):
    write_raw(tmp_path, HAND_RATINGS, [])
    path = tmp_path / "meta_Toy.jsonl.gz"
    if content is None:
        path.write_bytes(b"")
    else:
        write_gz(path, content)
    before = listing(tmp_path)
    assert user_error(capsys, ["--category", "Toy", "--data_root_dir", str(tmp_path)]) == (
        f"error: {path} is empty (no items) — delete the file and rerun to download it again")
    assert listing(tmp_path) == before


def test_an_empty_data_root_is_refused(tmp_path, capsys, monkeypatch):
    """An unset variable in `--data_root_dir "$DIR"` would otherwise write into the current folder."""
    monkeypatch.chdir(tmp_path)
    assert user_error(capsys, ["--category", "Toy", "--data_root_dir", ""]) == (
        "error: --data_root_dir is empty (an unset variable?) — pass a folder you can write to (it is created if "
        "missing), or leave the flag out for ./data")
    assert user_error(capsys, ["--category", "Toy", "--data_root_dir", " "]).startswith(
        "error: --data_root_dir is blank (' ') (an unset variable?) — pass a folder")  # made a folder " "
    assert os.listdir(tmp_path) == []


def test_corrupt_local_raw_file_is_reported_and_kept(tmp_path, capsys):
    copy_sample(tmp_path)
    data = (tmp_path / SAMPLE_FILES[0]).read_bytes()
    (tmp_path / SAMPLE_FILES[0]).write_bytes(data[: len(data) // 2])
    line = user_error(capsys, ["--category", "Video_Games", "--data_root_dir", str(tmp_path)])
    assert "Video_Games.csv.gz is truncated or corrupt" in line
    assert line.endswith("— delete the file and rerun to download it again")
    assert sorted(os.listdir(tmp_path)) == sorted(SAMPLE_FILES)


def test_a_damaged_shipped_sample_is_restored_from_git_not_downloaded(tmp_path, capsys, monkeypatch):
    """The committed sample has no download: a rerun would fetch the whole category into data/sample."""
    copy_sample(tmp_path)
    monkeypatch.setattr(P, "SHIPPED_SAMPLE", str(tmp_path))  # stands in for data/sample, which stays whole
    data = (tmp_path / SAMPLE_FILES[0]).read_bytes()
    (tmp_path / SAMPLE_FILES[0]).write_bytes(data[: len(data) // 2])
    line = user_error(capsys, ["--category", "Video_Games", "--data_root_dir", str(tmp_path)])
    assert "Video_Games.csv.gz is truncated or corrupt" in line
    assert line.endswith("— restore the shipped sample with `git checkout data/sample`")


def test_cli_exit_code_and_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "preprocess.py"), "--category",
                             "Video_Gmaes", "--data_root_dir", str(tmp_path), "--base_url",
                             NOWHERE], capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and "known categories:" in result.stderr


def listing(folder):
    """Every path under `folder` with its size, to show that a failed run changed nothing."""
    return sorted((os.path.relpath(os.path.join(d, n), folder), os.path.getsize(os.path.join(d, n)))
                  for d, dirs, files in os.walk(folder) for n in dirs + files)


@pytest.mark.parametrize("flags, named", [
    (["--st_year", "0", "--ed_year", "0"], "--st_year 0 "),
    (["--st_year", "-5", "--ed_year", "-5"], "--st_year -5 "),
    (["--ed_year", "99999999"], "--ed_year 99999999 "),
    (["--postfix", "a/b"], "--postfix 'a/b' "),
    (["--postfix", "../up"], "--postfix '../up' "),
    (["--base_url", "http://127.0.0.1:99999/"], "--base_url 'http://127.0.0.1:99999/' "),
    (["--base_url", "http://127.0.0.1:0/"], "--base_url 'http://127.0.0.1:0/' "),
    (["--base_url", "notaurl"], "--base_url 'notaurl' "),
    (["--base_url", "http://"], "--base_url 'http://' "),
    (["--base_url", "ftp://127.0.0.1/"], "--base_url 'ftp://127.0.0.1/' "),
])
def test_bad_flags_fail_before_touching_the_raw_files(tmp_path, capsys, flags, named):
    copy_sample(tmp_path)
    before = listing(tmp_path)
    line = user_error(capsys, ["--category", "Video_Games", "--data_root_dir", str(tmp_path), *flags])
    assert named in line and " — " in line
    assert listing(tmp_path) == before


def test_bad_base_url_from_the_environment_names_the_variable(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(P.BASE_URL_ENV, "notaurl")
    line = user_error(capsys, ["--category", "Video_Games", "--data_root_dir", str(tmp_path)])
    assert "--base_url 'notaurl'" in line and f"${P.BASE_URL_ENV}" in line
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("url", ["http://127.0.0.1:99999/x.gz", "notaurl", "http://"])
def test_download_error_handler_survives_any_url(tmp_path, url):
    """The handler's own message must not raise (it used to re-parse the URL with urllib3)."""
    with pytest.raises(UserError, match="is unreachable .*--base_url"):
        P.download(url, str(tmp_path / "x.gz"), "Video_Games")
    assert os.listdir(tmp_path) == []


def test_download_write_failure_is_one_line(tmp_path, server, monkeypatch):
    def full_disk(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(P, "open", full_disk, raising=False)  # preprocess's own open() only
    with pytest.raises(UserError, match=r"cannot write .*Video_Games.csv.gz.part \(No space left "
                                        r"on device\) — .*--data_root_dir"):
        P.fetch_raw("Video_Games", str(tmp_path), server(sample_files()).url)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("reachable", [True, False])
@pytest.mark.parametrize("below, message", [("", "afile is a file — "),
                                            ("sub", "is inside .*afile, a file — ")])
def test_data_root_that_is_a_file(tmp_path, capsys, server, reachable, below, message):
    (tmp_path / "afile").write_text("keep")
    root = os.path.join(tmp_path, "afile", below) if below else str(tmp_path / "afile")
    url = server(sample_files()).url if reachable else NOWHERE
    line = user_error(capsys, ["--category", "Video_Games", "--data_root_dir", root,
                               "--base_url", url])
    assert line.startswith(f"error: --data_root_dir {root} ")
    assert re.search(message, line) and "pass a folder" in line
    assert listing(tmp_path) == [("afile", 4)]


@pytest.mark.parametrize("has_raw, below", [(True, ""), (False, ""), (False, "new/deeper")])
def test_data_root_not_writable(tmp_path, capsys, monkeypatch, has_raw, below):
    """Root ignores file modes, so os.access is told that this one folder is read-only."""
    locked = tmp_path / "locked"
    locked.mkdir()
    if has_raw:
        copy_sample(locked)
    before = listing(tmp_path)
    real_access = os.access
    monkeypatch.setattr(P.os, "access", lambda path, mode, **kw: (
        os.path.abspath(path) != str(locked) and real_access(path, mode, **kw)))
    root = os.path.join(locked, below) if below else str(locked)
    line = user_error(capsys, ["--category", "Video_Games", "--data_root_dir", root,
                               "--base_url", NOWHERE])
    assert line.startswith(f"error: --data_root_dir {root} ") and "pass a folder you can write" in line
    assert (f"cannot be created: {locked} is not writable" if below else "is not writable") in line
    assert listing(tmp_path) == before


@pytest.mark.parametrize("below", ["", "new"])
def test_data_root_on_a_read_only_file_system(tmp_path, capsys, monkeypatch, below):
    """os.access says yes there (its modes allow writing), so a folder is made to find out."""
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    root = os.path.join(tmp_path, below) if below else str(tmp_path)
    line = user_error(capsys, ["--category", "Video_Games", "--data_root_dir", root, "--base_url", NOWHERE])
    problem = (f"cannot be created: no folder can be made in {tmp_path} (Read-only file system)" if below
               else "is not writable (Read-only file system)")
    assert line == f"error: --data_root_dir {root} {problem} — pass a folder you can write to (it is created if missing)"
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_data_root_read_only_for_real(tmp_path):
    copy_sample(tmp_path)
    before = listing(tmp_path)
    tmp_path.chmod(0o555)
    try:
        result = subprocess.run([sys.executable, os.path.join(ROOT, "preprocess.py"), "--category",
                                 "Video_Games", "--data_root_dir", str(tmp_path)],
                                capture_output=True, text=True)
    finally:
        tmp_path.chmod(0o755)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"error: --data_root_dir {tmp_path} is not writable")
    assert listing(tmp_path) == before


def test_dataset_write_failure_is_one_line_and_saves_nothing(tmp_path, capsys, monkeypatch):
    copy_sample(tmp_path)
    before = listing(tmp_path)

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(P, "tempfile", types.SimpleNamespace(mkdtemp=full_disk))
    line = user_error(capsys, ["--category", "Video_Games", "--data_root_dir", str(tmp_path),
                               "--base_url", NOWHERE])
    assert "Video_Games_0_2022-10-2023-10 (No space left on device)" in line
    assert "--data_root_dir" in line and listing(tmp_path) == before


def test_cli_bad_year_after_raw_files_exist(tmp_path):
    """The audit's case: raw files present, year 0; once a traceback after reading them."""
    copy_sample(tmp_path)
    result = subprocess.run([sys.executable, os.path.join(ROOT, "preprocess.py"), "--category",
                             "Video_Games", "--data_root_dir", str(tmp_path), "--st_year", "0",
                             "--ed_year", "0"], capture_output=True, text=True)
    lines = result.stderr.splitlines()
    assert result.returncode == 2 and "Traceback" not in result.stderr and len(lines) == 1
    assert lines[0].startswith("error: --st_year 0 ")
    assert sorted(os.listdir(tmp_path)) == sorted(SAMPLE_FILES)

# ---------------------------------------------------------------------------------------------
# The committed sample data


def test_sample_data_end_to_end(tmp_path, capsys):
    import datasets

    copy_sample(tmp_path)
    target = run_main(tmp_path, category="Video_Games")
    assert os.path.basename(target) == "Video_Games_0_2022-10-2023-10"  # the requested start
    out = capsys.readouterr().out
    assert "window start moved back to 2021-10-01" in out
    assert "users: 313  items: 239  interactions: 1,666" in out
    with open(os.path.join(target, "preprocess.json")) as f:
        assert json.load(f) == {
            "category": "Video_Games", "K": 0, "window_size": 20, "requested_start": "2022-10-01",
            "start": "2021-10-01", "end": "2023-10-01", "users": 313, "items": 239, "interactions": 1666,
            "train": 1332, "valid": 167, "test": 167, "blank_titles": 0}
    d = datasets.load_from_disk(target)
    assert list(d) == ["train", "valid", "test", "item_info"]
    assert [d[s].num_rows for s in ("train", "valid", "test")] == [1332, 167, 167]
    for split in ("train", "valid", "test"):
        assert d[split].column_names == SAMPLE_COLUMNS
        assert d[split].features["timestamp"].dtype == "int64"
        assert d[split].features["history_timestamp"].feature.dtype == "int64"
    assert d["item_info"].column_names == ITEM_INFO_COLUMNS
    info = d["item_info"]
    assert info["item_id"] == list(range(240)) and info[0]["parent_asin"] == "pad_asin"
    titles = info["title"][1:]
    assert all(t.isascii() and "&quot;" not in t and "<" not in t and "\t" not in t for t in titles)
    times = np.concatenate([d[s]["timestamp"] for s in ("train", "valid", "test")])
    assert (np.diff(times) >= 0).all() and d["test"][-1]["interaction_id"] == 1665
    assert times.min() > ms(2021, 10) and times.max() == ms(2023, 10)  # both bounds inclusive
    assert all(0 < len(h) <= 20 for h in d["train"]["history_item_id"])


def reference_samples(folder, category, start, end, k=0, window_size=20):
    """SPEC §1 the plain way: dicts, lists and Python's sorted, one rating at a time. Returns
    (samples, item asins in id order) to check the vectorised pipeline against."""
    kept, seen = {}, set()
    with gzip.open(os.path.join(folder, f"meta_{category}.jsonl.gz"), "rt") as f:
        for line in f:
            item = json.loads(line)
            if item["parent_asin"] in seen:
                continue
            seen.add(item["parent_asin"])
            title = item.get("title")
            if title is None or "<span id" in title:
                continue
            title = title.replace("&quot;", '"').replace("&amp;", "&").strip(" ").strip('"')
            if len(title.split(" ")) > 20 or len(title) <= 1:
                continue
            try:
                float(item.get("price"))
            except (TypeError, ValueError):
                continue
            kept[item["parent_asin"]] = P.clean_text(title)
    with gzip.open(os.path.join(folder, f"{category}.csv.gz"), "rt") as f:
        ratings = [(u, a, float(r), int(t)) for u, a, r, t in
                   (line.strip().split(",") for line in list(f)[1:]) if a in kept]
    earliest = min(time.gmtime(t // 1000).tm_year for *_, t in ratings)
    while True:
        lo, hi = ms(*start), ms(*end)
        inside = [r for r in ratings if lo <= r[3] <= hi]
        while k:
            users = collections.Counter(r[0] for r in inside)
            items = collections.Counter(r[1] for r in inside)
            left = [r for r in inside if users[r[0]] >= k and items[r[1]] >= k]
            if len(left) == len(inside):
                break
            inside = left
        in_window = {r[1] for r in inside}
        if len(in_window) >= 10_000 or start[0] <= earliest:
            break
        start = (start[0] - (start[1] <= 3), (start[1] - 4) % 12 + 1)
    ids = {a: i for i, a in enumerate([a for a in kept if a in in_window], 1)}
    by_user = {}
    for r in inside:
        by_user.setdefault(r[0], []).append(r)
    samples = []
    for user, rows in by_user.items():
        rows = sorted(rows, key=lambda r: r[3])
        for i in range(1, len(rows)):
            history = rows[max(0, i - window_size):i]
            samples.append({
                "user_id": user, "item_asins": [r[1] for r in history], "item_asin": rows[i][1],
                "history_item_id": [ids[r[1]] for r in history], "item_id": ids[rows[i][1]],
                "history_item_title": [kept[r[1]] for r in history], "item_title": kept[rows[i][1]],
                "history_rating": [r[2] for r in history], "rating": rows[i][2],
                "history_timestamp": [r[3] for r in history], "timestamp": rows[i][3]})
    samples = sorted(samples, key=lambda s: s["timestamp"])
    return [{**s, "interaction_id": i} for i, s in enumerate(samples)], list(ids)


@pytest.mark.parametrize("k", [0, 2])
def test_sample_data_matches_a_row_by_row_reference(tmp_path, k):
    import datasets

    copy_sample(tmp_path)
    d = datasets.load_from_disk(run_main(tmp_path, "--K", str(k), category="Video_Games"))
    samples, asins = reference_samples(tmp_path, "Video_Games", (2022, 10), (2023, 10), k)
    assert [r for s in ("train", "valid", "test") for r in d[s]] == samples
    assert d["item_info"]["parent_asin"] == ["pad_asin"] + asins


def test_sample_data_is_reproducible(tmp_path):
    subprocess.run([sys.executable, os.path.join(ROOT, "data", "make_sample.py"), "--out",
                    str(tmp_path)], check=True, capture_output=True)
    for name in SAMPLE_FILES:
        with gzip.open(tmp_path / name) as new, gzip.open(os.path.join(SAMPLE, name)) as committed:
            assert new.read() == committed.read(), name
    assert sum(os.path.getsize(os.path.join(SAMPLE, n)) for n in SAMPLE_FILES) < 2 * 2**20
