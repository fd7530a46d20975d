"""The serving graph: the FastAPI ingress `Recommender` (retrieval, ranking, explanation, online items) and the
`Encoder` it calls only for requests that carry text.

Why two deployments and not four (encoder, retriever, ranker, ingress): retrieval is the stateful stage (it holds
the index and the items added online), and the ranker and the explanations read exactly what retrieval has in
hand (the user vector, the candidates' and the history's vectors). Split into deployments, a plain request
crossed three replica boundaries behind the proxy and ~200 KB of candidate vectors crossed the object store
twice; that cost more than the ~10 ms of compute it carried. Merged, the common request crosses one boundary
(client or proxy -> Recommender) and only the final k rows leave the replica. The Encoder (a 90 MB backbone that
takes seconds to load and scales on its own) stays separate: a request with text pays one more hop, once, with
all its texts, and repeated texts hit a small cache.

Every deployment takes its bundle from `user_config` (`{"bundle": PATH}`) and loads it in `reconfigure`, off the
event loop, swapping the new state in at once: a new bundle reaches running replicas in place and they keep
answering with the old one while the new one loads. Vectors carry the bundle version of the Encoder that made
them, and the Recommender retries a request whose Encoder answered from another bundle (the seconds of a
rollout).

Items added online are appended (fsync'ed) to the item log in the app's `state_dir` before the API answers
(serving/item_log.py); every Recommender replica replays the log when it starts or rolls out a bundle and reads
what others appended before each request, so replicas agree, a killed replica loses nothing, and the stage can
run (and autoscale) several replicas.
"""

import asyncio
import json
import logging
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import ray
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve

from crossrec import recommender as core
from crossrec.bundle import load_bundle, served_domains
from crossrec.embedding import template_of
from crossrec.inference import bundle_backbone, has_domain_adapters
from crossrec.text import render_items
from serving.item_log import ItemLog, LogItem
from serving.schemas import (
    MAX_BODY_BYTES,
    MAX_TEXTS,
    ItemsRequest,
    ItemsResponse,
    RecommendRequest,
    RecommendResponse,
)

__all__ = ["Encoder", "Recommender", "BadRequest", "ServeSettings"]

log = logging.getLogger("ray.serve")

ROLLOUT_WAIT_S = 10.0  # how long a request waits for the Encoder to serve the Recommender's bundle
REEMBED_WAIT_S = 180.0  # how long a rollout waits for the Encoder to re-embed the log's items
ENCODE_CHUNK = 64  # texts per Encoder call when replaying the log
RETRY_AFTER_S = "1"  # what a 503 asks the client to wait


class BadRequest(ValueError):
    """Bad input that only the catalog can tell: answered 422."""


class _Stale(Exception):
    """The Encoder answered from another bundle than the Recommender's (a rollout is under way): retried."""


@dataclass(frozen=True)
class ServeSettings:
    """The app's runtime settings (serving.app.AppArgs, validated there), handed to every Recommender replica."""

    state_dir: str  # folder of the item log (absolute)
    max_online_items: int = 10_000  # items added online beyond the bundle's catalog, per app
    explain_history: int = core.EXPLAIN_HISTORY  # most recent history entries `explain` weighs
    text_cache: int = 2048  # (text, domain, bundle) -> vector entries kept by each replica


def _in_thread(fn):
    """Runs a blocking loader in its own thread, so the replica keeps serving its previous state meanwhile."""
    return asyncio.get_running_loop().run_in_executor(None, fn)


# -- Encoder ---------------------------------------------------------------------------------------------
@serve.deployment(name="Encoder", ray_actor_options={"num_cpus": 0.3}, max_ongoing_requests=16)
class Encoder:
    """Texts -> the model's item vectors (backbone, then the bundle's adaptor), batched across requests."""

    def __init__(self) -> None:
        torch.set_num_threads(1)  # one core's worth per replica: replicas, not threads, share the machine
        self.state: tuple | None = None  # (version, {domain or None: backbone} or None, model, max_tokens)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="encode")

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

        self.state = await _in_thread(load)

    def _encode(self, texts: list[tuple[str, str]]) -> tuple[str, np.ndarray]:
        version, backbones, model, max_tokens = self.state
        if backbones is None:
            raise BadRequest(f"bundle {version} has item_encoder 'id' and cannot embed text")
        keys = [d if d in backbones else None for _, d in texts]
        x = [None] * len(texts)
        for key in set(keys):
            at = [i for i, k in enumerate(keys) if k == key]
            out = backbones[key].encode([texts[i][0] for i in at], batch_size=32, max_length=max_tokens)
            for i, row in zip(at, out):
                x[i] = row
        with torch.inference_mode():
            return version, model.item_vectors(torch.from_numpy(np.stack(x))).numpy()  # (T, V)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.002)
    async def encode(self, calls: list[list[tuple[str, str]]]) -> list[tuple[str, np.ndarray]]:
        """Each call: every (text, domain) of one request -> (bundle version, (T, V) vectors). The backbone runs
        in a worker thread: the replica's event loop keeps taking (and batching) calls meanwhile."""
        flat = [t for c in calls for t in c]
        version, v = await asyncio.get_running_loop().run_in_executor(self.pool, self._encode, flat)
        out, at = [], 0
        for c in calls:
            out.append((version, v[at : at + len(c)]))
            at += len(c)
        return out


