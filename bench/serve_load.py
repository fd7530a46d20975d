"""Load on the Serve graph: throughput and latency of POST /v1/recommend over loopback HTTP, beside the same
pipeline called in-process, with the replica counts Serve's autoscaler chose.

    .venv/bin/python bench/serve_load.py --bundle out/bench/ao/crossrec                 # starts Serve itself
    .venv/bin/python bench/serve_load.py --bundle B --duration 10 --clients 1,8,32 --rate 50
    .venv/bin/python bench/serve_load.py --bundle B --url http://127.0.0.1:8000       # a running `crossrec serve`

Requests are drawn (seeded) from the bundle's own catalog: a history of 1-10 items from any of its domains,
a random target domain, k=10, and for a fraction of requests (--query-frac) a `query` (another item's title,
real text) that goes through the Encoder. Each phase runs N closed-loop clients (each sends its next request
when the previous answers; keep-alive connections) for --duration seconds; then an idle phase shows the
replicas scaling back down. `--rate R` adds an open-loop phase at R requests/s (sent on a fixed schedule by
a pool of senders; latency from the actual send). The in-process row runs the same pipeline in one process, one
caller, one torch thread (as a replica has), same requests: backbone + adaptor for the query,
crossrec.recommender.Recommender, the bundle's ranker.
Clients share the machine with the server: on 2 cores they cost the server CPU.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def make_requests(bundle: Path, n: int, query_frac: float, seed: int) -> list[dict]:
    import pyarrow.parquet as pq

    meta = json.loads((bundle / "bundle.json").read_text())
    cat = {d: pq.read_table(bundle / "items" / f"{d}.parquet", columns=["item_id", "title"]).to_pydict()
           for d in meta["domains"]}
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
        out.append(body)
    return out


class Client:
    def __init__(self, url: str):
        u = urlparse(url)
        self.host, self.port, self.prefix = u.hostname, u.port or 80, u.path.rstrip("/")
        self.conn = http.client.HTTPConnection(self.host, self.port, timeout=60)

    def post(self, body: dict) -> int:
        data = json.dumps(body).encode()
        try:
            self.conn.request("POST", self.prefix + "/v1/recommend", body=data,
                              headers={"Content-Type": "application/json"})
            r = self.conn.getresponse()
            r.read()
            return r.status
        except (OSError, http.client.HTTPException):
            self.conn.close()
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
            return -1


def closed_loop(url: str, reqs: list[dict], clients: int, duration: float) -> dict:
    lat, fails, lock = [], [0], threading.Lock()
    deadline = time.perf_counter() + duration

    def worker(w: int):
        c, i, mine = Client(url), w, []
        while time.perf_counter() < deadline:  # bounded: no request starts after the deadline
            t = time.perf_counter()
            status = c.post(reqs[i % len(reqs)])
            if status == 200:
                mine.append(time.perf_counter() - t)
            else:
                with lock:
                    fails[0] += 1
            i += clients
        with lock:
            lat.extend(mine)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(w,)) for w in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return summary(lat, fails[0], time.perf_counter() - t0)


def open_loop(url: str, reqs: list[dict], rate: float, duration: float, senders: int = 16) -> dict:
    lat, fails, lock = [], [0], threading.Lock()
    n = int(rate * duration)
    t0 = time.perf_counter() + 0.2

    def worker(w: int):
        c, mine = Client(url), []
        for i in range(w, n, senders):
            wait = t0 + i / rate - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            t = time.perf_counter()
            status = c.post(reqs[i % len(reqs)])
            if status == 200:
                mine.append(time.perf_counter() - t)
            else:
                with lock:
                    fails[0] += 1
        with lock:
            lat.extend(mine)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(senders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return summary(lat, fails[0], time.perf_counter() - t0)


def summary(lat: list[float], fails: int, wall: float) -> dict:
    a = np.array(lat) * 1000 if lat else np.array([np.nan])
    return {"n": len(lat), "fail": fails, "rps": len(lat) / wall, "p50": float(np.percentile(a, 50)),
            "p95": float(np.percentile(a, 95)), "p99": float(np.percentile(a, 99))}


def in_process(bundle: Path, reqs: list[dict], duration: float, candidates: int) -> dict:
    """The same retrieve -> rank -> top-k in one process: the cost of the pipeline without Serve."""
    import torch

    from crossrec.bundle import load_bundle
    from crossrec.inference import bundle_backbone
    from crossrec.recommender import HistoryItem, Recommender
    from serving.deployments import _load_ranker

    torch.set_num_threads(1)  # as in the replicas (Ray gives workers OMP_NUM_THREADS=1); 2 threads on 2 busy
    b = load_bundle(bundle)   # cores measured 7x slower here
    rec, ranker = Recommender(b), _load_ranker(b)
    backbone = bundle_backbone(b) if any(r.get("query") for r in reqs) else None
    lat = []
    deadline = time.perf_counter() + duration
    t0, i = time.perf_counter(), 0
    while time.perf_counter() < deadline:
        body = reqs[i % len(reqs)]
        i += 1
        t = time.perf_counter()
        hist = [HistoryItem(h["domain"], h["item_id"]) for h in body["history"]]
        if body.get("query"):  # as the Encoder does: backbone, then the model's item vector
            x = backbone.encode([body["query"]], batch_size=1, max_length=b.config.max_tokens)
            with torch.inference_mode():
                hist.append(HistoryItem(body["domain"], vector=b.model.item_vectors(torch.from_numpy(x))[0]))
        c = rec.candidates(hist, body["domain"], max(candidates, body["k"]))
        scores = c.scores
        if ranker is not None:
            from crossrec.ranker import RankRequest

            scores = ranker.score(RankRequest(body["domain"], c.item_ids, c.scores, c.user,
                                              [(h.domain, h.item_id) for h in hist], c.history_vectors,
                                              c.candidate_vectors))
        _ = [c.item_ids[j] for j in np.argsort(-np.asarray(scores), kind="stable")[:body["k"]]]
        lat.append(time.perf_counter() - t)
    return summary(lat, 0, time.perf_counter() - t0)


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
        return {name: sum(n for state, n in d.replica_states.items() if str(state).endswith("RUNNING"))
                for name, d in st.deployments.items()}

    def _run(self):
        while not self.stop.wait(1.0):
            for k, v in self.now().items():
                self.peak[k] = max(self.peak.get(k, 0), v)

    def phase(self) -> dict[str, int]:
        peak, self.peak = self.peak, {}
        return peak


def fmt_replicas(r: dict[str, int]) -> str:
    return " ".join(f"{k[:3]}={v}" for k, v in sorted(r.items())) if r else "-"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True, help="bundle to serve (and to draw requests from)")
    ap.add_argument("--url", help="a running `crossrec serve` (default: start Serve here on 127.0.0.1)")
    ap.add_argument("--port", type=int, default=8765, help="port when starting Serve here (default: 8765)")
    ap.add_argument("--config", help="Serve config YAML (default: serving/serve_config.yaml)")
    ap.add_argument("--clients", default="1,8,32", help="closed-loop client counts (default: 1,8,32)")
    ap.add_argument("--duration", type=float, default=30.0, help="seconds per phase (default: 30)")
    ap.add_argument("--idle", type=float, default=20.0, help="idle seconds at the end, to see scale-down")
    ap.add_argument("--rate", type=float, default=0.0, help="also an open-loop phase at this many requests/s")
    ap.add_argument("--query-frac", type=float, default=0.25, help="share of requests with a text query")
    ap.add_argument("--candidates", type=int, default=50, help="retrieval's N for the in-process row")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    bundle = Path(a.bundle).resolve()
    reqs = make_requests(bundle, 2000, a.query_frac, a.seed)
    watch = None
    if a.url:
        url = a.url.rstrip("/")
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        from serving.app import deploy
        from trainers.runtime import init_ray

        init_ray()
        t = time.perf_counter()
        url = deploy(bundle, port=a.port, config=a.config)
        print(f"Serve up at {url} in {time.perf_counter() - t:.1f} s", flush=True)
    try:
        from ray import serve  # noqa: F401  (replica counts need the Ray that runs Serve)
        import ray

        if ray.is_initialized():
            watch = ReplicaWatch()
    except ImportError:
        pass
    Client(url).post(reqs[0])  # warm-up: first request loads lazy parts
    rows = []
    for c in [int(x) for x in a.clients.split(",")]:
        r = closed_loop(url, reqs, c, a.duration)
        rows.append((f"serve, {c} client{'s' if c > 1 else ''}", r, watch.phase() if watch else {}))
        print(f"  done: {rows[-1][0]}  {r['rps']:.1f} req/s", flush=True)
    if a.rate:
        r = open_loop(url, reqs, a.rate, a.duration)
        rows.append((f"serve, open loop {a.rate:g} req/s", r, watch.phase() if watch else {}))
    if watch:
        time.sleep(a.idle)
        idle = watch.now()
    ip = in_process(bundle, reqs, a.duration, a.candidates)
    rows.append(("in-process, 1 caller", ip, {}))
    print(f"\nbundle {bundle} | {a.duration:g} s per phase | {len(reqs)} distinct requests, "
          f"{a.query_frac:.0%} with a query")
    print(f"{'phase':<34} {'req/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'fail':>5}  replicas (peak)")
    for name, r, rep in rows:
        print(f"{name:<34} {r['rps']:>8.1f} {r['p50']:>8.1f} {r['p95']:>8.1f} {r['p99']:>8.1f} {r['fail']:>5}  "
              f"{fmt_replicas(rep)}")
    if watch:
        print(f"{'idle ' + format(a.idle, 'g') + ' s later':<34} {'':>8} {'':>8} {'':>8} {'':>8} {'':>5}  "
              f"{fmt_replicas(idle)}")
    one = rows[0][1]
    print(f"\nServe / in-process at 1 client: throughput x{one['rps'] / ip['rps']:.2f}, "
          f"p50 x{one['p50'] / ip['p50']:.1f}")
    if watch:  # stop polling the controller before it goes away
        watch.stop.set()
        watch.thread.join()
    if not a.url:
        from ray import serve

        serve.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
