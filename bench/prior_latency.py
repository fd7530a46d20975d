"""What the transition prior (crossrec.priors.transition) costs a request: in-process `Recommender.recommend` (the code a Serve
replica runs, with the bundle's ranker if it has one) on the same seeded requests with the bundle's transition
prior and with it switched off (beta 0), alternating, after a warm-up. Prints median and p99 per setting.

    .venv/bin/python bench/prior_latency.py --bundle out/bench/in-fk-co/bundle [--requests 300] [--explain-frac 0.2]
    .venv/bin/python bench/prior_latency.py --bundle out/bench/in-fk-co/bundle --fit-data data/amazon-food-kitchen

`--fit-data` times instead what training's end adds: counting the transitions of the bundle's training split and
choosing beta and the decay on validation targets (`valid_max_targets` per domain), as trainers/pipeline.py does.
"""

from __future__ import annotations

import argparse
import random
import time

import numpy as np

from crossrec.bundle import load_bundle
from crossrec.recommender import HistoryItem, Recommender


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--explain-frac", type=float, default=0.2)
    ap.add_argument("--fit-data", metavar="DATASET", help="time the prior's fit on this dataset instead")
    a = ap.parse_args()
    if a.fit_data:
        return fit_time(a.bundle, a.fit_data)
    rec = Recommender.load(load_bundle(a.bundle))
    co = next((p for p in rec.retriever.priors if p.name == "transition"), None)
    if co is None or not co.weight:
        raise SystemExit(f"{a.bundle}: the bundle has no transition prior (beta 0 in every domain)")
    rng = random.Random(0)
    reqs = []
    for _ in range(a.requests):
        hist = []
        for _ in range(rng.randint(1, 10)):
            d = rng.choice(rec.domains)
            hist.append(HistoryItem(domain=d, item_id=rng.choice(rec.ids[d])))
        reqs.append((hist, rng.choice(rec.domains), rng.random() < a.explain_frac))
    weights = co.weight
    times: dict[str, list[float]] = {"with the transition prior": [], "without (beta 0)": []}
    for h, d, e in reqs[:20]:  # warm-up
        rec.recommend(h, d, k=10, explain=e)
    for h, d, e in reqs:
        for name, w in (("with the transition prior", weights), ("without (beta 0)", {})):
            co.weight = w
            t = time.perf_counter()
            rec.recommend(h, d, k=10, explain=e)
            times[name].append(time.perf_counter() - t)
    co.weight = weights
    print(f"{a.requests} requests, explain share {a.explain_frac}, ranker: {rec.ranker is not None}")
    print("| setting | median ms | p99 ms |\n|---|---|---|")
    for name, ts in times.items():
        print(f"| {name} | {1e3 * np.median(ts):.2f} | {1e3 * np.percentile(ts, 99):.2f} |")
    return 0


def fit_time(bundle_path: str, data_path: str) -> int:
    from crossrec.dataset import Dataset
    from crossrec.inference import bundle_retriever
    from crossrec.priors import make_prior
    from crossrec.priors.base import choose
    from crossrec.splits import splits_for

    bundle, data = load_bundle(bundle_path), Dataset.load(data_path)
    splits = splits_for(data, bundle.config, training=True)
    retriever = bundle_retriever(bundle, data, splits)
    # Chosen over the model and the priors before it, as at training end.
    retriever.priors = [p for p in retriever.priors if p.name != "transition"] + [make_prior("transition", splits)]
    prior = retriever.priors[-1]
    t0 = time.perf_counter()
    prior.fit(splits)
    t1 = time.perf_counter()
    choices = choose(retriever, prior, max_targets=bundle.config.valid_max_targets)
    t2 = time.perf_counter()
    print(f"{len(prior.transitions):,} pairs counted in {t1 - t0:.1f} s; weight and decay chosen in {t2 - t1:.1f} s")
    for d in choices:
        print(f"  {prior.describe(d)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
