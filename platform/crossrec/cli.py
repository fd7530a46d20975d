"""The `crossrec` command line. Each subcommand prints a one-line reason and exits non-zero on bad input.

Commands that need Ray (train, tune, serve, submit) import `trainers` / `serving` when they run, so the
core library stays framework-free and `crossrec prepare` starts fast.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import crossrec
from crossrec.schema import DataError

__all__ = ["main", "build_parser"]

REPO = Path(__file__).resolve().parents[2]
VENDORED = REPO / "data"
RECOMMENDED = REPO / "configs" / "recommended.yaml"  # the pipeline the README's numbers measure


class UsageError(ValueError):
    """Bad arguments: reported as one line, exit code 2."""


def _csv_list(text: str | None) -> list[str] | None:
    return None if text is None else [x.strip() for x in text.split(",") if x.strip()]


# -- prepare ---------------------------------------------------------------------------------------------
def cmd_prepare(args: argparse.Namespace) -> int:
    from crossrec.dataset import prepare

    man = prepare(args.sources, args.out, fmt=args.format, domain=args.domain, identity=args.identity,
                  force=args.force, progress=not args.quiet)
    c = man["counts"]
    print(f"wrote {args.out}: {c['users']:,} users, {c['items']:,} items, {c['interactions']:,} interactions")
    for d, dc in c["domains"].items():
        print(f"  {d:<12} {dc['users']:>8,} users {dc['items']:>8,} items {dc['interactions']:>9,} interactions")
    for what, n in {**man["skipped"], **{k: v for k, v in man["report"].items() if isinstance(v, int)}}.items():
        if n:
            print(f"  {what}: {n:,}")
    return 0


# -- evaluate --------------------------------------------------------------------------------------------
def _baseline_scorers(names: list[str], splits, data, text_cfg, backbone: str, args) -> dict:
    from crossrec.baselines import BASELINES

    out = {}
    for name in names:
        if name == "sasrec":
            from trainers.baselines import sasrec_scorer  # trains with Ray Train (cached per dataset + config)

            out[name] = sasrec_scorer(args.data, data, splits, address=getattr(args, "address", None),
                                      progress=not args.quiet)
        else:
            out[name] = BASELINES[name](splits, data, backbone, text_cfg.text_template, text_cfg.max_tokens,
                                        progress=not args.quiet)
    return out


def cmd_evaluate(args: argparse.Namespace) -> int:
    from crossrec.baselines import BASELINES
    from crossrec.config import TrainConfig
    from crossrec.dataset import Dataset
    from crossrec.evaluation import evaluate, format_table
    from crossrec.splits import Splits

    accepted = [*BASELINES, "sasrec"]
    baselines = _csv_list(args.baselines)
    if baselines is None:
        baselines = ["popularity", "textknn"] if args.bundle else ["popularity"]
    unknown = [b for b in baselines if b not in accepted]
    if unknown:
        raise UsageError(f"--baselines: unknown baseline {unknown[0]!r} (accepted: {', '.join(accepted)})")
    if args.bundle is None and not baselines:
        raise UsageError("nothing to evaluate: pass --bundle, --baselines, or both")
    bundle = None
    if args.bundle is not None:
        from crossrec.bundle import load_bundle

        bundle = load_bundle(args.bundle)
    data = Dataset.load(args.data)
    splits = Splits(data, min_per_domain=args.min_per_domain)
    domains = _csv_list(args.domains)
    for d in domains or []:
        if d not in splits.domains:
            raise UsageError(f"--domains: unknown domain {d!r} (domains in {args.data}: "
                             f"{', '.join(splits.domains)})")
    scorers = {}
    if bundle is not None:
        from crossrec.inference import bundle_scorer, calibrate_zero_shot

        evaluated = domains or splits.domains
        unseen = [d for d in evaluated if d not in bundle.domains]
        if unseen:
            print(f"zero-shot: the bundle never trained on {', '.join(unseen)}; their items are embedded from "
                  f"text with {bundle.config.backbone}")
        scorers["crossrec"] = bundle_scorer(bundle, data, splits, progress=not args.quiet)
        if unseen == evaluated and not args.as_trained:  # a whole new dataset: calibrated on its validation split
            calibrate_zero_shot(scorers["crossrec"], evaluated)
        if bundle.has_ranker:  # the full pipeline is `crossrec`; retrieval alone is reported beside it
            from crossrec.ranker import RankedScorer, load_ranker

            scorers["crossrec-retrieval"] = scorers["crossrec"]
            scorers["crossrec"] = RankedScorer(scorers["crossrec-retrieval"], load_ranker(bundle))
    # Text baselines (textknn) use the bundle's backbone, template and truncation, else the training defaults;
    # --backbone overrides the backbone.
    text_cfg = bundle.config if bundle is not None else TrainConfig()
    backbone = args.backbone or text_cfg.backbone
    scorers.update(_baseline_scorers(baselines, splits, data, text_cfg, backbone, args))
    params = {name: s.params for name, s in scorers.items() if hasattr(s, "params")}
    for name, p in params.items():
        print(f"{name}: {', '.join(f'{k}={v}' for k, v in p.items())} (chosen on the validation split)")
    results = {name: evaluate(splits, scorer, split=args.split, domains=domains, progress=not args.quiet,
                              desc=name, mask_history=not args.no_mask) for name, scorer in scorers.items()}
    print(format_table(results))
    if args.json:
        out = {"bundle": args.bundle, "dataset": str(args.data), "data_hash": data.content_hash,
               "protocol": {"split": args.split, "min_per_domain": args.min_per_domain,
                            "mask_history": not args.no_mask, "full_ranking": True,
                            "ties": "item id order"},
               "metrics": {m: r.metrics for m, r in results.items()}, "params": params,
               "n_targets": next(iter(results.values())).n_targets,
               "slices": {m: r.slices for m, r in results.items()}}
        if bundle is not None:
            out["bundle_version"] = bundle.version
            out["zero_shot_domains"] = [d for d in (domains or splits.domains) if d not in bundle.domains]
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


# -- train -----------------------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    from crossrec.config import RunSettings, load_config

    overrides = list(args.set or [])
    if args.mode:
        overrides.append(f"mode={args.mode}")
    if args.train_domains:
        overrides.append(f"train_domains=[{args.train_domains}]")
    if args.init:
        overrides.append(f"init_from={args.init}")
    cfg = load_config(args.config, overrides)
    if args.workers < 1:
        raise UsageError(f"--workers must be >= 1, got {args.workers}")
    if cfg.strategy == "deepspeed":
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            raise UsageError("`strategy` deepspeed needs DeepSpeed: .venv/bin/pip install --no-build-isolation "
                             "deepspeed==0.19.8 (see README), or use `strategy` ddp")
    run = RunSettings(workers=args.workers, gpus_per_worker=args.gpus_per_worker, address=args.address,
                      storage_path=args.storage, name=args.name)
    from crossrec.dataset import Dataset

    Dataset.load(args.data)  # fail fast, before Ray starts, on a bad --data
    from trainers.train import train_bundle

    meta = train_bundle(args.data, args.out, cfg, run, resume_from=args.resume, progress=not args.quiet)
    m = meta["metrics"]
    print(f"\nwrote bundle {args.out} (version {meta['version']}); fit {m['time_s']['fit']:.0f}s, "
          f"embedding {m['time_s']['embed']:.0f}s")
    print(f"  {'test':<10}{'targets':>9}{'R@10':>9}{'N@10':>9}{'MRR@10':>9}")
    for d, v in m["test"].items():
        print(f"  {d:<10}{m['n_targets'][d]:>9}{v['recall@10']:>9.4f}{v['ndcg@10']:>9.4f}{v['mrr@10']:>9.4f}")
    if "ranker" in meta:
        r = meta["ranker"]
        print(f"  with the ranker (top-{cfg.ranker.top_n} re-ranked; fit {r['time_s']['fit']:.0f}s):")
        for d, v in r["test"].items():
            print(f"  {d:<10}{r['n_targets'][d]:>9}{v['recall@10']:>9.4f}{v['ndcg@10']:>9.4f}{v['mrr@10']:>9.4f}")
    print(f"compare with baselines: crossrec evaluate --bundle {args.out} --data {args.data}")
    return 0


# -- recommend -------------------------------------------------------------------------------------------
def _recommend(rec, history: list, domain: str, k: int) -> list:
    """Top-k with reasons: retrieval alone, or retrieval's top-N re-ordered by the bundle's ranker (as Serve
    answers), the score shown then being the ranker's."""
    import numpy as np

    from crossrec.ranker import RankRequest, load_ranker

    ranker = load_ranker(rec.bundle)
    if ranker is None:
        return rec.recommend(history, domain, k=k, explain=True)
    c = rec.candidates(history, domain, max(ranker.cfg.top_n, k))
    scores = ranker.score(RankRequest(domain=domain, candidates=c.item_ids, retrieval_scores=c.scores, user=c.user,
                                      history=[(h.domain, h.item_id) for h in history],
                                      history_vectors=c.history_vectors, candidate_vectors=c.candidate_vectors))
    order = np.argsort(-scores, kind="stable")[:k]
    top = [c.item_ids[j] for j in order]
    by_id = {r.item_id: r for r in rec.recommend(history, domain, k=len(top), explain=True, candidates=top)}
    out = [by_id[i] for i in top]
    for r, j in zip(out, order):
        r.score = float(scores[j])
    return out


