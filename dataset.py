"""The dataset folder that preprocess.py writes and train.py and recommend.py read.

Its name, `{category}_{K}_{st_year}-{st_month}-{ed_year}-{ed_month}[_{postfix}]` (SPEC §1), tells
the category; it holds a `datasets.DatasetDict` with the sample splits and `item_info`, and
`preprocess.json`: category, K, window size, the requested and the kept window (its start may have
moved back), the sizes and how many items' titles cleaning left blank.
`load_dataset_dir` checks what training relies on, so a wrong folder fails in one line.
"""
import hashlib
import json
import os
import re

import pyarrow as pa
import pyarrow.compute as pc

from errors import UserError, missing_path, one_line, read_json

PREPROCESS_RECORD = "preprocess.json"
SAMPLE_SPLITS = ("train", "valid", "test")
SPLITS = (*SAMPLE_SPLITS, "item_info")
DATASET_ENTRIES = ("dataset_dict.json", *SPLITS, PREPROCESS_RECORD)  # what preprocess.py writes into the folder


def _text(kind) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def _number(kind) -> bool:
    return pa.types.is_integer(kind) or pa.types.is_floating(kind)


def _is_list(kind) -> bool:
    return pa.types.is_list(kind) or pa.types.is_large_list(kind)


def _list_of(holds):
    return lambda kind: _is_list(kind) and holds(kind.value_type)


def _or_null(holds):
    return lambda kind: pa.types.is_null(kind) or holds(kind)


COLUMN_KINDS = {  # what train.py and recommend.py read (preprocess writes more): (what it holds, Arrow type test)
    "user_id": ("text", _text), "history_item_id": ("lists of integers", _list_of(pa.types.is_integer)),
    "history_item_title": ("lists of text", _list_of(_text)), "history_rating": ("lists of numbers", _list_of(_number)),
    "history_timestamp": ("lists of integers", _list_of(pa.types.is_integer)),
    "item_id": ("integers", pa.types.is_integer), "item_title": ("text", _text),
    "timestamp": ("integers", pa.types.is_integer), "title": ("text", _text),
    # the item prompt's metadata, where present; all empty (null) renders too
    "average_rating": ("numbers", _or_null(_number)), "rating_number": ("numbers", _or_null(_number)),
    "description": ("lists of text", _or_null(_list_of(_or_null(_text)))),
}
SAMPLE_COLUMNS = ("user_id", "history_item_id", "history_item_title", "history_rating", "history_timestamp",
                  "item_id", "item_title", "timestamp")
ITEM_COLUMNS = ("item_id", "title")  # of item_info
ITEM_PROMPT_COLUMNS = ("average_rating", "rating_number", "description")  # the item prompt's, where present
NAME = re.compile(r"(?P<category>.+?)_\d+_\d{4}-\d{1,2}-\d{4}-\d{1,2}(_.*)?")


def dataset_name(category: str, k: int, st_year: int, st_month: int, ed_year: int, ed_month: int,
                 postfix: str = "") -> str:
    """SPEC §1 folder name; months not zero-padded, the postfix appended when given."""
    name = f"{category}_{k}_{st_year}-{st_month}-{ed_year}-{ed_month}"
    return f"{name}_{postfix}" if postfix else name


def category_of(folder: str) -> str | None:
    """The category in a dataset folder's name (None: not a `dataset_name`)."""
    match = NAME.fullmatch(os.path.basename(os.path.normpath(folder)))
    return match and match["category"]


def is_dataset(path: str) -> bool:
    """Whether `path` is a dataset folder (a DatasetDict saved there), whole or not."""
    return os.path.isfile(os.path.join(path, "dataset_dict.json"))


