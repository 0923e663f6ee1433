"""Amazon Reviews 2023 -> R²ec dataset: download, item filter, time window, K-core, samples, split.

Owns everything SPEC §1 describes: fetching `{category}.csv.gz` (5-core ratings) and
`meta_{category}.jsonl.gz` (metadata) into `--data_root_dir`, and writing the `DatasetDict`
(`train, valid, test, item_info`) that `train.py` reads. Run:

    python preprocess.py --category CDs_and_Vinyl --K 0 --st_year 2022 --st_month 10 \
        --ed_year 2023 --ed_month 10 --window_size 20 --data_root_dir data

-> data/CDs_and_Vinyl_0_2022-10-2023-10. Raw files already in `--data_root_dir` are used as they
are, with no network access; a mirror can replace the McAuley Lab host with `--base_url` or
R2EC_AMAZON_BASE_URL. Times are read as UTC. Offline, on the committed sample (data/make_sample.py):

    python preprocess.py --category Video_Games --data_root_dir data/sample
"""
import argparse
import calendar
import datetime
import difflib
import gzip
import html
import json
import os
import queue
import re
import shutil
import tempfile
import threading
import urllib.parse
import zlib

# errors.py before the libraries: its excepthook makes Ctrl-C while they import one line
from errors import (UserError, check_not_blank, folder_problem, missing_folders, one_line, one_line_parser_errors,
                    run_cli, umask, write_json)

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.csv as pa_csv
import requests
import urllib3
from tqdm import tqdm

from dataset import DATASET_ENTRIES, PREPROCESS_RECORD, dataset_name

DEFAULT_BASE_URL = "https://mcauleylab.ucsd.edu/public_datasets/data/amazon_2023/"
BASE_URL_ENV = "R2EC_AMAZON_BASE_URL"
KNOWN_CATEGORIES = (
    "All_Beauty", "Amazon_Fashion", "Appliances", "Arts_Crafts_and_Sewing", "Automotive",
    "Baby_Products", "Beauty_and_Personal_Care", "Books", "CDs_and_Vinyl",
    "Cell_Phones_and_Accessories", "Clothing_Shoes_and_Jewelry", "Digital_Music", "Electronics",
    "Gift_Cards", "Grocery_and_Gourmet_Food", "Handmade_Products", "Health_and_Household",
    "Health_and_Personal_Care", "Home_and_Kitchen", "Industrial_and_Scientific", "Kindle_Store",
    "Magazine_Subscriptions", "Movies_and_TV", "Musical_Instruments", "Office_Products",
    "Patio_Lawn_and_Garden", "Pet_Supplies", "Software", "Sports_and_Outdoors",
    "Subscription_Boxes", "Tools_and_Home_Improvement", "Toys_and_Games", "Video_Games", "Unknown",
)
MIN_WINDOW_ITEMS = 10_000  # fewer items than this: move the window start back
BACKOFF_MONTHS = 3
MAX_TITLE_WORDS = 20
RATING_COLUMNS = ("user_id", "parent_asin", "rating", "timestamp")
CHUNK = 1 << 20
DOWNLOAD_ATTEMPTS = 8
CONNECT_TIMEOUT_S, READ_TIMEOUT_S = 15, 120
MIN_YEAR, MAX_YEAR = 1970, 2100  # timestamps are ms since 1970; Amazon Reviews 2023 spans 1996-2023
PLAUSIBLE_YEARS = (1990, 2100)  # a last rating outside, read as ms: the file counts in another unit
MAX_POSTFIX = 100  # keeps the output folder's name (and its temporary name) under 255 bytes
SHIPPED_SAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "sample")
MAX_WINDOW_SIZE = 100_000  # history lines per sample; far beyond any prompt limit, and within int64

# ---------------------------------------------------------------------------------------------
# Raw files: local names, download with resume, gzip check


def raw_files(category):
    """(remote path under the base URL, local file name) for the ratings and the metadata."""
    return [
        (f"benchmark/5core/rating_only/{category}.csv.gz", f"{category}.csv.gz"),
        (f"raw/meta_categories/meta_{category}.jsonl.gz", f"meta_{category}.jsonl.gz"),
    ]


def known_categories_hint(category):
    close = difflib.get_close_matches(category, KNOWN_CATEGORIES, n=1, cutoff=0.6)
    guess = f"did you mean {close[0]}? " if close else ""
    return f"{guess}known categories: {', '.join(KNOWN_CATEGORIES)}"


def gzip_is_complete(path):
    """True when `path` is a gzip stream that decompresses to its end with a matching CRC."""
    try:
        with open(path, "rb") as raw:
            if raw.read(2) != b"\x1f\x8b":  # also catches an empty file or an HTML error page
                return False
        with gzip.open(path, "rb") as f:
            while f.read(CHUNK):
                pass
        return True
    except (EOFError, OSError, zlib.error):
        return False


