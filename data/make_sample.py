"""Writes the committed sample raw pair data/sample/{Video_Games.csv.gz, meta_Video_Games.jsonl.gz}.

Same format as the Amazon Reviews 2023 files preprocess.py downloads, small enough to commit and
to train on a CPU in minutes, deterministic (fixed seed, gzip mtime 0). Run from the repo root:

    python data/make_sample.py                      # rewrites data/sample/
    python preprocess.py --category Video_Games --data_root_dir data/sample

What is inside:
- learnable structure: 8 genres of 30 games each, every title naming its genre ("... Racing ...",
  "... Puzzle ..."); each user has a favourite genre and buys 85% of the time within it, in time
  order, and rates those games higher;
- the mess the item filter must handle: titles missing, null, with `<span id`, over 20 words,
  one character long, entity-laden (`&quot;`, `&amp;`, `&#39;`), with tags, tabs, newlines and
  non-ASCII characters; prices null, "—", "from 12.99", numeric strings; rated items without
  metadata and metadata lines without ratings; a repeated metadata line and repeated rating rows;
  ratings before and after the window and exactly on its bounds; timestamps in ms.
With fewer than 10,000 items the window start backs off from 2022-10 to 2021-10 (the earliest
rating is from 2021), so the dataset covers 2021-10-01 .. 2023-10-01.
"""
import argparse
import calendar
import gzip
import json
import os
import random

CATEGORY = "Video_Games"
SEED = 7
GENRES = {
    "Racing": ["Turbo", "Nitro", "Drift", "Rally", "Street", "Kart", "Speedway", "Grand Prix"],
    "Puzzle": ["Brain", "Logic", "Block", "Tile", "Crossword", "Jigsaw", "Riddle", "Maze"],
    "Horror": ["Haunted", "Zombie", "Nightmare", "Dead", "Crypt", "Shadow", "Cursed", "Asylum"],
    "Soccer": ["Goal", "Striker", "League", "Stadium", "Penalty", "Cup", "Derby", "Pitch"],
    "Fantasy RPG": ["Dragon", "Kingdom", "Sword", "Legend", "Elven", "Rune", "Crown", "Quest"],
    "Space Shooter": ["Galaxy", "Star", "Laser", "Nebula", "Orbit", "Comet", "Astro", "Meteor"],
    "Farming": ["Harvest", "Ranch", "Meadow", "Orchard", "Barn", "Village", "Garden", "Valley"],
    "Fighting": ["Fist", "Brawl", "Combat", "Arena", "Dojo", "Knockout", "Martial", "Tiger"],
}
NOUNS = ["Legends", "Champions", "Deluxe", "Chronicles", "Masters", "Saga", "Edition", "World",
         "Heroes", "Unleashed"]
PLATFORMS = ["PlayStation 5", "Nintendo Switch", "Xbox Series X", "PC", "PlayStation 4"]
GAMES_PER_GENRE = 30
N_USERS = 360
STAY_IN_GENRE = 0.85
ALPHANUMERIC = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
MISSING = object()  # an override that removes the key from the metadata line


def ms(year, month, day, hour=0, minute=0, second=0, milli=0):
    return calendar.timegm((year, month, day, hour, minute, second)) * 1000 + milli


WINDOW_START, WINDOW_END = ms(2021, 10, 1), ms(2023, 10, 1)  # after the back-off (see docstring)


def new_id(rng, prefix, length, taken):
    while True:
        made = prefix + "".join(rng.choice(ALPHANUMERIC) for _ in range(length - len(prefix)))
        if made not in taken:
            taken.add(made)
            return made


