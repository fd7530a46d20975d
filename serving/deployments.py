"""The serving graph, one deployment per stage: Encoder -> Retriever -> Ranker, behind the FastAPI ingress.

Every deployment takes its bundle from `user_config` (`{"bundle": PATH}`) and loads it in `reconfigure`,
off the event loop, swapping the new state in at once: a new bundle reaches running replicas in place and
they keep answering with the old one while the new one loads. Each stage answers with the bundle version it
used, and the ingress retries a request whose stages disagreed (the seconds of a rollout).

The Retriever holds the only copy of the online catalog (`POST /v1/items`), so it runs one replica: a second
replica would not see the items added through the first. Items added online live until the next bundle.
"""
import asyncio
import json
import time
from pathlib import Path

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve

from crossrec import recommender as core
from crossrec.bundle import load_bundle
from crossrec.embedding import template_of
from crossrec.inference import bundle_backbone, has_domain_adapters
from crossrec.text import render_items
from serving.schemas import (MAX_BODY_BYTES, Item, ItemsRequest, ItemsResponse, Reason, RecommendRequest,
                             RecommendResponse)

__all__ = ["Encoder", "Retriever", "Ranker", "Recommender", "BadRequest"]

# Small on purpose: everything (4 deployments, autoscaled replicas, the proxy and the controller) must fit 2
# CPUs, and `max_ongoing_requests` well above Serve's default of 5, which caps `@serve.batch` batches at 5 and
# throttles the ingress (../shared/RAY_NOTES.md). The Serve config YAML can override each of these.
AUTOSCALE = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 4, "look_back_period_s": 12.0,
             "upscale_delay_s": 2.0, "downscale_delay_s": 10.0}
ROLLOUT_WAIT_S = 10.0  # how long a request waits for the stages to agree on one bundle


class BadRequest(ValueError):
    """Bad input that only the catalog can tell: answered 422 by the ingress."""


class _Stale(Exception):
    """Stages answered with different bundles (a rollout is under way): the request is retried."""


def _reloading(load):
    """Runs a blocking loader in a thread, so the replica keeps serving its previous state meanwhile."""
    return asyncio.get_running_loop().run_in_executor(None, load)


# -- Encoder ---------------------------------------------------------------------------------------------
@serve.deployment(name="Encoder", ray_actor_options={"num_cpus": 0.4}, max_ongoing_requests=64,
                  autoscaling_config=AUTOSCALE)
class Encoder:
    """Text -> the model's item vector (backbone, then the bundle's adaptor), batched across requests."""

    def __init__(self) -> None:
        self.state: tuple | None = None  # (version, {domain or None: backbone} or None, model, max_tokens)

    async def reconfigure(self, config: dict) -> None:
        def load():
            b = load_bundle(config["bundle"])
            # An id-based bundle (SASRec) has no text path; the ingress refuses text before it gets here.
            if b.config.item_encoder != "text":
                backbones = None
            elif has_domain_adapters(b):  # one merged backbone per domain's adapter
                backbones = {d: bundle_backbone(b, d) for d in b.domains}
            else:
                backbones = {None: bundle_backbone(b)}
            return b.version, backbones, b.model, b.config.max_tokens

        self.state = await _reloading(load)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def encode(self, texts: list[tuple[str, str]]) -> list[tuple[str, np.ndarray]]:
        """(text, its domain) pairs -> (bundle version, item vector) each."""
        version, backbones, model, max_tokens = self.state
        if backbones is None:
            raise BadRequest(f"bundle {version} has item_encoder 'id' and cannot embed text")
        keys = [d if d in backbones else None for _, d in texts]
        x = [None] * len(texts)
        for key in set(keys):
            at = [i for i, k in enumerate(keys) if k == key]
            out = backbones[key].encode([texts[i][0] for i in at], batch_size=len(at), max_length=max_tokens)
            for i, row in zip(at, out):
                x[i] = row
        with torch.inference_mode():
            v = model.item_vectors(torch.from_numpy(np.stack(x))).numpy()  # (B, V)
        return [(version, row) for row in v]


# -- Retriever -------------------------------------------------------------------------------------------
def _history(entries: list[dict]) -> list[core.HistoryItem]:
    return [core.HistoryItem(domain=e["domain"], item_id=e.get("item_id"),
                             vector=torch.tensor(e["vector"]) if e.get("vector") is not None else None)
            for e in entries]


