"""Schema-driven fuzzing of the HTTP API: requests generated with hypothesis from the app's own OpenAPI document
(`/openapi.json`: every operation, its request schema turned into a strategy by `from_schema`), plus
real catalog ids and domains swapped in (so requests reach the model, not only validation), broken variants (a
required field dropped, a value of the wrong type, unknown keys) and raw non-JSON bodies. The contract: every
answer is < 500 (bad input gets a 4xx naming the field). Prints counts by status; exits 1 on any 5xx, with the
request and the answer's body.

    .venv/bin/python bench/api_fuzz.py --bundle BUNDLE --requests 2000     # starts Serve on a local Ray itself
    .venv/bin/python bench/api_fuzz.py --url http://127.0.0.1:8000 --requests 2000   # a running `crossrec serve`

tests/test_api_fuzz.py runs a few hundred against a small bundle (slow marker).
"""

from __future__ import annotations

import argparse
import collections
import copy
import http.client
import json
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

REPO = Path(__file__).resolve().parents[1]


def fetch_json(url: str, path: str) -> dict:
    status, body = send(url, "GET", path, None)
    if status != 200:
        raise RuntimeError(f"GET {path}: {status} {body[:300]!r}")
    return json.loads(body)


def send(url: str, method: str, path: str, body: bytes | None, timeout: float = 120) -> tuple[int, bytes]:
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, (u.path.rstrip("/") + path) or "/", body=body, headers=headers)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def operations(spec: dict) -> list[tuple[str, str, dict | None]]:
    """(method, path, JSON schema of the body or None) for every operation of the document."""
    ops = []
    for path, item in spec.get("paths", {}).items():
        for method, op in item.items():
            if method.lower() not in ("get", "post", "put", "patch", "delete"):
                continue
            schema = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
            ops.append((method.upper(), path, schema))
    return ops


def catalog(url: str, bundle: str | None) -> dict[str, list[str]]:
    """domain -> item ids, from the bundle's folder (or empty: generated ids only)."""
    if not bundle:
        return {}
    import pyarrow.parquet as pq

    meta = json.loads((Path(bundle) / "bundle.json").read_text())
    return {
        d: pq.read_table(Path(bundle) / "items" / f"{d}.parquet", columns=["item_id"]).column(0).to_pylist()
        for d in meta["domains"]
    }


def _realistic(body, cat: dict[str, list[str]], draw_int) -> object:
    """Swaps generated domains / item ids for real ones where the keys say so (a drawn choice per field)."""
    if not cat or not isinstance(body, dict):
        return body
    domains = sorted(cat)
    out = copy.deepcopy(body)

    def fix(d: dict) -> None:
        if ("item_id" in d or "text" in d) and draw_int(0, 3) > 0:  # a history entry: exactly one of the two
            if "text" not in d or ("item_id" in d and draw_int(0, 1)):
                d.pop("text", None)
                d["item_id"] = str(d.get("item_id") or "x")
            else:
                d.pop("item_id", None)
            d["domain"] = domains[draw_int(0, len(domains) - 1)]
        if isinstance(d.get("item_id"), str) and draw_int(0, 3) > 0:
            ids = cat[d["domain"]] if d.get("domain") in cat else cat[domains[0]]
            d["item_id"] = ids[draw_int(0, len(ids) - 1)]

    fix(out)
    if "history" in out and not out["history"] and draw_int(0, 1):
        out["history"] = [{"domain": domains[0], "item_id": cat[domains[0]][0]}]
    for key in ("history", "items"):
        if isinstance(out.get(key), list):
            for e in out[key]:
                if isinstance(e, dict):
                    fix(e)
    return out


def from_schema(schema: dict, root: dict, depth: int = 0):
    """A hypothesis strategy of values valid for a JSON schema, for the part of JSON Schema that pydantic's OpenAPI
    uses: $ref, anyOf/oneOf, allOf of one, object (properties, required, additionalProperties), array
    (maxItems), string (min/maxLength), integer / number (bounds), boolean, null, enum, const."""
    from hypothesis import strategies as st

    if "$ref" in schema:
        node = root
        for part in schema["$ref"].lstrip("#/").split("/"):
            node = node[part]
        return from_schema(node, root, depth + 1)
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return st.one_of([from_schema(s, root, depth + 1) for s in schema[key]])
    if "allOf" in schema and len(schema["allOf"]) == 1:
        return from_schema(schema["allOf"][0], root, depth + 1)
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    if isinstance(kind, list):
        return st.one_of([from_schema({**schema, "type": k}, root, depth + 1) for k in kind])
    if kind == "object" or "properties" in schema:
        props = schema.get("properties", {})
        required = set(schema.get("required", []))
        fixed = {k: from_schema(v, root, depth + 1) for k, v in props.items() if k in required}
        optional = {k: from_schema(v, root, depth + 1) for k, v in props.items() if k not in required}
        return st.fixed_dictionaries(fixed, optional=optional)
    if kind == "array":
        items = from_schema(schema.get("items", {}), root, depth + 1)
        hi = min(schema.get("maxItems", 8), 8 if depth < 3 else 2)
        return st.lists(items, min_size=min(schema.get("minItems", 0), hi), max_size=hi)
    if kind == "string":
        lo, hi = schema.get("minLength", 0), min(schema.get("maxLength", 60), 60)
        return st.text(min_size=lo, max_size=max(lo, hi))
    if kind == "integer":
        return st.integers(schema.get("minimum", -(2**40)), schema.get("maximum", 2**40))
    if kind == "number":
        return st.floats(schema.get("minimum"), schema.get("maximum"), allow_nan=False, allow_infinity=False)
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    return st.none() | st.booleans() | st.integers() | st.text(max_size=20)  # {}: anything