def url_host(url):
    """The host of `url` for a message; the URL itself when it has none or does not parse."""
    try:
        return urllib.parse.urlsplit(url).hostname or url
    except ValueError:
        return url


def download(url, dest, category):
    """Stream `url` into `dest` via `dest.part`, resuming with HTTP Range after a dropped connection.

    The `.part` file survives an interrupted run, so the next run resumes it too. It only replaces
    `dest` once its gzip stream checks out complete.
    """
    part = dest + ".part"
    name = os.path.basename(dest)
    for _ in range(DOWNLOAD_ATTEMPTS):
        have = os.path.getsize(part) if os.path.exists(part) else 0
        # identity: a server that labels .gz files Content-Encoding: gzip must not have them unpacked
        headers = {"Accept-Encoding": "identity"}
        if have:
            headers["Range"] = f"bytes={have}-"
        try:
            with requests.get(url, headers=headers, stream=True, timeout=(CONNECT_TIMEOUT_S, READ_TIMEOUT_S)) as r:
                if r.status_code == 404 and category in KNOWN_CATEGORIES and url.startswith(DEFAULT_BASE_URL):
                    raise UserError(f"{url} does not exist (HTTP 404): the Amazon host no longer serves this "
                                    f"file — put both files into --data_root_dir, or pass --base_url a mirror")
                if r.status_code == 404 and category in KNOWN_CATEGORIES:
                    remote = " and ".join(path for path, _ in raw_files(category))
                    raise UserError(f"{url} does not exist (HTTP 404) — a mirror must keep the Amazon host's "
                                    f"layout ({remote} under --base_url); or put both files into --data_root_dir")
                if r.status_code == 404:
                    raise UserError(f"{url} does not exist (HTTP 404): no category {category!r} there "
                                    f"— check --category ({known_categories_hint(category)})")
                if r.status_code == 416:  # Range starts past the end of the remote file
                    if gzip_is_complete(part):
                        break  # an earlier run had already received every byte
                    os.remove(part)  # our own partial file does not match the remote one
                    continue
                if r.status_code not in (200, 206):
                    raise UserError(f"{url} answered HTTP {r.status_code} — retry later, or point "
                                    f"--base_url / {BASE_URL_ENV} at a mirror")
                if r.status_code == 200:
                    have = 0  # the server ignored Range: start over
                size = r.headers.get("Content-Length")
                total = have + int(size) if size and size.isdigit() else None
                os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
                with open(part, "ab" if have else "wb") as f, tqdm(
                        total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                        desc=name) as bar:
                    for chunk in r.raw.stream(CHUNK, decode_content=False):
                        f.write(chunk)
                        bar.update(len(chunk))
            break
        except (requests.RequestException, urllib3.exceptions.HTTPError, ConnectionError,
                TimeoutError) as e:  # any network failure, whatever layer raised it
            got = os.path.getsize(part) if os.path.exists(part) else 0
            if got > have:
                continue  # dropped mid-file after some progress: resume from the new end
            if isinstance(e, (requests.exceptions.ReadTimeout, urllib3.exceptions.ReadTimeoutError)):
                raise UserError(f"cannot download {name}: {url_host(url)} answered, then sent nothing for "
                                f"{READ_TIMEOUT_S} s — rerun later (a partial download resumes), or point "
                                f"--base_url / {BASE_URL_ENV} at a mirror") from e
            if isinstance(e, requests.exceptions.SSLError):  # it answered, but not as an https server
                raise UserError(f"cannot download {name}: {url_host(url)} answered, but no secure (https) "
                                f"connection was made ({one_line(e)}) — check the scheme of --base_url / "
                                f"{BASE_URL_ENV} (http:// for a plain mirror) and its certificate") from e
            problem = f"cannot download {name}: {url_host(url)} is unreachable ({type(e).__name__})"
            fixes = ["check your network", f"point --base_url / {BASE_URL_ENV} at a mirror",
                     f"put {name} in {os.path.dirname(dest) or '.'}"]
            if category not in KNOWN_CATEGORIES:
                problem += f", and {category!r} is not a known category"
                fixes.insert(0, f"check --category ({known_categories_hint(category)})")
            raise UserError(f"{problem} — {', '.join(fixes[:-1])}, or {fixes[-1]}") from e
        except OSError as e:  # writing the .part file: disk full, permissions changed mid-run
            raise UserError(f"cannot write {part} ({e.strerror or e}) — free some space or pass a "
                            f"writable --data_root_dir, then rerun to resume") from e
    else:
        raise UserError(f"the connection kept dropping while downloading {url} — rerun to resume "
                        f"from {part}")
    if not gzip_is_complete(part):
        os.remove(part)
        raise UserError(f"downloaded {name} is truncated or corrupt (not a complete gzip stream) "
                        f"— rerun to download it again, or check the mirror at --base_url")
    os.replace(part, dest)


