"""Peak memory of `crossrec prepare` on synthetic interactions files (docs/RESULTS.md "Ingest memory";
older single-size runs: docs/RELIABILITY.md "Ingest memory").

    python bench/ingest_memory.py [--rows 5000000 [20000000 ...]] [--items 200000] [--users 500000]
                                  [--format csv|jsonl|parquet] [--work /tmp/crossrec-ingest-bench] [--repeat 1]
                                  [--keep] [-- PREPARE_OPTIONS...]

For each row count, writes items + interactions in crossrec's own schema (two domains, ids like real Amazon ones,
seeded), then runs `crossrec prepare` in a subprocess under `/usr/bin/time -v` and prints one table row: rows,
input size, wall time, peak resident memory (the kernel's maximum RSS of the prepare process), the output's size
and content hash. Options after `--` go to `crossrec prepare` (e.g. `--partition-rows 500000`). The files are
reused when they already exist with the same parameters; `--keep` keeps the prepared output (else removed).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

DOMAINS = ("books", "movies")
CHUNK = 1_000_000  # rows generated at a time, so the generator itself stays small


def _items(n: int) -> pa.Table:
    ids = [f"B{i:09d}" for i in range(n)]
    return pa.table(
        {
            "item_id": ids,
            "domain": [DOMAINS[i % 2] for i in range(n)],
            "title": [f"synthetic item {i} of a long enough title" for i in range(n)],
        }
    )


def _interactions(rng: np.random.Generator, start: int, n: int, n_users: int, n_items: int) -> pa.Table:
    items = rng.integers(0, n_items, n)
    users = rng.integers(0, n_users, n)
    ts = 1_500_000_000_000 + rng.integers(0, 10**10, n)
    return pa.table(
        {
            "user_id": pa.array(np.char.add("AE", np.char.zfill(users.astype(str), 26))),
            "item_id": pa.array(np.char.add("B", np.char.zfill(items.astype(str), 9))),
            "domain": pa.array(np.asarray(DOMAINS, dtype=object)[items % 2].tolist(), pa.string()),
            "timestamp": pa.array(ts, pa.int64()),
            "rating": pa.array(rng.integers(1, 6, n).astype(np.float64)),
        }
    )


def generate(folder: Path, rows: int, n_items: int, n_users: int, fmt: str) -> Path:
    params = {"rows": rows, "items": n_items, "users": n_users, "format": fmt}
    stamp = folder / "params.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == params:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    items = _items(n_items)
    inter = folder / f"interactions.{fmt}"
    if fmt == "csv":
        pacsv.write_csv(items, folder / "items.csv")
        with pacsv.CSVWriter(inter, _interactions(rng, 0, 1, n_users, n_items).schema) as w:
            for start in range(0, rows, CHUNK):
                w.write_table(_interactions(rng, start, min(CHUNK, rows - start), n_users, n_items))
    elif fmt == "parquet":
        pq.write_table(items, folder / "items.parquet")
        with pq.ParquetWriter(inter, _interactions(rng, 0, 1, n_users, n_items).schema) as w:
            for start in range(0, rows, CHUNK):
                w.write_table(_interactions(rng, start, min(CHUNK, rows - start), n_users, n_items))
    elif fmt == "jsonl":
        with open(folder / "items.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in items.to_pylist())
        with open(inter, "w") as f:
            for start in range(0, rows, CHUNK):
                f.writelines(
                    json.dumps(r) + "\n"
                    for r in _interactions(rng, start, min(CHUNK, rows - start), n_users, n_items).to_pylist()
                )
    else:
        raise SystemExit(f"--format must be csv, jsonl or parquet, got {fmt!r}")
    stamp.write_text(json.dumps(params))
    return folder


def measure(src: Path, out: Path, extra: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB) of one `crossrec prepare SRC --out OUT --force --quiet EXTRA...`."""
    cmd = [
        "/usr/bin/time",
        "-v",
        sys.executable,
        "-m",
        "crossrec_cli",
        "prepare",
        str(src),
        "--out",
        str(out),
        "--force",
        "--quiet",
        *extra,
    ]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"prepare failed ({r.returncode}):\n{r.stderr[-3000:]}")
    match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr)
    assert match is not None, r.stderr[-3000:]
    return wall, int(match.group(1)) / 1024


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[5_000_000])
    p.add_argument("--items", type=int, default=200_000)
    p.add_argument("--users", type=int, default=500_000)
    p.add_argument("--format", default="csv")
    p.add_argument("--work", type=Path, default=Path("/tmp/crossrec-ingest-bench"))
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--keep", action="store_true", help="keep the prepared datasets (WORK/out-ROWS)")
    a = p.parse_args(argv)
    print(
        f"| format | interactions | input MiB | wall s (median of {a.repeat}) | peak RSS MiB (median) | output MiB | content hash |"
    )
    print("|---|---:|---:|---:|---:|---:|---|")
    for rows in a.rows:
        src = generate(a.work / f"src-{a.format}-{rows}", rows, a.items, a.users, a.format)
        size = sum(f.stat().st_size for f in src.iterdir()) / 2**20
        out = a.work / f"out-{rows}"
        runs = [measure(src, out, extra) for _ in range(a.repeat)]
        manifest = json.loads((out / "manifest.json").read_text())
        out_size = sum(f.stat().st_size for f in out.iterdir()) / 2**20
        if not a.keep:
            shutil.rmtree(out)
        print(
            f"| {a.format} | {rows:,} | {size:,.0f} | {statistics.median(w for w, _ in runs):.1f} | "
            f"{statistics.median(m for _, m in runs):,.0f} | {out_size:,.0f} | {manifest['content_hash'][:12]} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
