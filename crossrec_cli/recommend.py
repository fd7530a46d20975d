"""`crossrec recommend`: top-k for a history, in-process, with the history items behind each recommendation."""

from __future__ import annotations

import argparse

from crossrec.explain import DEFAULT_TOKENS
from crossrec_cli.options import UsageError, add_bundle, csv_list

__all__ = ["register"]


def _text_vectors(rec, entries: list[tuple[str, str]]) -> list:
    """(text, domain) -> the model's item vector of each text: the bundle's (adapted) backbone, then its item
    encoder, as Serve's encoder embeds text-only history entries and queries."""
    import numpy as np
    import torch
    import transformers

    from crossrec.inference import bundle_backbone, has_domain_adapters

    transformers.utils.logging.disable_progress_bar()  # "Loading weights" is noise in a one-shot command
    bundle = rec.bundle
    if bundle.config.item_encoder != "text":
        raise UsageError(
            f"bundle {bundle.meta['version']} has item_encoder 'id' and cannot embed text; give catalog item ids"
        )
    out = [None] * len(entries)
    keys = [d if has_domain_adapters(bundle) and d in bundle.domains else None for _, d in entries]
    for key in dict.fromkeys(keys):
        at = [i for i, k in enumerate(keys) if k == key]
        x = bundle_backbone(bundle, key).encode(
            [entries[i][0] for i in at], batch_size=len(at), max_length=bundle.config.max_tokens
        )
        with torch.inference_mode():
            v = rec.model.item_vectors(torch.from_numpy(np.asarray(x)))
        for i, row in zip(at, v):
            out[i] = row
    return out


def _history(rec, args) -> tuple[list, list[dict]]:
    """--history ids (DOMAIN:ITEM_ID where ambiguous), then --history-text entries (DOMAIN:TEXT), then the
    --query (read as the newest entry of the target domain, as Serve reads `query`). Returns the history and,
    for each entry, what the user gave ({"item_id"}, {"text"} or {"query"}, with its domain)."""
    from crossrec.recommender import HistoryItem

    history, shown = [], []
    for token in csv_list(args.history) or []:
        # An item id alone is looked up in every domain; DOMAIN:ITEM_ID names the domain.
        dom, _, iid = token.rpartition(":") if ":" in token else ("", "", token)
        found = [d for d in rec.domains if iid in rec.pos[d]] if not dom else [dom]
        if not found:
            raise UsageError(f"--history: unknown item_id {iid!r} (not in any domain of the bundle)")
        history.append(HistoryItem(domain=found[0], item_id=iid))
        shown.append({"item_id": iid, "domain": found[0]})
    texts = []
    for entry in args.history_text or []:
        dom, sep, text = entry.partition(":")
        if not sep or not text.strip() or dom not in rec.domains:
            raise UsageError(
                f"--history-text {entry!r}: expected DOMAIN:TEXT with DOMAIN one of {', '.join(rec.domains)}"
            )
        texts.append((text.strip(), dom))
        shown.append({"text": text.strip(), "domain": dom})
    if args.query is not None:
        if not args.query.strip():
            raise UsageError("--query: empty text")
        texts.append((args.query.strip(), args.domain))
        shown.append({"query": args.query.strip(), "domain": args.domain})
    if not shown:
        raise UsageError("give --history, --history-text or --query (at least one)")
    for (_, dom), vec in zip(texts, _text_vectors(rec, texts) if texts else []):
        history.append(HistoryItem(domain=dom, vector=vec))
    return history, shown


