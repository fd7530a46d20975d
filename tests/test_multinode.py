"""A real two-node Ray cluster on this machine: a head (`ray start --head`, 127.0.0.1, 1 CPU, the dashboard and
Jobs API) and a worker node (`ray start --address=...`, 127.0.0.3, 1 CPU), each a `ray start --block` process in its
own process group with its own temp dir, and one storage folder both see (checkpoints). With one CPU per node, two
1-CPU Train workers (or two Serve replicas with `max_replicas_per_node: 1`) must land on different nodes. The tests:
a 2-worker `crossrec train` resumes after the worker node is SIGKILLed (a new worker node joins), two Recommender
replicas on the two nodes both answer HTTP, and `crossrec submit` runs jobs there. docs/CLUSTER.md says what
changes on a real cluster."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import _subset
from test_cluster import _free_ports, _own_processes

pytestmark = pytest.mark.slow

REPO = Path(__file__).parents[1]
BIN = Path(sys.executable).parent
CROSSREC = [sys.executable, "-m", "crossrec_cli"]
# Not 127.0.0.1: `ray start --node-ip-address=127.0.0.1` (and "localhost") is replaced by the machine's outward
# address (Ray's resolve_ip_for_localhost); any other loopback address is kept as given.
HEAD_IP, WORKER_IP = "127.0.0.2", "127.0.0.3"


@dataclass
class Node:
    """One `ray start --block` process (its own session: SIGKILL to its process group ends the whole node)."""

    proc: subprocess.Popen
    tmp: Path
    ip: str
    log: object = field(repr=False)

    def kill(self) -> None:
        """SIGKILL the node's process group (raylet, object store, agents, its workers), nothing else; then
        whatever of it left the group (Ray starts some processes in sessions of their own)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        for pid in _own_processes(self.tmp):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def keep_logs(self, into: Path) -> None:
        """The node's own log and Ray's logs of its session (raylet, agents, workers), copied before the temp dir
        goes."""
        into.mkdir(parents=True, exist_ok=True)
        shutil.copy(self.tmp / "node.log", into / "node.log")
        for logs in self.tmp.glob("session_*/logs"):
            shutil.copytree(logs, into / "logs", dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.sock"))

    def stop(self) -> None:
        """`ray start --block` stops its node's processes on SIGTERM; then kill() for what is left."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        self.kill()
        deadline = time.time() + 15
        while _own_processes(self.tmp) and time.time() < deadline:
            time.sleep(1)
        self.kill()
        self.log.close()


@dataclass
class Cluster:
    gcs: str  # the head's GCS address, what `ray.init(address=...)` / `--address` take
    dashboard: str  # the head's dashboard URL: the Jobs API, the state API
    env: dict  # the environment of every node and of the commands the tests run against it
    storage: Path  # the storage path every node shares (checkpoints)
    head: Node
    workers: list[Node]

    def node_id(self, ip: str) -> str:
        return next(n["nodeId"] for n in _alive_nodes(self.dashboard) if n["nodeManagerAddress"] == ip)

    def wait_dead(self, node_id: str, timeout: float = 90) -> float:
        """Until the GCS no longer counts `node_id` alive (its health checks failed); returns the seconds it took."""
        t0 = time.time()
        while node_id in {n["nodeId"] for n in _alive_nodes(self.dashboard)}:
            if time.time() - t0 > timeout:
                raise TimeoutError(f"node {node_id} still alive {timeout:.0f} s after it was killed")
            time.sleep(0.5)
        return time.time() - t0

    def add_worker(self) -> Node:
        node = _start_node(
            [f"--address={self.gcs}", f"--node-ip-address={WORKER_IP}", "--num-cpus=1", '--resources={"node_b": 1}'],
            self.env,
            WORKER_IP,
        )
        self.workers.append(node)
        return node


def _start_node(args: list[str], env: dict, ip: str) -> Node:
    tmp = Path(tempfile.mkdtemp(prefix="crn", dir="/tmp"))  # unix socket paths must stay under 108 chars
    ports = _free_ports(7)
    cmd = [
        str(BIN / "ray"),
        "start",
        "--block",
        *args,
        f"--node-manager-port={ports[0]}",
        f"--object-manager-port={ports[1]}",
        f"--dashboard-agent-listen-port={ports[2]}",
        f"--dashboard-agent-grpc-port={ports[3]}",
        f"--runtime-env-agent-port={ports[4]}",
        f"--metrics-export-port={ports[5]}",
        f"--object-store-memory={200 * 1024**2}",
        f"--temp-dir={tmp}",
        "--disable-usage-stats",
    ]
    log = open(tmp / "node.log", "wb")
    proc = subprocess.Popen(
        cmd, env={**env, "RAY_TMPDIR": str(tmp)}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    return Node(proc, tmp, ip, log)


def _alive_nodes(dashboard: str) -> list[dict]:
    with urllib.request.urlopen(f"{dashboard}/nodes?view=summary", timeout=5) as r:
        summary = json.loads(r.read())["data"]["summary"]
    return [n["raylet"] for n in summary if n["raylet"]["state"] == "ALIVE"]


def wait_nodes(cluster: Cluster, ips: list[str], timeout: float = 90) -> list[dict]:
    """Until the alive nodes are exactly one per ip of `ips` (in any order); returns their raylet records."""
    deadline = time.time() + timeout
    last: list = []
    while time.time() < deadline:
        try:
            last = _alive_nodes(cluster.dashboard)
            if sorted(n["nodeManagerAddress"] for n in last) == sorted(ips):
                return last
        except (OSError, KeyError, ValueError):
            pass
        for node in [cluster.head, *cluster.workers]:
            if node.proc.poll() is not None and node.proc.returncode not in (0, -9):
                raise RuntimeError(f"node {node.ip} exited:\n{(node.tmp / 'node.log').read_text()[-3000:]}")
        time.sleep(1)
    raise TimeoutError(f"alive nodes {[n.get('nodeManagerAddress') for n in last]}, expected {ips}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, vector_cache):
    """Head (127.0.0.2: GCS, dashboard on 127.0.0.1, 1 CPU, resource node_a) + worker node (127.0.0.3: 1 CPU, node_b)."""
    gcs, dash = _free_ports(2)
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
        # Every Ray client in the cluster's processes (Train's placement-group cleaner among them) resolves this
        # cluster, never another Ray instance running on the machine.
        "RAY_ADDRESS": f"{HEAD_IP}:{gcs}",
        # Nodes import crossrec from this checkout, as nodes of a real cluster import their installed copy; jobs
        # bring theirs (working_dir). A job's entrypoint runs `python` from PATH.
        "PYTHONPATH": os.pathsep.join([str(REPO / "platform"), str(REPO)]),
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "CROSSREC_CACHE_DIR": str(vector_cache),
        # Serve's proxy sends requests to replicas on its own node while they have room (measured here: 200 of 200
        # to the head's replica): the one proxy (HeadOnly) spreads over both nodes' replicas only without that
        # preference. On a real cluster a proxy runs on every node behind a load balancer (docs/CLUSTER.md).
        "RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING": "0",
    }
    head = _start_node(
        [
            "--head",
            f"--node-ip-address={HEAD_IP}",
            f"--port={gcs}",
            "--num-cpus=1",
            '--resources={"node_a": 1}',
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
        ],
        env,
        HEAD_IP,
    )
    c = Cluster(f"{HEAD_IP}:{gcs}", f"http://127.0.0.1:{dash}", env, tmp_path_factory.mktemp("shared"), head, [])
    try:
        wait_nodes(c, [HEAD_IP])
        c.add_worker()
        wait_nodes(c, [HEAD_IP, WORKER_IP])
        yield c
    finally:
        for node in [*c.workers, c.head]:
            node.stop()
        for k, node in enumerate([c.head, *c.workers]):  # kept with pytest's temp folders (its last 3 runs)
            node.keep_logs(c.storage / "node-logs" / f"{k}-{node.ip}")
            shutil.rmtree(node.tmp, ignore_errors=True)


# -- helpers -----------------------------------------------------------------------------------------------
FAST = ["epochs=3", "dim=32", "layers=1", "n_negatives=32", "batch_size=16", "valid_max_targets=0", "patience=0"]


def _sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def _wait_for(what: str, check, proc: subprocess.Popen, log: Path, timeout: float):
    """check()'s first truthy value, polled each 0.5 s; fails with the command's log if it exits or time runs out."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if value := check():
            return value
        if proc.poll() is not None:
            raise AssertionError(f"command exited ({proc.returncode}) before {what}:\n{log.read_text()[-4000:]}")
        time.sleep(0.5)
    raise AssertionError(f"no {what} after {timeout:.0f} s:\n{log.read_text()[-4000:]}")


def _latest_state(run: Path) -> dict:
    states = [json.loads(p.read_text()) for p in run.glob("checkpoint_*/state.json")]
    return max(states, key=lambda s: s["epoch"])


def _get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, {"detail": e.read().decode(errors="replace")}


def _post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, {"detail": e.read().decode(errors="replace")}


# -- training: 2 workers on 2 nodes, the worker node SIGKILLed after the first checkpoint ------------------------
@pytest.fixture(scope="module")
def node_loss_run(cluster, tiny_fk):
    """`crossrec train --address HEAD --workers 2` (1 CPU each: one per node), checkpoints in the shared storage;
    once the first checkpoint is there the worker node's process group is SIGKILLed and a new worker node joins.
    Returns what the test checks (the command's exit code and output, the run folder, the nodes)."""
    from trainers.train import PAUSE_ENV

    runs, out, log_path = cluster.storage / "runs", cluster.storage / "bundle", cluster.storage / "train.log"
    lost = cluster.workers[-1]
    lost_id = cluster.node_id(WORKER_IP)
    argv = ["train", "--config", "basic", "--data", str(tiny_fk), "--out", str(out), "--storage", str(runs)]
    argv += ["--name", "nodes", "--workers", "2", "--address", cluster.gcs, *_sets(FAST)]
    release = cluster.storage / "release-epoch-1"
    # The workers wait after epoch 1's report (trainers.train.PAUSE_ENV): the node dies mid-run, after a checkpoint.
    env = {**cluster.env, PAUSE_ENV: f"1:{release}"}
    t0 = time.time()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([*CROSSREC, *argv], env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            first = _wait_for(
                "a first checkpoint",
                lambda: sorted((runs / "nodes").glob("checkpoint_*/state.json")),
                proc,
                log_path,
                400,
            )
            time.sleep(2)  # Train's controller registers the checkpoint when it next polls the workers (0.5 s)
            t_kill = time.time()
            lost.kill()
            # A replacement joins once the GCS has declared the node dead, as an autoscaler's would.
            t_dead = cluster.wait_dead(lost_id)
            cluster.add_worker()
            wait_nodes(cluster, [HEAD_IP, WORKER_IP])
            new_id = cluster.node_id(WORKER_IP)
            t_new = time.time() - t_kill
            rc = proc.wait(600)
        finally:
            release.touch()  # nothing should be waiting for it by now (the restarted workers do not pause)
            if proc.poll() is None:
                proc.kill()
    return {
        "rc": rc,
        "output": log_path.read_text(),
        "run": runs / "nodes",
        "bundle": out,
        "first_checkpoint": first[0].parent.name,
        "lost_node": lost_id,
        "new_node": new_id,
        "times": {
            "to_first_checkpoint": round(t_kill - t0),
            "node_declared_dead": round(t_dead),
            "new_node_up": round(t_new),
            "total": round(time.time() - t0),
        },
    }


def test_training_across_nodes_resumes_after_the_worker_node_is_killed(node_loss_run):
    r = node_loss_run
    print(f"\ntraining across nodes: {r['times']}")
    assert r["rc"] == 0, r["output"][-4000:]
    assert (r["bundle"] / "bundle.json").is_file() and "wrote bundle" in r["output"]
    state = _latest_state(r["run"])
    # Two starts of the worker group: the first on both nodes, the restart on the head and the new worker node.
    first, restart = state["worker_nodes"]
    assert sorted(w["ip"] for w in first) == [HEAD_IP, WORKER_IP]
    assert r["lost_node"] in {w["node_id"] for w in first}
    assert sorted(w["ip"] for w in restart) == [HEAD_IP, WORKER_IP]
    assert r["new_node"] in {w["node_id"] for w in restart} and r["lost_node"] not in {w["node_id"] for w in restart}
    # It went on from a checkpoint written before the kill, not from scratch, and finished every epoch.
    assert state["resumed_after"] == [1]
    assert [h["epoch"] for h in state["history"]] == [1, 2, 3]
    meta = json.loads((r["bundle"] / "bundle.json").read_text())
    assert [h["epoch"] for h in meta["metrics"]["history"]] == [1, 2, 3]


# -- Serve: 2 Recommender replicas, one per node -------------------------------------------------------------
@pytest.fixture
def served(cluster, node_loss_run, tmp_path_factory):
    """`crossrec serve` (RAY_ADDRESS: the cluster) of the bundle trained above, with the shipped Serve config, its
    Recommender pinned at 2 replicas and `max_replicas_per_node: 1`: its 2 replicas must take both nodes. Yields the URL; Serve is
    shut down after the test (its replicas hold CPUs the jobs below need)."""
    import yaml

    from serving.app import default_config

    root = tmp_path_factory.mktemp("multinode-serve")
    raw = yaml.safe_load(default_config().read_text())
    rec = next(d for d in raw["applications"][0]["deployments"] if d["name"] == "Recommender")
    # The shipped config autoscales 1..2 replicas: pinned at 2 here, so both nodes get one at once.
    rec["autoscaling_config"]["min_replicas"] = rec["autoscaling_config"]["max_replicas"] = 2
    rec["max_replicas_per_node"] = 1
    config = root / "serve.yaml"
    config.write_text(yaml.safe_dump(raw))
    port = _free_ports(1)[0]
    log_path = root / "serve.log"
    argv = ["serve", "--bundle", str(node_loss_run["bundle"]), "--port", str(port), "--config", str(config)]
    argv += ["--state", str(cluster.storage / "serve-state")]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([*CROSSREC, *argv], env=cluster.env, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_for("the app serving", lambda: b"try: curl" in log_path.read_bytes(), proc, log_path, 300)
            yield f"http://127.0.0.1:{port}"
        finally:
            proc.send_signal(signal.SIGTERM)  # crossrec serve shuts Serve down on the cluster, then disconnects
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_serve_replicas_on_both_nodes_answer_http(cluster, served, node_loss_run):
    from ray.util.state import list_actors

    from serving.app import example_body

    replicas = list_actors(
        address=cluster.dashboard,
        filters=[("class_name", "=", "ServeReplica:crossrec:Recommender"), ("state", "=", "ALIVE")],
    )
    nodes = {n["nodeId"]: n["nodeManagerAddress"] for n in _alive_nodes(cluster.dashboard)}
    assert sorted(nodes[a.node_id] for a in replicas) == [HEAD_IP, WORKER_IP]  # one replica per node
    # Through the one proxy (on the head), until each replica has answered.
    seen: dict[str, str] = {}
    for _ in range(200):
        status, out = _get(f"{served}/v1/health")
        assert status == 200 and out["status"] == "ok", out
        seen[out["replica"]] = out["node"]
        if len(seen) == 2:
            break
    assert sorted(nodes[n] for n in seen.values()) == [HEAD_IP, WORKER_IP], seen
    body = example_body(node_loss_run["bundle"])
    for _ in range(10):
        status, out = _post(f"{served}/v1/recommend", body)
        assert status == 200 and len(out["items"]) == body["k"], out


# -- Jobs: `crossrec submit` to the head's Jobs API ---------------------------------------------------------------
def _crossrec(cluster: Cluster, *argv: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*CROSSREC, *argv], env=cluster.env, capture_output=True, text=True, timeout=timeout)


def test_submit_runs_jobs_on_the_cluster(cluster, food_kitchen_csv):
    """A prepare job, then a 2-worker train job: the job's driver runs on the head, its Train workers on both nodes,
    in the runtime env the submission uploaded (the checkout as working_dir)."""
    root = cluster.storage / "jobs"
    src = _subset(food_kitchen_csv, root / "src", 60)
    prep = _crossrec(
        cluster,
        "submit",
        "--address",
        cluster.dashboard,
        "--follow",
        "--",
        "prepare",
        str(src),
        "--out",
        str(root / "ds"),
    )
    assert prep.returncode == 0, prep.stdout[-3000:] + prep.stderr[-3000:]
    assert "SUCCEEDED" in prep.stderr and (root / "ds" / "manifest.json").is_file()
    train = _crossrec(
        cluster,
        "submit",
        "--address",
        cluster.dashboard,
        "--follow",
        "--",
        "train",
        "--config",
        "basic",
        "--data",
        str(root / "ds"),
        "--out",
        str(root / "bundle"),
        "--storage",
        str(root / "runs"),
        "--workers",
        "2",
        *_sets([*FAST, "epochs=1", "item_encoder=id"]),  # id items: no catalog embedding, the job is the point
        "--quiet",
    )
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    assert "SUCCEEDED" in train.stderr and (root / "bundle" / "bundle.json").is_file()
    (placement,) = _latest_state(root / "runs" / "bundle")["worker_nodes"]
    assert sorted(w["ip"] for w in placement) == [HEAD_IP, WORKER_IP]
