"""Which approximate nearest-neighbour library for crossrec's retrieval (issue 24, item 1): faiss-cpu (HNSW and
IVF-Flat, inner product), hnswlib (space 'ip') and usearch (metric 'ip', f32 / i8) against exact search, on a
synthetic catalog shaped like crossrec's item vectors. docs/ANN.md has the results and the choice.

Catalog: item vector = [unit learned part (--dim, 64) | unit MiniLM text part (384)], every item of norm sqrt 2.
The text parts are drawn around the real MiniLM vectors of a prepared dataset's catalog (--base, an (n, 384) .npy:
a random real item plus Gaussian noise of norm --noise, renormalised), the learned part is a fixed random linear
map of the text part plus noise, renormalised (a stand-in for the adaptor). Queries (--queries users) are
recency-weighted means of 1-10 random catalog items, [learned mean / 0.2 | 10 * normalised text mean], norms like
real user vectors. Ground truth: exact top-10 by matmul.

Per library and N: build time (2 threads), recall@10 against exact, single-query latency p50/p99 with 1 search
thread (one query at a time, as a Serve replica answers a request), index size on disk, RSS of a fresh process
after a full load and after a memory-mapped load plus --queries searches (anonymous vs file-backed, the latter is
page cache shared between replicas), adding --add new items after a full load and after an mmap load. HNSW
indexes are built once per (M, ef_construction) and ef_search is swept: the row kept is the lowest-p99 setting
with recall@10 >= --target. Exact search: torch matmul + topk per query with 1 and 2 threads.

Needs faiss-cpu, hnswlib, usearch (not in the project's venv; see docs/ANN.md for the venv used) and torch:

    python bench/ann_libraries.py --base /tmp/ann/ao_minilm.npy --n 40000 300000 --json out.json
    python bench/ann_libraries.py --base /tmp/ann/ao_minilm.npy --n 1000000 --libs faiss-hnsw hnswlib usearch-f32

`--base` is made by embedding a prepared dataset's catalog with crossrec's own code (see docs/ANN.md).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

K = 10

# (M, ef_construction) builds and the ef_search sweep; IVF: nlist factor and the nprobe sweep.
HNSW_BUILDS = [(16, 100)]  # --hnsw
EF_SWEEP = [16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512]
NPROBE_SWEEP = [4, 8, 12, 16, 24, 32, 48, 64, 96, 128]


# ---------------------------------------------------------------- data


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make_catalog(base: np.ndarray, n: int, dim: int, noise: float, seed: int) -> np.ndarray:
    """(n, dim + 384) float32 items; the same seed gives the same map W for every n."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((base.shape[1], dim)).astype(np.float32) / np.sqrt(base.shape[1])
    out = np.empty((n, dim + base.shape[1]), np.float32)
    for s in range(0, n, 100_000):
        m = min(100_000, n - s)
        parent = base[rng.integers(0, len(base), m)]
        text = unit(parent + rng.standard_normal(parent.shape).astype(np.float32) * (noise / np.sqrt(base.shape[1])))
        learned = text @ w
        learned = unit(unit(learned) + rng.standard_normal(learned.shape).astype(np.float32) * (noise / np.sqrt(dim)))
        out[s : s + m, :dim] = learned
        out[s : s + m, dim:] = text
    return out


def make_queries(items: np.ndarray, nq: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed + 1)
    q = np.empty((nq, items.shape[1]), np.float32)
    for i in range(nq):
        h = items[rng.integers(0, len(items), rng.integers(1, 11))]
        wts = 0.8 ** np.arange(len(h))[::-1]  # the most recent item (last) weighs most
        wts = (wts / wts.sum()).astype(np.float32)
        m = wts @ h
        q[i, :dim] = m[:dim] / 0.2
        q[i, dim:] = 10 * m[dim:] / np.linalg.norm(m[dim:])
    return q


def exact_topk(items: np.ndarray, q: np.ndarray) -> np.ndarray:
    import torch

    it = torch.from_numpy(items)
    out = []
    for s in range(0, len(q), 256):
        out.append(torch.topk(torch.from_numpy(q[s : s + 256]) @ it.T, K, dim=1).indices.numpy())
    return np.concatenate(out)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f[f >= 0].tolist()) & set(t.tolist())) / K for f, t in zip(found, truth)]))


def pct(lat: list[float]) -> tuple[float, float]:
    a = np.asarray(lat) * 1e3
    return float(np.percentile(a, 50)), float(np.percentile(a, 99))