def fetch_raw(category, root, base_url):
    """Paths of the ratings and metadata files in `root`, downloading only those missing."""
    paths = []
    for remote, local in raw_files(category):
        dest = os.path.join(root, local)
        if not os.path.exists(dest):
            download(base_url.rstrip("/") + "/" + remote, dest, category)
        paths.append(dest)
    return paths


def fetch_again(path: str) -> str:
    """How to replace a damaged raw file: download it anew, or restore the committed sample, which
    is never downloaded (data/make_sample.py builds it)."""
    if os.path.realpath(os.path.dirname(os.path.abspath(path))) == os.path.realpath(SHIPPED_SAMPLE):
        return "restore the shipped sample with `git checkout data/sample`"
    return "delete the file and rerun to download it again"


def corrupt_file_error(path, e):
    return UserError(f"{path} is truncated or corrupt ({type(e).__name__}: {one_line(e)}) — {fetch_again(path)}")

# ---------------------------------------------------------------------------------------------
# Item filter and text cleaning


def filter_title(title):
    """The title used from now on, or None when rules 1-4 of the item filter drop the item."""
    if not isinstance(title, str) or "<span id" in title:
        return None
    title = title.replace("&quot;", '"').replace("&amp;", "&").strip(" ").strip('"')
    if len(title.split(" ")) > MAX_TITLE_WORDS or len(title) <= 1:
        return None
    return title


def price_is_float(price):
    try:
        float(price)
        return True
    except (TypeError, ValueError):
        return False


TAG_RE = re.compile(r"<[^>]+>")
NEWLINE_TAB_RE = re.compile(r"[\n\t]")
SPACES_RE = re.compile(r" +")
NON_ASCII_RE = re.compile(r"[^\x00-\x7f]")


def clean_text(text):
    """HTML-unescape, strip, drop tags, newlines/tabs to space, squeeze spaces, non-ASCII to space."""
    text = html.unescape(text).strip()
    text = TAG_RE.sub("", text)
    text = NEWLINE_TAB_RE.sub(" ", text)
    text = SPACES_RE.sub(" ", text)
    return NON_ASCII_RE.sub(" ", text)


class GzipLines:
    """Lines of a gzip file, decompressed by a background thread that starts at once.

    zlib releases the GIL, so on two cores decompressing the metadata (the slowest part of reading
    it) overlaps with reading the ratings and with parsing the lines. At most `prefetch` chunks
    wait in memory.
    """

    def __init__(self, path, prefetch=16):
        self.path, self.chunks, self.stop = path, queue.Queue(maxsize=prefetch), threading.Event()
        threading.Thread(target=self._produce, daemon=True).start()

    def _produce(self):
        try:
            with gzip.open(self.path, "rb") as f:
                while not self.stop.is_set():
                    chunk = f.read(4 * CHUNK)
                    self.chunks.put(chunk)
                    if not chunk:
                        return
        except (EOFError, OSError, zlib.error) as e:
            self.chunks.put(corrupt_file_error(self.path, e))

    def __iter__(self):
        rest = b""
        while chunk := self.chunks.get():
            if isinstance(chunk, UserError):
                raise chunk
            lines = (rest + chunk).split(b"\n")
            rest = lines.pop()
            yield from lines
        if rest:
            yield rest

    def close(self):
        self.stop.set()
        while not self.chunks.empty():  # a producer blocked on a full queue can then see `stop`
            self.chunks.get_nowait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


PARENT_ASIN_RE = re.compile(rb'"parent_asin"\s*:\s*"([^"\\]*)"')


def scan_metadata(lines, rated, path):
    """{parent_asin: raw JSON line} of the items that pass the filter, in metadata-file order.

    Only items in `rated` (asins that have ratings) can ever reach a window, so a line whose
    `"parent_asin": "..."` pairs name none of them is skipped before JSON parsing: real files hold
    several times more items than their 5-core ratings. A repeated parent_asin keeps its first line.
    A file without a single non-blank line is refused: it would only surface later, as no rating
    passing the item filter.
    """
    rated = set(rated)
    wanted = {a.encode() for a in rated}
    kept, seen, empty = {}, set(), True
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        empty = False
        found = PARENT_ASIN_RE.findall(line)
        if found and not any(a in wanted for a in found):
            continue
        try:
            meta = json.loads(line)
        except ValueError as e:
            raise UserError(f"{path} line {number} is not valid JSON ({one_line(e)}) — {fetch_again(path)}") from e
        if not isinstance(meta, dict) or not isinstance(meta.get("parent_asin"), str):
            raise UserError(f"{path} line {number} has no parent_asin — every metadata line needs one: "
                            f"{fetch_again(path)}")
        asin = meta["parent_asin"]
        if asin not in rated or asin in seen:  # not rated: escaped ("B\\u0031"), it passed the pre-filter
            continue
        seen.add(asin)
        if filter_title(meta.get("title")) is not None and price_is_float(meta.get("price")):
            kept[asin] = line
    if empty:
        raise UserError(f"{path} is empty (no items) — {fetch_again(path)}")
    return kept


