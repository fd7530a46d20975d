"""Token auth on the Jobs API: a real Ray head started here with `RAY_AUTH_MODE=token` (as cluster.yaml starts the
head) refuses a submission without the token, and `crossrec submit` / `crossrec jobs` send the configured token
(Ray's token file or env) although the client process itself does not run Ray in token mode. Each process gets a
temporary HOME, so no test reads or writes ~/.ray."""

from __future__ import annotations

import json
import secrets
import subprocess
import urllib.error
import urllib.request

import pytest
from conftest import _subset
from test_cluster import CROSSREC, start_head


@pytest.fixture(scope="module")
def auth_head(tmp_path_factory):
    home = tmp_path_factory.mktemp("head-home")
    token_file = home / "cluster_token"
    token_file.write_text(secrets.token_hex(16))
    with start_head({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file), "HOME": str(home)}) as head:
        head["token_file"] = token_file
        yield head


def _client_env(head, home, **extra) -> dict:
    """A user's shell: not in token mode (what the client of the bug report was), its own HOME, no token unless
    `extra` gives one."""
    env = {k: v for k, v in head["env"].items() if k not in ("RAY_TMPDIR", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN")}
    return {**env, "RAY_AUTH_MODE": "disabled", "HOME": str(home), **extra}


def _run(env, *argv, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([*CROSSREC, *argv], env=env, capture_output=True, text=True, timeout=timeout)


def test_a_submission_without_the_token_is_refused(auth_head, tmp_path):
    body = json.dumps({"entrypoint": "echo pwned"}).encode()
    req = urllib.request.Request(
        f"{auth_head['url']}/api/jobs/", data=body, method="POST", headers={"Content-Type": "application/json"}
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(req, timeout=30)
    assert refused.value.code == 401
    wrong = urllib.request.Request(
        f"{auth_head['url']}/api/jobs/",
        data=body,
        method="POST",
        headers={"Content-Type": "application/json", "Authorization": "Bearer nope"},
    )
    with pytest.raises(urllib.error.HTTPError) as forbidden:
        urllib.request.urlopen(wrong, timeout=30)
    assert forbidden.value.code == 403

    # crossrec without a token: one line saying where the token is expected, exit 2, no traceback.
    no_token = _run(_client_env(auth_head, tmp_path), "jobs", "list", "--address", auth_head["url"])
    assert no_token.returncode == 2, no_token.stderr
    err = no_token.stderr.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert "requires Ray's token auth and no token is configured" in err and "RAY_AUTH_TOKEN_PATH" in err
    bad = _run(
        _client_env(auth_head, tmp_path, RAY_AUTH_TOKEN="wrong"),
        "submit",
        "--address",
        auth_head["url"],
        "--",
        "prepare",
        "x",
        "--out",
        str(tmp_path / "x"),
    )
    assert bad.returncode == 2 and "refused the token from $RAY_AUTH_TOKEN" in bad.stderr, bad.stderr
    assert bad.stderr.strip().count("\n") == 0


def test_crossrec_submit_sends_the_configured_token(auth_head, food_kitchen_csv, tmp_path):
    src = _subset(food_kitchen_csv, tmp_path / "src", 20)
    # Ray's default token file under the (temporary) HOME, as `ray get-auth-token --generate` writes it.
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text(auth_head["token_file"].read_text())
    env = _client_env(auth_head, tmp_path)
    sub = _run(
        env,
        "submit",
        "--address",
        auth_head["url"],
        "--follow",
        "--",
        "prepare",
        str(src),
        "--out",
        str(tmp_path / "ds"),
        "--quiet",
    )
    assert sub.returncode == 0, sub.stdout[-3000:] + sub.stderr[-3000:]
    assert "SUCCEEDED" in sub.stderr and (tmp_path / "ds" / "manifest.json").is_file()
    # The token from RAY_AUTH_TOKEN_PATH (and no default file) works too.
    env2 = _client_env(auth_head, tmp_path / "src", RAY_AUTH_TOKEN_PATH=str(auth_head["token_file"]))
    listed = _run(env2, "jobs", "list", "--address", auth_head["url"])
    assert listed.returncode == 0 and sub.stdout.splitlines()[0] in listed.stdout, listed.stderr