def exact_latency(items: np.ndarray, q: np.ndarray, threads: int, nq: int) -> tuple[float, float]:
    import torch

    torch.set_num_threads(threads)
    it = torch.from_numpy(items)
    nq = min(nq, len(q))
    lat = np.zeros((3, nq))
    with torch.inference_mode():
        for i in range(5):
            torch.topk(torch.from_numpy(q[i]) @ it.T, K)
        for rep in range(3):
            for i in range(nq):
                t = time.perf_counter()
                torch.topk(torch.from_numpy(q[i]) @ it.T, K)
                lat[rep, i] = time.perf_counter() - t
    torch.set_num_threads(2)
    return pct(lat.ravel().tolist()) + pct(lat.min(axis=0).tolist())


# ---------------------------------------------------------------- libraries
# Each adapter: build(items, params, threads) -> index; set_search(index, value); search1(index, q) -> ids (one
# query, 1 thread); save(index, path); load(path, mmap) -> index; add(index, vecs, start_id).


class FaissHNSW:
    name = "faiss-hnsw"
    knob = "efSearch"
    mmap_note = "IO_FLAG_MMAP_IFC (vectors mapped, graph read)"

    def __init__(self):
        import faiss

        self.faiss = faiss

    def builds(self, n):
        return HNSW_BUILDS

    def build(self, items, p, threads):
        f = self.faiss
        f.omp_set_num_threads(threads)
        m, efc = p
        idx = f.IndexHNSWFlat(items.shape[1], m, f.METRIC_INNER_PRODUCT)
        idx.hnsw.efConstruction = efc
        idx.add(items)
        f.omp_set_num_threads(1)
        return idx

    def sweep(self, n):
        return EF_SWEEP

    def set_search(self, idx, v):
        idx.hnsw.efSearch = v

    def search1(self, idx, q):
        return idx.search(q[None], K)[1][0]

    def save(self, idx, path):
        self.faiss.write_index(idx, str(path))

    def load(self, path, mmap):
        f = self.faiss
        return f.read_index(str(path), f.IO_FLAG_MMAP_IFC if mmap else 0)

    def add(self, idx, vecs, start):
        idx.add(vecs)


class FaissIVF(FaissHNSW):
    name = "faiss-ivfflat"
    knob = "nprobe"
    mmap_note = "IO_FLAG_MMAP (inverted lists mapped)"

    def builds(self, n):
        return [int(4 * np.sqrt(n))]

    def build(self, items, nlist, threads):
        f = self.faiss
        f.omp_set_num_threads(threads)
        quant = f.IndexFlatIP(items.shape[1])
        idx = f.IndexIVFFlat(quant, items.shape[1], nlist, f.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(0)
        idx.train(items[rng.choice(len(items), min(len(items), 40 * nlist), replace=False)])
        idx.add(items)
        f.omp_set_num_threads(1)
        return idx

    def sweep(self, n):
        return NPROBE_SWEEP

    def set_search(self, idx, v):
        idx.nprobe = v

    def load(self, path, mmap):
        f = self.faiss
        return f.read_index(str(path), f.IO_FLAG_MMAP | f.IO_FLAG_READ_ONLY if mmap else 0)


class Hnswlib:
    name = "hnswlib"
    knob = "ef"
    mmap_note = "none (load_index reads the file)"

    def __init__(self):
        import hnswlib

        self.h = hnswlib

    def builds(self, n):
        return HNSW_BUILDS

    def build(self, items, p, threads):
        m, efc = p
        idx = self.h.Index(space="ip", dim=items.shape[1])
        idx.init_index(max_elements=len(items), ef_construction=efc, M=m)
        idx.add_items(items, np.arange(len(items)), num_threads=threads)
        idx.set_num_threads(1)
        return idx

    def sweep(self, n):
        return EF_SWEEP

    def set_search(self, idx, v):
        idx.set_ef(v)

    def search1(self, idx, q):
        return idx.knn_query(q[None], k=K, num_threads=1)[0][0].astype(np.int64)

    def save(self, idx, path):
        idx.save_index(str(path))

    def load(self, path, mmap):
        if mmap:
            raise NotImplementedError("hnswlib has no memory-mapped load")
        idx = self.h.Index(space="ip", dim=self.dim)
        idx.load_index(str(path))
        return idx

    def add(self, idx, vecs, start):
        idx.resize_index(idx.get_current_count() + len(vecs))
        idx.add_items(vecs, np.arange(start, start + len(vecs)), num_threads=1)


class Usearch:
    knob = "expansion_search"
    mmap_note = "Index.restore(path, view=True)"

    def __init__(self, dtype="f32"):
        from usearch.index import Index

        self.Index = Index
        self.dtype = dtype
        self.name = f"usearch-{dtype}"

    def builds(self, n):
        return HNSW_BUILDS

    def build(self, items, p, threads):
        m, efc = p
        idx = self.Index(ndim=items.shape[1], metric="ip", dtype=self.dtype, connectivity=m, expansion_add=efc)
        idx.add(np.arange(len(items)), items, threads=threads)
        return idx

    def sweep(self, n):
        return EF_SWEEP

    def set_search(self, idx, v):
        idx.expansion_search = v

    def search1(self, idx, q):
        return idx.search(q, K, threads=1).keys.astype(np.int64)

    def save(self, idx, path):
        idx.save(str(path))

    def load(self, path, mmap):
        return self.Index.restore(str(path), view=mmap)

    def add(self, idx, vecs, start):
        idx.add(np.arange(start, start + len(vecs)), vecs, threads=1)


def adapter(name: str, dim: int):
    a = {
        "faiss-hnsw": FaissHNSW,
        "faiss-ivfflat": FaissIVF,
        "hnswlib": Hnswlib,
        "usearch-f32": lambda: Usearch("f32"),
        "usearch-f16": lambda: Usearch("f16"),
        "usearch-i8": lambda: Usearch("i8"),
    }[name]()
    a.dim = dim
    return a


def lib_version(name: str) -> str:
    from importlib.metadata import version

    return version({"faiss": "faiss-cpu", "hnswlib": "hnswlib", "usearch": "usearch"}[name.split("-")[0]])


# ---------------------------------------------------------------- load probe (a fresh process)


def mem() -> dict:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "RssAnon", "RssFile"):
            out[k] = int(v.split()[0]) / 1024  # MiB
    return out


