"""Cuts the small real slices under tests/data/ from ../shared/data (run once; the output is committed).

Each slice keeps every k-th user of a shared dataset (in file order, so all source files are sampled), all
their interactions, and the
items they touched plus a few untouched items of each domain (full ranking must cover never-seen items).
"""
import csv
import sys
from pathlib import Path

HERE = Path(__file__).parent
SHARED = HERE.parents[2] / "shared" / "data"


def cut(name: str, stride: int, extra_items: int = 20) -> None:
    src, dst = SHARED / name, HERE / f"{name}-mini"
    dst.mkdir(exist_ok=True)
    with open(src / "interactions.csv", newline="", encoding="utf-8") as f:
        rd = csv.reader(f)
        header = next(rd)
        order, keep, rows = {}, set(), []
        for row in rd:
            if row[0] not in order:
                order[row[0]] = len(order)
                if order[row[0]] % stride == 0:
                    keep.add(row[0])
            if row[0] in keep:
                rows.append(row)
        users = keep
    used = {r[1] for r in rows}
    with open(src / "items.csv", newline="", encoding="utf-8") as f:
        rd = csv.reader(f)
        iheader = next(rd)
        items, extra = [], {}
        for row in rd:
            if row[0] in used:
                items.append(row)
            elif extra.get(row[1], 0) < extra_items:
                extra[row[1]] = extra.get(row[1], 0) + 1
                items.append(row)
    for fname, head, body in (("interactions.csv", header, rows), ("items.csv", iheader, items)):
        with open(dst / fname, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(head)
            w.writerows(body)
    print(f"{dst}: {len(users)} users, {len(items)} items, {len(rows)} interactions")


if __name__ == "__main__":
    cut("amazon-art-office", int(sys.argv[1]) if len(sys.argv) > 1 else 64)
    cut("amazon-food-kitchen", int(sys.argv[2]) if len(sys.argv) > 2 else 130)
