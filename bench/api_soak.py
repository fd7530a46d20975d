"""Soak test of the HTTP API: valid POST /v1/recommend requests (histories of real catalog items, a `query` in one of
five) at a fixed rate, open loop, for a long time; counts errors (anything but 200, timeouts, dropped connections)
and the resident memory of the Serve processes (replicas and proxy) at the start and at the end.
Pass: 0 errors and memory growth under 10%.

    .venv/bin/python bench/api_soak.py --bundle BUNDLE                      # 10 minutes at 30 req/s; starts Serve
    .venv/bin/python bench/api_soak.py --bundle BUNDLE --minutes 1 --rate 10
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from api_fuzz import _free_port, send  # noqa: E402


def bodies(bundle: Path, n: int, seed: int = 0) -> list[bytes]:
    """The serving bench's request mix (serve_load.make_requests: 1-10 history items, 20% text queries, half with
    explain), encoded once."""
    from serve_load import make_requests

    return [json.dumps(b).encode() for b in make_requests(bundle, n, query_frac=0.2, explain_frac=0.5, seed=seed)]


def serve_rss_mb() -> dict[int, float]:
    """pid -> resident MB of this process tree's Serve processes (replicas, proxy, controller)."""
    import psutil

    out = {}
    for p in psutil.Process().children(recursive=True):
        try:
            if "Serve" in p.name() or any("Serve" in c or "ProxyActor" in c for c in p.cmdline()[:1]):
                out[p.pid] = p.memory_info().rss / 2**20
        except psutil.Error:
            continue
    return out


def soak(url: str, reqs: list[bytes], rate: float, seconds: float, senders: int = 32) -> dict:
    errors: list[str] = []
    lat: list[float] = []
    lock = threading.Lock()

    def one(body: bytes, due: float) -> None:
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        t = time.monotonic()
        try:
            status, answer = send(url, "POST", "/v1/recommend", body, timeout=30)
            err = None if status == 200 else f"{status} {answer[:200]!r}"
        except Exception as e:  # timeouts, dropped connections
            err = repr(e)[:200]
        with lock:
            lat.append(time.monotonic() - t)
            if err:
                errors.append(err)

    n = int(rate * seconds)
    t0 = time.monotonic()
    with ThreadPoolExecutor(senders) as pool:
        for i in range(n):
            due = t0 + i / rate
            while due - time.monotonic() > 1.0:  # submit about a second ahead: the pool stays small
                time.sleep(0.2)
            pool.submit(one, reqs[i % len(reqs)], due)
    wall = time.monotonic() - t0
    lat.sort()
    return {
        "requests": n,
        "errors": errors,
        "wall_s": wall,
        "achieved_rps": n / wall,
        "p50_ms": 1000 * lat[len(lat) // 2],
        "p99_ms": 1000 * lat[int(len(lat) * 0.99)],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", required=True)
    p.add_argument("--url", help="a running server (then memory is not measured)")
    p.add_argument("--minutes", type=float, default=10)
    p.add_argument("--rate", type=float, default=30)
    p.add_argument("--warmup", type=float, default=30, help="seconds at the rate before memory is first measured")
    args = p.parse_args(argv)
    url = args.url
    if url is None:
        sys.path.insert(0, str(REPO))
        from serving.app import deploy
        from trainers.runtime import init_ray

        init_ray()
        url = deploy(args.bundle, port=_free_port())
    reqs = bodies(Path(args.bundle), 2000)
    warm = soak(url, reqs, args.rate, args.warmup)
    before = serve_rss_mb()
    res = soak(url, reqs, args.rate, args.minutes * 60)
    after = serve_rss_mb()
    common = set(before) & set(after)
    b, a = sum(before[k] for k in common), sum(after[k] for k in common)
    growth = (a - b) / b if b else float("nan")
    print(f"warm-up: {warm['requests']} requests, {len(warm['errors'])} errors")
    print(
        f"soak: {res['requests']} requests in {res['wall_s']:.0f}s ({res['achieved_rps']:.1f} req/s), "
        f"errors {len(res['errors'])}, p50 {res['p50_ms']:.0f} ms, p99 {res['p99_ms']:.0f} ms"
    )
    print(
        f"Serve processes' resident memory: {b:.0f} MB -> {a:.0f} MB ({100 * growth:+.1f}%) over {len(common)} "
        f"processes; replaced or new processes: {len(set(after) ^ set(before))}"
    )
    for e in res["errors"][:10]:
        print("  error:", e)
    return 0 if not res["errors"] and growth < 0.10 else 1


if __name__ == "__main__":
    sys.exit(main())
