"""Hyper-parameter sweeps with Ray Tune (`crossrec tune`). A trial is a function trainable that runs
`trainers.train.fit` (a TorchTrainer over the same `train_func` as `crossrec train`; Train V2 has no `Tuner(trainer)`).

Trials ask for no CPU (their Train workers hold the CPUs) and `TuneReportCallback` forwards each epoch's report, so
ASHA stops trials between epochs. A stopped trial's Train controller dies with the trial's actor and its placement
group would outlive it (Train's cleaner needs the dashboard's state API), so the driver frees this job's placement
groups whose creating actor is dead. Out folder: experiment/ (Tune state, `--resume`), runs/TRIAL/ (Train
checkpoints: a resumed trial goes on from its last epoch), sweep.json, trials.csv, sweep.png, best/ (bundle).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import ray  # ray
from ray import tune  # ray

from crossrec.config import RunSettings
from crossrec.dataset import Dataset
from crossrec.early_stopping import out_of_patience
from crossrec.fingerprint import check_run, fingerprint
from crossrec.splits import splits_for
from crossrec.sweep import (
    SweepConfig,
    TrialRecord,
    format_trial_table,
    plot_sweep,
    sweep_from_dict,
    sweep_to_dict,
    write_trial_csv,
)
from trainers.pipeline import Inputs, TrainedRun, finish_bundle, prepare_inputs
from trainers.runtime import check_end_to_end_memory, init_ray
from trainers.train import fit, model_domains

__all__ = ["run_sweep", "SweepResult", "tune_trial", "KILL_TRIAL_ENV"]

log = logging.getLogger(__name__)

# Keys the text prior's validation choice depends on: a sweep varying one leaves the choice to each trial.
PRIOR_INPUTS = ("text_prior_decay", "text_prior_cross", "train_domains", "min_per_domain")
# A trial is a thread in a tiny actor; Tune refuses an all-zero request, hence the token memory.
TRIAL_RESOURCES = {"cpu": 0, "memory": 64 * 1024**2}
# A trial whose process dies (a node lost, OOM) is restarted once; its Train run resumes from its last checkpoint.
TRIAL_MAX_FAILURES = 1
# Fault injection for tests of that: with CROSSREC_KILL_TRIAL_AFTER_EPOCH=N:MARKER the first trial whose Train run
# has checkpointed epoch N while MARKER does not exist creates MARKER and SIGKILLs its own process.
KILL_TRIAL_ENV = "CROSSREC_KILL_TRIAL_AFTER_EPOCH"


@dataclass
class SweepResult:
    out: Path
    records: list[TrialRecord]  # every trial, in trial order
    best: TrialRecord | None  # by the sweep's metric and mode (None if no trial reported)
    bundle: dict | None  # bundle.json of out/best (None when interrupted or no trial reported)
    interrupted: bool  # trials were left unfinished: `run_sweep(..., resume=True)` continues them
    wall_s: float
    experiment: Path  # the Tune experiment folder (Tuner.restore)


def tune_trial(config: dict, setup: dict) -> None:
    """One Tune trial: `config` holds the sampled values of the searched keys (dotted), `setup` the sweep, the
    dataset, the catalog vectors and where Train runs are stored. Reports reach Tune through the callback."""
    from ray.tune.integration.ray_train import TuneReportCallback  # ray

    sweep = sweep_from_dict(setup["sweep"])
    cfg = _trial_config(sweep, config, setup)
    # The Train run is named after the trial: a trial restarted by `Tuner.restore` resumes its last checkpoint.
    run = RunSettings(
        workers=sweep.workers_per_trial,
        cpus_per_worker=sweep.cpus_per_worker,
        gpus_per_worker=sweep.gpus_per_worker,
        storage_path=setup["runs"],
        name=tune.get_context().get_trial_id(),
        max_failures=0,
    )
    if (setup.get("env") or {}).get(KILL_TRIAL_ENV):
        _kill_after_epoch(setup["env"][KILL_TRIAL_ENV], Path(setup["runs"]) / run.name)
    fit(
        setup["data"],
        cfg,
        run,
        setup["vectors"],
        progress=setup.get("progress", True),
        callbacks=[TuneReportCallback()],
    )


def _kill_after_epoch(plan: str, run_dir: Path) -> None:
    """KILL_TRIAL_ENV: a thread that SIGKILLs this trial's process once its Train run has checkpointed epoch N."""
    import signal
    import threading

    epoch, _, marker = plan.partition(":")

    def watch() -> None:
        while True:
            if int(epoch) in _train_checkpoints(run_dir):
                try:
                    os.close(os.open(marker, os.O_CREAT | os.O_EXCL))  # once per sweep
                except FileExistsError:
                    return
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(0.2)

    threading.Thread(target=watch, daemon=True).start()