def load_dataset_dir(folder: str | None, category: str | None = None):
    """The DatasetDict written by preprocess.py, checked.  -> (dataset, category); the category
    is read from preprocess.json, else the folder name, unless given (--dataset_category)."""
    from datasets import DatasetDict, load_from_disk  # import cost only where a dataset is loaded

    if not folder:
        raise UserError("no --dataset_dir given — run preprocess.py and pass the folder it prints")
    folder, category = os.path.expanduser(folder), category or None  # an empty --dataset_category: not given
    if not os.path.isdir(folder):
        state = "is a file" if os.path.exists(folder) else "does not exist"
        raise UserError(f"dataset folder {missing_path(folder)} {state} — run preprocess.py first or fix --dataset_dir")
    parent = os.path.dirname(os.path.abspath(folder))
    if os.path.basename(os.path.abspath(folder)) in SPLITS and is_dataset(parent):
        raise UserError(f"{folder!r} is one split of a dataset — pass the dataset folder above it, {parent!r}")
    try:
        dataset = load_from_disk(folder)
    except (OSError, ValueError, IndexError, KeyError, TypeError, AttributeError) as e:  # the last three: JSON of a wrong shape
        readable = os.access(folder, os.R_OK | os.X_OK)
        inside = [os.path.join(folder, name) for name in sorted(os.listdir(folder) if readable else [])
                  if is_dataset(os.path.join(folder, name))]
        if is_dataset(folder):
            raise UserError(f"dataset folder {folder!r} is damaged ({one_line(e)}) — rerun preprocess.py to write "
                            "it again") from e
        fix = (f"it holds {', '.join(inside)}: pass that as --dataset_dir" if inside
               else "point --dataset_dir at the folder preprocess.py printed ({category}_{K}_{start}-{end})")
        raise UserError(f"{folder!r} is not a dataset saved by preprocess.py ({one_line(e)}) — {fix}") from e
    missing = [s for s in SPLITS if not isinstance(dataset, DatasetDict) or s not in dataset]
    if missing:
        raise UserError(f"{folder!r} lacks the split(s) {', '.join(missing)} — rerun preprocess.py for it")
    for split in SPLITS:  # damage inside a file (bad bytes, not a cut) loads, and fails only at its rows
        try:
            dataset[split].data.table.validate(full=True)
        except pa.ArrowInvalid as e:
            raise UserError(f"dataset folder {folder!r} is damaged ({split}: {one_line(e)}) — rerun preprocess.py "
                            "to write it again") from e
    for split in SAMPLE_SPLITS:
        absent = [c for c in SAMPLE_COLUMNS if c not in dataset[split].column_names]
        if absent:
            raise UserError(f"the {split} split of {folder!r} lacks the column(s) {', '.join(absent)} — "
                            "rerun preprocess.py for it")
        check_column_kinds(dataset[split], split, SAMPLE_COLUMNS, folder)
        if len(dataset[split]) == 0:
            raise UserError(f"the {split} split of {folder!r} is empty — preprocess a wider window (or a "
                            "smaller --K) so that every split holds samples")
        columns = [dataset[split].data.column(c) for c in SAMPLE_COLUMNS]
        with_nulls = [c for c, values in zip(SAMPLE_COLUMNS, columns) if values.null_count
                      or (_is_list(values.type) and pc.list_flatten(values).null_count)]
        if with_nulls:
            raise UserError(f"the {split} split of {folder!r} has empty values in {', '.join(with_nulls)} — "
                            "rerun preprocess.py for it")
    absent = [c for c in ITEM_COLUMNS if c not in dataset["item_info"].column_names]
    if absent:
        raise UserError(f"the item_info split of {folder!r} lacks the column(s) {', '.join(absent)} — "
                        "rerun preprocess.py for it")
    present = tuple(c for c in ITEM_PROMPT_COLUMNS if c in dataset["item_info"].column_names)
    check_column_kinds(dataset["item_info"], "item_info", ITEM_COLUMNS + present, folder)
    check_item_ids(dataset, folder)
    named = category_of(folder)
    recorded = recorded_category(folder)
    if recorded is not None and named is not None and recorded != named:
        raise UserError(f"dataset folder {folder!r} is named for {named} but holds {recorded} (its {PREPROCESS_RECORD}) "
                        f"— give it back its name, or rerun preprocess.py for {named}")
    named = recorded or named
    if category is None and named is None:
        raise UserError(f"cannot read the category from the folder name {folder!r} — pass --dataset_category")
    if category is not None and named is not None and named != category:
        raise UserError(f"dataset folder {folder!r} holds {named}, not {category} — point --dataset_dir at a "
                        f"{category} dataset (or, training, fix DATASET_CAT/--dataset_category)")
    return dataset, category or named


def catalogue_titles(item_info) -> list[str]:
    """A catalogue (the item_info split): its item titles in id order, the pad item's first."""
    return item_info.data.column("title").to_pylist()


def catalogue_digest(titles: list[str]) -> str:
    """A digest of a catalogue, its item titles in id order (the pad item's first): recorded with a
    run, so that recommend.py can tell when it serves another catalogue."""
    return hashlib.sha256(json.dumps(titles).encode()).hexdigest()[:16]


def preprocess_record(folder: str) -> dict | None:
    """What preprocess.py recorded in the folder (None: no record, as in older folders)."""
    path = os.path.join(folder, PREPROCESS_RECORD)
    return read_json(path, "rerun preprocess.py for this folder") if os.path.isfile(path) else None


def recorded_category(folder: str) -> str | None:
    """The category preprocess.py recorded in the folder (None: no record)."""
    category = (preprocess_record(folder) or {}).get("category")
    return category if isinstance(category, str) and category else None


def preprocessed_anew(then, now: dict | None) -> list[str]:
    """How a dataset folder's preprocess record differs from the one a run recorded when it
    trained (preprocess.py run again into one folder, e.g. with another --window_size), as
    "window_size 20, now 10"; only entries both records hold are compared (a run of a version
    before 2026-12-02 recorded none)."""
    then, now = then if isinstance(then, dict) else {}, now or {}
    return [f"{key} {then[key]}, now {now[key]}" for key in then if key in now and now[key] != then[key]]


def check_column_kinds(split_data, split: str, columns: tuple, folder: str):
    """The columns hold the kinds of values preprocess.py writes (a hand-made dataset may not)."""
    wrong = [f"{c} holds {split_data.data.column(c).type}, not {COLUMN_KINDS[c][0]}" for c in columns
             if not COLUMN_KINDS[c][1](split_data.data.column(c).type)]
    if wrong:
        raise UserError(f"the {split} split of {folder!r}: {'; '.join(wrong)} — rerun preprocess.py for it")


def check_item_ids(dataset, folder: str):
    """item_info holds ids 0..N-1 in order (0 = pad), and every sample's ids are among them."""
    ids = dataset["item_info"].data.column("item_id").to_pylist()
    if ids != list(range(len(ids))):
        raise UserError(f"the item_info split of {folder!r} does not hold item ids 0..{len(ids) - 1} in order "
                        "(0 = the pad item) — rerun preprocess.py for it")
    for split in SAMPLE_SPLITS:
        table = dataset[split].data
        used = [pc.min_max(table.column("item_id")), pc.min_max(pc.list_flatten(table.column("history_item_id")))]
        if any(m["min"].is_valid and (m["min"].as_py() < 1 or m["max"].as_py() >= len(ids)) for m in used):
            raise UserError(f"the {split} split of {folder!r} names item ids outside 1..{len(ids) - 1} of its "
                            "item_info — rerun preprocess.py for it")