def probe(a: argparse.Namespace) -> int:
    """Child: load the index (full or mmap), run the queries, report memory and whether adding works."""
    lib = adapter(a.probe_lib, a.probe_dim)
    q = np.load(a.probe_queries)
    new = np.load(a.probe_new)
    before = mem()
    t = time.perf_counter()
    try:
        idx = lib.load(a.probe_index, a.probe_mmap)
    except Exception as e:  # noqa: BLE001 - reported, not hidden
        print(json.dumps({"error": f"{type(e).__name__}: {e}"[:200]}))
        return 0
    load_s = time.perf_counter() - t
    lib.set_search(idx, a.probe_knob)
    for x in q:
        lib.search1(idx, x)
    after = mem()
    res = {"load_s": load_s, "rss_mib": after["VmRSS"] - before["VmRSS"]}
    res["anon_mib"] = after["RssAnon"] - before["RssAnon"]
    res["file_mib"] = after["RssFile"] - before["RssFile"]
    print(json.dumps(res), flush=True)  # before the add: a failed add may abort the process (faiss's asserts do)
    res = {}
    t = time.perf_counter()
    try:
        lib.add(idx, new, a.probe_n)
        res["add_s"] = time.perf_counter() - t
        lib.set_search(idx, a.probe_knob)
        hits = [int(a.probe_n + i in set(lib.search1(idx, new[i] * 10).tolist())) for i in range(0, len(new), 10)]
        res["add_found"] = float(np.mean(hits))
    except Exception as e:  # noqa: BLE001
        res["add_error"] = f"{type(e).__name__}: {e}"[:160]
    print(json.dumps(res))
    return 0


def run_probe(lib, path, mmap, knob, qpath, newpath, n) -> dict:
    cmd = [sys.executable, __file__, "--probe-lib", lib.name, "--probe-index", str(path), "--probe-knob", str(knob)]
    cmd += ["--probe-queries", str(qpath), "--probe-new", str(newpath), "--probe-n", str(n)]
    cmd += ["--probe-dim", str(lib.dim)] + (["--probe-mmap"] if mmap else [])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    out = {}
    for line in r.stdout.strip().splitlines():
        if line.startswith("{"):
            out |= json.loads(line)
    if not out:
        return {"error": (r.stderr or r.stdout)[-300:]}
    if "error" not in out and "add_s" not in out and "add_error" not in out:
        out["add_error"] = f"process died (exit {r.returncode}): {r.stderr.strip()[-120:]}"
    return out


# ---------------------------------------------------------------- main


