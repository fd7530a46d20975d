"""`crossrec recommend`: top-k for a history, in-process, with the history items behind each recommendation."""
from __future__ import annotations

import argparse

from crossrec_cli.options import UsageError, csv_list

__all__ = ["register"]


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
    for token in csv_list(args.history) or []:
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


def register(sub: argparse._SubParsersAction) -> None:
    sp = sub.add_parser("recommend", help="top-k for a history, in-process, with reasons",
                        description="Recommend items of one domain for a history of item ids, and show which "
                                    "history items contributed most to each recommendation.")
    sp.add_argument("--bundle", required=True)
    sp.add_argument("--domain", required=True, help="domain to recommend from")
    sp.add_argument("--history", required=True, metavar="ITEM_ID[,ITEM_ID...]",
                    help="history item ids, oldest first (DOMAIN:ITEM_ID where an id is ambiguous)")
    sp.add_argument("--k", type=int, default=10)
    sp.set_defaults(func=cmd_recommend)