def text_list(meta: dict, key: str) -> list[str]:
    """A list field of the metadata as strings; a lone value (a string, not its characters) is a one-item list."""
    value = meta.get(key) or []
    return [str(x) for x in (value if isinstance(value, list) else [value])]


def item_row(line):
    """One `item_info` row from a kept item's metadata line (top-level strings cleaned)."""
    meta = json.loads(line)
    meta["title"] = filter_title(meta["title"])
    text = {k: clean_text(meta[k]) if isinstance(meta.get(k), str) else meta.get(k)
            for k in ("main_category", "title", "subtitle", "store", "parent_asin")}
    return {
        "main_category": text["main_category"],
        "title": text["title"],
        "subtitle": text["subtitle"] or "",
        "average_rating": meta.get("average_rating"),
        "rating_number": int(meta.get("rating_number") or 0),
        "features": text_list(meta, "features"),
        "description": list(dict.fromkeys(text_list(meta, "description"))),
        "price": float(meta["price"]),
        "store": text["store"],
        "categories": text_list(meta, "categories"),
        "details": json.dumps(meta.get("details") or {}),
        "parent_asin": text["parent_asin"],
    }


PAD_ROW = {"main_category": "", "title": "pad_title", "subtitle": "", "average_rating": 0.0,
           "rating_number": 0, "features": [], "description": [], "price": 0.0, "store": "",
           "categories": [], "details": "{}", "parent_asin": "pad_asin"}
ITEM_INFO_SCHEMA = pa.schema([
    ("main_category", pa.string()), ("title", pa.string()), ("subtitle", pa.string()),
    ("average_rating", pa.float64()), ("rating_number", pa.int64()),
    ("features", pa.list_(pa.string())), ("description", pa.list_(pa.string())),
    ("price", pa.float64()), ("store", pa.string()), ("categories", pa.list_(pa.string())),
    ("details", pa.string()), ("parent_asin", pa.string()), ("item_id", pa.int64()),
])


def build_item_info(lines):
    """`item_info` table: the pad row (id 0), then one row per window item in id order (1..N)."""
    rows = [PAD_ROW]
    for line in lines:
        try:
            rows.append(item_row(line))
        except (TypeError, ValueError, OverflowError) as e:  # OverflowError: a count written as Infinity
            raise unexpected_type_error(json.loads(line)["parent_asin"], e) from e
    rows = [{**row, "item_id": item_id} for item_id, row in enumerate(rows)]
    try:
        return pa.Table.from_pylist(rows, schema=ITEM_INFO_SCHEMA)
    except (TypeError, ValueError, OverflowError, pa.ArrowException) as e:
        # Only on this rare path: name the first item that fails, with its own reason.
        asin, problem = next(((row["parent_asin"], problem) for row in rows if (problem := item_schema_problem(row))),
                             ("?", e))
        raise unexpected_type_error(asin, problem) from e


def item_schema_problem(row: dict) -> Exception | None:
    """Why this row does not fit ITEM_INFO_SCHEMA, or None when it does."""
    try:
        pa.Table.from_pylist([row], schema=ITEM_INFO_SCHEMA)
        return None
    except (TypeError, ValueError, OverflowError, pa.ArrowException) as e:
        return e


def unexpected_type_error(asin: str, error: Exception) -> UserError:
    return UserError(f"the metadata of item {asin} holds a field of an unexpected type ({one_line(error)}) — delete "
                     "the metadata file and rerun to download it again (if the error stays, the file itself holds it: "
                     "drop that item's line)")

# ---------------------------------------------------------------------------------------------
# Ratings, time window, K-core