def request_strategy(spec: dict, cat: dict[str, list[str]]):
    """A hypothesis strategy of (method, path, raw body bytes or None)."""
    from hypothesis import strategies as st

    json_values = st.recursive(
        st.none()
        | st.booleans()
        | st.integers(-(2**70), 2**70)
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(max_size=30),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
        max_leaves=12,
    )
    per_op = []
    for method, path, schema in operations(spec):
        if schema is None:
            per_op.append(st.just((method, path, None)))
            continue
        valid = from_schema(schema, spec)

        @st.composite
        def body(draw, valid=valid, method=method, path=path):
            b = draw(valid)
            kind = draw(st.sampled_from(["schema", "real", "real", "real", "broken", "junk", "raw"]))
            if kind in ("real", "broken"):
                b = _realistic(b, cat, lambda lo, hi: draw(st.integers(lo, hi)))
            if kind == "broken" and isinstance(b, dict) and b:
                key = draw(st.sampled_from(sorted(b)))
                if draw(st.booleans()):
                    del b[key]
                else:
                    b[key] = draw(json_values)
                if draw(st.booleans()):
                    b[draw(st.text(min_size=1, max_size=8))] = draw(json_values)
            if kind == "junk":
                b = draw(json_values)
            if kind == "raw":
                return method, path, draw(st.binary(max_size=64))
            return method, path, json.dumps(b, allow_nan=False).encode()

        per_op.append(body())
    return st.one_of(per_op)


def fuzz(url: str, n: int, bundle: str | None = None, seed: int = 0, out=sys.stdout) -> dict:
    """Sends `n` generated requests; returns {"statuses": Counter, "errors": [(request, status, body)], "wall_s"}."""
    from hypothesis import HealthCheck, Phase, given, settings

    spec = fetch_json(url, "/openapi.json")
    strategy = request_strategy(spec, catalog(url, bundle))
    statuses: collections.Counter = collections.Counter()
    errors: list[tuple] = []
    t0 = time.time()

    @settings(
        max_examples=n,
        database=None,
        phases=[Phase.generate],
        deadline=None,
        derandomize=seed == 0,
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def one(req):
        method, path, body = req
        try:
            status, answer = send(url, method, path, body)
        except (OSError, http.client.HTTPException) as e:  # a dropped connection counts as a server error
            status, answer = 599, repr(e).encode()
        statuses[status] += 1
        if status >= 500:
            errors.append(
                (
                    (method, path, (body or b"")[:2000].decode(errors="replace")),
                    status,
                    answer[:2000].decode(errors="replace"),
                )
            )

    one()
    res = {
        "statuses": statuses,
        "errors": errors,
        "wall_s": time.time() - t0,
        "operations": [f"{m} {p}" for m, p, _ in operations(spec)],
    }
    print(
        f"{sum(statuses.values())} requests in {res['wall_s']:.0f}s over {', '.join(res['operations'])}; "
        f"by status: {dict(sorted(statuses.items()))}; 5xx: {len(errors)}",
        file=out,
    )
    for (method, path, body), status, answer in errors[:10]:
        print(f"  {status} {method} {path} {body[:300]} -> {answer[:500]}", file=out)
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", help="bundle to serve (starts Serve on a local Ray) and to draw real ids from")
    p.add_argument("--url", help="a running server instead (with --bundle: ids drawn from that bundle)")
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0, help="0: derandomized (the same requests every run)")
    args = p.parse_args(argv)
    if not (args.bundle or args.url):
        p.error("give --bundle or --url")
    url = args.url
    if url is None:
        sys.path.insert(0, str(REPO))
        from serving.app import deploy
        from trainers.runtime import init_ray

        init_ray()
        url = deploy(args.bundle, port=_free_port())
    res = fuzz(url, args.requests, args.bundle, args.seed)
    return 1 if res["errors"] else 0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    sys.exit(main())
