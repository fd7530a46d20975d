"""Load on the Serve graph: throughput and latency of POST /v1/recommend over loopback HTTP, beside the exact
served pipeline called in-process once Serve has stopped, and the cost of items inserted one by one.

    .venv/bin/python bench/serve_load.py --bundle out/ao-bundle                       # fast path (default)
    .venv/bin/python bench/serve_load.py --bundle out/ao-bundle --mode proxy          # Serve's Python proxy
    .venv/bin/python bench/serve_load.py --bundle B --duration 10 --clients 1,8 --rates 50 --json out/x.json

Requests are drawn (seeded) from the bundle's own catalog: a history of 1-10 items from any of its domains, a
random target domain, k=10; a share of them (--query-frac) has a `query` (another item's title: real text, so
the Encoder runs) and a share (--explain-frac) asks for `explain`. After a warm-up, each closed-loop phase runs N
clients (each sends its next request when the previous answers; keep-alive connections) and each open-loop
phase sends R requests/s on a fixed schedule (a pool of senders; latency from the scheduled send time, so a
sender that falls behind counts its delay); failures count every answer that is not 200 (503s from load
shedding included). Then 1,000 items are POSTed one at a time. The in-process row runs, after Serve has
stopped, the same requests through the same code the replica runs (crossrec.recommender.Recommender.recommend
with the bundle's ranker and the same explain share; the backbone + adaptor for each query) on one thread.
Clients share the machine with the server: on 2 cores they cost the server CPU.

--mode picks how HTTP reaches the replicas (environment set before Ray starts, serving.app.FAST_PATH_ENV):
  fast      HAProxy + Serve's throughput-optimised mode (direct ingress, gRPC, one event loop, buffered logs)
  proxy-opt Serve's Python proxy, replicas in the throughput-optimised mode (gRPC, one loop, buffered logs)
  proxy     Serve's Python proxy, Serve's defaults
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MODES = {
    "fast": None,  # serving.app.FAST_PATH_ENV
    "proxy-opt": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"},
    "proxy": {},
}


def make_requests(bundle: Path, n: int, query_frac: float, explain_frac: float, seed: int) -> list[dict]:
    import pyarrow.parquet as pq

    meta = json.loads((bundle / "bundle.json").read_text())
    cat = {
        d: pq.read_table(bundle / "items" / f"{d}.parquet", columns=["item_id", "title"]).to_pydict()
        for d in meta["domains"]
    }
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        hist = []
        for _ in range(rng.randint(1, 10)):
            d = rng.choice(meta["domains"])
            hist.append({"item_id": rng.choice(cat[d]["item_id"]), "domain": d})
        body = {"history": hist, "domain": rng.choice(meta["domains"]), "k": 10}
        if rng.random() < query_frac:
            body["query"] = rng.choice(cat[body["domain"]]["title"])[:200] or "gift"
        if rng.random() < explain_frac:
            body["explain"] = True
        out.append(body)
    return out


class Client:
    def __init__(self, url: str):
        u = urlparse(url)
        self.host, self.port, self.prefix = u.hostname, u.port or 80, u.path.rstrip("/")
        self.conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
        self.timing: dict[str, float] = {}  # the last answer's Server-Timing (ms): where the replica spent it

    def post(self, body: dict, path: str = "/v1/recommend") -> int:
        data = json.dumps(body).encode()
        try:
            self.conn.request("POST", self.prefix + path, body=data, headers={"Content-Type": "application/json"})
            r = self.conn.getresponse()
            r.read()
            parts = [p.split(";dur=") for p in (r.getheader("server-timing") or "").split(",") if ";dur=" in p]
            self.timing = {name.strip(): float(ms) for name, ms in parts}
            if r.getheader("connection", "").lower() == "close":
                self.conn.close()
            return r.status
        except (OSError, http.client.HTTPException):
            self.conn.close()
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
            return -1


def closed_loop(url: str, reqs: list[dict], clients: int, duration: float) -> dict:
    lat, fails, lock = [], [], threading.Lock()
    deadline = time.perf_counter() + duration

    inside: list[dict[str, float]] = []

    def worker(w: int):
        c, i, mine, bad, replica = Client(url), w, [], [], []
        while time.perf_counter() < deadline:  # bounded: no request starts after the deadline
            t = time.perf_counter()
            status = c.post(reqs[i % len(reqs)])
            (mine.append(time.perf_counter() - t) if status == 200 else bad.append(status))
            if status == 200 and c.timing:
                inner = sum(c.timing.values())
                replica.append({**c.timing, "replica": inner, "outside": mine[-1] * 1e3 - inner})
            i += clients
        with lock:
            lat.extend(mine)
            fails.extend(bad)
            inside.extend(replica)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(w,)) for w in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out = summary(lat, fails, time.perf_counter() - t0)
    if inside:  # medians of each Server-Timing part, and of what the client waited beyond the replica
        out["timing_p50"] = {k: float(np.median([t[k] for t in inside])) for k in inside[0]}
    return out


def open_loop(url: str, reqs: list[dict], rate: float, duration: float, senders: int = 48) -> dict:
    lat, fails, lock = [], [], threading.Lock()
    n = int(rate * duration)
    t0 = time.perf_counter() + 0.2

    def worker(w: int):
        c, mine, bad = Client(url), [], []
        for i in range(w, n, senders):
            due = t0 + i / rate
            wait = due - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            status = c.post(reqs[i % len(reqs)])
            # From the scheduled send: a request a busy sender sent late waited that long too.
            (mine.append(time.perf_counter() - due) if status == 200 else bad.append(status))
        with lock:
            lat.extend(mine)
            fails.extend(bad)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(senders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return summary(lat, fails, time.perf_counter() - t0)


def summary(lat: list[float], fails: list[int], wall: float) -> dict:
    a = np.array(lat) * 1000 if lat else np.array([np.nan])
    codes: dict[str, int] = {}
    for s in fails:
        codes[str(s)] = codes.get(str(s), 0) + 1
    return {
        "n": len(lat),
        "fail": len(fails),
        "codes": codes,
        "rps": len(lat) / wall,
        "p50": float(np.percentile(a, 50)),
        "p95": float(np.percentile(a, 95)),
        "p99": float(np.percentile(a, 99)),
    }


def inserts(url: str, bundle: Path, n: int) -> dict:
    """n items POSTed one at a time (each embedded, logged with fsync, recommendable at once)."""
    meta = json.loads((bundle / "bundle.json").read_text())
    c, lat, fails = Client(url), [], []
    for i in range(n):
        body = {
            "items": [
                {
                    "item_id": f"bench-new-{i}",
                    "domain": meta["domains"][i % len(meta["domains"])],
                    "title": f"bench item {i}: a set of {i % 24 + 1} coloured gel pens",
                }
            ]
        }
        t = time.perf_counter()
        status = c.post(body, "/v1/items")
        (lat.append(time.perf_counter() - t) if status == 200 else fails.append(status))
    return summary(lat, fails, sum(lat) or 1.0)


def in_process(bundle: Path, reqs: list[dict], duration: float, explain_history: int) -> dict:
    """The served pipeline in this process, one thread: query -> backbone + adaptor (the Encoder's code), then
    Recommender.recommend with the bundle's ranker and the request's explain (the replica's code)."""
    import torch

    from crossrec.bundle import load_bundle
    from crossrec.inference import bundle_backbone
    from crossrec.recommender import HistoryItem, Recommender

    torch.set_num_threads(1)  # as each replica does
    b = load_bundle(bundle)
    rec = Recommender.load(b, explain_history=explain_history)
    backbone = bundle_backbone(b) if any(r.get("query") for r in reqs) else None
    for body in reqs[:20]:  # warm-up, as the served run had
        rec.recommend([HistoryItem(h["domain"], h["item_id"]) for h in body["history"]], body["domain"], k=10)
    lat = []
    deadline = time.perf_counter() + duration
    t0, i = time.perf_counter(), 0
    while time.perf_counter() < deadline:
        body = reqs[i % len(reqs)]
        i += 1
        t = time.perf_counter()
        hist = [HistoryItem(h["domain"], h["item_id"]) for h in body["history"]]
        if body.get("query"):
            x = backbone.encode([body["query"]], batch_size=32, max_length=b.config.max_tokens)
            with torch.inference_mode():
                hist.append(HistoryItem(body["domain"], vector=b.model.item_vectors(torch.from_numpy(x))[0]))
        rec.recommend(hist, body["domain"], k=body["k"], explain=body.get("explain", False))
        lat.append(time.perf_counter() - t)
    return summary(lat, [], time.perf_counter() - t0)


class ReplicaWatch:
    """Polls serve.status() once a second: the most replicas per deployment seen while a phase runs."""

    def __init__(self, app: str = "crossrec"):
        from ray import serve

        self.serve, self.app = serve, app
        self.peak: dict[str, int] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def now(self) -> dict[str, int]:
        st = self.serve.status().applications.get(self.app)
        if st is None:
            return {}
        return {
            name: sum(n for state, n in d.replica_states.items() if str(state).endswith("RUNNING"))
            for name, d in st.deployments.items()
        }

    def _run(self):
        while not self.stop.wait(1.0):
            for k, v in self.now().items():
                self.peak[k] = max(self.peak.get(k, 0), v)

    def phase(self) -> dict[str, int]:
        peak, self.peak = self.peak, {}
        return peak


def fmt_replicas(r: dict[str, int]) -> str:
    return " ".join(f"{k[:3]}={v}" for k, v in sorted(r.items())) if r else "-"


def plot(rows: list[tuple[str, dict, dict]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [(r["offered"], r) for _, r, _ in rows if r.get("offered")]
    if not pts:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    x = [p for p, _ in pts]
    for q, style in (("p50", "o-"), ("p95", "s--"), ("p99", "^:")):
        ax.plot(x, [r[q] for _, r in pts], style, label=q)
    ax.plot(x, [r["rps"] for _, r in pts], "k.", alpha=0)  # keeps the x range honest
    for p, r in pts:
        ax.annotate(
            f"{r['rps']:.0f}/s" + (f", {r['fail']} fail" if r["fail"] else ""),
            (p, r["p99"]),
            textcoords="offset points",
            xytext=(4, 4),
            fontsize=8,
        )
    ax.set_xlabel("offered load (requests/s, open loop)")
    ax.set_ylabel("latency (ms)")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True, help="bundle to serve (and to draw requests from)")
    ap.add_argument("--mode", choices=sorted(MODES), default="fast", help="how HTTP reaches replicas (see above)")
    ap.add_argument("--port", type=int, default=8765, help="HTTP port (default: 8765)")
    ap.add_argument("--config", help="Serve config YAML (default: serving/serve_config.yaml)")
    ap.add_argument("--clients", default="1,8,32", help="closed-loop client counts (default: 1,8,32)")
    ap.add_argument("--rates", default="25,50,100", help="open-loop rates in requests/s (default: 25,50,100)")
    ap.add_argument("--duration", type=float, default=30.0, help="seconds per phase (default: 30)")
    ap.add_argument("--warmup", type=float, default=5.0, help="seconds of warm-up load first (default: 5)")
    ap.add_argument("--inserts", type=int, default=1000, help="items POSTed one by one at the end (default: 1000)")
    ap.add_argument("--query-frac", type=float, default=0.25, help="share of requests with a text query")
    ap.add_argument("--explain-frac", type=float, default=0.25, help="share of requests with explain")
    ap.add_argument("--explain-history", type=int, default=20, help="the app's explain_history (default: 20)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the rows here too")
    ap.add_argument("--plot", help="latency-vs-rate PNG (default: out/serve_load_MODE.png)")
    a = ap.parse_args()
    bundle = Path(a.bundle).resolve()
    reqs = make_requests(bundle, 2000, a.query_frac, a.explain_frac, a.seed)

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from serving.app import FAST_PATH_ENV, deploy

    # Before Ray starts: Serve reads them in each process. ("proxy" is {}: Serve's defaults, not the fast path.)
    env = FAST_PATH_ENV if MODES[a.mode] is None else MODES[a.mode]
    for key in FAST_PATH_ENV.keys() - env.keys():
        os.environ.pop(key, None)
    os.environ.update(env)
    import ray
    from ray import serve

    ray.init(
        address="local",
        include_dashboard=False,
        object_store_memory=512 * 1024**2,
        logging_level="WARNING",
        logging_config=ray.LoggingConfig(log_level="ERROR"),
    )
    state = tempfile.mkdtemp(prefix="crossrec-bench-state-")  # the inserts must not outlive the bench
    t = time.perf_counter()
    url = deploy(bundle, port=a.port, config=a.config, state_dir=state)
    print(f"Serve up at {url} ({a.mode}) in {time.perf_counter() - t:.1f} s", flush=True)
    watch = ReplicaWatch()
    closed_loop(url, reqs, 4, a.warmup)  # warm-up: lazy imports, caches, allocator, JIT-free paths all touched
    watch.phase()
    rows = []
    for c in [int(x) for x in a.clients.split(",") if x]:
        r = closed_loop(url, reqs, c, a.duration)
        rows.append((f"serve, {c} client{'s' if c > 1 else ''}", r, watch.phase()))
        print(f"  done: {rows[-1][0]}  {r['rps']:.1f} req/s", flush=True)
    for rate in [float(x) for x in a.rates.split(",") if x]:
        r = open_loop(url, reqs, rate, a.duration)
        r["offered"] = rate
        rows.append((f"serve, open loop {rate:g} req/s", r, watch.phase()))
        print(f"  done: {rows[-1][0]}  {r['rps']:.1f} req/s", flush=True)
    ins = inserts(url, bundle, a.inserts) if a.inserts else None
    watch.stop.set()
    watch.thread.join()
    serve.shutdown()
    ray.shutdown()
    ip = in_process(bundle, reqs, a.duration, a.explain_history)
    rows.append(("in-process, 1 caller (after Serve)", ip, {}))

    print(
        f"\nbundle {bundle} | mode {a.mode} | {a.duration:g} s per phase | {len(reqs)} distinct requests, "
        f"{a.query_frac:.0%} with a query, {a.explain_frac:.0%} with explain | {os.cpu_count()} CPUs"
    )
    print(f"{'phase':<36} {'req/s':>7} {'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7} {'fail':>5}  replicas (peak)")
    for name, r, rep in rows:
        codes = f" {r['codes']}" if r["codes"] else ""
        print(
            f"{name:<36} {r['rps']:>7.1f} {r['p50']:>7.1f} {r['p95']:>7.1f} {r['p99']:>7.1f} {r['fail']:>5}  "
            f"{fmt_replicas(rep)}{codes}"
        )
    if ins:
        print(
            f"{'POST /v1/items, 1 item x ' + str(a.inserts):<36} {ins['rps']:>7.1f} {ins['p50']:>7.1f} "
            f"{ins['p95']:>7.1f} {ins['p99']:>7.1f} {ins['fail']:>5}"
        )
    one = rows[0][1]
    sat = max((r["rps"] for n, r, _ in rows if "client" in n), default=float("nan"))
    print(f"\nsaturated throughput (best closed loop): {sat:.1f} req/s")
    print(
        f"Serve / in-process at 1 client: p50 x{one['p50'] / ip['p50']:.2f}, throughput x{one['rps'] / ip['rps']:.2f}"
    )
    if "timing_p50" in one:  # Server-Timing: the replica's own time; the rest is HTTP, HAProxy and Serve
        parts = ", ".join(f"{k} {v:.2f}" for k, v in one["timing_p50"].items())
        print(f"1 client, medians in ms (Server-Timing): {parts}; in-process p50 {ip['p50']:.2f}")
    out = Path(a.plot or REPO / "out" / f"serve_load_{a.mode}.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(rows, out, f"crossrec Serve ({a.mode}), {bundle.name}, {os.cpu_count()} CPUs")
    print(f"plot: {out}")
    if a.json:
        Path(a.json).write_text(
            json.dumps(
                {
                    "mode": a.mode,
                    "bundle": str(bundle),
                    "rows": [{"phase": n, **r, "replicas": rep} for n, r, rep in rows],
                    "inserts": ins,
                },
                indent=1,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