def read_ratings(path):
    """The ratings CSV as a pyarrow table: user_id, parent_asin (str), rating, timestamp (int64 ms)."""
    types = {"user_id": pa.string(), "parent_asin": pa.string(), "rating": pa.float64(),
             "timestamp": pa.int64()}
    try:
        table = pa_csv.read_csv(path, convert_options=pa_csv.ConvertOptions(
            column_types=types, include_columns=list(RATING_COLUMNS), strings_can_be_null=True))
    except (EOFError, OSError, zlib.error) as e:
        raise corrupt_file_error(path, e) from e
    except pa.ArrowException as e:
        detail = one_line(e)
        if isinstance(e, pa.ArrowKeyError):  # a column of include_columns is absent
            raise UserError(f"{path} lacks a required column — the header must be "
                            f"{','.join(RATING_COLUMNS)}: {fetch_again(path)}") from e
        if "Empty CSV file" in detail:
            raise UserError(f"{path} is empty (no header, no ratings) — {fetch_again(path)}") from e
        raise UserError(f"{path} has a line with missing or malformed fields ({detail}) — {fetch_again(path)}") from e
    for name in RATING_COLUMNS:
        if table[name].null_count:
            row = int(np.flatnonzero(table[name].is_null().to_numpy(zero_copy_only=False))[0])
            raise UserError(f"{path} line {row + 2} has no {name} — every line needs "
                            f"{','.join(RATING_COLUMNS)}: {fetch_again(path)}")
    if table.num_rows == 0:
        raise UserError(f"{path} has a header but no ratings — {fetch_again(path)}")
    return table


def month_start_ms(year, month):
    return calendar.timegm((year, month, 1, 0, 0, 0)) * 1000


def months_back(year, month, n):
    index = year * 12 + (month - 1) - n
    return index // 12, index % 12 + 1


def k_core(users, items, k):
    """Boolean mask of the ratings left after repeatedly removing users/items with < k ratings."""
    keep = np.ones(len(users), dtype=bool)
    if k <= 0:
        return keep
    while True:
        user_count = np.bincount(users[keep], minlength=users.max() + 1)
        item_count = np.bincount(items[keep], minlength=items.max() + 1)
        drop = keep & ((user_count[users] < k) | (item_count[items] < k))
        if not drop.any():
            return keep
        keep &= ~drop


def select_window(users, items, timestamps, start, end, k):
    """(mask of window ratings, actual (year, month) start) with the 3-month back-off of SPEC §1.

    `users`/`items` are integer codes, `timestamps` ms; `start`/`end` are (year, month). The start
    moves back while fewer than MIN_WINDOW_ITEMS items remain and its year is later than the
    earliest rating's year.
    """
    latest = timestamps.max()
    plausible = [month_start_ms(year, 1) for year in PLAUSIBLE_YEARS]
    if not plausible[0] <= latest < plausible[1]:
        unit = "seconds" if latest < plausible[0] else "micro- or nanoseconds"
        raise UserError(f"the ratings' last timestamp, {latest}, is no date in milliseconds (Amazon Reviews "
                        f"2023's unit): {unit}? — check the ratings file's timestamp column")
    earliest = timestamps[timestamps >= plausible[0]].min()  # a stray 0 or negative one would extend the back-off
    first, last = (datetime.datetime.fromtimestamp(t / 1000, tz=datetime.timezone.utc) for t in (earliest, latest))
    within = f"pick a window within the ratings, {first:%Y-%m} to {last:%Y-%m}"
    if month_start_ms(*end) < earliest:
        raise UserError(f"the window ends {end[0]}-{end[1]:02d}, before the first rating ({first:%Y-%m-%d}) — {within}")
    if month_start_ms(*start) > latest:  # a mistyped year: the back-off would fill its folder with other months
        raise UserError(f"the window starts {start[0]}-{start[1]:02d}, after the last rating ({last:%Y-%m-%d}) — {within}")
    earliest_year = first.year
    end_ms = month_start_ms(*end)
    while True:
        inside = np.flatnonzero((timestamps >= month_start_ms(*start)) & (timestamps <= end_ms))
        mask = np.zeros(len(users), dtype=bool)
        if len(inside):
            mask[inside[k_core(users[inside], items[inside], k)]] = True
        n_items = len(np.unique(items[mask]))
        if n_items >= MIN_WINDOW_ITEMS or start[0] <= earliest_year:
            return mask, start
        start = months_back(*start, BACKOFF_MONTHS)

# ---------------------------------------------------------------------------------------------
# Samples and split