# -- Recommender: ingress + retrieval + ranker + explanations --------------------------------------------
api = FastAPI(
    title="crossrec",
    version="1",
    description="Cross-domain recommendations from a crossrec bundle (Ray Serve graph: recommender "
    "(retrieval, ranker, explanations, online items) and text encoder).",
)


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
        name, msg = _field(err.get("loc", ())), err.get("msg", "invalid").removeprefix("Value error, ")
        if err.get("type") == "json_invalid":
            name, msg = "body", f"malformed JSON ({err.get('ctx', {}).get('error', 'cannot parse')})"
        if name == "body" and msg.startswith("`"):  # a model validator that names its fields itself
            lines.append(msg)
        else:
            lines.append(f"`{name}`: {msg}")
    return JSONResponse(status_code=422, content={"detail": "; ".join(lines)})


@api.middleware("http")
async def _limit_body(request: Request, call_next):
    if request.method == "POST":
        length = request.headers.get("content-length")
        if length is None:
            return JSONResponse(status_code=411, content={"detail": "`body`: a Content-Length header is required"})
        if not length.isdigit() or int(length) > MAX_BODY_BYTES:
            return JSONResponse(
                status_code=413,
                content={"detail": f"`body`: {length} bytes is more than the limit of {MAX_BODY_BYTES} bytes"},
            )
    return await call_next(request)


def _bad(error: str | Exception, status: int = 422) -> JSONResponse:
    # An error raised in another deployment arrives wrapped (a RayTaskError that is also an instance of the
    # original class); its text is the remote traceback, the original's text is the message.
    return JSONResponse(status_code=status, content={"detail": str(getattr(error, "cause", None) or error)})


def _unavailable(detail: str) -> JSONResponse:
    return JSONResponse(status_code=503, content={"detail": detail}, headers={"Retry-After": RETRY_AFTER_S})


# A deployment bound without `user_config` (e.g. `serve run serving.app:build_app` with no bundle=) has nothing
# to serve: say how to fix it instead of failing every request with a 500.
_NO_BUNDLE = 'no bundle: deploy with user_config {"bundle": PATH} (or `bundle=` as an app argument)'


@dataclass
class _State:
    """One bundle's serving state; replaced whole when another bundle rolls out."""

    version: str
    meta: dict
    rec: core.Recommender
    log: ItemLog
    replay: dict = field(default_factory=dict)  # what the last replay did (GET /v1/model)
    # Lines of another bundle still to embed with this one, the latest per (domain, item_id), with their place in
    # the log (`read`: lines read so far): a later line of this bundle for the same id supersedes one.
    foreign: dict[tuple[str, str], tuple[int, LogItem]] = field(default_factory=dict)
    read: int = 0
    retry_at: float = 0.0  # when to ask the Encoder again after it answered from another bundle

    @property
    def can_encode(self) -> bool:
        return self.meta["config"]["item_encoder"] == "text"


def _apply(st: _State, items: list[LogItem]) -> tuple[int, int]:
    """Upserts log items (in log order) whose vectors come from st's bundle; lines of another bundle wait in
    st.foreign to be embedded again. Returns (applied, over the limit).

    A foreign line in a replay is an item accepted under an earlier bundle; one read later comes from a replica
    that was still on another bundle during a rollout (it accepted the item, so it must not stay invisible here
    until this replica restarts)."""
    applied = full = 0
    for it in items:
        st.read += 1
        key = (it.domain, it.item_id)
        if it.domain not in st.rec.ids:
            continue  # a domain this bundle lacks: the line stays in the log for a bundle that has it
        if it.bundle != st.version:
            st.foreign[key] = (st.read, it)
            continue
        st.foreign.pop(key, None)  # this line is newer than any foreign line of the id read before it
        try:
            st.rec.upsert(it.domain, it.item_id, it.title, torch.from_numpy(it.vector))
            applied += 1
        except core.CatalogFull:
            full += 1  # the bound was lowered below what the log holds
    return applied, full


