"""The Serve graph over real HTTP on 127.0.0.1: two small real bundles trained here on tiny_fk (MiniLM vectors),
the shipped Serve config, the session's 2-CPU Ray."""
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

from crossrec.bundle import load_bundle
from crossrec_cli import main
from crossrec.config import RunSettings, load_config
from crossrec.recommender import HistoryItem, Recommender

FAST = ["epochs=1", "dim=32", "layers=1", "n_negatives=32", "batch_size=32", "valid_max_targets=0", "patience=0"]


@pytest.fixture(scope="module")
def bundles(ray_cluster, vector_cache, tiny_fk, tmp_path_factory):
    """A text bundle (MiniLM + adaptor) and, to roll out over it, an id-based one (SASRec-style)."""
    from trainers.pipeline import train_bundle

    root = tmp_path_factory.mktemp("serve-bundles")
    text = train_bundle(tiny_fk, root / "text", load_config(overrides=FAST), RunSettings(workers=1, name="text"),
                        progress=False)
    ids = train_bundle(tiny_fk, root / "ids", load_config(overrides=[*FAST, "item_encoder=id"]),
                       RunSettings(workers=1, name="ids"), progress=False)
    assert text["version"] != ids["version"]
    # A copy of the text bundle with a ranker; trained before Serve takes its CPUs (a 1-CPU Train worker would
    # wait forever beside the app on the session's 2 CPUs).
    import shutil

    from crossrec.config import RankerConfig
    from trainers.ranker import train_ranker

    shutil.copytree(root / "text", root / "ranked")
    train_ranker(root / "ranked", tiny_fk, RunSettings(workers=1, name="serve-ranker", storage_path=str(root / "runs")),
                 RankerConfig(enabled=True, top_n=20, epochs=3, patience=0), progress=False)
    return root / "text", root / "ids", root / "ranked"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def url(bundles):
    from ray import serve

    from serving.app import deploy

    base = deploy(bundles[0], port=_free_port())
    yield base
    serve.shutdown()  # later modules get the cluster's CPUs back


def call(url: str, path: str, body=None, raw: bytes | None = None) -> tuple[int, dict]:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        text = e.read()
        try:
            return e.code, json.loads(text)
        except ValueError:
            return e.code, {"detail": text.decode(errors="replace")}


@pytest.fixture(scope="module")
def catalog(bundles):
    b = load_bundle(bundles[0])
    return {d: b.items[d].column("item_id").to_pylist() for d in b.domains}, b


def _history(catalog):
    ids, _ = catalog
    return [{"item_id": i, "domain": "food"} for i in ids["food"][:3]] + [{"item_id": ids["kitchen"][0],
                                                                          "domain": "kitchen"}]


def test_history_only_request_mixing_domains_matches_the_in_process_recommender(url, catalog):
    ids, bundle = catalog
    hist = _history(catalog)
    status, out = call(url, "/v1/recommend", {"history": hist, "domain": "kitchen", "k": 5})
    assert status == 200, out
    assert out["model"] == bundle.version
    assert len(out["items"]) == 5 and all(it["domain"] == "kitchen" and "reasons" not in it for it in out["items"])
    scores = [it["score"] for it in out["items"]]
    assert scores == sorted(scores, reverse=True)
    assert ids["kitchen"][0] not in [it["item_id"] for it in out["items"]]  # exclude_seen
    # The bundle has no ranker: the graph answers exactly what the in-process recommender does.
    local = Recommender(bundle).recommend([HistoryItem(h["domain"], h["item_id"]) for h in hist], "kitchen", k=5)
    assert [it["item_id"] for it in out["items"]] == [r.item_id for r in local]
    assert scores == pytest.approx([r.score for r in local], rel=1e-4)


def test_explain_names_the_history_items_and_the_query(url, catalog):
    hist = _history(catalog)
    status, out = call(url, "/v1/recommend", {"history": [*hist, {"text": "cast iron skillet", "domain": "kitchen"}],
                                              "domain": "kitchen", "k": 3, "explain": True, "query": "a teapot"})
    assert status == 200, out
    named = {h["item_id"] for h in hist} | {"history[4]", "query"}
    for it in out["items"]:
        assert 1 <= len(it["reasons"]) <= 3
        assert {r["item_id"] for r in it["reasons"]} <= named
    # A query alone is enough.
    status, out = call(url, "/v1/recommend", {"domain": "food", "query": "dark chocolate", "k": 2})
    assert status == 200 and len(out["items"]) == 2, out