def bench_lib(lib, items, q, truth, new, work: Path, a) -> list[dict]:
    n = len(items)
    rows = []
    best = None
    for p in lib.builds(n):
        gc.collect()
        t = time.perf_counter()
        idx = lib.build(items, p, a.build_threads)
        build_s = time.perf_counter() - t
        sweep = []
        for v in lib.sweep(n):
            lib.set_search(idx, v)
            t = time.perf_counter()
            r = recall(np.stack([lib.search1(idx, x) for x in q]), truth)
            mean = (time.perf_counter() - t) / len(q) * 1e3
            sweep.append({"value": v, "recall": r, "mean_ms": mean})
            print(f"  {lib.name} N={n} build={p} {lib.knob}={v}: recall {r:.4f} mean {mean:.2f} ms", flush=True)
            if r >= a.target:  # latency grows with the knob: the first setting that meets the target is kept
                break
        ok = [s for s in sweep if s["recall"] >= a.target]
        pick = dict(ok[0] if ok else max(sweep, key=lambda s: s["recall"]))
        lib.set_search(idx, pick["value"])
        lat = np.zeros((a.repeats, len(q)))
        for rep in range(a.repeats):
            for i, x in enumerate(q):
                t = time.perf_counter()
                lib.search1(idx, x)
                lat[rep, i] = time.perf_counter() - t
        pick["p50_ms"], pick["p99_ms"] = pct(lat.ravel().tolist())
        pick["p50_min_ms"], pick["p99_min_ms"] = pct(lat.min(axis=0).tolist())
        print(f"  -> {pick}", flush=True)
        row = {"lib": lib.name, "version": lib_version(lib.name), "n": n, "build": str(p), "knob": lib.knob}
        row |= {"build_s": build_s, "meets_recall": bool(ok)} | pick
        row["sweep"] = sweep
        path = work / f"{lib.name}-{n}-{str(p).replace(' ', '')}.index"
        lib.save(idx, path)
        row["disk_mib"] = path.stat().st_size / 2**20
        del idx
        gc.collect()
        if best is None or (row["meets_recall"], -row["p99_ms"]) > (best[0]["meets_recall"], -best[0]["p99_ms"]):
            if best is not None:
                best[1].unlink(missing_ok=True)
            best = (row, path)
        else:
            path.unlink(missing_ok=True)
        rows.append(row)
    row, path = best
    row["chosen"] = True
    qpath, newpath = work / "q.npy", work / "new.npy"
    np.save(qpath, q)
    np.save(newpath, new)
    for mode in ("full", "mmap"):
        pr = run_probe(lib, path, mode == "mmap", row["value"], qpath, newpath, n)
        row[mode] = pr
        print(f"  {lib.name} N={n} load {mode}: {pr}")
    if not a.keep:
        path.unlink(missing_ok=True)
    return rows


def exact_row(n, th, p50, p99, p50m, p99m) -> dict:
    return {"lib": f"exact-torch-{th}t", "n": n, "threads": th, "p50_ms": p50, "p99_ms": p99} | {
        "p50_min_ms": p50m,
        "p99_min_ms": p99m,
    }