def cmd_recommend(args: argparse.Namespace) -> int:
    from crossrec.bundle import load_bundle
    from crossrec.recommender import HistoryItem, Recommender

    rec = Recommender(load_bundle(args.bundle))
    history = []
    for token in _csv_list(args.history) or []:
        # An item id alone is looked up in every domain; DOMAIN:ITEM_ID names the domain.
        dom, _, iid = token.rpartition(":") if ":" in token else ("", "", token)
        found = [d for d in rec.domains if iid in rec.pos[d]] if not dom else [dom]
        if not found:
            raise UsageError(f"--history: unknown item_id {iid!r} (not in any domain of the bundle)")
        history.append(HistoryItem(domain=found[0], item_id=iid))
    if args.k < 1:
        raise UsageError(f"--k must be >= 1, got {args.k}")
    try:
        recs = _recommend(rec, history, args.domain, args.k)
    except KeyError as e:
        raise UsageError(str(e)) from None
    print(f"history ({len(history)} items):")
    for h in history:
        print(f"  [{h.domain}] {h.item_id}  {rec.titles[h.domain][rec.pos[h.domain][h.item_id]][:80]}")
    print(f"top {len(recs)} in {args.domain}:")
    for i, r in enumerate(recs, 1):
        print(f"{i:>3}. {r.item_id}  {r.score:7.2f}  {r.title[:80]}")
        for reason in r.reasons or []:
            t = rec.titles[reason['domain']][rec.pos[reason['domain']][reason['item_id']]]
            print(f"       because of [{reason['domain']}] {reason['item_id']} ({reason['weight']:+.2f})  {t[:60]}")
    return 0