def test_an_added_item_is_recommended_at_once(url, catalog, tiny_fk):
    from crossrec.dataset import Dataset
    from crossrec.embedding import catalog_texts, template_of

    ids, bundle = catalog
    seen = ids["kitchen"][1]
    items = Dataset.load(tiny_fk).items
    row = items.filter(__import__("pyarrow.compute").compute.equal(items.column("item_id"), seen))
    text = catalog_texts(row, template_of(bundle.config.text_template, bundle.config.max_tokens))[0]
    body = {"items": [{"item_id": "new-twin", "domain": "kitchen", "title": "A twin of " + seen, "text": text}]}
    status, out = call(url, "/v1/items", body)
    assert status == 200 and out["added"] == ["new-twin"] and out["updated"] == [], out
    # The twin of the one history item has the same text: it must come out on top.
    status, out = call(url, "/v1/recommend", {"history": [{"item_id": seen, "domain": "kitchen"}],
                                              "domain": "kitchen", "k": 10})
    assert status == 200, out
    top = [it["item_id"] for it in out["items"]]
    assert top[0] == "new-twin", top
    assert out["items"][0]["title"] == "A twin of " + seen
    status, out = call(url, "/v1/items", body)
    assert status == 200 and out["updated"] == ["new-twin"], out


def _bad_cases(catalog):
    ids, bundle = catalog
    ok = {"item_id": ids["food"][0], "domain": "food"}
    n_kitchen = len(ids["kitchen"])
    return [
        ("/v1/recommend", {"history": [ok], "domain": "garden"}, 422, "`domain`"),
        ("/v1/recommend", {"history": [{"item_id": "no-such-item", "domain": "food"}], "domain": "food"}, 422,
         "`history[0]`"),
        ("/v1/recommend", {"history": [ok, {"item_id": ids["food"][1], "domain": "garden"}], "domain": "food"}, 422,
         "`history[1].domain`"),
        ("/v1/recommend", {"history": [], "domain": "food"}, 422, "`history`"),
        ("/v1/recommend", {"domain": "food"}, 422, "`history`"),
        ("/v1/recommend", {"history": [ok], "domain": "food", "k": 0}, 422, "`k`"),
        ("/v1/recommend", {"history": [ok], "domain": "food", "k": 101}, 422, "`k`"),
        ("/v1/recommend", {"history": [ok], "domain": "kitchen", "k": min(n_kitchen + 1, 100)},
         422 if n_kitchen < 100 else 200, "`k`"),
        ("/v1/recommend", {"history": [ok], "domain": "food", "k": "ten"}, 422, "`k`"),
        ("/v1/recommend", {"history": [{"domain": "food"}], "domain": "food"}, 422, "`item_id` or `text`"),
        ("/v1/recommend", {"history": [{**ok, "text": "x"}], "domain": "food"}, 422, "`item_id` or `text`"),
        ("/v1/recommend", {"history": [{"item_id": ids["food"][0]}], "domain": "food"}, 422, "`history[0].domain`"),
        ("/v1/recommend", {"history": [ok], "domain": "food", "colour": "red"}, 422, "`colour`"),
        ("/v1/recommend", {"history": [ok] * 501, "domain": "food"}, 422, "`history`"),
        ("/v1/recommend", {"history": [{"text": "x" * 5000, "domain": "food"}], "domain": "food"}, 422,
         "`history[0].text`"),
        ("/v1/recommend", {"history": "abc", "domain": "food"}, 422, "`history`"),
        ("/v1/recommend", [1, 2], 422, "`body`"),
        ("/v1/recommend", b'{"history": [', 422, "`body`: malformed JSON"),
        ("/v1/recommend", b"x" * (1024 * 1024 + 1), 413, "`body`"),
        ("/v1/items", {"items": []}, 422, "`items`"),
        ("/v1/items", {"items": [{"item_id": "a", "domain": "garden", "title": "t"}]}, 422, "`items[0].domain`"),
        ("/v1/items", {"items": [{"item_id": "a", "domain": "food"}]}, 422, "`items[0].title`"),
    ]


def test_every_bad_input_is_a_4xx_naming_the_field(url, catalog):
    for path, body, want, field in _bad_cases(catalog):
        status, out = call(url, path, raw=body) if isinstance(body, bytes) else call(url, path, body)
        label = f"{path} {str(body)[:80]}"
        assert status == want, (label, out)
        if want != 200:
            assert field in out["detail"], (label, out)


def test_openapi_schema_and_docs(url):
    status, spec = call(url, "/openapi.json")
    assert status == 200 and spec["openapi"].startswith("3.")
    assert {"/v1/recommend", "/v1/items", "/v1/health", "/v1/model"} <= set(spec["paths"])
    req = spec["components"]["schemas"]["RecommendRequest"]
    assert {"history", "domain", "k", "exclude_seen", "explain", "query", "user_id"} <= set(req["properties"])
    assert req["required"] == ["domain"]
    with urllib.request.urlopen(url + "/docs", timeout=30) as r:
        assert r.status == 200 and b"swagger" in r.read().lower()
    status, model = call(url, "/v1/model")
    assert status == 200 and model["ranker"] is None and model["domains"] == ["food", "kitchen"]


