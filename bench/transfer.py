"""Transfer tables: cold-start users, leave-one-domain-out zero-shot, in-domain, and the loss-term ablation.

Each mode runs the same `crossrec train` / `crossrec evaluate` commands a user runs (through crossrec_cli.main,
printed before they run) and writes OUT/result.json; `table` turns result files into a Markdown table and a PNG.

    python bench/transfer.py cold-user --data data/amazon-art-office --out out/bench/cold-ao [--sasrec]
    python bench/transfer.py lodo --data out/pool4 --hold-out office --out out/bench/lodo-office
    python bench/transfer.py in-domain --data data/amazon-art-office --out out/bench/in-ao
    python bench/transfer.py ablation --data data/amazon-art-office --out out/bench/abl-ao \
        --variant base: --variant align:align_weight=0.1 --variant ssl:ssl_weight=0.1
    python bench/transfer.py table out/bench/*/result.json --png out/bench/transfer.png

Pool the two shared datasets into the 4-domain dataset first:
    crossrec prepare ../shared/data/amazon-food-kitchen ../shared/data/amazon-art-office --out out/pool4

Baselines are fitted like the model: on the validation targets of the evaluated domains; nothing is chosen on
test targets. Training runs `crossrec train`'s default config (`recommended`) unless `--config NAME|FILE` is given
(`--config basic`: text vectors only, no graph, no ranker); `--set` passes config overrides to every training run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from crossrec_cli import main as crossrec


def run(argv: list[str]) -> None:
    print("$ crossrec " + " ".join(argv), flush=True)
    rc = crossrec(argv)
    if rc:
        raise SystemExit(f"crossrec {argv[0]} failed with exit code {rc}")


CONFIG: list[str] = []  # ["--config", NAME|FILE] when given: every training run uses it


def train(data: str, out: Path, extra: list[str], sets: list[str]) -> float:
    t0 = time.time()
    if not (out / "bundle.json").is_file():
        sets_argv = sum((["--set", s] for s in sets), [])
        run(["train", "--data", data, "--out", str(out), *CONFIG, *extra, *sets_argv, "--quiet"])
    return round(time.time() - t0, 1)


def evaluate(bundle: Path | None, data: str, out_json: Path, extra: list[str]) -> dict:
    if not out_json.is_file():
        run(
            [
                "evaluate",
                *(["--bundle", str(bundle)] if bundle else []),
                "--data",
                data,
                "--json",
                str(out_json),
                *extra,
                "--quiet",
            ]
        )
    return json.loads(out_json.read_text())


def ndcg_rows(res: dict, domains: list[str] | None = None, metric: str = "ndcg@10") -> dict:
    return {
        m: {d: v[metric] for d, v in per.items() if domains is None or d in domains}
        for m, per in res["metrics"].items()
    }


def cmd_cold_user(a) -> dict:
    out = Path(a.out)
    t = train(a.data, out / "bundle", ["--protocol", "cold-user"], a.set)
    baselines = "popularity,textknn" + (",sasrec" if a.sasrec else "")
    res = evaluate(out / "bundle", a.data, out / "eval.json", ["--protocol", "cold-user", "--baselines", baselines])
    return {"kind": "cold-user", "data": a.data, "train_s": t, "ndcg@10": ndcg_rows(res), "n_targets": res["n_targets"]}


def cmd_lodo(a) -> dict:
    from crossrec.dataset import Dataset

    out = Path(a.out)
    domains = sorted(set(Dataset.load(a.data).items.column("domain").to_pylist()))
    if a.hold_out not in domains:
        raise SystemExit(f"--hold-out: unknown domain {a.hold_out!r} (domains: {', '.join(domains)})")
    train_domains = ",".join(d for d in domains if d != a.hold_out)
    t = train(a.data, out / "bundle", ["--train-domains", train_domains], a.set)
    # Calibrated (crossrec) and as trained (crossrec-as-trained) come out of one evaluation.
    res = evaluate(out / "bundle", a.data, out / "eval.json", ["--domains", a.hold_out])
    return {
        "kind": "lodo",
        "data": a.data,
        "hold_out": a.hold_out,
        "train_s": t,
        "ndcg@10": ndcg_rows(res, [a.hold_out]),
        "n_targets": res["n_targets"],
    }


def cmd_in_domain(a) -> dict:
    out = Path(a.out)
    t = train(a.data, out / "bundle", [], a.set)
    res = evaluate(
        out / "bundle",
        a.data,
        out / "eval.json",
        ["--baselines", "popularity,textknn" + (",sasrec" if a.sasrec else "")],
    )
    return {
        "kind": "in-domain",
        "data": a.data,
        "train_s": t,
        "ndcg@10": ndcg_rows(res),
        "recall@10": ndcg_rows(res, metric="recall@10"),
        "n_targets": res["n_targets"],
    }


def cmd_ablation(a) -> dict:
    out = Path(a.out)
    rows = {}
    for v in a.variant:
        name, _, sets = v.partition(":")
        extra = ["--protocol", a.protocol] if a.protocol else []
        t = train(a.data, out / name, extra, [*a.set, *[s for s in sets.split(",") if s]])
        res = evaluate(out / name, a.data, out / f"{name}.json", [*extra, "--baselines", "popularity"])
        rows[name] = {"sets": sets, "train_s": t, "ndcg@10": ndcg_rows(res)["crossrec"]}
    return {"kind": "ablation", "data": a.data, "protocol": a.protocol or "leave-one-out", "variants": rows}


def cmd_table(a) -> int:
    results = [json.loads(Path(p).read_text()) for p in a.results]
    lines = []
    for r in results:
        if r["kind"] == "ablation":
            lines.append(f"\nablation on {r['data']} ({r['protocol']}), crossrec NDCG@10")
            for name, v in r["variants"].items():
                lines.append(
                    f"| {name} | {v['sets'] or 'defaults'} | "
                    + " | ".join(f"{d} {x:.4f}" for d, x in v["ndcg@10"].items())
                    + f" | {v['train_s']} s |"
                )
            continue
        title = {"cold-user": "cold-user", "lodo": f"held out: {r.get('hold_out')}", "in-domain": "in-domain"}
        what = "NDCG@10 / Recall@10" if "recall@10" in r else "NDCG@10"
        lines.append(f"\n{title[r['kind']]} on {r['data']} ({what}; train {r['train_s']} s)")
        models = list(r["ndcg@10"])
        doms = list(next(iter(r["ndcg@10"].values())))
        lines.append("| model | " + " | ".join(f"{d} ({r['n_targets'].get(d, '?')})" for d in doms) + " |")
        lines.append("|---" * (len(doms) + 1) + "|")
        for m in models:
            cells = [f"{r['ndcg@10'][m].get(d) or 0:.4f}" for d in doms]
            if "recall@10" in r:  # NDCG@10 / Recall@10
                cells = [f"{c} / {r['recall@10'][m].get(d) or 0:.4f}" for c, d in zip(cells, doms)]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    print("\n".join(lines))
    if a.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        panels = [r for r in results if r["kind"] != "ablation"]
        cols = min(4, max(1, len(panels)))
        rows = -(-max(1, len(panels)) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.6 * rows), squeeze=False)
        for ax in axes.flat[len(panels) :]:
            ax.set_visible(False)
        for ax, r in zip(axes.flat, panels):
            dom = "all" if r["kind"] != "lodo" else r["hold_out"]
            names = list(r["ndcg@10"])
            ax.bar(range(len(names)), [r["ndcg@10"][m].get(dom) or 0 for m in names], color="tab:blue")
            ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
            ax.set_title(f"{r['kind']} {Path(r['data']).name} {dom}", fontsize=9)
            ax.set_ylabel("NDCG@10 (test)")
        fig.tight_layout()
        fig.savefig(a.png, dpi=120)
        print(f"wrote {a.png}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode", required=True)
    for name, fn in (
        ("cold-user", cmd_cold_user),
        ("lodo", cmd_lodo),
        ("in-domain", cmd_in_domain),
        ("ablation", cmd_ablation),
    ):
        sp = sub.add_parser(name)
        sp.add_argument("--data", required=True)
        sp.add_argument("--out", required=True)
        sp.add_argument("--config", metavar="NAME|FILE", help="crossrec train --config (default: its default)")
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
        sp.add_argument("--sasrec", action="store_true", help="also the SASRec baseline (trains one)")
        sp.set_defaults(fn=fn)
        if name == "lodo":
            sp.add_argument("--hold-out", required=True, metavar="DOMAIN")
        if name == "ablation":
            sp.add_argument("--variant", action="append", required=True, metavar="NAME:KEY=VALUE,...")
            sp.add_argument("--protocol", choices=["leave-one-out", "cold-user"])
    sp = sub.add_parser("table")
    sp.add_argument("results", nargs="+")
    sp.add_argument("--png")
    a = ap.parse_args()
    if a.mode == "table":
        return cmd_table(a)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    if a.config:
        CONFIG[:] = ["--config", a.config]
    result = a.fn(a)
    result["config"] = a.config or "default"
    (Path(a.out) / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["ndcg@10"] if "ndcg@10" in result else result["variants"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