@serve.deployment(name="Retriever", num_replicas=1, ray_actor_options={"num_cpus": 0.3}, max_ongoing_requests=128)
class Retriever:
    """Per-domain exact inner-product index of the bundle's item vectors, plus items added online.

    Methods are async on purpose: they run one at a time on the replica's event loop, so an upsert never
    interleaves with a search (each call is a few milliseconds of numpy/torch)."""

    def __init__(self) -> None:
        self.index: core.Recommender | None = None

    async def reconfigure(self, config: dict) -> None:
        self.index = await _reloading(lambda: core.Recommender(load_bundle(config["bundle"])))

    def _check(self, version: str | None) -> core.Recommender:
        index = self.index
        if version is not None and version != index.bundle.version:
            raise _Stale(index.bundle.version)
        return index

    async def candidates(self, history: list[dict], domain: str, n: int, k: int, exclude_seen: bool,
                         vectors_from: str | None) -> dict:
        """Top-n of `domain` for the history. `vectors_from`: the bundle that encoded the history's text."""
        index = self._check(vectors_from)
        try:
            index.check_domain(domain)
            size = len(index.ids[domain])
            if k > size:
                raise BadRequest(f"`k`: {k} is more than the {size} items of domain {domain!r}")
            c = index.candidates(_history(history), domain, max(n, k), exclude_seen)
        except (core.UnknownItem, core.UnknownDomain) as e:
            raise BadRequest(str(e)) from None
        pos = index.pos[domain]
        return {"version": index.bundle.version, "item_ids": c.item_ids, "scores": c.scores, "user": c.user,
                "history_vectors": c.history_vectors, "candidate_vectors": c.candidate_vectors,
                "titles": [index.titles[domain][pos[i]] for i in c.item_ids]}

    async def reasons(self, history: list[dict], domain: str, item_ids: list[str], exclude_seen: bool,
                      version: str) -> dict[str, list[dict]]:
        """Occlusion reasons of `item_ids` (core.Recommender.recommend explains any candidate set)."""
        index = self._check(version)
        recs = index.recommend(_history(history), domain, k=len(item_ids), exclude_seen=exclude_seen,
                               explain=True, candidates=item_ids)
        return {r.item_id: r.reasons or [] for r in recs}

    async def upsert(self, items: list[dict], vectors_from: str) -> tuple[list[str], list[str]]:
        index = self._check(vectors_from)
        for i, it in enumerate(items):
            try:
                index.check_domain(it["domain"], f"items[{i}].domain")  # before any change: all or nothing
            except core.UnknownDomain as e:
                raise BadRequest(str(e)) from None
        added, updated = [], []
        for it in items:
            new = index.upsert(it["domain"], it["item_id"], it["title"], torch.tensor(it["vector"]))
            (added if new else updated).append(it["item_id"])
        return added, updated


# -- Ranker ----------------------------------------------------------------------------------------------
def _load_ranker(bundle):
    """The bundle's second stage, or None when crossrec has no ranker module or the bundle no ranker."""
    try:
        from crossrec.ranker import load_ranker
    except ModuleNotFoundError as e:
        if e.name != "crossrec.ranker":
            raise  # a dependency of the ranker is missing: say so instead of serving without it
        return None
    return load_ranker(bundle)


@serve.deployment(name="Ranker", ray_actor_options={"num_cpus": 0.2}, max_ongoing_requests=64,
                  autoscaling_config=AUTOSCALE)
class Ranker:
    """Rescores retrieval's top-N with the bundle's trained ranker; keeps retrieval's order without one.

    Items added online reach only the Retriever: the ranker scores them from its fallback features (the
    ranker contract), so its replicas need no online state and can autoscale."""

    def __init__(self) -> None:
        self.state: tuple | None = None  # (version, ranker or None)

    async def reconfigure(self, config: dict) -> None:
        def load():
            b = load_bundle(config["bundle"])
            return b.version, _load_ranker(b)

        self.state = await _reloading(load)

    async def describe(self) -> tuple[str, dict | None]:
        """(bundle version, what the ranker is, or None when the bundle has none)."""
        version, ranker = self.state
        return version, None if ranker is None else {"class": type(ranker).__name__, "bundle": version}

    async def score(self, request: dict, version: str) -> np.ndarray | None:
        """(N,) new scores of the candidates, or None when the bundle has no ranker."""
        own, ranker = self.state
        if own != version:
            raise _Stale(own)
        if ranker is None:
            return None
        from crossrec.ranker import RankRequest

        return np.asarray(ranker.score(RankRequest(**request)), dtype=np.float32)


# -- Ingress ---------------------------------------------------------------------------------------------
api = FastAPI(title="crossrec", version="1",
              description="Cross-domain recommendations from a crossrec bundle (Ray Serve graph: encoder, "
                          "retriever, ranker).")


