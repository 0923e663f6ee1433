"""Benchmark of preprocess.py on a CDs_and_Vinyl-sized synthetic raw pair: wall time and peak RSS.

Writes `CDs_and_Vinyl.csv.gz` (≈1.6M ratings, 123.9K users, 89.4K rated items, timestamps in ms,
most before 2019 so the window backs off a few times) and `meta_CDs_and_Vinyl.jsonl.gz` (≈319K
lines, ~2.2 KB each like real ones, with the mess real files have: missing/null/long/`<span id`/
entity-laden/non-ASCII titles, null and odd prices, rated items without metadata, repeated lines),
then runs the default preprocess command on them in a child process. Run from the repo root:

    python bench/bench_preprocess.py                # generates once into /tmp/r2ec_bench, then times
    python bench/bench_preprocess.py --runs 3       # best of three

Targets (2-core machine): ≤ 20 s wall, ≤ 1 GB peak RSS. Figures go in bench/RESULTS.md.
"""
import argparse
import calendar
import gzip
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
import pandas as pd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, ROOT)  # errors.py
from errors import UserError, run_cli  # noqa: E402
CATEGORY = "CDs_and_Vinyl"
N_USERS, N_RATED_ITEMS, N_RATINGS, N_META_LINES = 123_900, 89_400, 1_600_000, 320_000
VOCABULARY = 3000  # random pseudo-words: text that compresses about as well as real descriptions
WORDS = ("love night blue river heart soul live best collection remastered deluxe edition vinyl "
         "jazz rock blues symphony concerto greatest hits songs orchestra quartet piano guitar "
         "summer winter moon sun dream road home city fire rain gold silver black white album "
         "sessions anthology original soundtrack motion picture volume part one two three").split()


def random_ids(rng, n, prefix, length):
    alphabet = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"))
    body = alphabet[rng.integers(0, len(alphabet), size=(n, length - len(prefix)))]
    return np.unique(np.char.add(prefix, np.apply_along_axis("".join, 1, body)))[:n]


def write_ratings(rng, path, asins):
    """Ratings grouped by user, each user's sorted by time, as the real rating_only files are."""
    per_user = 5 + rng.geometric(1 / (N_RATINGS / N_USERS - 4), size=N_USERS) - 1
    per_user = np.round(per_user * N_RATINGS / per_user.sum()).astype(int).clip(5)
    users = np.repeat(random_ids(rng, N_USERS, "A", 28), per_user)
    popularity = 1 / np.arange(1, len(asins) + 1) ** 0.8
    items = rng.choice(len(asins), size=len(users), p=popularity / popularity.sum())
    years = np.arange(1998, 2024)
    weight = np.exp(-((years - 2014) / 5.0) ** 2) + 0.002
    # each user is active for a while around a year drawn from a bell over 1998-2023
    year = np.repeat(rng.choice(years, size=N_USERS, p=weight / weight.sum()), per_user)
    start = np.array([calendar.timegm((y, 1, 1, 0, 0, 0)) * 1000 for y in years])[year - years[0]]
    spread = rng.exponential(200 * 86_400_000, size=len(users)).astype(np.int64)
    ms = np.minimum(start + spread, 1_696_000_000_000)
    frame = pd.DataFrame({"user_id": users, "parent_asin": asins[items],
                          "rating": rng.integers(1, 6, size=len(users)).astype(float),
                          "timestamp": ms})
    frame = frame.sort_values(["user_id", "timestamp"], kind="stable")
    frame.to_csv(path, index=False, compression={"method": "gzip", "compresslevel": 6, "mtime": 0})


def title_for(rng, i):
    kind = i % 50
    words = " ".join(rng.choice(WORDS, size=rng.integers(2, 9)))
    if kind == 0:
        return None
    if kind == 1:
        return f'<span id="x">{words}</span>'
    if kind == 2:
        return " ".join(rng.choice(WORDS, size=25))
    if kind == 3:
        return f'&quot;{words}&quot; &amp; Friends'
    if kind == 4:
        return f"Café {words} — Live™"
    return words.title()


def price_for(rng, i):
    kind = i % 20
    if kind < 6:
        return None
    if kind == 6:
        return "—"
    if kind == 7:
        return "from 12.99"
    if kind == 8:
        return "24.50"
    return round(float(rng.uniform(3, 60)), 2)