@serve.deployment(
    name="Recommender", ray_actor_options={"num_cpus": 0.4}, max_ongoing_requests=8, max_queued_requests=16
)
@serve.ingress(api)
class Recommender:
    """Validates, retrieves, ranks and explains in one pass (crossrec.recommender.Recommender.recommend) on a
    one-thread executor, and takes items added online; calls the Encoder only for text."""

    def __init__(self, encoder, settings: dict) -> None:
        torch.set_num_threads(1)  # one core per replica: on 2 cores, threads of two replicas thrash each other
        self.encoder = encoder
        self.settings = ServeSettings(**settings)
        # One thread runs every compute step and every upsert, in arrival order: the event loop stays free to
        # parse, shed and answer, and an upsert never interleaves with a search.
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="recommend")
        self.state: _State | None = None
        self.cache: OrderedDict[tuple[str, str, str], np.ndarray] = OrderedDict()
        self._reembedding: asyncio.Task | None = None
        # Which replica, on which Ray node, answers GET /v1/health (several replicas behind one proxy, on a cluster).
        self.where = {
            "replica": serve.get_replica_context().replica_id.unique_id,
            "node": ray.get_runtime_context().get_node_id(),
        }

    # -- bundle and item log --------------------------------------------------------------------------------
    async def reconfigure(self, config: dict) -> None:
        path = Path(config["bundle"])

        def load() -> _State:
            b = load_bundle(path)
            meta = {**json.loads((path / "bundle.json").read_text()), "path": str(path)}
            rec = core.Recommender.load(
                b, max_online_items=self.settings.max_online_items, explain_history=self.settings.explain_history
            )
            st = _State(version=b.version, meta=meta, rec=rec, log=ItemLog(self.settings.state_dir))
            items = st.log.read_all()
            applied, full = _apply(st, items)
            st.replay = {"log_items": len(items), "applied": applied, "over_limit": full}
            return st

        st = await _in_thread(load)
        if st.foreign:
            if not st.can_encode:  # an id bundle: the lines wait in the log for a text bundle
                st.replay["not_embeddable"] = len(st.foreign)
            else:
                await self._reembed(st, deadline=time.monotonic() + REEMBED_WAIT_S)
        self.state = st  # the new bundle serves from here on, with every item the log holds

    async def _reembed(self, st: _State, deadline: float | None = None) -> bool:
        """Embeds again, with st's bundle, the log items whose vectors another bundle made, and appends them to
        the log under st's version (other replicas and later starts then apply them without the Encoder).
        While the Encoder still serves another bundle: waits until `deadline` (a rollout's replay), or with no
        deadline returns False at once (a request's catch-up: the next request tries again)."""
        todo = list(st.foreign.items())
        done = []
        for s in range(0, len(todo), ENCODE_CHUNK):
            chunk = todo[s : s + ENCODE_CHUNK]
            while True:
                version, vecs = await self.encoder.encode.remote([(it.text, it.domain) for _, (_, it) in chunk])
                if version == st.version:
                    break
                if deadline is None:
                    return False
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"the Encoder still serves bundle {version}, not {st.version}, after "
                        f"{REEMBED_WAIT_S:.0f} s: cannot re-embed the item log"
                    )
                await asyncio.sleep(0.5)
            done += [(key, seq, it, v) for (key, (seq, it)), v in zip(chunk, vecs)]

        def write() -> int:
            # Only lines no newer line of this bundle superseded while the Encoder worked.
            rows = [
                LogItem(it.domain, it.item_id, it.title, it.text, st.version, v)
                for key, seq, it, v in done
                if st.foreign.get(key, (None,))[0] == seq
            ]
            if rows:
                st.log.append(rows)
            _apply(st, st.log.tail())
            return len(rows)

        n = await asyncio.get_running_loop().run_in_executor(self.pool, write)
        st.replay["reembedded"] = st.replay.get("reembedded", 0) + n
        return True

    def _catch_up(self, st: _State) -> None:
        """Items other replicas appended since this one last looked (on the compute thread, before a search)."""
        _apply(st, st.log.tail())

    def _reembed_later(self, st: _State) -> None:
        """After a request: embeds the foreign lines a catch-up found (at most one such task at a time, retried
        at most once a second while a rollout has the Encoder on another bundle)."""
        if not st.foreign or not st.can_encode or self._reembedding or time.monotonic() < st.retry_at:
            return

        async def task() -> None:
            try:
                if not await self._reembed(st):
                    st.retry_at = time.monotonic() + 1.0
            except Exception as e:  # the request that triggered it has been answered; the next one retries
                log.warning("re-embedding %d logged items failed: %s", len(st.foreign), e)
                st.retry_at = time.monotonic() + 1.0
            finally:
                self._reembedding = None

        self._reembedding = asyncio.get_running_loop().create_task(task())

    # -- text ------------------------------------------------------------------------------------------------
    async def _vectors(self, st: _State, texts: list[tuple[str, str]]) -> list[np.ndarray]:
        """(text, domain) pairs -> vectors of st's bundle: from the cache, else one Encoder call for all."""
        out: list[np.ndarray | None] = [self.cache.get((t, d, st.version)) for t, d in texts]
        missing = [i for i, v in enumerate(out) if v is None]
        if missing:
            version, vecs = await self.encoder.encode.remote([texts[i] for i in missing])
            if version != st.version:
                raise _Stale(version)
            for i, v in zip(missing, vecs):
                out[i] = v
                self.cache[(*texts[i], st.version)] = v
            while len(self.cache) > self.settings.text_cache:
                self.cache.popitem(last=False)
        for i in set(range(len(texts))) - set(missing):
            key = (*texts[i], st.version)
            if key in self.cache:  # another request may have evicted it while this one awaited the Encoder
                self.cache.move_to_end(key)
        return out

    async def _until_consistent(self, attempt):
        """Runs `attempt` again while a rollout has the Encoder on another bundle."""
        deadline = time.monotonic() + ROLLOUT_WAIT_S
        while True:
            try:
                return await attempt()
            except _Stale:
                if time.monotonic() > deadline:
                    return _unavailable("a new bundle is rolling out; retry")
                await asyncio.sleep(0.05)

    # -- HTTP ------------------------------------------------------------------------------------------------
    @api.post("/v1/recommend", response_model=RecommendResponse, response_model_exclude_none=True)
    async def recommend(self, req: RecommendRequest):
        if self.state is None:
            return _unavailable(_NO_BUNDLE)
        known = served_domains(self.state.meta)
        for name, domain in [
            ("domain", req.domain),
            *((f"history[{i}].domain", h.domain) for i, h in enumerate(req.history)),
        ]:
            if domain not in known:
                return _bad(f"`{name}`: unknown domain {domain!r} (known: {', '.join(known)})")
        texts = [(f"history[{i}].text", (h.text, h.domain)) for i, h in enumerate(req.history) if h.text is not None]
        if req.query is not None:
            texts.append(("query", (req.query, req.domain)))
        if len(texts) > MAX_TEXTS:
            return _bad(
                f"`history`: {len(texts)} texts (history entries with `text`, and `query`) is more than "
                f"the limit of {MAX_TEXTS} per request; give catalog item ids"
            )
        if texts and not self.state.can_encode:
            return _bad(
                f"`{texts[0][0]}`: bundle {self.state.version} has item_encoder 'id' and cannot embed "
                "text; give catalog item ids"
            )
        try:
            return await self._until_consistent(lambda: self._recommend(req, [t for _, t in texts]))
        except BadRequest as e:
            return _bad(e)

    async def _recommend(self, req: RecommendRequest, texts: list[tuple[str, str]]) -> JSONResponse:
        st = self.state
        t0 = time.perf_counter()
        vecs = iter(await self._vectors(st, texts) if texts else [])
        t1 = time.perf_counter()
        history = [
            core.HistoryItem(h.domain, item_id=h.item_id, rating=h.rating)
            if h.item_id is not None
            else core.HistoryItem(h.domain, vector=torch.tensor(next(vecs)), rating=h.rating)
            for h in req.history
        ]
        if req.query is not None:  # the intent, read as the newest entry of the target domain
            history.append(core.HistoryItem(req.domain, vector=torch.tensor(next(vecs))))

        def run() -> tuple[list[core.Recommendation], float]:
            """The recommendations and the seconds this compute step took (queueing for the thread excluded)."""
            t = time.perf_counter()
            self._catch_up(st)
            size = len(st.rec.ids[req.domain])
            if req.k > size:
                raise BadRequest(f"`k`: {req.k} is more than the {size} items of domain {req.domain!r}")
            try:
                recs = st.rec.recommend(
                    history, req.domain, k=req.k, exclude_seen=req.exclude_seen, explain=req.explain
                )
            except (core.UnknownItem, core.UnknownDomain) as e:
                raise BadRequest(str(e)) from None
            return recs, time.perf_counter() - t

        t2 = time.perf_counter()
        recs, compute = await asyncio.get_running_loop().run_in_executor(self.pool, run)
        t3 = time.perf_counter()
        self._reembed_later(st)
        query = f"history[{len(req.history)}]"  # how the core names the query entry
        items = []
        for r in recs:
            item: dict = {"item_id": r.item_id, "domain": r.domain, "title": r.title, "score": r.score}
            if r.reasons is not None:
                item["reasons"] = [{**x, "item_id": "query"} if x["item_id"] == query else x for x in r.reasons]
            items.append(item)
        # The dict has RecommendResponse's shape (the route's response_model, which documents it): returned as
        # a Response, FastAPI skips validating and re-encoding what this code just built. Server-Timing says
        # where the replica's time went (text: the Encoder call; queue: waiting for the compute thread;
        # compute: retrieve, rank, explain), so a client can tell it from the network and the proxy.
        timing = (
            f"text;dur={(t1 - t0) * 1e3:.2f}, queue;dur={(t3 - t2 - compute) * 1e3:.2f}, "
            f"compute;dur={compute * 1e3:.2f}"
        )
        return JSONResponse({"items": items, "model": st.version}, headers={"Server-Timing": timing})

    @api.post("/v1/items", response_model=ItemsResponse)
    async def items(self, req: ItemsRequest):
        """Adds or updates items of the bundle's domains: durable (the item log) and recommendable at once."""
        st = self.state
        if st is None:
            return _unavailable(_NO_BUNDLE)
        if not st.can_encode:
            return _bad(f"`items`: bundle {st.version} has item_encoder 'id' and cannot embed new items")
        cfg = st.meta["config"]
        template = template_of(cfg.get("text_template", ""), cfg.get("max_tokens", 64))
        texts = []
        for i, it in enumerate(req.items):
            if it.domain not in served_domains(st.meta):
                return _bad(
                    f"`items[{i}].domain`: unknown domain {it.domain!r} (known: {', '.join(served_domains(st.meta))})"
                )
            if it.text is not None:
                texts.append((it.text, it.domain))
                continue
            try:
                texts.append((render_items({"title": [it.title]}, template)[0], it.domain))
            except ValueError as e:
                return _bad(f"`items[{i}].text`: required by this bundle's text template ({e})")
        keys = [(it.domain, it.item_id) for it in req.items]
        try:
            st.rec.room(keys)  # before the Encoder works for nothing; checked again on the compute thread
        except core.CatalogFull as e:
            return _bad(e, 409)

        async def attempt():
            st = self.state
            version, vecs = await self.encoder.encode.remote(texts)
            if version != st.version:
                raise _Stale(version)
            rows = [
                LogItem(it.domain, it.item_id, it.title, text, version, v)
                for it, (text, _), v in zip(req.items, texts, vecs)
            ]

            def run() -> ItemsResponse:
                self._catch_up(st)
                st.rec.room(keys)
                new = [k[1] not in st.rec.pos[k[0]] for k in keys]
                st.log.append(rows)  # durable before it is visible or acknowledged
                self._catch_up(st)  # applies them, in log order with other replicas' lines
                return ItemsResponse(
                    added=[k[1] for k, n in zip(keys, new) if n],
                    updated=[k[1] for k, n in zip(keys, new) if not n],
                    model=version,
                )

            return await asyncio.get_running_loop().run_in_executor(self.pool, run)

        try:
            out = await self._until_consistent(attempt)
            self._reembed_later(self.state)
            return out
        except core.CatalogFull as e:
            return _bad(e, 409)
        except BadRequest as e:
            return _bad(e)

    @api.get("/v1/health")
    async def health(self):
        if self.state is None:
            return _unavailable(_NO_BUNDLE)
        return {"status": "ok", "model": self.state.version, **self.where}

    @api.get("/v1/model")
    async def model(self):
        st = self.state
        if st is None:
            return _unavailable(_NO_BUNDLE)
        m, rec = st.meta, st.rec
        return {
            "model": st.version,
            "bundle": m["path"],
            "created_at": m.get("created_at"),
            "backbone": m["config"].get("backbone"),
            "item_encoder": m["config"]["item_encoder"],
            "domains": served_domains(m),
            "adapted": list(m.get("adapted") or {}),
            "ranker": None
            if rec.ranker is None
            else {"class": type(rec.ranker).__name__, "bundle": st.version, "top_n": rec.n_candidates},
            "online": {
                "items": len(rec.online),
                "max_online_items": rec.max_online_items,
                "log": str(st.log.path),
                "replay": st.replay,
            },
            "test_metrics": m.get("metrics", {}).get("test"),
        }
