"""Test NDCG@10 of a bundle WITHOUT its priors, for the "without the prior" columns in docs/RESULTS.md "Transfer":
the same weights, without the last prior (crossrec.priors: transition), then without any prior.

    python bench/pop_prior_ablation.py as-trained BUNDLE DATASET            # with, beta 0, beta 0 and gamma 0
    python bench/pop_prior_ablation.py zero-shot BUNDLE DATASET DOMAIN      # calibrated as before the prior

`as-trained` evaluates every domain under the bundle's protocol (retrieval only: a ranker is not applied);
`zero-shot` calibrates on DOMAIN's validation targets with no prior (text prior and learned weight only) and
evaluates DOMAIN. Prints one JSON line.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys

from crossrec.bundle import load_bundle
from crossrec.dataset import Dataset
from crossrec.evaluation import evaluate
from crossrec.inference import bundle_retriever, calibrate_zero_shot
from crossrec.splits import Splits


def main(argv: list[str]) -> int:
    kind, bundle_path, data_path, *rest = argv
    bundle = load_bundle(bundle_path)
    data = Dataset.load(data_path)
    cfg = bundle.config
    splits = Splits(
        data, cfg.min_per_domain, protocol=cfg.protocol, cold_fraction=cfg.cold_fraction, cold_seed=cfg.cold_seed
    )
    scorer = bundle_retriever(bundle, data, splits)
    if kind == "as-trained":
        out = {}
        priors = list(scorer.priors)
        for name, keep in (("with", priors), ("without_co", priors[:-1]), ("without_priors", [])):
            scorer.priors = keep
            res = evaluate(splits, scorer, "test", ks=(10,))
            out[name] = {d: m["ndcg@10"] for d, m in res.metrics.items()}
        print(json.dumps(out))
    elif kind == "zero-shot":
        (domain,) = rest
        scorer.model = copy.deepcopy(scorer.model)
        scorer.model.cfg = dataclasses.replace(scorer.model.cfg, priors=[])
        params = calibrate_zero_shot(scorer, [domain])
        res = evaluate(splits, scorer, "test", ks=(10,), domains=[domain])
        print(json.dumps({"params": params, domain: res.metrics[domain]["ndcg@10"]}))
    else:
        raise SystemExit(f"unknown mode {kind!r} (as-trained, zero-shot)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
