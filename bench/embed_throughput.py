"""Catalog embedding throughput: the Ray Data job (trainers/embed.py) vs a plain in-process loop.

    .venv/bin/python bench/embed_throughput.py --n 2000
    .venv/bin/python bench/embed_throughput.py --data data/amazon-art-office --backbone smollm2-135m --n 500

Both encode the same N item texts (a seeded sample of the dataset's catalog, rendered as training does) with
the same frozen backbone, and both are timed end to end as a caller sees them: the in-process row loads the
backbone and runs `Backbone.encode`; the Ray row starts its actor pool (each actor loads the backbone) and runs
the job on an already started Ray (Ray's own start-up is printed apart); an extra row shows the in-process
encode alone, without loading the model. The vector cache is bypassed. The last column is throughput relative
to in-process end to end (> 1: Ray Data is faster); the vectors are checked to agree.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from crossrec.backbones import load_backbone, prepare_backbone
from crossrec.dataset import Dataset
from crossrec.embedding import catalog_texts, template_of
from crossrec.splits import Splits

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(REPO / "data" / "amazon-food-kitchen"), help="a prepared dataset")
    ap.add_argument("--n", type=int, default=4000, help="texts to encode (default: 4000)")
    ap.add_argument("--backbone", default="minilm")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=128, help="texts per batch, both methods (default: 128)")
    ap.add_argument("--actors", type=int, default=None, help="Ray Data actors (default: one per free CPU/GPU)")
    ap.add_argument("--address", default=None, help="Ray cluster address (default: start a local Ray)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    data = Dataset.load(a.data)
    splits = Splits(data)
    texts = catalog_texts(data.items.take(splits.item_row), template_of("", a.max_tokens))
    pick = np.sort(np.random.default_rng(a.seed).choice(len(texts), size=min(a.n, len(texts)), replace=False))
    texts = [texts[i] for i in pick]
    prepare_backbone(a.backbone)  # a GGUF conversion (once) is not part of either measurement
    print(
        f"{len(texts)} texts of {a.data} ({', '.join(splits.domains)}), backbone {a.backbone}, "
        f"max_tokens {a.max_tokens}, batch {a.batch_size}"
    )

    t0 = time.perf_counter()
    backbone = load_backbone(a.backbone)
    t_load = time.perf_counter() - t0
    reference = backbone.encode(texts, batch_size=a.batch_size, max_length=a.max_tokens)
    t_local = time.perf_counter() - t0
    local_threads = torch.get_num_threads()
    del backbone

    import ray

    from trainers.embed import _actor_plan, embed_texts_ray
    from trainers.runtime import init_ray

    t0 = time.perf_counter()
    init_ray(a.address)
    t_init = time.perf_counter() - t0
    n_actors, cpus, gpus = _actor_plan(a.actors, None)
    t0 = time.perf_counter()
    vectors = embed_texts_ray(texts, a.backbone, a.max_tokens, batch_size=a.batch_size, actors=a.actors)
    t_ray = time.perf_counter() - t0
    resources = ray.cluster_resources()
    ray.shutdown()

    rows = [
        (f"in-process ({local_threads} torch threads)", t_local),
        ("  of which encode (model loaded)", t_local - t_load),
        (f"ray data ({n_actors} actors x {gpus and '1 GPU' or f'{cpus:g} CPU'})", t_ray),
    ]
    print(
        f"\nray.init: {t_init:.1f} s (not counted); cluster: {resources.get('CPU', 0):g} CPU, "
        f"{resources.get('GPU', 0):g} GPU"
    )
    print(f"{'method':<34}{'texts':>7}{'seconds':>10}{'texts/s':>10}{'x in-process':>14}")
    for name, sec in rows:
        print(f"{name:<34}{len(texts):>7}{sec:>10.1f}{len(texts) / sec:>10.1f}{t_local / sec:>14.2f}")
    diff = float(np.abs(vectors - reference).max())
    print(f"max |ray - in-process| = {diff:.2e}")
    return 0 if diff < 1e-4 else 1


if __name__ == "__main__":
    raise SystemExit(main())