def table(rows: list[dict]) -> str:
    head = "| library | N | build (M, efC) / nlist | search knob | recall@10 | p50 ms | p99 ms | p99 min-of-3 ms "
    head += "| build s | disk MiB "
    head += "| RSS full load MiB (anon) | RSS mmap load MiB (anon + file) | add 1000 after full load | after mmap |"
    lines = [head, "|" + "---|" * 14]
    for r in rows:
        if r["lib"].startswith("exact"):
            lines.append(
                f"| {r['lib']} | {r['n']:,} | - | {r['threads']} thread(s) | 1.000 | {r['p50_ms']:.2f} | "
                f"{r['p99_ms']:.2f} | {r['p99_min_ms']:.2f} | - | - | - | - | - | - |"
            )
            continue
        if not r.get("chosen"):
            continue

        def ld(p):
            if "error" in p:
                return "no (" + p["error"].split(":")[0] + ")"
            return f"{p['rss_mib']:.0f} ({p['anon_mib']:.0f} + {p['file_mib']:.0f})"

        def add(p):
            if "error" in p:
                return "-"
            if "add_error" in p:
                return "aborts the process" if "died" in p["add_error"] else "raises"
            return f"{p['add_s'] * 1e3:.0f} ms, found {p['add_found']:.0%}"

        f, m = r.get("full", {}), r.get("mmap", {})
        lines.append(
            f"| {r['lib']} {r['version']} | {r['n']:,} | {r['build']} | {r['knob']}={r['value']} | {r['recall']:.3f}"
            f"{'' if r['meets_recall'] else ' (<target)'} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['p99_min_ms']:.2f} | "
            f"{r['build_s']:.0f} | {r['disk_mib']:.0f} | {ld(f)} | {ld(m)} | {add(f)} | {add(m)} |"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", help="(n, 384) float32 .npy of real MiniLM item vectors")
    ap.add_argument("--n", type=int, nargs="+", default=[40_000, 300_000])
    ap.add_argument("--dim", type=int, default=64, help="learned part's dimension")
    ap.add_argument("--noise", type=float, default=0.3, help="norm of the noise around a real item")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--exact-queries", type=int, default=200)
    ap.add_argument("--exact-n", type=int, nargs="*", default=[5_000, 10_000, 20_000], help="extra exact-only Ns")
    ap.add_argument("--add", type=int, default=1000, help="items added online")
    ap.add_argument("--target", type=float, default=0.95)
    ap.add_argument("--repeats", type=int, default=3, help="timing passes over the queries at the chosen setting")
    ap.add_argument(
        "--libs", nargs="+", default=["faiss-hnsw", "faiss-ivfflat", "hnswlib", "usearch-f32", "usearch-i8"]
    )
    ap.add_argument("--hnsw", nargs="+", default=["16,100"], help="HNSW builds to try: M,ef_construction")
    ap.add_argument("--build-threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default="/tmp/ann/work")
    ap.add_argument("--keep", action="store_true", help="keep the chosen index files")
    ap.add_argument("--json", metavar="OUT")
    ap.add_argument("--table", nargs="+", metavar="JSON", help="only print one table of these --json outputs")
    for k, t in (("lib", str), ("index", str), ("knob", int), ("queries", str), ("new", str), ("n", int), ("dim", int)):
        ap.add_argument(f"--probe-{k}", type=t, help=argparse.SUPPRESS)
    ap.add_argument("--probe-mmap", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.probe_lib:
        return probe(a)
    if a.table:
        rows = [r for f in a.table for r in json.loads(Path(f).read_text())["rows"]]
        rows.sort(key=lambda r: (r["n"], not r["lib"].startswith("exact"), r["lib"], r.get("build", "")))
        print(table(rows))
        return 0
    if not a.base:
        ap.error("--base is required")
    HNSW_BUILDS[:] = [tuple(int(x) for x in b.split(",")) for b in a.hnsw]
    import torch

    torch.set_num_threads(2)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    base = unit(np.load(a.base).astype(np.float32))
    rows = []
    load = os.getloadavg()
    print(f"base {base.shape}, cpus {os.cpu_count()}, load average {load[0]:.1f}", flush=True)
    for n in sorted(a.exact_n):
        items = make_catalog(base, n, a.dim, a.noise, a.seed)
        q = make_queries(items, a.exact_queries, a.dim, a.seed)
        for th in (1, 2):
            p50, p99, p50m, p99m = exact_latency(items, q, th, a.exact_queries)
            rows.append(exact_row(n, th, p50, p99, p50m, p99m))
    for n in a.n:
        cache = work / f"catalog-{n}-{a.dim}-{a.noise}-{a.seed}.npy"
        if cache.is_file():
            items = np.load(cache)
        else:
            items = make_catalog(base, n + a.add, a.dim, a.noise, a.seed)
            np.save(cache, items)
        items, new = items[:n], items[n:]
        q = make_queries(items, a.queries, a.dim, a.seed)
        t = time.perf_counter()
        truth = exact_topk(items, q)
        print(f"N={n}: catalog {items.shape}, ground truth {time.perf_counter() - t:.1f} s", flush=True)
        for th in (1, 2):
            p50, p99, p50m, p99m = exact_latency(
                items, q, th, a.exact_queries if n <= 300_000 else a.exact_queries // 4
            )
            rows.append(exact_row(n, th, p50, p99, p50m, p99m))
            print(f"  exact torch {th} thread(s): {rows[-1]}", flush=True)
        for name in a.libs:
            lib = adapter(name, items.shape[1])
            rows += bench_lib(lib, items, q, truth, new, work, a)
            if a.json:
                Path(a.json).write_text(json.dumps({"load_avg": load, "rows": rows}, indent=1))
        del items
        gc.collect()
    rows.sort(key=lambda r: (r["n"], not r["lib"].startswith("exact"), r["lib"]))
    print(table(rows))
    if a.json:
        Path(a.json).write_text(json.dumps({"load_avg": load, "end_load_avg": os.getloadavg(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