def meta_line(rng, item, **overrides):
    """One metadata line for `item` = (asin, genre, title, price), keys in the real files' order."""
    asin, genre, title, price = item
    meta = {
        "main_category": "Video Games",
        "title": title,
        "subtitle": None,
        "average_rating": round(rng.uniform(3.0, 5.0), 1),
        "rating_number": rng.randint(3, 4000),
        "features": [f"A {genre.lower()} game for 1-{rng.randint(1, 4)} players",
                     f"Rated {rng.choice(['E', 'T', 'M'])}"],
        "description": [f"The {genre.lower()} game everyone is talking about.",
                        f"Includes {rng.randint(5, 60)} levels."],
        "price": price,
        "images": [{"thumb": f"https://m.media-amazon.com/images/I/{asin}._SS40_.jpg",
                    "large": f"https://m.media-amazon.com/images/I/{asin}.jpg",
                    "variant": "MAIN", "hi_res": None}],
        "videos": [],
        "store": rng.choice(["Nintendo", "Sony", "Microsoft", "SEGA", "Capcom &amp; Co"]),
        "categories": ["Video Games", genre],
        "details": {"Release date": f"{rng.choice(['March', 'June', 'October'])} 1, 2020",
                    "ESRB": rng.choice(["Everyone", "Teen", "Mature"])},
        "parent_asin": asin,
        "bought_together": None,
    }
    meta.update(overrides)
    return json.dumps({k: v for k, v in meta.items() if v is not MISSING})


