"""`crossrec submit` and `crossrec jobs`: commands as Ray jobs on a cluster, through the Jobs API
(`trainers.jobs` imports Ray, so only when these run)."""

from __future__ import annotations

import argparse
import os
import sys

from crossrec_cli.options import UsageError, add_dashboard_address, key_values
from crossrec_cli.parser import suggestion

__all__ = ["register", "job_argv", "SUBMITTABLE"]

SUBMITTABLE = ("prepare", "train", "tune", "evaluate", "serve")
# Options whose value is written by the job: a relative path would land in the job's temporary working dir.
_OUTPUTS = ("out", "json", "storage", "state")
# A serve job is stopped with SIGTERM (`crossrec jobs stop`); Ray SIGKILLs a job after RAY_JOB_STOP_WAIT_TIME_S
# (3 s by default), before Serve has shut down (~5-10 s): a detached Serve app would outlive its job.
SERVE_JOB_ENV = {"RAY_JOB_STOP_WAIT_TIME_S": "60"}


def job_argv(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """Checks `SUBCOMMAND ARGS` with the local `parser` (a typo fails here, not minutes later on the cluster) and
    returns the argv the job runs: commands that take --address get `--address auto` (the job's own cluster)."""
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        raise UsageError(f"no command to run: crossrec submit --address URL -- {{{','.join(SUBMITTABLE)}}} ARGS...")
    if argv[0] not in SUBMITTABLE:
        raise UsageError(
            f"cannot submit {argv[0]!r} (accepted: {', '.join(SUBMITTABLE)}){suggestion(argv[0], SUBMITTABLE)}"
        )
    args = parser.parse_args(argv)  # argparse's own message and exit code 2 on bad ARGS
    if argv[0] == "serve" and not args.state:
        raise UsageError(
            "submit -- serve needs --state DIR, an absolute path on the head: the log of items added online must "
            "outlive the job's temporary working dir"
        )
    for name in _OUTPUTS:
        value = getattr(args, name, None)
        if value and "://" not in str(value) and not os.path.isabs(value):
            raise UsageError(
                f"--{name} {value}: a relative path is written inside the job's temporary copy of the "
                f"working dir and deleted with it; give an absolute path on storage every node shares "
                f"(or a URI for --storage)"
            )
    if hasattr(args, "address") and args.address is None:
        argv = [*argv, "--address", "auto"]
    return argv


def cmd_submit(args: argparse.Namespace) -> int:
    from trainers.jobs import exit_code, follow, submit

    argv = job_argv(args.command_args, args.parser)
    c, sid = submit(
        args.address,
        argv,
        working_dir=args.working_dir,
        env={**(SERVE_JOB_ENV if argv[0] == "serve" else {}), **key_values(args.env, "--env")},
        excludes=args.exclude,
        pip=args.pip,
        python=args.python,
        submission_id=args.id,
        entrypoint_num_gpus=args.entrypoint_gpus or None,
    )
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


def register(sub: argparse._SubParsersAction) -> None:
    sp = sub.add_parser(
        "submit",
        help="run prepare/train/tune/evaluate/serve as a job on a Ray cluster (Jobs API)",
        description="Submit `crossrec SUBCOMMAND ARGS` through Ray's Jobs API. The job runs on the "
        "head node with the head's own Python (the one running its Ray, found there; a pre-flight job "
        "checks it has crossrec's dependencies and names what is missing) in a runtime env that uploads "
        "this checkout (data/ included; .git, .venv, out/ and caches excluded); relative paths in ARGS "
        "resolve inside that upload, so outputs need absolute paths on shared storage. `serve` runs "
        "`crossrec serve` as a long-running job on the cluster until `crossrec jobs stop ID`. Prints the "
        "job id; with --follow streams its logs and exits 0 if it succeeded, 1 if it failed or was stopped.",
        epilog="examples: crossrec submit --address http://HEAD:8265 --follow -- train --data "
        "data/amazon-art-office --out /mnt/shared/bundles/ao --workers 4 --gpus-per-worker 1; "
        "crossrec submit --address http://HEAD:8265 -- serve --bundle /mnt/shared/bundles/ao "
        "--host 0.0.0.0 --state /mnt/shared/serve-state",
    )
    add_dashboard_address(sp)
    sp.add_argument("--follow", action="store_true", help="stream the job's logs and exit with its status")
    sp.add_argument(
        "--env",
        action="append",
        metavar="KEY=VALUE",
        help="environment variable for the job (repeatable), e.g. CROSSREC_CACHE_DIR=/mnt/shared/cache",
    )
    sp.add_argument(
        "--pip",
        action="append",
        metavar="REQUIREMENT",
        help="extra package installed into the job's env (repeatable; default: none, the cluster's "
        "nodes have crossrec's dependencies)",
    )
    sp.add_argument(
        "--exclude",
        action="append",
        metavar="PATTERN",
        help="also leave out of the upload (gitignore syntax, repeatable)",
    )
    sp.add_argument("--working-dir", metavar="CHECKOUT", help="crossrec checkout to upload (default: this one)")
    sp.add_argument(
        "--python",
        metavar="PATH",
        help="interpreter on the head (default: the one that runs the head's Ray, found by the job; never "
        "the `python` of the head's PATH)",
    )
    sp.add_argument(
        "--entrypoint-gpus",
        type=float,
        default=0,
        help="GPUs reserved for the job's driver itself (default: 0; workers request their own)",
    )
    sp.add_argument("--id", help="submission id (default: crossrec-SUBCOMMAND-TIME-RANDOM)")
    sp.add_argument(
        "command_args",
        nargs=argparse.REMAINDER,
        metavar="-- SUBCOMMAND ARGS",
        help="prepare, train, tune, evaluate or serve with its arguments",
    )
    sp.set_defaults(func=cmd_submit)

    sp = sub.add_parser(
        "jobs",
        help="list, inspect, follow or stop jobs on a Ray cluster",
        description="Jobs submitted to a Ray cluster (by `crossrec submit` or `ray job submit`). "
        "`status` and `logs --follow` exit 1 for a job that failed or was stopped.",
    )
    jobs = sp.add_subparsers(dest="action", metavar="ACTION", required=True)
    common = argparse.ArgumentParser(add_help=False)
    add_dashboard_address(common)
    jobs.add_parser("list", parents=[common], help="submitted jobs, oldest first")
    jp = jobs.add_parser("status", parents=[common], help="a job's status and, if it failed, why")
    jp.add_argument("job_id", metavar="ID")
    jp = jobs.add_parser("logs", parents=[common], help="a job's logs")
    jp.add_argument("job_id", metavar="ID")
    jp.add_argument("--follow", action="store_true", help="stream until the job ends; exit with its status")
    jp = jobs.add_parser("stop", parents=[common], help="stop a job")
    jp.add_argument("job_id", metavar="ID")
    jp.add_argument(
        "--wait", type=float, default=30, metavar="SECONDS", help="wait up to this long for it to end (default: 30)"
    )
    sp.set_defaults(func=cmd_jobs)