# -- submit, jobs (Ray Jobs API; trainers.jobs imports Ray, so only when these run) -------------------------
def _key_values(pairs: list[str] | None, option: str) -> dict[str, str]:
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"{option} {pair!r}: expected KEY=VALUE")
        out[key] = value
    return out


def cmd_submit(args: argparse.Namespace) -> int:
    from trainers.jobs import exit_code, follow, submit

    c, sid = submit(args.address, args.command_args, working_dir=args.working_dir,
                    env=_key_values(args.env, "--env"), excludes=args.exclude, pip=args.pip, python=args.python,
                    submission_id=args.id, entrypoint_num_gpus=args.entrypoint_gpus or None)
    print(sid, flush=True)
    where = f" --address {args.address}" if args.address else ""
    if not args.follow:
        print(f"submitted; follow it with: crossrec jobs logs {sid} --follow{where}", file=sys.stderr)
        return 0
    try:
        return exit_code(follow(c, sid))
    except KeyboardInterrupt:
        print(f"\ndetached; job {sid} keeps running (stop it: crossrec jobs stop {sid}{where})", file=sys.stderr)
        return 130


def cmd_jobs(args: argparse.Namespace) -> int:
    from trainers.jobs import client, exit_code, follow, format_jobs, job_info, job_logs, list_jobs, report, stop_job

    c = client(args.address)
    if args.action == "list":
        print(format_jobs(list_jobs(c)))
        return 0
    if args.action == "status":
        info = job_info(c, args.job_id)
        print(f"entrypoint: {info.entrypoint}")
        report(info, sys.stdout)
        return exit_code(info.status)
    if args.action == "logs":
        if args.follow:
            return exit_code(follow(c, args.job_id))
        print(job_logs(c, args.job_id), end="")
        return 0
    info = stop_job(c, args.job_id, wait_s=args.wait)
    print(f"job {args.job_id} {info.status}")
    return 0


