"""Made once, at commit 30d5e84 (before the retrieval core, crossrec.retrieval): a small bundle with both priors on
the food-kitchen slice of tests/conftest.py `cross_fk` (leave-one-out) and what the code of that commit answered for
it (expected.json): evaluation's top-10 and metrics, `Recommender.recommend` lists with explanations, and zero-shot
calibration. tests/test_retrieval.py checks that today's code answers the same.

    PYTHONPATH=tests .venv/bin/python tests/data/golden/make.py   # at commit 30d5e84
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parents[1]))
from conftest import _subset, bundle_items  # noqa: E402

from crossrec.bundle import load_bundle, save_bundle  # noqa: E402
from crossrec.co_prior import co_prior_meta, fit_co_prior  # noqa: E402
from crossrec.dataset import prepare  # noqa: E402
from crossrec.evaluation import evaluate, top_k_lists  # noqa: E402
from crossrec.inference import bundle_scorer, calibrate_zero_shot  # noqa: E402
from crossrec.pop_prior import fit_pop_prior, pop_prior_meta  # noqa: E402
from crossrec.recommender import HistoryItem, Recommender  # noqa: E402
from crossrec.transitions import Transitions  # noqa: E402


def cross_fk(root: Path) -> Path:
    src = HERE.parent / "amazon-food-kitchen-mini"
    prepare([_subset(src, root / "fk-src", 200, extra_items=10, cross_domain=True)], root / "fk", progress=False)
    return root / "fk"


def main() -> None:
    root = Path(tempfile.mkdtemp())
    from crossrec.config import TrainConfig
    from crossrec.dataset import Dataset
    from crossrec.inference import backbone_vectors
    from crossrec.model import CrossRecModel
    from crossrec.splits import Splits
    from crossrec.training import ModelScorer

    data = Dataset.load(cross_fk(root))
    sp = Splits(data)  # leave-one-out: every cross-domain user has targets in both domains
    vecs = torch.from_numpy(backbone_vectors(data, sp, "minilm", "", 64))
    cfg = TrainConfig(dim=32, layers=1, text_prior_decay=0.6, text_prior_cross=0.1)
    torch.manual_seed(0)
    model = CrossRecModel(cfg, len(sp.domains), in_dim=vecs.shape[1]).eval()
    model.adaptor.init_from_vectors(vecs)
    with torch.inference_mode():
        item_vecs = model.item_vectors(vecs)
    torch.manual_seed(1)
    with torch.no_grad():  # a tower that is not the identity: random, fixed weights
        for p in model.tower.parameters():
            p.add_(0.05 * torch.randn_like(p))
    scorer = ModelScorer(model, item_vecs, sp, np.arange(len(sp.domains)))
    pop = fit_pop_prior(scorer)
    tr = Transitions.from_splits(sp)
    co = fit_co_prior(scorer, tr)
    # Both priors on in both domains whatever validation chose (an untrained model): the test is about scoring.
    for d in sp.domains:
        pop[d].weight = pop[d].weight or 0.05
        co[d].weight = co[d].weight or 0.3
    out = HERE / "bundle"
    save_bundle(
        out,
        model,
        cfg,
        list(sp.domains),
        384,
        None,
        bundle_items(data, sp, item_vecs),
        {},
        data.content_hash,
        extra={"pop_prior": pop_prior_meta(pop), "co_prior": co_prior_meta(co, len(tr))},
        pop={d: pop[d].pop for d in sp.domains},
        co=tr.to_table(sp.item_ids, [sp.domains[k] for k in sp.item_domain]),
    )
    bundle = load_bundle(out)
    expected: dict = {"bundle_version": bundle.version, "evaluate": {}, "recommend": [], "zero_shot": {}}
    ev = bundle_scorer(bundle, data, sp)
    for split in ("valid", "test"):
        res = evaluate(sp, ev, split=split)
        expected["evaluate"][split] = {"metrics": res.metrics}
        for d in sp.domains:
            top, _ = top_k_lists(sp, ev, d, split=split, k=10)
            rows = sp.targets(split, d)
            batch = sp.batch(rows, d)
            full = ev(batch)
            expected["evaluate"][split][d] = {
                "top10": [[str(sp.item_ids[sp.offset[d] + c]) for c in t] for t in top.tolist()],
                "scores": [[round(float(full[r, c]), 6) for c in t] for r, t in enumerate(top.tolist())],
            }
    rec = Recommender(bundle)
    for d in sp.domains:
        for h in sp.batch(sp.targets("test", d)[:5], d).histories:
            hist = [HistoryItem(sp.domains[sp.item_domain[i]], str(sp.item_ids[i])) for i in h]
            got = rec.recommend(hist, d, k=10, explain=True)
            expected["recommend"].append(
                {
                    "domain": d,
                    "history": [[x.domain, x.item_id] for x in hist],
                    "items": [g.item_id for g in got],
                    "scores": [round(g.score, 6) for g in got],
                    "reasons": [g.reasons for g in got],
                }
            )
    zs = bundle_scorer(load_bundle(out), data, sp)
    params = calibrate_zero_shot(zs, ["kitchen"])
    expected["zero_shot"] = {
        "params": {k: str(v) for k, v in params.items()},
        "metrics": evaluate(sp, zs, split="test", domains=["kitchen"]).metrics,
    }
    (HERE / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")
    print({d: (pop[d].weight, co[d].weight) for d in sp.domains}, np.round(params.get("learned_weight", 0), 3))


if __name__ == "__main__":
    main()