def catalogue(rng, taken):
    """(games by genre: list of (asin, genre), metadata lines in file order, asins to rate that the
    filter drops or that have no metadata)."""
    games, lines = {g: [] for g in GENRES}, []
    for genre, words in GENRES.items():
        titles = set()
        while len(titles) < GAMES_PER_GENRE:
            titles.add(f"{rng.choice(words)} {genre} {rng.choice(NOUNS)} {rng.randint(1, 4)}")
        for title in sorted(titles):
            asin = new_id(rng, "B0", 10, taken)
            games[genre].append((asin, genre))
            lines.append((asin, genre, f"{title} - {rng.choice(PLATFORMS)}",
                          round(rng.uniform(9.99, 69.99), 2)))
    rng.shuffle(lines)  # metadata order is not genre order

    # mess that survives the filter and is cleaned: rewrite some kept titles and prices
    survivable = [
        lambda t: f'&quot;{t}&quot;',                          # quotes stripped after unescaping
        lambda t: f"  {t} &amp; Friends  ",                      # spaces stripped, &amp; -> &
        lambda t: f"{t} &#39;Gold&#39; <b>Edition</b>",         # html.unescape + tag removal
        lambda t: f"{t}\tDirector\u2019s Cut\n",                 # tab/newline, non-ASCII quote
        lambda t: f"Pok\u00e9mon-style {t} \u2122",              # non-ASCII letters and symbols
    ]
    for i in range(0, 60, 3):
        asin, genre, title, price = lines[i]
        lines[i] = (asin, genre, survivable[i // 3 % len(survivable)](title),
                    "29.99" if i % 2 else 20)                   # numeric string / integer price
    text = [meta_line(rng, line) for line in lines]
    text[7] = meta_line(rng, lines[7], subtitle="Standard Edition")
    text[9] = meta_line(rng, lines[9], subtitle=MISSING)
    text[11] = meta_line(rng, lines[11], description=["<p>Twice.</p>", "Once.", "<p>Twice.</p>"])

    # rated items the filter drops, one genre each so their ratings look real
    doomed = []
    dropping = [
        {"title": MISSING}, {"title": None}, {"title": '<span id="parseTitle">Racing Kit</span>'},
        {"title": " ".join(["Extended"] * 12 + ["Horror", "Collection"] * 5)}, {"title": '"X"'},
        {"price": None}, {"price": "\u2014"}, {"price": "from 12.99"}, {"price": None},
        {"title": "Soccer Pro &quot;Ultimate&quot; " + "Bundle " * 18},
    ]
    for i, overrides in enumerate(dropping):
        genre = list(GENRES)[i % len(GENRES)]
        asin = new_id(rng, "B0", 10, taken)
        doomed.append((asin, genre))
        title = f"{GENRES[genre][0]} {genre} Classic - PC"
        text.insert(rng.randrange(len(text)), meta_line(rng, (asin, genre, title, 14.99), **overrides))
    no_meta = [(new_id(rng, "B0", 10, taken), list(GENRES)[i]) for i in range(6)]
    for i in range(30):  # metadata of items nobody rated
        genre = list(GENRES)[i % len(GENRES)]
        item = (new_id(rng, "B0", 10, taken), genre, f"{genre} Collector Pack {i}", 39.99)
        text.insert(rng.randrange(len(text)), meta_line(rng, item))
    text.insert(40, text[20])  # a repeated line: the first one counts
    return games, text, doomed + no_meta


def user_ratings(rng, user, games, extra):
    """One user's ratings: a favourite genre, mostly followed, in time order."""
    genres = list(GENRES)
    favourite = rng.choice(genres)
    length = 3 + min(int(rng.expovariate(1 / 5)), 22)
    if rng.random() < 0.25:  # some users start before the window or run past its end
        t = rng.randint(ms(2021, 2, 1), ms(2021, 9, 1))
    else:
        t = rng.randint(WINDOW_START, ms(2023, 8, 1))
    rows, bought = [], set()
    for _ in range(length):
        if rng.random() < STAY_IN_GENRE:
            genre = favourite
        else:
            genre = rng.choice(genres)
        pool = [g for g in games[genre] if g[0] not in bought] or games[genre]
        weights = [1 / (1 + k) ** 0.7 for k in range(len(pool))]  # a few hits per genre
        asin = rng.choices(pool, weights)[0][0]
        if rng.random() < 0.03 and extra:
            asin = rng.choice(extra)[0]
        bought.add(asin)
        rating = float(rng.choice([4, 5, 5]) if genre == favourite else rng.choice([1, 2, 3, 4]))
        rows.append([user, asin, rating, t])
        t += int(rng.expovariate(1 / (25 * 86_400_000))) + rng.randint(0, 999)
    return rows


def ratings_rows(rng, games, extra, taken):
    rows = []
    for _ in range(N_USERS):
        rows += user_ratings(rng, new_id(rng, "A", 28, taken), games, extra)
    # exact bounds and their neighbours: 2021-10-01 00:00:00.000 and 2023-10-01 00:00:00.000 are in
    edge_user = new_id(rng, "A", 28, taken)
    racing = [g[0] for g in games["Racing"]]
    for t, asin in [(WINDOW_START - 1, racing[0]), (WINDOW_START, racing[1]),
                    (WINDOW_START + 3_600_000, racing[2]), (WINDOW_END, racing[3]),
                    (WINDOW_END + 1, racing[4])]:
        rows.append([edge_user, asin, 5.0, t])
    rows.append(list(rows[5]))  # repeated rows, as the filter must tolerate
    rows.append(list(rows[17]))
    rows[30][3] = rows[31][3]  # a timestamp tie inside one user: file order decides
    rows[40], rows[42] = rows[42], rows[40]  # one user's rows out of time order in the file
    assert rows[30][0] == rows[31][0] and rows[40][0] == rows[42][0]
    return rows


def write_gzip(path, text):
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", filename="", mtime=0) as f:
        f.write(text.encode())


def main():
    p = argparse.ArgumentParser(description="Write the sample Amazon-format raw pair.")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "sample"),
                   help="output folder (default: data/sample next to this script)")
    args = p.parse_args()
    rng, taken = random.Random(SEED), set()
    games, meta, extra = catalogue(rng, taken)
    rows = ratings_rows(rng, games, extra, taken)
    os.makedirs(args.out, exist_ok=True)
    write_gzip(os.path.join(args.out, f"meta_{CATEGORY}.jsonl.gz"), "".join(m + "\n" for m in meta))
    write_gzip(os.path.join(args.out, f"{CATEGORY}.csv.gz"),
               "user_id,parent_asin,rating,timestamp\n"
               + "".join(f"{u},{a},{r},{t}\n" for u, a, r, t in rows))
    print(f"wrote {len(meta)} metadata lines and {len(rows)} ratings to {args.out}")


if __name__ == "__main__":
    main()