def _trial_config(sweep: SweepConfig, params: dict, setup: dict):
    """The trial's TrainConfig with what the sweep computed once for all trials: the graph / feature blocks of
    its catalog input and, where no trial varies them, the text prior's weights chosen on validation."""
    cfg = sweep.trial_config(params)
    cfg.side_dims = setup["side_dims"]
    for key, value in setup["text_prior"].items():
        if getattr(cfg, key) is None:
            setattr(cfg, key, value)
    return cfg


# -- placement groups of stopped trials -----------------------------------------------------------------------
def _actor_placement_groups() -> dict[bytes, object]:
    """This job's live placement groups that an actor created (not the driver, not detached): id -> GCS record."""
    from ray._private.state import state  # ray: the GCS tables, readable without the dashboard
    from ray.core.generated import gcs_pb2  # ray

    job = ray.get_runtime_context().get_job_id()
    out = {}
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        pg = gcs_pb2.PlacementGroupTableData.FromString(raw)
        by_actor = pg.creator_actor_id and pg.creator_actor_id != b"\xff" * len(pg.creator_actor_id)
        if (
            by_actor
            and not pg.is_detached
            and pg.creator_job_id.hex() == job
            and pg.state != gcs_pb2.PlacementGroupTableData.REMOVED
        ):
            out[pg.placement_group_id] = pg
    return out


def _free_orphaned_placement_groups() -> int:
    """Removes this job's placement groups whose creating actor is dead (Train controllers of stopped trials).
    Placement groups created by the driver (Tune's own, Ray Data's) and detached ones are never touched."""
    from ray.util.placement_group import PlacementGroup, remove_placement_group  # ray

    freed = 0
    for pg_id, pg in _actor_placement_groups().items():
        if pg.creator_actor_dead:
            try:
                remove_placement_group(PlacementGroup(ray.PlacementGroupID(pg_id)))
                freed += 1
            except Exception as e:  # already going away
                log.debug("placement group %s: %s", pg_id.hex(), e)
    return freed


def _wait_free_placement_groups(before: set, timeout_s: float = 15.0) -> None:
    """After the experiment: trial actors that Tune force-stopped take a moment to be declared dead, and only then
    are their controllers' placement groups orphans. Free those created during the sweep (not in `before`) before
    anything else needs the CPUs."""
    deadline = time.monotonic() + timeout_s
    while True:
        _free_orphaned_placement_groups()
        if not set(_actor_placement_groups()) - before or time.monotonic() > deadline:
            return
        time.sleep(0.5)