def _field(loc) -> str:
    parts = [p for p in loc if p != "body"]
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "body"


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    # One line per problem, each starting with the field: `history[2].domain`: Field required.
    lines = []
    for err in exc.errors():
        field, msg = _field(err.get("loc", ())), err.get("msg", "invalid").removeprefix("Value error, ")
        if err.get("type") == "json_invalid":
            field, msg = "body", f"malformed JSON ({err.get('ctx', {}).get('error', 'cannot parse')})"
        if field == "body" and msg.startswith("`"):  # a model validator that names its fields itself
            lines.append(msg)
        else:
            lines.append(f"`{field}`: {msg}")
    return JSONResponse(status_code=422, content={"detail": "; ".join(lines)})


@api.middleware("http")
async def _limit_body(request: Request, call_next):
    if request.method == "POST":
        length = request.headers.get("content-length")
        if length is None:
            return JSONResponse(status_code=411, content={"detail": "`body`: a Content-Length header is required"})
        if not length.isdigit() or int(length) > MAX_BODY_BYTES:
            return JSONResponse(status_code=413, content={
                "detail": f"`body`: {length} bytes is more than the limit of {MAX_BODY_BYTES} bytes"})
    return await call_next(request)


def _bad(error: str | Exception) -> JSONResponse:
    # An error raised in another deployment arrives wrapped (a RayTaskError that is also an instance of the
    # original class); its text is the remote traceback, the original's text is the message.
    return JSONResponse(status_code=422, content={"detail": str(getattr(error, "cause", None) or error)})


# A deployment bound without `user_config` (e.g. `serve run serving.app:build_app` with no bundle=) has nothing
# to serve: say how to fix it instead of failing every request with a 500.
_NO_BUNDLE = JSONResponse(status_code=503, content={
    "detail": "no bundle: deploy with user_config {\"bundle\": PATH} (or `bundle=` as an app argument)"})