def build_samples(users, items, ratings, timestamps, user_names, asins, titles, window_size):
    """Sliding-window samples over each user's time-sorted ratings, sorted by target time.

    Inputs are the window's ratings in file order: `users` (codes into the pyarrow array
    `user_names`), `items` (ids 1..N into the pyarrow arrays `asins`/`titles`), `ratings`,
    `timestamps`. Users are taken in order of first appearance and both sorts are stable: the
    rows a per-user dict of lists, each sorted with Python's `sorted`, would give.
    """
    rank = pd.factorize(users)[0]                                      # users by first appearance
    order = np.lexsort((timestamps, rank))                             # stable: by user, then time
    users, rank, items = users[order], rank[order], items[order]
    ratings, timestamps = ratings[order], timestamps[order]
    m = len(order)
    first = np.ones(m, dtype=bool)                                     # (m,) first rating of a user
    first[1:] = rank[1:] != rank[:-1]
    position = np.arange(m) - np.maximum.accumulate(np.where(first, np.arange(m), 0))
    targets = np.flatnonzero(position >= 1)                            # (n,) one sample per target
    targets = targets[np.argsort(timestamps[targets], kind="stable")]  # global time order
    lengths = np.minimum(position[targets], window_size)               # (n,) history lengths
    offsets = np.r_[0, np.cumsum(lengths)]                             # (n+1,)
    history = np.repeat(targets - lengths - offsets[:-1], lengths) + np.arange(offsets[-1])

    def as_list(values):
        return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values)

    history_items = pa.array(items[history], pa.int64())
    target_items = pa.array(items[targets], pa.int64())
    return pa.table({
        "user_id": user_names.take(pa.array(users[targets])),
        "item_asins": as_list(asins.take(history_items)),
        "item_asin": asins.take(target_items),
        "history_item_id": as_list(history_items),
        "item_id": target_items,
        "history_item_title": as_list(titles.take(history_items)),
        "item_title": titles.take(target_items),
        "history_rating": as_list(pa.array(ratings[history], pa.float64())),
        "rating": pa.array(ratings[targets], pa.float64()),
        "history_timestamp": as_list(pa.array(timestamps[history], pa.int64())),
        "timestamp": pa.array(timestamps[targets], pa.int64()),
        "interaction_id": pa.array(np.arange(len(targets)), pa.int64()),
    })


def build_tables(ratings, kept_lines, start, end, k, window_size):
    """(samples, item_info, actual window start, number of users) from the ratings table and the
    kept metadata lines: item filter applied to ratings, window with back-off, ids, samples."""
    encoded = ratings["parent_asin"].combine_chunks().dictionary_encode()
    item_codes = encoded.indices.to_numpy()
    asins = encoded.dictionary.to_numpy(zero_copy_only=False)
    keep = pa.compute.is_in(encoded.dictionary, pa.array(list(kept_lines), pa.string()))
    keep = keep.to_numpy(zero_copy_only=False)[item_codes]
    if not keep.any():
        raise UserError("no rating belongs to an item that passes the item filter — check that "
                        "both raw files are of the same category and not cut short")
    users = ratings["user_id"].combine_chunks().filter(pa.array(keep)).dictionary_encode()
    user_codes, item_codes = users.indices.to_numpy(), item_codes[keep]
    timestamps = ratings["timestamp"].to_numpy()[keep]
    mask, start = select_window(user_codes, item_codes, timestamps, start, end, k)

    in_window = set(asins[np.unique(item_codes[mask])])
    window_asins = [a for a in kept_lines if a in in_window]           # metadata order: ids 1..N
    code_to_id = np.zeros(len(asins), dtype=np.int64)
    code_to_id[pd.Index(asins).get_indexer(window_asins)] = np.arange(1, len(window_asins) + 1)
    item_info = build_item_info([kept_lines[a] for a in window_asins])
    samples = build_samples(user_codes[mask], code_to_id[item_codes[mask]],
                            ratings["rating"].to_numpy()[keep][mask], timestamps[mask],
                            users.dictionary, item_info["parent_asin"].combine_chunks(),
                            item_info["title"].combine_chunks(), window_size)
    return samples, item_info, start, len(np.unique(user_codes[mask]))


def split_bounds(n):
    """80/10/10 by position: train [0, a), valid [a, b), test [b, n)."""
    return int(0.8 * n), int(0.9 * n)

# ---------------------------------------------------------------------------------------------
# Output


def save_atomically(write, target):
    """Call `write(folder)` on a new folder beside `target`, then rename it to `target`.

    An interrupted run leaves at most a hidden `.{name}.*.tmp` folder, never a half-written
    dataset under the name train.py looks for; an existing dataset is replaced only at the end.
    """
    parent = os.path.dirname(os.path.abspath(target))
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.", suffix=".tmp", dir=parent)
    os.chmod(tmp, 0o777 & ~umask())  # mkdtemp's 0o700 would make the dataset private to its writer
    old = None
    try:
        write(tmp)
        if os.path.exists(target):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.", suffix=".old", dir=parent)
            os.replace(target, os.path.join(old, "dataset"))
        os.replace(tmp, target)
    finally:
        if old and not os.path.exists(target):  # stopped between the two renames: the earlier dataset stays
            os.replace(os.path.join(old, "dataset"), target)
        shutil.rmtree(tmp, ignore_errors=True)
        if old:
            shutil.rmtree(old, ignore_errors=True)