# -- tune ------------------------------------------------------------------------------------------------
def cmd_tune(args: argparse.Namespace) -> int:
    from crossrec.dataset import Dataset
    from crossrec.sweep import load_sweep

    if args.trials is not None and args.trials < 1:
        raise UsageError(f"--trials must be >= 1, got {args.trials}")
    sweep = load_sweep(args.sweep, num_samples=args.trials)
    Dataset.load(args.data)  # fail fast, before Ray starts, on a bad --data
    from trainers.tune import run_sweep  # imports Ray

    res = run_sweep(sweep, args.data, args.out, address=args.address, resume=args.resume, progress=not args.quiet)
    if args.quiet:
        from crossrec.sweep import format_trial_table

        print(format_trial_table(res.records, sweep.metric, sweep.mode))
    early = sum(r.status == "stopped early" for r in res.records)
    print(f"\n{len(res.records)} trials in {res.wall_s:.0f}s ({early} stopped early); table {res.out / 'trials.csv'}, "
          f"plot {res.out / 'sweep.png'}")
    if res.interrupted:
        print(f"crossrec tune: interrupted; continue with: crossrec tune {args.sweep} --data {args.data} "
              f"--out {args.out}{f' --trials {args.trials}' if args.trials else ''} --resume", file=sys.stderr)
        return 130
    if res.best is None:
        print("crossrec tune: error: no trial reported a metric (see the trials' errors above)", file=sys.stderr)
        return 1
    b = res.best.best(sweep.metric, sweep.mode)
    params = ", ".join(f"{k}={v}" for k, v in res.best.params.items())
    print(f"best: trial {res.best.trial_id} ({params}) {sweep.metric} {b[sweep.metric]:.4f} at epoch {b['epoch']}")
    test = res.bundle["metrics"]["test"]["all"]
    print(f"wrote bundle {res.out / 'best'}: test ndcg@10 {test['ndcg@10']:.4f}, recall@10 {test['recall@10']:.4f}; "
          f"compare with baselines: crossrec evaluate --bundle {res.out / 'best'} --data {args.data}")
    return 0


# -- serve (serving/ imports Ray Serve, so only when this runs) ----------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    bundle = Path(args.bundle)
    if not (bundle / "bundle.json").is_file():
        raise UsageError(f"--bundle: {bundle} is not a crossrec bundle (no bundle.json); create one with "
                         "`crossrec train`")
    if args.config and not Path(args.config).is_file():
        raise UsageError(f"--config: {args.config} not found")
    if not 0 < args.port < 65536:
        raise UsageError(f"--port must be in 1..65535, got {args.port}")
    from serving.app import serve_until_stopped

    serve_until_stopped(bundle, args.host, args.port, args.config)
    return 0