@serve.deployment(name="Recommender", ray_actor_options={"num_cpus": 0.2}, max_ongoing_requests=128)
@serve.ingress(api)
class Recommender:
    """Validates, routes through encoder -> retriever -> ranker, and shapes the responses."""

    def __init__(self, encoder, retriever, ranker, candidates: int = 50) -> None:
        self.encoder, self.retriever, self.ranker = encoder, retriever, ranker
        self.default_candidates = self.n_candidates = candidates
        self.meta: dict | None = None
        self.ranker_of: dict[str, bool] = {}

    async def reconfigure(self, config: dict) -> None:
        path = Path(config["bundle"])
        self.meta = {**json.loads((path / "bundle.json").read_text()), "path": str(path)}
        ranker = path / "ranker" / "ranker.json"
        self.n_candidates = self.default_candidates
        if ranker.is_file():
            # The ranker's features (rank, score z-scores) depend on the list length it was trained on.
            self.n_candidates = json.loads(ranker.read_text())["config"]["top_n"]

    @property
    def can_encode(self) -> bool:
        return self.meta["config"]["item_encoder"] == "text"

    async def _encode(self, texts: list[tuple[str, str]]) -> tuple[str | None, list[np.ndarray]]:
        """(text, domain) pairs -> (the encoder's bundle version, vectors)."""
        if not texts:
            return None, []
        out = await asyncio.gather(*[self.encoder.encode.remote(t) for t in texts])
        versions = {v for v, _ in out}
        if len(versions) > 1:
            raise _Stale(versions)
        return versions.pop(), [vec for _, vec in out]

    async def _until_consistent(self, attempt):
        """Runs `attempt` again while a rollout has the stages on different bundles."""
        deadline = time.monotonic() + ROLLOUT_WAIT_S
        while True:
            try:
                return await attempt()
            except _Stale:
                if time.monotonic() > deadline:
                    return JSONResponse(status_code=503, content={"detail": "a new bundle is rolling out; retry"})
                await asyncio.sleep(0.05)

    async def _has_ranker(self, version: str) -> bool:
        """Whether bundle `version` has a ranker; asked once per bundle, so a bundle without one costs no hop."""
        if version not in self.ranker_of:
            own, info = await self.ranker.describe.remote()
            if own != version:
                raise _Stale(own)
            self.ranker_of = {version: info is not None}  # only the serving bundle's answer is kept
        return self.ranker_of[version]

    @api.post("/v1/recommend", response_model=RecommendResponse, response_model_exclude_none=True)
    async def recommend(self, req: RecommendRequest):
        if self.meta is None:
            return _NO_BUNDLE
        texts = [(f"history[{i}].text", (h.text, h.domain)) for i, h in enumerate(req.history) if h.text is not None]
        if req.query is not None:
            texts.append(("query", (req.query, req.domain)))
        known = self.meta["domains"]
        for field, domain in [("domain", req.domain), *((f"history[{i}].domain", h.domain)
                                                        for i, h in enumerate(req.history))]:
            if domain not in known:
                return _bad(f"`{field}`: unknown domain {domain!r} (known: {', '.join(known)})")
        if texts and not self.can_encode:
            return _bad(f"`{texts[0][0]}`: bundle {self.meta['version']} has item_encoder 'id' and cannot embed "
                        "text; give catalog item ids")
        try:
            return await self._until_consistent(lambda: self._recommend(req, [t for _, t in texts]))
        except BadRequest as e:
            return _bad(e)

    async def _recommend(self, req: RecommendRequest, texts: list[tuple[str, str]]) -> RecommendResponse:
        version, vecs = await self._encode(texts)
        vecs = iter(vecs)
        history = [{"domain": h.domain, "item_id": h.item_id} if h.item_id is not None
                   else {"domain": h.domain, "vector": next(vecs)} for h in req.history]
        if req.query is not None:  # the intent, read as the newest entry of the target domain
            history.append({"domain": req.domain, "vector": next(vecs)})
        c = await self.retriever.candidates.remote(history, req.domain, self.n_candidates, req.k,
                                                   req.exclude_seen, version)
        pairs = [(h["domain"], h.get("item_id")) for h in history]
        ranked = None
        if await self._has_ranker(c["version"]):
            ranked = await self.ranker.score.remote(
                {"domain": req.domain, "candidates": c["item_ids"], "retrieval_scores": c["scores"],
                 "user": c["user"], "history": pairs, "history_vectors": c["history_vectors"],
                 "candidate_vectors": c["candidate_vectors"]}, c["version"])
        scores = c["scores"] if ranked is None else ranked
        order = np.argsort(-scores, kind="stable")[:req.k]
        top = [c["item_ids"][j] for j in order]
        reasons = {}
        if req.explain:
            reasons = await self.retriever.reasons.remote(history, req.domain, top, req.exclude_seen, c["version"])
        items = []
        for j, iid in zip(order, top):
            why = None
            if req.explain:
                why = [Reason(item_id="query" if r["item_id"] == f"history[{len(req.history)}]" else r["item_id"],
                              domain=r["domain"], weight=r["weight"]) for r in reasons.get(iid, [])]
            items.append(Item(item_id=iid, domain=req.domain, title=c["titles"][j], score=float(scores[j]),
                              reasons=why))
        return RecommendResponse(items=items, model=c["version"])

    @api.post("/v1/items", response_model=ItemsResponse)
    async def items(self, req: ItemsRequest):
        """Adds or updates items of the bundle's domains; they are recommendable at once."""
        if self.meta is None:
            return _NO_BUNDLE
        if not self.can_encode:
            return _bad(f"`items`: bundle {self.meta['version']} has item_encoder 'id' and cannot embed new items")
        cfg = self.meta["config"]
        template = template_of(cfg.get("text_template", ""), cfg.get("max_tokens", 64))
        texts = []
        for i, it in enumerate(req.items):
            if it.domain not in self.meta["domains"]:
                return _bad(f"`items[{i}].domain`: unknown domain {it.domain!r} "
                            f"(known: {', '.join(self.meta['domains'])})")
            if it.text is not None:
                texts.append((it.text, it.domain))
                continue
            try:
                texts.append((render_items({"title": [it.title]}, template)[0], it.domain))
            except ValueError as e:
                return _bad(f"`items[{i}].text`: required by this bundle's text template ({e})")

        async def attempt():
            version, vecs = await self._encode(texts)
            rows = [{"domain": it.domain, "item_id": it.item_id, "title": it.title, "vector": v}
                    for it, v in zip(req.items, vecs)]
            added, updated = await self.retriever.upsert.remote(rows, version)
            return ItemsResponse(added=added, updated=updated, model=version)

        try:
            return await self._until_consistent(attempt)
        except BadRequest as e:
            return _bad(e)

    @api.get("/v1/health")
    async def health(self):
        if self.meta is None:
            return _NO_BUNDLE
        return {"status": "ok", "model": self.meta["version"]}

    @api.get("/v1/model")
    async def model(self):
        if self.meta is None:
            return _NO_BUNDLE
        m = self.meta
        return {"model": m["version"], "bundle": m["path"], "created_at": m.get("created_at"),
                "backbone": m["config"].get("backbone"), "item_encoder": m["config"]["item_encoder"],
                "domains": m["domains"], "ranker": (await self.ranker.describe.remote())[1],
                "test_metrics": m.get("metrics", {}).get("test")}