def cmd_recommend(args: argparse.Namespace) -> int:
    import json

    from crossrec.bundle import load_bundle
    from crossrec.recommender import Recommender

    if args.k < 1:
        raise UsageError(f"--k must be >= 1, got {args.k}")
    rec = Recommender.load(load_bundle(args.bundle))  # with its ranker: what Serve answers
    if args.domain not in rec.domains:
        raise UsageError(f"--domain: unknown domain {args.domain!r} (known: {', '.join(rec.domains)})")
    history, shown = _history(rec, args)
    try:
        # Retrieval, ranker and reasons in one pass; --explain-text writes its sentences from the reasons.
        recs = rec.recommend(history, args.domain, k=args.k, explain=args.explain or args.explain_text)
    except KeyError as e:
        raise UsageError(str(e)) from None
    # Reasons name text entries `history[i]` (the recommender knows no id for them): back to what the user gave.
    entry = {f"history[{i}]": e for i, e in enumerate(shown)}
    entry.update({e["item_id"]: e for e in shown if "item_id" in e})
    words = None
    if args.explain_text:  # one batched generation for the k items, from the titles behind each
        from crossrec.explain import Explainer

        def title(e: dict) -> str:
            return (
                rec.titles[e["domain"]][rec.pos[e["domain"]][e["item_id"]]]
                if "item_id" in e
                else e.get("query") or e["text"]
            )

        words = Explainer(max_new_tokens=args.explain_tokens).explain(
            [(r.title, [title(entry[x["item_id"]]) for x in (r.reasons or [])[:2]]) for r in recs]
        )
    if args.json:
        items = [
            {
                "item_id": r.item_id,
                "domain": r.domain,
                "title": r.title,
                "score": round(float(r.score), 6),
                "reasons": [
                    {
                        "item_id": "query" if "query" in entry[x["item_id"]] else x["item_id"],
                        "domain": x["domain"],
                        "weight": x["weight"],
                    }
                    for x in r.reasons or []
                ]
                if args.explain
                else None,
            }
            for r in recs
        ]
        if words is not None:
            for it, text in zip(items, words.texts):
                it["explanation"] = text
        answer = {"items": items, "model": rec.bundle.meta["version"], "history": shown}
        if words is not None:
            answer["explain_s"] = round(words.seconds, 3)
        print(json.dumps(answer, indent=1))
        return 0
    print(f"history ({len(shown)} entries, oldest first):")
    for e in shown:
        text = (
            rec.titles[e["domain"]][rec.pos[e["domain"]][e["item_id"]]]
            if "item_id" in e
            else f"query: {e['query']}"
            if "query" in e
            else f"text: {e['text']}"
        )
        print(f"  [{e['domain']}] {e.get('item_id', '-')}  {text[:80]}")
    print(f"top {len(recs)} in {args.domain}:")
    for i, r in enumerate(recs, 1):
        print(f"{i:>3}. {r.item_id}  {r.score:7.2f}  {r.title[:80]}")
        if words is not None:
            print(f'       "{words.texts[i - 1]}"')
        for reason in r.reasons or [] if args.explain else []:
            e = entry[reason["item_id"]]
            text = (
                rec.titles[e["domain"]][rec.pos[e["domain"]][e["item_id"]]]
                if "item_id" in e
                else e.get("query") or e["text"]
            )
            what = e.get("item_id") or ("query" if "query" in e else "text")
            print(f"       because of [{reason['domain']}] {what} ({reason['weight']:+.2f})  {text[:60]}")
    if words is not None:
        print(f"(explanations: {words.new_tokens} tokens by smollm2-135m in {words.seconds:.1f}s, one batch)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    sp = sub.add_parser(
        "recommend",
        help="top-k for a history and/or a query, in-process, with reasons",
        description="Recommend items of one domain for a history (catalog item ids and/or free "
        "texts) and an optional query stating the user's intent, and show which "
        "history entries contributed most to each recommendation.",
    )
    add_bundle(sp)
    sp.add_argument("--domain", required=True, help="the domain to recommend items from")
    sp.add_argument(
        "--history",
        metavar="ITEM_ID[,ITEM_ID...]",
        help="history item ids, oldest first (DOMAIN:ITEM_ID where an id is ambiguous)",
    )
    sp.add_argument(
        "--history-text",
        action="append",
        metavar="DOMAIN:TEXT",
        help="a history entry given as text (an item not in the catalog), newer than --history's; "
        "repeatable, oldest first",
    )
    sp.add_argument(
        "--query",
        metavar="TEXT",
        help="free text stating what the user wants now; read as the newest history entry of --domain",
    )
    sp.add_argument("--k", type=int, default=10, help="how many items to recommend (default: 10)")
    sp.add_argument(
        "--json",
        action="store_true",
        help="print the answer as JSON (the shape of POST /v1/recommend's response) instead of a table",
    )
    sp.add_argument(
        "--explain",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="show the history entries behind each item with their weights, as the API's `explain: true` "
        "(default: on; --no-explain: items and scores only)",
    )
    sp.add_argument(
        "--explain-text",
        action="store_true",
        help="also one sentence per item in words, written by the instruct backbone (smollm2-135m) "
        "from the titles of the history entries behind it (slower: one batched generation)",
    )
    sp.add_argument(
        "--explain-tokens",
        type=int,
        default=DEFAULT_TOKENS,
        metavar="N",
        help=f"with --explain-text: at most N generated tokens per sentence (default: {DEFAULT_TOKENS}; a "
        "sentence stops at its end, one that reaches N is cut at its last whole word)",
    )
    sp.set_defaults(func=cmd_recommend)