# -- demo ------------------------------------------------------------------------------------------------
def _sample(src: Path, dst: Path, users: int) -> None:
    """Every k-th user of a prepared dataset with all their interactions and the items they touched, as a
    Parquet folder `prepare` reads: a demo-sized slice of real data (its catalog embeds in a minute)."""
    import numpy as np
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    inter = pq.read_table(src / "interactions.parquet")
    all_users = pc.unique(inter.column("user_id"))
    step = max(1, len(all_users) // users)
    keep = all_users.take(np.arange(0, len(all_users), step)[:users])
    dst.mkdir(parents=True, exist_ok=True)
    inter = inter.filter(pc.is_in(inter.column("user_id"), value_set=keep))
    items = pq.read_table(src / "items.parquet")
    pq.write_table(inter, dst / "interactions.parquet")
    pq.write_table(items.filter(pc.is_in(items.column("item_id"), value_set=pc.unique(inter.column("item_id")))),
                   dst / "items.parquet")


def _serve_once(bundle: Path, body: dict) -> None:
    """Deploys the Serve app for `bundle`, answers `body` over HTTP, prints how to query it, shuts Serve down."""
    from serving.app import curl_line, serve_once

    url, answer = serve_once(bundle, body)
    print(f"POST {url}/v1/recommend -> model {answer['model']}")
    for it in answer["items"]:
        why = ", ".join(f"{x['item_id']} ({x['weight']:+.2f})" for x in it.get("reasons") or [])
        print(f"  {it['item_id']}  {it['score']:7.2f}  {it['title'][:70]}  <- {why}")
    print(f"to serve it until Ctrl-C: crossrec serve --bundle {bundle}")
    print(f"then query it: {curl_line('http://127.0.0.1:8000', body)}")


def cmd_demo(args: argparse.Namespace) -> int:
    import numpy as np

    src = VENDORED / args.dataset
    if not (src / "manifest.json").is_file():
        raise UsageError(f"vendored dataset {src} not found (this command runs from a crossrec checkout)")
    out = Path(args.out)
    quiet = ["--quiet"] if args.quiet else []

    def run(*argv: str) -> None:
        print(f"\n$ crossrec {' '.join(argv)}", flush=True)
        if main([*argv]) != 0:
            raise UsageError(f"demo step `crossrec {argv[0]}` failed (see above)")

    print(f"== 1. prepare: {args.users} users of {src} (real data, vendored)")
    _sample(src, out / "sample", args.users)
    run("prepare", str(out / "sample"), "--out", str(out / "data"), "--force", *quiet)
    print("\n== 2. train (configs/recommended.yaml: cached MiniLM vectors + knowledge graph, then a ranker; "
          "2 Ray Train workers)")
    run("train", "--data", str(out / "data"), "--out", str(out / "bundle"), "--config", str(RECOMMENDED),
        "--set", f"epochs={args.epochs}", "--name", f"demo-{int(__import__('time').time())}", *quiet)
    print("\n== 3. evaluate beside the baselines (full ranking, test split)")
    run("evaluate", "--bundle", str(out / "bundle"), "--data", str(out / "data"), "--json",
        str(out / "eval.json"), *quiet)
    print("\n== 4. recommend for one user")
    from crossrec.dataset import Dataset

    data = Dataset.load(out / "data")
    users = np.array(data.interactions.column("user_id").to_pylist())
    doms = np.array(data.interactions.column("domain").to_pylist())
    items = np.array(data.interactions.column("item_id").to_pylist())
    domains = sorted(set(doms.tolist()))
    # A user with history in several domains, to show cross-domain reasons.
    for u in dict.fromkeys(users.tolist()):
        m = users == u
        if len(set(doms[m].tolist())) > 1 and m.sum() >= 4:
            break
    hist = items[m][:-1][-6:]
    run("recommend", "--bundle", str(out / "bundle"), "--domain", str(doms[m][-1]), "--history",
        ",".join(hist.tolist()), "--k", "5")
    print("\n== 5. serve: the Ray Serve graph over HTTP on 127.0.0.1, one request, then shut down")
    _serve_once(out / "bundle", {"history": [{"item_id": i, "domain": d} for i, d in zip(hist, doms[m][:-1][-6:])],
                                 "domain": str(doms[m][-1]), "k": 3, "explain": True})
    print(f"\ndone: dataset {out / 'data'}, bundle {out / 'bundle'}, metrics {out / 'eval.json'}; "
          f"domains {', '.join(domains)}")
    return 0


# -- parser ----------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="crossrec",
        description="LLM-enhanced cross-domain recommendation on Ray: prepare logs, train, tune, evaluate, serve.",
        epilog="Run `crossrec COMMAND --help` for a command's options. Data contract: see README.md.")
    p.add_argument("--version", action="version", version=f"crossrec {crossrec.__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    sp = sub.add_parser("prepare", help="turn logs into a prepared dataset (Parquet + manifest)",
                        description="Read one or more sources, validate them, unify user identity, and write a "
                                    "prepared dataset folder atomically (nothing is left behind on failure).")
    sp.add_argument("sources", nargs="+", metavar="SRC",
                    help="a folder or file: items.csv + interactions.csv (or .parquet/.jsonl), RecBole/UniSRec "
                         "atomic files, or Amazon Reviews 2023 JSONL")
    sp.add_argument("--out", required=True, metavar="DATASET", help="folder to write")
    sp.add_argument("--format", default="auto",
                    choices=["auto", "csv", "parquet", "jsonl", "recbole", "amazon2023"],
                    help="source format (default: detect)")
    sp.add_argument("--domain", help="domain name for sources that carry none (e.g. one RecBole dataset)")
    sp.add_argument("--identity", metavar="FILE",
                    help="identity table (platform, platform_user_id, user_id) unifying users across platforms")
    sp.add_argument("--force", action="store_true", help="replace DATASET if it exists")
    sp.add_argument("--quiet", action="store_true", help="no progress bar")
    sp.set_defaults(func=cmd_prepare)

    sp = sub.add_parser("evaluate", help="full-ranking metrics per domain, beside baselines",
                        description="Rank every item of each target domain for each test target (leave-one-out "
                                    "per user and domain) and report Recall/NDCG/MRR@10/20/50 per domain and "
                                    "overall.")
    sp.add_argument("--bundle", help="a trained bundle (omit to evaluate baselines only)")
    sp.add_argument("--data", required=True, metavar="DATASET", help="a prepared dataset")
    sp.add_argument("--domains", help="comma-separated domains (default: all)")
    sp.add_argument("--baselines", help="comma-separated: popularity, textknn, sasrec (trained with Ray Train) "
                                        "(default: popularity,textknn with --bundle, else popularity)")
    sp.add_argument("--address", help="Ray address for baselines that train (sasrec)")
    sp.add_argument("--backbone", help="backbone of text baselines (textknn): a registry name or a local model "
                                       "directory (default: the bundle's backbone, else minilm)")
    sp.add_argument("--json", metavar="FILE", help="also write the metrics as JSON")
    sp.add_argument("--split", default="test", choices=["test", "valid"], help="which targets (default: test)")
    sp.add_argument("--min-per-domain", type=int, default=3,
                    help="interactions a user needs in a domain to get targets there (default: 3)")
    sp.add_argument("--no-mask", action="store_true", help="keep history items as candidates")
    sp.add_argument("--as-trained", action="store_true",
                    help="zero-shot (no evaluated domain in the bundle): keep the bundle as trained instead of "
                         "choosing its text-prior decay, cross-domain weight and learned-part weight on this "
                         "dataset's validation split, as the textknn baseline's are")
    sp.add_argument("--quiet", action="store_true", help="no progress bars")
    sp.set_defaults(func=cmd_evaluate)

    sp = sub.add_parser("train", help="train the cross-domain recommender with Ray Train; writes a bundle",
                        description="Train the two-tower model (item adaptor over backbone text vectors + causal "
                                    "user tower) on all domains with Ray Train (DDP over gloo on CPUs), report "
                                    "validation NDCG@10 each epoch, keep the best checkpoint, evaluate the test "
                                    "split, and export a bundle. Re-running with the same --name resumes.")
    sp.add_argument("--data", required=True, metavar="DATASET", help="a prepared dataset")
    sp.add_argument("--out", required=True, metavar="BUNDLE", help="bundle folder to write")
    sp.add_argument("--config", metavar="FILE.yaml", help="training config (keys of crossrec.config.TrainConfig)")
    sp.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="override a config key, dotted for sections (lr=3e-4, lora.rank=16); repeatable")
    sp.add_argument("--train-domains", metavar="A,B", help="train on these domains only (transfer pre-training)")
    sp.add_argument("--init", metavar="BUNDLE", help="start from a bundle (fine-tuning after pre-training); "
                                                      "with --set finetune=adaptor only the adaptor trains")
    sp.add_argument("--mode", choices=["cached", "end-to-end"], help="cached: frozen backbone (default)")
    sp.add_argument("--workers", type=int, default=2, help="Ray Train workers (default: 2)")
    sp.add_argument("--gpus-per-worker", type=float, default=0, help="GPUs per worker (default: 0)")
    sp.add_argument("--address", help="Ray address (default: a local Ray started in-process)")
    sp.add_argument("--storage", help="where checkpoints go: a path or URI (default: next to BUNDLE, in .runs)")
    sp.add_argument("--name", help="run name under --storage (default: the bundle's name; same name resumes)")
    sp.add_argument("--resume", metavar="CHECKPOINT_DIR", help="resume from this checkpoint folder")
    sp.add_argument("--quiet", action="store_true", help="no progress bars")
    sp.set_defaults(func=cmd_train)

    sp = sub.add_parser("recommend", help="top-k for a history, in-process, with reasons",
                        description="Recommend items of one domain for a history of item ids, and show which "
                                    "history items contributed most to each recommendation.")
    sp.add_argument("--bundle", required=True)
    sp.add_argument("--domain", required=True, help="domain to recommend from")
    sp.add_argument("--history", required=True, metavar="ITEM_ID[,ITEM_ID...]",
                    help="history item ids, oldest first (DOMAIN:ITEM_ID where an id is ambiguous)")
    sp.add_argument("--k", type=int, default=10)
    sp.set_defaults(func=cmd_recommend)

    sp = sub.add_parser("submit", help="run prepare/train/tune/evaluate as a job on a Ray cluster (Jobs API)",
                        description="Submit `crossrec SUBCOMMAND ARGS` through Ray's Jobs API. The job runs on the "
                                    "head node in a runtime env that uploads this checkout (data/ included; .git, "
                                    ".venv, out/ and caches excluded); relative paths in ARGS resolve inside that "
                                    "upload, so outputs need absolute paths on shared storage. Prints the job id; "
                                    "with --follow streams its logs and exits 0 if it succeeded, 1 if it failed or "
                                    "was stopped.",
                        epilog="example: crossrec submit --address http://HEAD:8265 --follow -- train --data "
                               "data/amazon-art-office --out /mnt/shared/bundles/ao --workers 4 --gpus-per-worker 1")
    sp.add_argument("--address", help="the head's dashboard, http://HEAD:8265 (default: $RAY_ADDRESS)")
    sp.add_argument("--follow", action="store_true", help="stream the job's logs and exit with its status")
    sp.add_argument("--env", action="append", metavar="KEY=VALUE",
                    help="environment variable for the job (repeatable), e.g. CROSSREC_CACHE_DIR=/mnt/shared/cache")
    sp.add_argument("--pip", action="append", metavar="REQUIREMENT",
                    help="extra package installed into the job's env (repeatable; default: none, the cluster's "
                         "nodes have crossrec's dependencies)")
    sp.add_argument("--exclude", action="append", metavar="PATTERN",
                    help="also leave out of the upload (gitignore syntax, repeatable)")
    sp.add_argument("--working-dir", metavar="CHECKOUT", help="crossrec checkout to upload (default: this one)")
    sp.add_argument("--python", default="python", help="interpreter on the cluster (default: python)")
    sp.add_argument("--entrypoint-gpus", type=float, default=0,
                    help="GPUs reserved for the job's driver itself (default: 0; workers request their own)")
    sp.add_argument("--id", help="submission id (default: crossrec-SUBCOMMAND-TIME-RANDOM)")
    sp.add_argument("command_args", nargs=argparse.REMAINDER, metavar="-- SUBCOMMAND ARGS",
                    help="prepare, train, tune or evaluate with its arguments")
    sp.set_defaults(func=cmd_submit)

    sp = sub.add_parser("jobs", help="list, inspect, follow or stop jobs on a Ray cluster",
                        description="Jobs submitted to a Ray cluster (by `crossrec submit` or `ray job submit`). "
                                    "`status` and `logs --follow` exit 1 for a job that failed or was stopped.")
    jobs = sp.add_subparsers(dest="action", metavar="ACTION", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--address", help="the head's dashboard, http://HEAD:8265 (default: $RAY_ADDRESS)")
    jobs.add_parser("list", parents=[common], help="submitted jobs, oldest first")
    jp = jobs.add_parser("status", parents=[common], help="a job's status and, if it failed, why")
    jp.add_argument("job_id", metavar="ID")
    jp = jobs.add_parser("logs", parents=[common], help="a job's logs")
    jp.add_argument("job_id", metavar="ID")
    jp.add_argument("--follow", action="store_true", help="stream until the job ends; exit with its status")
    jp = jobs.add_parser("stop", parents=[common], help="stop a job")
    jp.add_argument("job_id", metavar="ID")
    jp.add_argument("--wait", type=float, default=30, metavar="SECONDS",
                    help="wait up to this long for it to end (default: 30)")
    sp.set_defaults(func=cmd_jobs)

    sp = sub.add_parser("tune", help="sweep hyper-parameters with Ray Tune; exports the best trial's bundle",
                        description="Run a sweep from a tune_configs/*.yaml file: every trial trains like `crossrec "
                                    "train` (a TorchTrainer over the same train_func), ASHA stops the weak ones "
                                    "between epochs. Writes DIR/trials.csv, DIR/sweep.png and the best trial's "
                                    "bundle DIR/best; an interrupted sweep (Ctrl+C) continues with --resume.")
    sp.add_argument("sweep", metavar="SWEEP.yaml", help="sweep file (keys of crossrec.sweep.SweepConfig), e.g. "
                                                        "tune_configs/cpu_cached.yaml")
    sp.add_argument("--data", required=True, metavar="DATASET", help="a prepared dataset")
    sp.add_argument("--out", required=True, metavar="DIR", help="sweep folder (on a cluster: storage every node "
                                                                "reaches)")
    sp.add_argument("--trials", type=int, help="trials drawn from the space (overrides `num_samples`; a grid runs "
                                               "every point this many times)")
    sp.add_argument("--address", help="Ray address (default: a local Ray started in-process)")
    sp.add_argument("--resume", action="store_true", help="continue the interrupted sweep in DIR (same file, "
                                                          "--trials and --data)")
    sp.add_argument("--quiet", action="store_true", help="no per-epoch lines; the table at the end")
    sp.set_defaults(func=cmd_tune)

    sp = sub.add_parser("serve", help="serve a bundle over HTTP with Ray Serve until Ctrl-C or SIGTERM",
                        description="Start an embedded Ray, deploy the Serve graph (encoder, retriever, ranker, "
                                    "FastAPI ingress) for BUNDLE from a Serve config YAML, and serve "
                                    "POST /v1/recommend, POST /v1/items, GET /v1/health, GET /v1/model (OpenAPI at "
                                    "/docs) until stopped.")
    sp.add_argument("--bundle", required=True, help="a bundle folder written by `crossrec train`")
    sp.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: 127.0.0.1)")
    sp.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    sp.add_argument("--config", metavar="SERVE_CONFIG.yaml",
                    help="Serve config (default: serving/serve_config.yaml); its args.bundle, host and port are "
                         "replaced by --bundle, --host and --port")
    sp.set_defaults(func=cmd_serve)

    sp = sub.add_parser("demo", help="prepare, train, evaluate and recommend on the vendored sample",
                        description="Run the product end to end on real data vendored in this repository: "
                                    "prepare a sample of users, train with Ray Train (a few minutes on 2 cores), "
                                    "evaluate beside the baselines, recommend for one user, and answer one request "
                                    "over HTTP from the Ray Serve graph.")
    sp.add_argument("--dataset", default="amazon-food-kitchen", choices=["amazon-food-kitchen", "amazon-art-office"])
    sp.add_argument("--users", type=int, default=3000, help="users in the sample (default: 3000)")
    sp.add_argument("--epochs", type=int, default=4, help="training epochs (default: 4)")
    sp.add_argument("--out", default="out/demo", help="working folder (default: out/demo)")
    sp.add_argument("--quiet", action="store_true", help="no progress bars")
    sp.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (DataError, UsageError, ValueError, FileNotFoundError) as e:
        print(f"crossrec {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"crossrec {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
