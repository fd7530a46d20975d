"""Writes the ingest-format fixtures under tests/data/ from the real slices next to it (run once; output is committed).

- `recbole-mini/`: all of amazon-food-kitchen-mini as atomic files. `food.inter` + `food.item` (RecBole: one
  interaction per row), `kitchen.inter` + `kitchen.text` (UniSRec: one row per user, the kitchen history in
  time order as `item_id_list` and its last item as `item_id`). The format has no quoting, so tabs and newlines
  inside titles become spaces, as RecBole's own conversion scripts do.
- `amazon2023-mini/`: every KEEP_EVERY-th user of amazon-art-office-mini as Amazon Reviews 2023 JSONL, one
  reviews + meta file per category; timestamps become ms (1_600_000_000_000 + ordinal * 1000), attributes the
  one-entry `categories` list. Fields the slice lacks (rating, store, ...) are left out. Items are the reviewed
  ones plus a few never reviewed; the meta row of one office item reviewed once is dropped, so that review has
  no meta (the adapter must count it as skipped).
- `jsonl-mini/`: the same users and items in crossrec's own schema as `items.jsonl` + `interactions.jsonl`.

Stdlib only: `python tests/data/make_format_fixtures.py`.
"""
import csv
import json
from collections import Counter
from pathlib import Path

HERE = Path(__file__).parent
KEEP_EVERY = 4  # art-office users kept: keeps each folder well under 400 KB
UNREVIEWED_ITEMS = 5  # per domain: meta rows nobody reviewed must stay items
CATEGORY = {"arts": "Arts_Crafts_and_Sewing", "office": "Office_Products"}
MS_BASE = 1_600_000_000_000


def load(name: str) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    folder = HERE / name
    with open(folder / "items.csv", newline="", encoding="utf-8") as f:
        items = list(csv.DictReader(f))
    with open(folder / "interactions.csv", newline="", encoding="utf-8") as f:
        inters = list(csv.DictReader(f))
    return items, inters


def tsv_value(text: str) -> str:
    return text.replace("\t", " ").replace("\r", " ").replace("\n", " ")


def write_tsv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write("\t".join(header) + "\n")
        for row in rows:
            f.write("\t".join(tsv_value(v) for v in row) + "\n")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def recbole(items: list[dict[str, str]], inters: list[dict[str, str]]) -> None:
    out = HERE / "recbole-mini"
    out.mkdir(exist_ok=True)
    food = [r for r in inters if r["domain"] == "food"]
    write_tsv(out / "food.inter", ["user_id:token", "item_id:token", "timestamp:float"],
              [[r["user_id"], r["item_id"], r["timestamp"]] for r in food])
    write_tsv(out / "food.item", ["item_id:token", "title:token_seq"],
              [[r["item_id"], r["title"]] for r in items if r["domain"] == "food"])
    histories: dict[str, list[tuple[int, str]]] = {}
    for r in inters:
        if r["domain"] == "kitchen":
            histories.setdefault(r["user_id"], []).append((int(r["timestamp"]), r["item_id"]))
    rows = []
    for user, hist in histories.items():
        seq = [item for _, item in sorted(hist, key=lambda p: p[0])]
        rows.append([user, " ".join(seq[:-1]), seq[-1]])
    write_tsv(out / "kitchen.inter", ["user_id:token", "item_id_list:token_seq", "item_id:token"], rows)
    write_tsv(out / "kitchen.text", ["item_id:token", "text:token_seq"],
              [[r["item_id"], r["title"]] for r in items if r["domain"] == "kitchen"])


def art_office_subset(items: list[dict[str, str]],
                      inters: list[dict[str, str]]) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    order: dict[str, int] = {}
    for r in inters:
        order.setdefault(r["user_id"], len(order))
    kept = [r for r in inters if order[r["user_id"]] % KEEP_EVERY == 0]
    used = {r["item_id"] for r in kept}
    extra: Counter[str] = Counter()
    kept_items = []
    for r in items:
        if r["item_id"] in used:
            kept_items.append(r)
        elif extra[r["domain"]] < UNREVIEWED_ITEMS:
            extra[r["domain"]] += 1
            kept_items.append(r)
    return kept_items, kept


def amazon2023(items: list[dict[str, str]], inters: list[dict[str, str]]) -> None:
    out = HERE / "amazon2023-mini"
    out.mkdir(exist_ok=True)
    counts = Counter(r["item_id"] for r in inters)
    no_meta = next(r["item_id"] for r in inters if r["domain"] == "office" and counts[r["item_id"]] == 1)
    for domain, category in CATEGORY.items():
        write_jsonl(out / f"{category}.jsonl", [
            {"user_id": r["user_id"], "asin": r["item_id"], "parent_asin": r["item_id"],
             "timestamp": MS_BASE + int(r["timestamp"]) * 1000}
            for r in inters if r["domain"] == domain])
        write_jsonl(out / f"meta_{category}.jsonl", [
            {"title": r["title"], "categories": [r["attributes"]], "parent_asin": r["item_id"]}
            for r in items if r["domain"] == domain and r["item_id"] != no_meta])
    print(f"amazon2023-mini: review of {no_meta} has no meta row")


def jsonl(items: list[dict[str, str]], inters: list[dict[str, str]]) -> None:
    out = HERE / "jsonl-mini"
    out.mkdir(exist_ok=True)
    write_jsonl(out / "items.jsonl", items)
    write_jsonl(out / "interactions.jsonl", [{**r, "timestamp": int(r["timestamp"])} for r in inters])


def main() -> None:
    recbole(*load("amazon-food-kitchen-mini"))
    subset = art_office_subset(*load("amazon-art-office-mini"))
    amazon2023(*subset)
    jsonl(*subset)
    for name in ("recbole-mini", "amazon2023-mini", "jsonl-mini"):
        size = sum(p.stat().st_size for p in (HERE / name).iterdir())
        print(f"{name}: {size / 1000:.0f} KB")


if __name__ == "__main__":
    main()