def test_a_new_bundle_rolls_out_while_requests_flow(url, bundles, catalog):
    """Last in the module: after it the id-based bundle serves."""
    from serving.app import deploy

    old, new = (load_bundle(b).version for b in bundles[:2])
    body = {"history": _history(catalog), "domain": "kitchen", "k": 5}
    seen, failures, stop = [], [], threading.Event()

    def client():
        while not stop.is_set():
            status, out = call(url, "/v1/recommend", body)
            (seen.append(out["model"]) if status == 200 else failures.append((status, out)))

    t = threading.Thread(target=client)
    t.start()
    try:
        time.sleep(1.0)
        deploy(bundles[1], port=int(url.rsplit(":", 1)[1]))
        time.sleep(1.0)
    finally:
        stop.set()
        t.join(60)
    assert not failures, failures[:3]
    assert seen[0] == old and seen[-1] == new and set(seen) == {old, new}
    # An id-based bundle cannot embed text: the request names the field.
    status, out = call(url, "/v1/recommend", {"history": [{"text": "a kettle", "domain": "kitchen"}],
                                              "domain": "kitchen"})
    assert status == 422 and "`history[0].text`" in out["detail"], out
    status, out = call(url, "/v1/items", {"items": [{"item_id": "a", "domain": "food", "title": "t"}]})
    assert status == 422 and "`items`" in out["detail"], out


def test_a_bundle_with_a_ranker_is_served_in_the_rankers_order(url, bundles, catalog):
    """Rolls out a copy of the text bundle with a trained ranker: /v1/model names it, and the answer is the
    in-process retrieve-then-rank order of the ranker's own top_n."""
    import numpy as np

    from crossrec.ranker import RankRequest, load_ranker
    from serving.app import deploy

    ranked = bundles[2]
    bundle = load_bundle(ranked)
    assert bundle.has_ranker
    try:
        deploy(ranked, port=int(url.rsplit(":", 1)[1]))
        status, model = call(url, "/v1/model")
        assert status == 200 and model["ranker"] is not None and model["model"] == bundle.version
        hist = _history(catalog)
        status, out = call(url, "/v1/recommend", {"history": hist, "domain": "kitchen", "k": 5})
        assert status == 200, out
        c = Recommender(bundle).candidates([HistoryItem(h["domain"], h["item_id"]) for h in hist], "kitchen", 20)
        scores = load_ranker(bundle).score(RankRequest(
            domain="kitchen", candidates=c.item_ids, retrieval_scores=c.scores, user=c.user,
            history=[(h["domain"], h["item_id"]) for h in hist], history_vectors=c.history_vectors,
            candidate_vectors=c.candidate_vectors))
        order = np.argsort(-scores, kind="stable")[:5]
        assert [it["item_id"] for it in out["items"]] == [c.item_ids[j] for j in order]
        assert [it["score"] for it in out["items"]] == pytest.approx(scores[order].tolist(), rel=1e-4)
    finally:
        deploy(bundles[0], port=int(url.rsplit(":", 1)[1]))  # back to the module's bundle


def test_app_args_and_serve_config_fail_naming_the_field(bundles, tmp_path):
    import yaml

    from serving.app import AppArgs, _schema, default_config

    with pytest.raises(ValueError, match="`bundle`: .* not a crossrec bundle"):
        AppArgs(bundle=str(tmp_path))
    with pytest.raises(ValueError, match="candidates"):
        AppArgs(candidates=0)
    with pytest.raises(ValueError, match="colour"):
        AppArgs(colour="red")
    raw = yaml.safe_load(default_config().read_text())
    raw["applications"][0]["deployments"][1]["name"] = "Encodr"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match="unknown deployment 'Encodr' \\(known: Encoder, Retriever"):
        _schema(tmp_path / "bad.yaml", str(bundles[0]), "127.0.0.1", 8000)
    schema, name, prefix, path = _schema(default_config(), str(bundles[0]), "127.0.0.1", 8001)
    app = schema.applications[0]
    assert (name, prefix, schema.http_options.port) == ("crossrec", "/", 8001)
    assert "bundle" not in app.args  # a bundle in args would restart every replica on rollout
    assert {d.name: d.user_config for d in app.deployments} == {n: {"bundle": path} for n in
                                                               ("Encoder", "Retriever", "Ranker", "Recommender")}


def test_serve_command_rejects_a_bad_bundle_path(tmp_path, capsys):
    assert main(["serve", "--bundle", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a crossrec bundle" in err[0]


@pytest.mark.slow
def test_serve_command_serves_until_sigterm_then_exits_cleanly(bundles):
    import os
    import signal
    import subprocess
    import sys

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "crossrec_cli", "serve", "--bundle", str(bundles[0]),
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    killer = threading.Timer(400, proc.kill)  # a hung start fails the test instead of hanging it
    killer.start()
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("try: curl"):
                break
        assert any(f"http://127.0.0.1:{port}" in x for x in lines), "".join(lines[-20:])
        status, out = call(f"http://127.0.0.1:{port}", "/v1/health")
        assert status == 200 and out["status"] == "ok"
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=120)[0]
        assert proc.returncode == 0, rest[-2000:]
        assert "shutting down Serve and Ray" in rest
    finally:
        killer.cancel()
        proc.kill()