# ---------------------------------------------------------------------------------------------
# Entry point


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    one_line_parser_errors(p, "python preprocess.py --help")
    p.add_argument("--category", default="Musical_Instruments",
                   help="Amazon Reviews 2023 category, e.g. Video_Games, CDs_and_Vinyl (default: %(default)s)")
    p.add_argument("--K", type=int, default=0,
                   help="K-core threshold inside the window, 0: none (default: %(default)s)")
    p.add_argument("--st_year", type=int, default=2022, help="window start year (default: %(default)s)")
    p.add_argument("--st_month", type=int, default=10, help="window start month, 1-12 (default: %(default)s)")
    p.add_argument("--ed_year", type=int, default=2023, help="window end year (default: %(default)s)")
    p.add_argument("--ed_month", type=int, default=10, help="window end month, 1-12 (default: %(default)s)")
    p.add_argument("--window_size", type=int, default=20, help="history length of a sample (default: %(default)s)")
    p.add_argument("--data_root_dir", default="data", type=os.path.expanduser,
                   help="folder for raw files and the dataset (default: %(default)s)")
    p.add_argument("--postfix", default="", help="appended to the output folder name as _POSTFIX")
    p.add_argument("--base_url", default=os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL,
                   help=f"download host (default: ${BASE_URL_ENV}, else the McAuley Lab host)")
    return p.parse_args(argv)


def check_args(args):
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", args.category):
        raise UserError(f"--category {args.category!r} is not a category name — "
                        f"{known_categories_hint(args.category)}")
    for flag in ("st_year", "ed_year"):
        if not MIN_YEAR <= getattr(args, flag) <= MAX_YEAR:
            raise UserError(f"--{flag} {getattr(args, flag)} is outside {MIN_YEAR}-{MAX_YEAR} — pass "
                            f"a four-digit year such as 2022 (Amazon Reviews 2023 spans 1996-2023)")
    for flag in ("st_month", "ed_month"):
        if not 1 <= getattr(args, flag) <= 12:
            raise UserError(f"--{flag} {getattr(args, flag)} is outside 1-12 — pass a month number "
                            f"from 1 (January) to 12 (December)")
    if (args.ed_year, args.ed_month) < (args.st_year, args.st_month):
        raise UserError(f"the window ends ({args.ed_year}-{args.ed_month}) before it starts "
                        f"({args.st_year}-{args.st_month}) — pass an --ed_year/--ed_month at or "
                        f"after --st_year/--st_month")
    if not 1 <= args.window_size <= MAX_WINDOW_SIZE:
        raise UserError(f"--window_size {args.window_size} is outside 1-{MAX_WINDOW_SIZE} — pass the history "
                        f"length, e.g. 20")
    if args.K < 0:
        raise UserError(f"--K {args.K} is negative — pass 0 for no K-core filter, or a positive "
                        f"count")
    if args.postfix and not re.fullmatch(rf"[A-Za-z0-9_.\-]{{1,{MAX_POSTFIX}}}", args.postfix):
        raise UserError(f"--postfix {args.postfix!r} is not a plain name — use up to {MAX_POSTFIX} "
                        f"letters, digits, '_', '-' or '.' (no '/'), e.g. v2")
    check_base_url(args.base_url)
    check_data_root(args.data_root_dir)
    check_replaceable(dataset_folder(args))


def dataset_folder(args) -> str:
    return os.path.join(args.data_root_dir, dataset_name(
        args.category, args.K, args.st_year, args.st_month, args.ed_year, args.ed_month, args.postfix))


def check_replaceable(target, or_else=", or pass --postfix for a dataset folder of another name"):
    """An earlier dataset of the same name is replaced as a whole: refused when it holds anything
    preprocess.py does not write (a training run saved into it, say), or when it is no folder.
    `or_else` ends the fix: the way out other than moving things away (quickstart.py has no --postfix)."""
    if os.path.islink(target) or (os.path.exists(target) and not os.path.isdir(target)):
        kind = "a link" if os.path.islink(target) else "a file"
        raise UserError(f"{target} is {kind}, not a dataset folder, and the new dataset would replace it — move it "
                        f"away{or_else}")
    if not os.path.isdir(target):
        return
    foreign = sorted(name for name in set(os.listdir(target)) - set(DATASET_ENTRIES) if not name.startswith("."))
    if foreign:
        raise UserError(f"{target} holds {', '.join(foreign[:3])}{' …' if len(foreign) > 3 else ''}, which "
                        "preprocess.py did not write, and the new dataset replaces the folder as a whole — move "
                        f"them out of it{or_else}")