class _SweepCallback(tune.Callback):
    """Driver side: frees stopped trials' CPUs, remembers trial states (to tell an interruption from the end),
    and prints one line per epoch and per finished trial."""

    def __init__(
        self,
        metric: str,
        progress: bool,
        scheduler,
        scheduler_state: Path,
        every_s: float = 1.0,
        max_epochs: int = 0,
        n_trials: int | None = None,
    ):
        from crossrec.progress import Progress

        self.metric, self.progress, self.every_s = metric, progress, every_s
        self.scheduler, self.scheduler_state = scheduler, scheduler_state
        self.statuses: dict[str, str] = {}
        self._last = 0.0
        self.max_epochs = max_epochs
        # trials done / running / pruned: a bar at a terminal, one line at the end otherwise
        self.bar = Progress(n_trials, "sweep", "trial", progress)

    def on_step_end(self, iteration, trials, **info):
        self.statuses = {t.trial_id: t.status for t in trials}
        done = [t for t in trials if t.status in ("TERMINATED", "ERROR")]
        pruned = sum((t.last_result or {}).get("epoch", 0) < self.max_epochs for t in done)
        if self.bar.total is None or self.bar.total < len(trials):
            self.bar.total = len(trials)
            if self.bar.bar is not None:
                self.bar.bar.total = len(trials)
        self.bar.update(len(done) - self.bar.n)
        self.bar.status(
            f"{sum(t.status == 'RUNNING' for t in trials)} running, "
            f"{sum(t.status == 'PENDING' for t in trials)} pending, {pruned} ended before epoch "
            f"{self.max_epochs}, {sum(t.status == 'ERROR' for t in trials)} failed"
        )
        if time.monotonic() - self._last > self.every_s:
            self._last = time.monotonic()
            _free_orphaned_placement_groups()
            self.save_scheduler()

    def save_scheduler(self) -> None:
        """Tune's experiment state leaves the scheduler out: a restored ASHA would have forgotten every rung and
        let resumed trials through. Its own save/restore keeps the rungs beside the experiment."""
        if hasattr(self.scheduler, "_brackets"):  # ASHA; FIFO has no state
            tmp = self.scheduler_state.with_suffix(".tmp")
            self.scheduler.save(str(tmp))
            os.replace(tmp, self.scheduler_state)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if self.progress and self.metric in result:
            params = " ".join(f"{k}={_short(v)}" for k, v in trial.config.items())
            print(
                f"[tune] {trial.trial_id} epoch {result.get('epoch')}: {self.metric} {result[self.metric]:.4f}"
                f"  ({params})",
                flush=True,
            )

    def on_trial_complete(self, iteration, trials, trial, **info):
        if self.progress:
            epoch = (trial.last_result or {}).get("epoch", 0)
            print(f"[tune] {trial.trial_id} ended (last epoch Tune saw: {epoch})", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        print(f"[tune] {trial.trial_id} failed: {trial.error_file or 'see the experiment folder'}", flush=True)


def _short(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


# -- the sweep ------------------------------------------------------------------------------------------------
def _param_space(sweep: SweepConfig) -> dict:
    space = {}
    for key, ps in sweep.space.items():
        space[key] = {
            "loguniform": lambda: tune.loguniform(ps.low, ps.high),
            "uniform": lambda: tune.uniform(ps.low, ps.high),
            "randint": lambda: tune.randint(ps.low, ps.high + 1),  # Tune's upper bound is exclusive
            "choice": lambda: tune.choice(ps.values),
            "grid": lambda: tune.grid_search(ps.values),
        }[ps.type]()
    return space


def _search_alg(sweep: SweepConfig):
    points = [sweep.base_params()] if sweep.include_base else None
    if sweep.search.type == "optuna":
        try:
            import optuna  # noqa: F401
            from ray.tune.search.optuna import OptunaSearch  # ray
        except ImportError:
            raise ValueError("`search.type` optuna needs the optuna package: pip install optuna") from None
        return OptunaSearch(metric=sweep.metric, mode=sweep.mode, points_to_evaluate=points, seed=sweep.search.seed)
    from ray.tune.search import BasicVariantGenerator  # ray

    return BasicVariantGenerator(
        points_to_evaluate=points, random_state=sweep.search.seed, max_concurrent=sweep.max_concurrent_trials
    )


def _max_epochs(sweep: SweepConfig) -> int:
    ps = sweep.space.get("epochs")
    return max([sweep.base_config().epochs, *(ps.probe_values() if ps else [])])


def _scheduler(sweep: SweepConfig):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler  # ray

    s = sweep.scheduler
    if s.type == "fifo":
        return FIFOScheduler()
    # Rungs count epochs (reported by train_func), not Tune iterations: a resumed trial goes on from its epoch.
    # metric and mode set here, not in TuneConfig: a scheduler restored with its state already has them.
    return ASHAScheduler(
        time_attr="epoch",
        metric=sweep.metric,
        mode=sweep.mode,
        max_t=s.max_t or _max_epochs(sweep),
        grace_period=s.grace_period,
        reduction_factor=s.reduction_factor,
    )


def _check_fits_cluster(sweep: SweepConfig, remote: bool) -> None:
    total = ray.cluster_resources()
    need_cpu = sweep.max_concurrent_trials * sweep.workers_per_trial * sweep.cpus_per_worker
    need_gpu = sweep.max_concurrent_trials * sweep.workers_per_trial * sweep.gpus_per_worker
    for what, need, have in (("CPU", need_cpu, total.get("CPU", 0)), ("GPU", need_gpu, total.get("GPU", 0))):
        if need > have:
            msg = (
                f"`max_concurrent_trials` ({sweep.max_concurrent_trials}) x `workers_per_trial` "
                f"({sweep.workers_per_trial}) x `{what.lower()}s_per_worker` needs {need:g} {what}s at once, "
                f"the cluster has {have:g}"
            )
            if not remote:  # a fixed local Ray: trials would wait for each other's CPUs for ever
                raise ValueError(msg + ": lower them")
            log.warning("%s; trials wait until the cluster scales up", msg)


def _train_checkpoints(run_dir: Path) -> dict[int, tuple[Path, list[dict]]]:
    """epoch -> (checkpoint folder, history up to that epoch), from the kept checkpoints of a trial's Train run
    (train_func's state.json). Train always keeps the latest, so the latest one holds the whole history, including
    an epoch that finished while an interrupted sweep was stopping (Tune never saw its report)."""
    out = {}
    for f in run_dir.glob("checkpoint_*/state.json"):
        try:
            st = json.loads(f.read_text())
            out[int(st["epoch"])] = (f.parent, st["history"])
        except (OSError, ValueError, KeyError):  # a checkpoint cut off while being written
            continue
    return out


def _records(grid, sweep: SweepConfig, statuses: dict[str, str], runs: Path) -> list[TrialRecord]:
    out = []
    for res in grid:
        trial_id = Path(res.path).name
        ckpts = _train_checkpoints(runs / trial_id)
        history = [dict(h) for h in ckpts[max(ckpts)][1]] if ckpts else []
        for h in history:
            if h["epoch"] in ckpts:
                h["checkpoint_path"] = str(ckpts[h["epoch"]][0])
        params = {k: _plain(v) for k, v in (res.config or {}).items() if k in sweep.space}
        try:
            cfg = sweep.trial_config(params)
        except ValueError:  # a combination the trial itself refused (it errored)
            cfg = sweep.base_config()
        if res.error is not None:
            status = "error"
        elif statuses.get(trial_id, "TERMINATED") not in ("TERMINATED", "ERROR"):
            status = "unfinished"
        elif history and _ran_to_the_end(history, cfg):
            status = "completed"
        elif out_of_patience(history, cfg.patience):
            status = "stopped (patience)"  # train_func ended it: no validation gain for `patience` epochs
        else:
            status = "stopped early"  # the scheduler (ASHA) ended it
        out.append(
            TrialRecord(
                trial_id,
                params,
                status,
                history,
                cfg.epochs,
                None if res.error is None else str(res.error).splitlines()[0][:300],
            )
        )
    return sorted(out, key=lambda r: r.trial_id)


def _ran_to_the_end(history: list[dict], cfg) -> bool:
    last = history[-1]
    return last["epoch"] >= cfg.epochs or bool(cfg.max_steps and last.get("step", 0) >= cfg.max_steps)


def _plain(v):
    """numpy / pandas scalars -> Python, for JSON and CSV."""
    return v.item() if hasattr(v, "item") else v


def _state_file(out: Path) -> Path:
    return out / "sweep.json"


def _shared_inputs(sweep: SweepConfig, base, dataset, splits, progress: bool) -> tuple:
    """What every trial reads, computed once before the first: (catalog vectors .npy or None, sizes of the graph /
    feature blocks or None, the text prior's weights chosen on validation unless trials vary what they depend
    on). Sets `base.side_dims`."""
    inputs = prepare_inputs(
        dataset,
        splits,
        base,
        progress,
        embed=base.item_encoder == "text" or "item_encoder" in sweep.space,
        resolve_prior=not set(PRIOR_INPUTS) & set(sweep.space),
    )
    base.side_dims = inputs.side_dims
    text_prior = {}
    if not set(PRIOR_INPUTS) & set(sweep.space):
        text_prior = {k: getattr(inputs.config, k) for k in ("text_prior_decay", "text_prior_cross")}
    return inputs.vectors, inputs.side_dims, text_prior


def _check_resume(out: Path, experiment: Path, state: dict, resume: bool) -> None:
    """A new sweep needs an empty --out; --resume needs the same sweep file, --trials and data (fingerprint)."""
    if resume:
        if not _state_file(out).is_file() or not experiment.is_dir():
            raise ValueError(f"--resume: {out} holds no sweep to resume (no sweep.json / experiment/)")
        saved = json.loads(_state_file(out).read_text())
        check_run(
            saved.get("fingerprint"),
            state["fingerprint"],
            f"--resume: {out}",
            resume=True,
            remedy="resume with the same sweep file, --trials and --data",
            config_name="sweep config",
        )
    elif experiment.exists():
        raise ValueError(f"{out} already holds a sweep: pass --resume to continue it, or choose another --out")


def _tuner(sweep: SweepConfig, trainable, out: Path, experiment: Path, scheduler_state: Path, resume: bool):
    """(Tuner, scheduler): a new experiment in `out`, or the interrupted one restored with its ASHA rungs."""
    if resume:
        tuner = tune.Tuner.restore(str(experiment), trainable, resume_unfinished=True)
        scheduler = tuner._local_tuner._tune_config.scheduler  # no public getter
        if scheduler_state.is_file() and hasattr(scheduler, "_brackets"):
            scheduler.restore(str(scheduler_state))
    else:
        scheduler = _scheduler(sweep)
        tuner = tune.Tuner(
            trainable,
            param_space=_param_space(sweep),
            run_config=tune.RunConfig(
                name=experiment.name,
                storage_path=str(out),
                verbose=0,
                failure_config=tune.FailureConfig(max_failures=TRIAL_MAX_FAILURES),
            ),
            # BasicVariantGenerator takes its concurrency limit itself; Tune wraps a Searcher (Optuna) in a
            # ConcurrencyLimiter from max_concurrent_trials.
            tune_config=tune.TuneConfig(
                num_samples=sweep.num_samples,
                max_concurrent_trials=sweep.max_concurrent_trials if sweep.search.type == "optuna" else None,
                search_alg=_search_alg(sweep),
                scheduler=scheduler,
                trial_name_creator=lambda t: t.trial_id,
                trial_dirname_creator=lambda t: t.trial_id,
            ),
        )
    return tuner, scheduler


def run_sweep(
    sweep: SweepConfig,
    data: str | Path,
    out: str | Path,
    address: str | None = None,
    resume: bool = False,
    progress: bool = True,
    callbacks: list | None = None,
) -> SweepResult:
    """Runs (or, with resume, continues) a sweep into `out` and exports the best trial to `out/best`.

    callbacks: extra `ray.tune.Callback`s. An interruption (Ctrl+C) saves the experiment state and returns with
    `interrupted` set; `resume=True` with the same sweep and data then finishes the unfinished trials."""
    t0 = time.time()
    out = Path(out).resolve()
    data = Path(data).resolve()
    experiment = out / "experiment"
    base = sweep.base_config()
    dataset = Dataset.load(data)
    # The sweep's fingerprint (crossrec.fingerprint, as `crossrec train` keeps one per run): every key counts.
    state = {
        "sweep": sweep_to_dict(sweep),
        "data": str(data),
        "fingerprint": fingerprint(dataset.content_hash, sweep_to_dict(sweep), ignore=()),
    }
    _check_resume(out, experiment, state, resume)
    splits = splits_for(dataset, base, training=True)  # what train_func trains on (protocol, train_domains)
    model_domains(base, splits)  # unknown train_domains fail before Ray starts
    # Trials in turn: max_concurrent_trials x workers_per_trial workers at once (a remote cluster is not checked).
    check_end_to_end_memory(base, sweep.max_concurrent_trials * sweep.workers_per_trial, address, progress)

    init_ray(address)
    _check_fits_cluster(sweep, remote=bool(address))
    vec_path, side_dims, text_prior = _shared_inputs(sweep, base, dataset, splits, progress)
    out.mkdir(parents=True, exist_ok=True)
    if not resume:
        _state_file(out).write_text(json.dumps(state, indent=1) + "\n")
    setup = {
        "sweep": state["sweep"],
        "data": str(data),
        "vectors": str(vec_path) if vec_path else None,
        "side_dims": side_dims,
        "text_prior": text_prior,
        "runs": str(out / "runs"),
        "progress": progress,
        "env": {k: os.environ[k] for k in (KILL_TRIAL_ENV,) if k in os.environ},
    }
    trainable = tune.with_resources(tune.with_parameters(tune_trial, setup=setup), TRIAL_RESOURCES)
    scheduler_state = out / "scheduler.pkl"  # Tune's own format (its save/restore), beside Tune's tuner.pkl
    tuner, scheduler = _tuner(sweep, trainable, out, experiment, scheduler_state, resume)
    local = tuner._local_tuner  # the TuneConfig and RunConfig have no public setter
    grids = [len(p.values) for p in sweep.space.values() if p.type == "grid"]
    watch = _SweepCallback(
        sweep.metric,
        progress,
        scheduler,
        scheduler_state,
        max_epochs=_max_epochs(sweep),
        n_trials=sweep.num_samples * (math.prod(grids) if grids else 1),
    )
    # Callbacks are set after the Tuner pickled its state (tuner.pkl): a restored sweep never brings back the
    # previous run's (a stale progress printer, a test's interrupter).
    local.get_run_config().callbacks = [watch, *(callbacks or [])]
    before = set(_actor_placement_groups())
    # Tune's new console output prints its header even at verbose 0; the legacy one is silent there.
    # Ours is the sweep bar and the per-epoch lines; Tune's own tables only with --verbose.
    from crossrec.progress import verbose

    quiet_env = {} if verbose() or "RAY_AIR_NEW_OUTPUT" in os.environ else {"RAY_AIR_NEW_OUTPUT": "0"}
    os.environ.update(quiet_env)
    try:
        grid = tuner.fit()
    finally:
        for k in quiet_env:
            os.environ.pop(k, None)
        watch.save_scheduler()
        watch.bar.close()
        _wait_free_placement_groups(before)
    records = _records(grid, sweep, watch.statuses, out / "runs")
    interrupted = any(r.status == "unfinished" for r in records)
    write_trial_csv(records, sweep.metric, sweep.mode, out / "trials.csv")
    if any(r.history for r in records):
        plot_sweep(records, sweep.metric, sweep.mode, out / "sweep.png", sweep.space)
    if progress:
        print(format_trial_table(records, sweep.metric, sweep.mode))
    reported = [r for r in records if r.best(sweep.metric, sweep.mode)]
    sign = 1 if sweep.mode == "max" else -1
    best = max(reported, key=lambda r: sign * r.best(sweep.metric, sweep.mode)[sweep.metric], default=None)
    bundle = None
    if best is not None and not interrupted:
        bundle = _export_best(best, sweep, data, out, setup, dataset, splits, progress, address)
    return SweepResult(out, records, best, bundle, interrupted, round(time.time() - t0, 1), experiment)


def _export_best(
    best: TrialRecord,
    sweep: SweepConfig,
    data: Path,
    out: Path,
    setup: dict,
    dataset,
    splits,
    progress: bool,
    address: str | None,
) -> dict:
    from ray.train import Checkpoint  # ray

    # The best epoch whose checkpoint was kept (Train keeps the best two and the latest).
    rows = [h for h in best.history if h.get("checkpoint_path") and h.get(sweep.metric) is not None]
    if not rows:
        raise RuntimeError(f"trial {best.trial_id} kept no checkpoint under {out / 'runs' / best.trial_id}")
    row = (max if sweep.mode == "max" else min)(rows, key=lambda h: h[sweep.metric])
    cfg = _trial_config(sweep, best.params, setup)
    history = [{k: v for k, v in h.items() if k != "checkpoint_path"} for h in best.history]
    trained = TrainedRun(
        Checkpoint(row["checkpoint_path"]),
        row,
        history,
        {"fit": round(sum(h.get("train/epoch_s", 0) for h in best.history), 1)},
        {"run": {"sweep": str(out), "trial": best.trial_id, "params": best.params, "workers": sweep.workers_per_trial}},
    )
    inputs = Inputs(setup["vectors"], setup["side_dims"], cfg)
    # The best trial's bundle is finished as `crossrec train` finishes one: its ranker too, when the base enables it.
    run = RunSettings(workers=sweep.workers_per_trial, address=address, storage_path=str(out / "runs"), name="best")
    return finish_bundle(data, out / "best", inputs, trained, run, progress, dataset, splits)
