"""Does fine-tuning the backbone pay? End-to-end LoRA on MiniLM against the cached default (frozen MiniLM vectors)
on a slice of the shared data, with the commands a user runs (printed before they run), per seed:

    frozen-sS       crossrec train --data SLICE --out OUT/frozen-sS --config basic --set seed=S [--set KEY=VALUE ...]
    lora-sS         crossrec train --data SLICE --out OUT/lora-sS --config basic --mode end-to-end --set seed=S
                        [--set ...] --set lora.enabled=true [--lora-set KEY=VALUE ...]   (`patience` stops it)
    lora-budget-sS  the same with `epochs` cut to what fits frozen-sS's wall time (at least one epoch)

Both use `basic` (text vectors only, no graph, no ranker) so that the backbone is the one difference. Each bundle's
test NDCG@10 is reported with the priors it was trained with (what `crossrec evaluate` reports) and with the
priors off (the model's own score: what the backbone and the towers learned), in-process on the same splits.

    python bench/finetune_quality.py --data data/amazon-art-office --users 600 --out out/bench/ftq --seeds 0,1 \
        --set batch_size=16 --set max_tokens=32 --lora-set backbone_lr=3.6e-5 --lora-set lora.rank=8
    python bench/finetune_quality.py table out/bench/ftq/result.json

Writes OUT/result.json (per run: wall seconds, epochs, best epoch, test NDCG@10 per domain with and without the
priors) and prints the Markdown table of docs/RESULTS.md "Fine-tuning vs frozen vectors".
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from adapt import run  # bench/adapt.py (this script's folder): a crossrec command, printed, timed, loud on failure


def ndcg(bundle: Path, data: Path) -> dict:
    """Test NDCG@10 per domain and overall, with the bundle's priors and without them."""
    from crossrec.bundle import load_bundle
    from crossrec.dataset import Dataset
    from crossrec.evaluation import evaluate
    from crossrec.inference import bundle_retriever
    from crossrec.splits import splits_for

    b = load_bundle(bundle)
    ds = Dataset.load(data)
    splits = splits_for(ds, b.config)
    retriever = bundle_retriever(b, ds, splits)
    out = {}
    for name, priors in (("priors", list(retriever.priors)), ("no_priors", [])):
        retriever.priors = priors
        res = evaluate(splits, retriever, split="test")
        out[name] = {d: round(m["ndcg@10"], 4) for d, m in res.metrics.items()}
    return out


def history(bundle: Path) -> list[dict]:
    return json.loads((bundle / "bundle.json").read_text())["metrics"]["history"]


def best_epoch(bundle: Path) -> int:
    h = history(bundle)
    return max(h, key=lambda r: r["valid/ndcg@10"])["epoch"]


def budget_epochs(lora: Path, lora_wall: float, frozen_wall: float) -> int:
    """Epochs of the converged LoRA run whose cumulative time (its start-up and export included, as in its wall
    time) fits the frozen run's wall time."""
    h = history(lora)
    per_epoch = [r["train/epoch_s"] + r.get("time/valid_s", 0.0) for r in h]
    overhead = max(0.0, lora_wall - sum(per_epoch))
    k, spent = 0, overhead
    for s in per_epoch:
        if spent + s > frozen_wall:
            break
        spent += s
        k += 1
    return max(1, k)


def measure(args: argparse.Namespace) -> None:
    from crossrec_cli.options import users_slice

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = users_slice(args.data, out / "data", args.users) if args.users else Path(args.data)
    result_path = out / "result.json"
    result = json.loads(result_path.read_text()) if result_path.is_file() else {"runs": {}}
    result.update({"data": str(args.data), "users": args.users, "set": args.set, "lora_set": args.lora_set})
    lora_flags = ["--mode", "end-to-end", "--set", "lora.enabled=true"]
    for kv in args.lora_set:
        lora_flags += ["--set", kv]
    base = ["train", "--data", str(data), "--config", "basic", "--quiet", "--force"]
    for kv in args.set:
        base += ["--set", kv]

    def train(name: str, seed: int, extra: list[str]) -> None:
        if name in result["runs"]:
            return
        bundle = out / name
        wall = run([*base, "--out", str(bundle), "--set", f"seed={seed}", *extra])
        h = history(bundle)
        result["runs"][name] = {
            "seed": seed,
            "wall_s": wall,
            "epochs": len(h),
            "best_epoch": best_epoch(bundle),
            "test_ndcg10": ndcg(bundle, data),
        }
        result_path.write_text(json.dumps(result, indent=1))
        print(name, json.dumps(result["runs"][name]), flush=True)

    for seed in args.seeds:
        train(f"frozen-s{seed}", seed, [])
        train(f"lora-s{seed}", seed, lora_flags)
        if args.no_budget:
            continue
        k = budget_epochs(
            out / f"lora-s{seed}",
            result["runs"][f"lora-s{seed}"]["wall_s"],
            result["runs"][f"frozen-s{seed}"]["wall_s"],
        )
        train(f"lora-budget-s{seed}", seed, [*lora_flags, "--set", f"epochs={k}", "--set", "patience=0"])
    table(result)


def table(result: dict) -> None:
    runs = result["runs"]
    doms = sorted({d for r in runs.values() for d in r["test_ndcg10"]["priors"]} - {"all"}) + ["all"]
    head = " | ".join(f"{d} (priors / off)" for d in doms)
    print(f"| run | seed | wall s | epochs (best) | {head} |")
    print("|---|---|---|---|" + "---|" * len(doms))
    for name, r in runs.items():
        cells = " | ".join(
            f"{r['test_ndcg10']['priors'].get(d, float('nan')):.4f} / {r['test_ndcg10']['no_priors'].get(d, float('nan')):.4f}"
            for d in doms
        )
        print(
            f"| {name.rsplit('-s', 1)[0]} | {r['seed']} | {r['wall_s']:.0f} | {r['epochs']} ({r['best_epoch']}) | {cells} |"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd")
    t = sub.add_parser("table", help="print the table of result files")
    t.add_argument("files", nargs="+")
    p.add_argument("--data", help="a prepared dataset")
    p.add_argument("--users", type=int, default=0, help="a slice of this many users (0: all)")
    p.add_argument("--out", default="out/bench/ftq")
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1])
    p.add_argument("--no-budget", action="store_true", help="skip the lora-budget runs")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config of every run")
    p.add_argument("--lora-set", action="append", default=[], metavar="KEY=VALUE", help="config of the LoRA runs")
    args = p.parse_args()
    if args.cmd == "table":
        for f in args.files:
            table(json.loads(Path(f).read_text()))
        return
    if not args.data:
        p.error("--data is required")
    measure(args)


if __name__ == "__main__":
    main()