def check_base_url(url):
    """An http(s) URL with a host and a valid port, as requests will need it."""
    source = f"--base_url {url!r}"
    if os.environ.get(BASE_URL_ENV) == url:
        source += f" (from ${BASE_URL_ENV})"
    fix = "pass the mirror's address, e.g. https://mirror.example/amazon_2023/"
    try:
        parts = urllib.parse.urlsplit(url)
        if parts.port == 0:
            raise ValueError("port 0 is outside 1-65535")
        urllib3.util.parse_url(url)  # what requests parses it with: rejects spaces in the host too
    except (ValueError, urllib3.exceptions.HTTPError) as e:
        raise UserError(f"{source} is not a valid URL ({one_line(e)}) — {fix}") from e
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UserError(f"{source} is not an http(s) URL with a host — {fix}")


def check_data_root(root):
    """`root` is a folder we can write into, or can be created: raw files and the dataset go there."""
    check_not_blank("--data_root_dir", root, "pass a folder you can write to (it is created if missing), or leave "
                    "the flag out for ./data")
    problem = folder_problem(root)
    if problem:
        raise UserError(f"--data_root_dir {root} {problem} — pass a folder you can write to (it is "
                        f"created if missing)")


def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    import datasets  # slow import: only once the flags are known to be good

    datasets.disable_progress_bars()  # four "Saving the dataset" bars would bury the statistics
    missing = missing_folders(args.data_root_dir)
    try:
        ratings_path, meta_path = fetch_raw(args.category, args.data_root_dir, args.base_url)
    except UserError:
        for folder in missing:  # created for a download that failed: leave nothing behind
            if not os.path.isdir(folder) or os.listdir(folder):
                break
            os.rmdir(folder)
        raise

    with GzipLines(meta_path) as meta_lines:  # decompresses while the ratings are read
        ratings = read_ratings(ratings_path)
        rated = ratings["parent_asin"].unique().to_pylist()
        kept_lines = scan_metadata(meta_lines, rated, meta_path)
    samples, item_info, start, n_users = build_tables(
        ratings, kept_lines, (args.st_year, args.st_month), (args.ed_year, args.ed_month), args.K,
        args.window_size)
    n = samples.num_rows
    fix = "widen the window or lower --K" if args.K > 0 else "widen the window"
    if n == 0:
        raise UserError(f"the window {start[0]}-{start[1]} .. {args.ed_year}-{args.ed_month} with "
                        f"K={args.K} leaves no samples — {fix}")
    a, b = split_bounds(n)
    if a == b or b == n:
        raise UserError(f"the window {start[0]}-{start[1]} .. {args.ed_year}-{args.ed_month} with K={args.K} "
                        f"leaves {n} samples, too few for the 80/10/10 split to give valid and test any — {fix}")
    dataset = datasets.DatasetDict({
        "train": datasets.Dataset(samples.slice(0, a)),
        "valid": datasets.Dataset(samples.slice(a, b - a)),
        "test": datasets.Dataset(samples.slice(b, n - b)),
        "item_info": datasets.Dataset(item_info),
    })
    target = dataset_folder(args)
    n_items = item_info.num_rows - 1
    # SPEC's cleaning turns each non-ASCII character into a space: a title of those alone is blank.
    blank_titles = sum(not title.strip() for title in item_info["title"].to_pylist())
    record = {  # the folder's name keeps the requested start (SPEC §1); this keeps what was done
        "category": args.category, "K": args.K, "window_size": args.window_size,
        "requested_start": f"{args.st_year}-{args.st_month:02d}-01", "start": f"{start[0]}-{start[1]:02d}-01",
        "end": f"{args.ed_year}-{args.ed_month:02d}-01", "users": n_users, "items": n_items,
        "interactions": n, "train": a, "valid": b - a, "test": n - b, "blank_titles": blank_titles,
    }

    def write(folder):
        # one shard per split: the default writes no file at all for an empty split
        dataset.save_to_disk(folder, num_shards={s: 1 for s in dataset})
        write_json(os.path.join(folder, PREPROCESS_RECORD), record)

    try:
        save_atomically(write, target)
    except OSError as e:  # disk full, or the folder changed since check_args
        raise UserError(f"cannot write {target} ({e.strerror or e}) — free some space or pass a "
                        f"writable --data_root_dir") from e

    if start != (args.st_year, args.st_month):
        why = (f"to reach {MIN_WINDOW_ITEMS:,} items" if n_items >= MIN_WINDOW_ITEMS else
               f"still under {MIN_WINDOW_ITEMS:,} items: stopped in the earliest rating's year")
        print(f"window start moved back to {start[0]}-{start[1]:02d}-01 ({why})")
    print(f"users: {n_users:,}  items: {n_items:,}  interactions: {n:,}")
    print(f"train: {a:,}  valid: {b - a:,}  test: {n - b:,}")
    if blank_titles:
        print(f"{blank_titles:,} items have a title that cleaning left blank (only non-ASCII characters or markup, "
              "SPEC §1): prompts show them without a name")
    print(f"saved to {target}")
    return target


if __name__ == "__main__":
    run_cli(main)