def write_metadata(rng, path, rated_asins):
    """Metadata of every item of the category; 1% of rated items have none, a few lines repeat."""
    extra = random_ids(rng, N_META_LINES, "B1", 10)[: N_META_LINES - len(rated_asins)]
    listed = np.concatenate([rated_asins[rng.random(len(rated_asins)) > 0.01], extra])
    listed = listed[rng.permutation(len(listed))]
    sentence = " ".join(WORDS)
    vocabulary = random_ids(rng, VOCABULARY, "", 7)
    vocabulary = np.char.lower(np.char.add(vocabulary, np.where(np.arange(VOCABULARY) % 3, "s", "")))
    image_ids = random_ids(rng, 200_000, "", 11)
    with gzip.GzipFile(path, "wb", compresslevel=6, mtime=0) as f:
        for i, asin in enumerate(listed):
            text = " ".join(vocabulary[rng.integers(0, VOCABULARY, size=40 + i % 80)])
            image = image_ids[rng.integers(0, len(image_ids), size=5)]
            meta = {
                "main_category": "Digital Music", "title": title_for(rng, i),
                "subtitle": "Audio CD" if i % 3 else None,
                "average_rating": round(float(rng.uniform(1, 5)), 1),
                "rating_number": int(rng.integers(1, 5000)),
                "features": [sentence[: 80 + i % 40]] if i % 4 == 0 else [],
                "description": [f"<b>{text}</b> &amp; more", text, text][: i % 4],
                "price": price_for(rng, i),
                "images": [{"thumb": f"https://m.media-amazon.com/images/I/{image[k]}._SS40_.jpg",
                            "large": f"https://m.media-amazon.com/images/I/{image[k]}.jpg",
                            "variant": "MAIN" if k == 0 else f"PT0{k}",
                            "hi_res": f"https://m.media-amazon.com/images/I/{image[k]}._SL1500_.jpg"}
                           for k in range(1 + i % 5)],
                "videos": [], "store": f"Artist {i % 997} (Artist)  Format: Audio CD",
                "categories": ["CDs & Vinyl", "Rock"] if i % 2 else [],
                "details": {"Label": "Records", "Number of discs": 1 + i % 3,
                            "Date First Available": "March 3, 2011"},
                "parent_asin": str(asin), "bought_together": None,
            }
            line = (json.dumps(meta) + "\n").encode()
            f.write(line)
            if i % 5000 == 0:
                f.write(line)  # repeated line


def generate(folder):
    rng = np.random.default_rng(0)
    os.makedirs(folder, exist_ok=True)
    asins = random_ids(rng, N_RATED_ITEMS, "B0", 10)
    write_ratings(rng, os.path.join(folder, f"{CATEGORY}.csv.gz"), asins)
    write_metadata(rng, os.path.join(folder, f"meta_{CATEGORY}.jsonl.gz"), asins)


def main():
    p = argparse.ArgumentParser(description="Time preprocess.py on a CDs_and_Vinyl-sized input.")
    p.add_argument("--data_dir", default="/tmp/r2ec_bench", help="where the synthetic pair lives")
    p.add_argument("--runs", type=int, default=1, help="timed runs; the best is reported")
    args = p.parse_args()
    if args.runs < 1:
        raise UserError(f"--runs {args.runs}: must be at least 1 (the default is 1)")
    raw = [os.path.join(args.data_dir, n) for n in (f"{CATEGORY}.csv.gz", f"meta_{CATEGORY}.jsonl.gz")]
    if not all(os.path.exists(path) for path in raw):
        t = time.perf_counter()
        generate(args.data_dir)
        print(f"generated the raw pair in {time.perf_counter() - t:.0f} s")
    print(", ".join(f"{os.path.basename(path)} {os.path.getsize(path) / 2**20:.0f} MiB" for path in raw))
    command = [sys.executable, os.path.join(ROOT, "preprocess.py"), "--category", CATEGORY,
               "--K", "0", "--st_year", "2022", "--st_month", "10", "--ed_year", "2023",
               "--ed_month", "10", "--window_size", "20", "--data_root_dir", args.data_dir]
    walls = []
    for _ in range(args.runs):
        t = time.perf_counter()
        if subprocess.run(command).returncode != 0:
            raise UserError(f"preprocess.py failed on the synthetic pair in {args.data_dir!r} (its error is above) "
                            "— fix it, or delete the folder to generate the pair again")
        walls.append(time.perf_counter() - t)
    # ru_maxrss of the children is the largest peak among the preprocess runs (KiB on Linux);
    # CPU time (user + sys, both cores) does not depend on what else the machine is running
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(f"wall: best {min(walls):.1f} s of {args.runs} ({', '.join(f'{w:.1f}' for w in walls)})"
          f"  CPU per run: {(usage.ru_utime + usage.ru_stime) / args.runs:.1f} s"
          f"  peak RSS: {usage.ru_maxrss / 2**10:.0f} MiB  load average: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    run_cli(main)
