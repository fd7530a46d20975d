"""Hyper-parameter sweeps as data: `tune_configs/*.yaml` loads into `SweepConfig`, validated before any trial runs.

A sweep file names the training config every trial shares (`base`, keys of `TrainConfig`), the searched keys
(`space`, dotted `TrainConfig` keys with a distribution each), the metric, the scheduler (ASHA or FIFO), the search
algorithm and the resources. Unknown keys anywhere are errors that list the accepted ones; every searched key is
checked by building a `TrainConfig` with its bounds or values, so a typo (`lora.rnak`) fails before Ray starts.
The results side (per-trial records, the CSV table, the plot) lives here too: plain data, no Ray.
The Ray part (`Tuner`, trials running `trainers.train.train_func`) is `trainers/tune.py`.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from crossrec.config import TrainConfig, check_settable, config_from_dict, config_to_dict, from_dict, set_dotted
from crossrec.early_stopping import VALID_METRIC

__all__ = [
    "ParamSpace",
    "SchedulerConfig",
    "SearchConfig",
    "SweepConfig",
    "TrialRecord",
    "load_sweep",
    "sweep_from_dict",
    "sweep_to_dict",
    "trial_table",
    "format_trial_table",
    "write_trial_csv",
    "plot_sweep",
    "SPACE_TYPES",
    "DEFAULT_METRIC",
]

DEFAULT_METRIC = VALID_METRIC  # what every trainer reports each epoch
SPACE_TYPES = ("loguniform", "uniform", "randint", "choice", "grid")
SCHEDULERS = ("asha", "fifo")
SEARCHERS = ("random", "optuna")
# The item-encoder input (catalog vectors, graph and feature blocks) is computed once per sweep, before the
# trials: keys that change it cannot vary.
FIXED_PER_SWEEP = (
    "backbone",
    "text_template",
    "max_tokens",
    "graph.enabled",
    "graph.layers",
    "graph.co_interaction",
    "graph.columns",
    "feature_columns",
    "side_dims",
)
_GRID_CHECK_LIMIT = 256  # finite spaces up to this many combinations are validated combination by combination


def _from_dict(cls, data: Any, where: str):
    return from_dict(cls, data, "" if where == "sweep" else where, kind="sweep")


def _number(value: Any, name: str) -> float:
    """YAML 1.1 reads `3e-4` as a string: accept it as the number it means."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"`{name}` must be a number, got {value!r}")
    return value


@dataclass
class ParamSpace:
    """How one dotted `TrainConfig` key varies across trials."""

    type: str  # loguniform / uniform (floats in [low, high]), randint (integers low..high inclusive), choice, grid
    low: float | None = None  # lower bound (loguniform, uniform, randint)
    high: float | None = None  # upper bound, inclusive (loguniform, uniform, randint)
    values: list | None = None  # the values (choice: sampled; grid: every value, crossed with the other grids)

    def validate(self, key: str) -> None:
        where = f"space.{key}"
        if self.type not in SPACE_TYPES:
            raise ValueError(f"`{where}.type` must be one of {', '.join(SPACE_TYPES)}, got {self.type!r}")
        if self.type in ("choice", "grid"):
            if self.low is not None or self.high is not None:
                raise ValueError(f"`{where}`: {self.type} takes `values`, not `low`/`high`")
            if not isinstance(self.values, list) or not self.values:
                raise ValueError(f"`{where}.values` must be a non-empty list, got {self.values!r}")
            self.values = [
                _number(v, f"{where}.values") if isinstance(v, str) and _is_number(v) else v for v in self.values
            ]
            return
        if self.values is not None:
            raise ValueError(f"`{where}`: {self.type} takes `low` and `high`, not `values`")
        if self.low is None or self.high is None:
            raise ValueError(f"`{where}`: {self.type} needs `low` and `high`")
        self.low, self.high = _number(self.low, f"{where}.low"), _number(self.high, f"{where}.high")
        if self.type == "randint":
            if self.low != int(self.low) or self.high != int(self.high):
                raise ValueError(f"`{where}`: randint bounds must be integers, got {self.low!r}, {self.high!r}")
            self.low, self.high = int(self.low), int(self.high)
        if not self.low < self.high:
            raise ValueError(f"`{where}`: `low` must be < `high`, got {self.low!r} >= {self.high!r}")
        if self.type == "loguniform" and self.low <= 0:
            raise ValueError(f"`{where}.low` must be > 0 for loguniform, got {self.low!r}")

    def probe_values(self) -> list:
        """Values that stand for the whole range when checking it against `TrainConfig`."""
        return list(self.values or []) if self.type in ("choice", "grid") else [self.low, self.high]


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


@dataclass
class SchedulerConfig:
    """Trial scheduling: ASHA stops trials whose metric trails at a rung; FIFO runs every trial to its end."""

    type: str = "asha"  # asha or fifo
    grace_period: int = 1  # ASHA: epochs every trial runs before it can be stopped
    reduction_factor: float = 2  # ASHA: 1/reduction_factor of the trials reaching a rung go on to the next
    max_t: int | None = None  # ASHA: the last rung, in epochs (None: the trials' `epochs`)

    def __post_init__(self):
        if self.type not in SCHEDULERS:
            raise ValueError(f"`scheduler.type` must be one of {', '.join(SCHEDULERS)}, got {self.type!r}")
        if isinstance(self.grace_period, bool) or not isinstance(self.grace_period, int) or self.grace_period < 1:
            raise ValueError(f"`scheduler.grace_period` must be an integer >= 1, got {self.grace_period!r}")
        self.reduction_factor = _number(self.reduction_factor, "scheduler.reduction_factor")
        if self.reduction_factor <= 1:
            raise ValueError(f"`scheduler.reduction_factor` must be > 1, got {self.reduction_factor!r}")
        if self.max_t is not None and (
            isinstance(self.max_t, bool) or not isinstance(self.max_t, int) or self.max_t < self.grace_period
        ):
            raise ValueError(
                f"`scheduler.max_t` must be an integer >= `scheduler.grace_period` "
                f"({self.grace_period}), got {self.max_t!r}"
            )


@dataclass
class SearchConfig:
    """How trial configurations are drawn."""

    type: str = "random"  # random (Tune's variant generator: grids crossed, distributions sampled) or optuna (TPE)
    seed: int | None = 0  # makes the draws repeatable (None: a new draw each run)

    def __post_init__(self):
        if self.type not in SEARCHERS:
            raise ValueError(f"`search.type` must be one of {', '.join(SEARCHERS)}, got {self.type!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"`search.seed` must be an integer or null, got {self.seed!r}")


@dataclass
class SweepConfig:
    """A hyper-parameter sweep: what every trial shares, what varies, how trials are judged, scheduled and sized."""

    base: dict = field(default_factory=dict)  # TrainConfig keys every trial shares, over its defaults (`basic`)
    space: dict = field(default_factory=dict)  # dotted TrainConfig key -> ParamSpace
    metric: str = DEFAULT_METRIC  # reported each epoch by the trainer: valid/ndcg@10, valid/recall@10, valid/DOMAIN/...
    mode: str = "max"  # max or min: the direction in which `metric` is better (the training mode is `base.mode`)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    num_samples: int = 1  # draws from the space (a space with grids runs every grid point this many times)
    include_base: bool = False  # also run the `base` values of the searched keys first (the default to beat)
    max_concurrent_trials: int = 1  # trials at once; x workers_per_trial x cpus_per_worker must fit the cluster
    workers_per_trial: int = 1  # Ray Train workers (DDP ranks) of each trial
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0

    def __post_init__(self):
        if isinstance(self.scheduler, dict):
            self.scheduler = _from_dict(SchedulerConfig, self.scheduler, "scheduler")
        if isinstance(self.search, dict):
            self.search = _from_dict(SearchConfig, self.search, "search")
        if not isinstance(self.base, dict):
            raise ValueError(f"`base` must be a mapping of TrainConfig keys, got {type(self.base).__name__}")
        check_settable(self.base, "base.")
        if not isinstance(self.space, dict) or not self.space:
            raise ValueError(
                "`space` must be a non-empty mapping: dotted TrainConfig key -> "
                "{type: loguniform|uniform|randint|choice|grid, ...}"
            )
        self.space = {
            k: v if isinstance(v, ParamSpace) else _from_dict(ParamSpace, v, f"space.{k}")
            for k, v in self.space.items()
        }
        if self.mode not in ("max", "min"):
            raise ValueError(f"`mode` must be max or min, got {self.mode!r}")
        if not isinstance(self.metric, str) or not (self.metric.startswith("valid/") or self.metric == "train/loss"):
            raise ValueError(
                f"`metric` must be a reported metric (valid/ndcg@10, valid/recall@10, "
                f"valid/DOMAIN/ndcg@10, valid/DOMAIN/recall@10, train/loss), got {self.metric!r}"
            )
        for name in ("num_samples", "max_concurrent_trials", "workers_per_trial"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"`{name}` must be an integer >= 1, got {v!r}")
        if _number(self.cpus_per_worker, "cpus_per_worker") < 0 or _number(self.gpus_per_worker, "gpus_per_worker") < 0:
            raise ValueError("`cpus_per_worker` and `gpus_per_worker` must be >= 0")
        if self.cpus_per_worker == 0 and self.gpus_per_worker == 0:
            raise ValueError("`cpus_per_worker` and `gpus_per_worker` cannot both be 0: a worker needs a CPU or GPU")
        try:
            self.base_config()
        except ValueError as e:
            raise ValueError(f"`base`: {e}") from None
        self._check_space()
        has_grid = any(p.type == "grid" for p in self.space.values())
        if has_grid and self.search.type == "optuna":
            raise ValueError("`search.type` optuna samples; it cannot run `grid` keys (use choice, or search random)")
        if self.include_base and has_grid:
            raise ValueError(
                "`include_base` runs the base values before the draws; a `grid` space already "
                "decides every trial: list the base value in the grid instead"
            )

    # -- building trial configs ------------------------------------------------------------------------------
    def base_config(self) -> TrainConfig:
        return config_from_dict(self.base)

    def trial_config(self, params: dict) -> TrainConfig:
        """The TrainConfig of one trial: `base` with the trial's values of the searched keys (dotted) set."""
        data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in self.base.items()}
        for key, value in params.items():
            set_dotted(data, key, value)
        return config_from_dict(data)

    def base_params(self) -> dict:
        """The searched keys' values in `base` (TrainConfig defaults where `base` does not set them)."""
        flat = _flatten(config_to_dict(self.base_config()))
        return {k: flat[k] for k in self.space}

    def _check_space(self) -> None:
        defaults = _flatten(config_to_dict(self.base_config()))
        for key, ps in self.space.items():
            where = f"space.{key}"
            if key in FIXED_PER_SWEEP:
                raise ValueError(
                    f"`{where}`: `{key}` cannot be searched: the catalog vectors are computed once "
                    f"per sweep (set it in `base`)"
                )
            ps.validate(key)
            if key not in defaults:  # a typo (`lora.rnak`) or a section (`lora`): TrainConfig names the keys
                try:
                    self.trial_config({key: ps.probe_values()[0]})
                except ValueError as e:
                    raise ValueError(f"`{where}`: {e}") from None
                raise ValueError(
                    f"`{where}`: `{key}` is not a TrainConfig key (accepted: {', '.join(sorted(defaults))})"
                )
            _check_type(where, key, defaults[key], ps)
            for value in ps.probe_values():
                try:
                    self.trial_config({key: value})
                except ValueError as e:
                    raise ValueError(f"`{where}`: {e}") from None
        # Finite spaces: each combination must be a valid config too (`dim` x `heads`, ...).
        finite = {k: p.values for k, p in self.space.items() if p.type in ("choice", "grid")}
        n = math.prod(len(v) for v in finite.values()) if finite else 0
        if 1 < len(finite) and n <= _GRID_CHECK_LIMIT:
            for combo in itertools.product(*finite.values()):
                params = dict(zip(finite, combo))
                try:
                    self.trial_config(params)
                except ValueError as e:
                    shown = ", ".join(f"{k}={v!r}" for k, v in params.items())
                    raise ValueError(f"`space`: the combination {shown} is not a valid config: {e}") from None


def _check_type(where: str, key: str, default: Any, ps: ParamSpace) -> None:
    """Distributions must give values of the key's type: an integer key cannot take loguniform floats."""
    if isinstance(default, bool):
        kind = "a boolean"
        ok = ps.type in ("choice", "grid") and all(isinstance(v, bool) for v in ps.values or [])
    elif isinstance(default, int):
        kind = "an integer"
        ok = ps.type == "randint" or (
            ps.type in ("choice", "grid")
            and all(isinstance(v, int) and not isinstance(v, bool) for v in ps.values or [])
        )
    elif isinstance(default, float):
        kind = "a number"
        ok = ps.type != "randint" and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in ps.values or []
        )
    else:
        return
    if not ok:
        hint = " (use randint, choice or grid)" if kind == "an integer" else ""
        raise ValueError(
            f"`{where}`: `{key}` is {kind}; {ps.type} "
            f"{ps.values if ps.values is not None else [ps.low, ps.high]} does not give one{hint}"
        )


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def sweep_from_dict(data: dict) -> SweepConfig:
    return _from_dict(SweepConfig, dict(data), "sweep")


def sweep_to_dict(cfg: SweepConfig) -> dict:
    return dataclasses.asdict(cfg)


def load_sweep(path: str | Path, num_samples: int | None = None) -> SweepConfig:
    """A `tune_configs/*.yaml` file, validated; `num_samples` overrides the file's (`crossrec tune --trials`)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{p}: no such sweep file")
    data = yaml.safe_load(p.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{p}: expected a mapping of sweep keys (base, space, metric, mode, scheduler, ...)")
    if num_samples is not None:
        data["num_samples"] = num_samples
    try:
        return sweep_from_dict(data)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{p}: {e}") from None


# -- results -----------------------------------------------------------------------------------------------
@dataclass
class TrialRecord:
    """One finished (or stopped) trial: its searched values and what it reported each epoch."""

    trial_id: str
    params: dict  # searched key -> value
    status: str  # completed, stopped early (scheduler), stopped (patience), error, unfinished
    history: list[dict]  # one row per epoch: epoch, step, valid/..., train/loss, tau (+ checkpoint_path)
    max_epochs: int  # the trial's `epochs`
    error: str | None = None

    def best(self, metric: str, mode: str) -> dict | None:
        rows = [h for h in self.history if h.get(metric) is not None]
        if not rows:
            return None
        return (max if mode == "max" else min)(rows, key=lambda h: h[metric])

    @property
    def epochs(self) -> int:
        return max((int(h.get("epoch", 0)) for h in self.history), default=0)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e-2 or abs(v) >= 1e4 else f"{v:.4f}".rstrip("0").rstrip(".")
    return str(v)


def trial_table(records: list[TrialRecord], metric: str, mode: str) -> tuple[list[str], list[list]]:
    """Header and rows, best trial first: id, status, searched values, epochs run, best and final metric."""
    keys = list(dict.fromkeys(k for r in records for k in r.params))
    header = [
        "trial",
        "status",
        *keys,
        "epochs",
        f"best {metric}",
        "best epoch",
        f"final {metric}",
        "valid/recall@10 at best",
        "train/loss final",
    ]
    sign = 1 if mode == "max" else -1

    def order(r):
        b = r.best(metric, mode)
        return -sign * b[metric] if b else math.inf

    rows = []
    for r in sorted(records, key=order):
        b = r.best(metric, mode)
        last = r.history[-1] if r.history else {}
        rows.append(
            [
                r.trial_id,
                r.status,
                *[r.params.get(k) for k in keys],
                r.epochs,
                b[metric] if b else None,
                b.get("epoch") if b else None,
                last.get(metric),
                b.get("valid/recall@10") if b else None,
                last.get("train/loss"),
            ]
        )
    return header, rows


def format_trial_table(records: list[TrialRecord], metric: str, mode: str) -> str:
    header, rows = trial_table(records, metric, mode)
    cells = [header] + [["-" if v is None else _fmt(v) for v in row] for row in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in cells
    ]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def write_trial_csv(records: list[TrialRecord], metric: str, mode: str, path: str | Path) -> Path:
    header, rows = trial_table(records, metric, mode)
    path = Path(path)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows([["" if v is None else v for v in row] for row in rows])
    return path


def plot_sweep(records: list[TrialRecord], metric: str, mode: str, path: str | Path, space: dict | None = None) -> Path:
    """PNG: the metric per epoch of every trial, then the best metric against up to two searched numeric keys
    (`lr`, `lora.rank`, then the others in file order; log axis for `lr` and loguniform keys)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    space = space or {}
    keys = [
        k
        for k in dict.fromkeys(k for r in records for k in r.params)
        if all(
            isinstance(r.params.get(k), (int, float)) and not isinstance(r.params.get(k), bool)
            for r in records
            if k in r.params
        )
    ]
    keys = sorted(keys, key=lambda k: (k != "lr", k != "lora.rank"))[:2]  # then the file's order
    fig, axes = plt.subplots(1, 1 + len(keys), figsize=(5.5 * (1 + len(keys)), 4.2), squeeze=False)
    ax = axes[0][0]
    for r in records:
        rows = [h for h in r.history if h.get(metric) is not None]
        if rows:
            style = "-" if r.status == "completed" else "--"
            params = " ".join(f"{k}={_fmt(v)}" for k, v in r.params.items())
            ax.plot(
                [h["epoch"] for h in rows],
                [h[metric] for h in rows],
                style,
                marker="o",
                ms=3,
                label=f"{r.trial_id.rsplit('_', 1)[-1]} {r.status}: {params}",
            )
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per epoch (dashed: stopped before the last epoch)", fontsize=9)
    if len(records) <= 16:  # below the panels, where it hides no point
        fig.legend(
            *ax.get_legend_handles_labels(),
            loc="upper left",
            bbox_to_anchor=(0.01, 0.0),
            fontsize=7,
            ncol=1 + len(records) // 9,
            frameon=False,
        )
    for ax, key in zip(axes[0][1:], keys):
        bests = {r.trial_id: r.best(metric, mode) for r in records}
        pts = [
            (r.params[key], best[metric], r.status == "completed")
            for r in records
            if key in r.params and (best := bests[r.trial_id])
        ]
        for done, marker, label in ((True, "o", "completed"), (False, "x", "stopped early / other")):
            sel = [(x, y) for x, y, d in pts if d == done]
            if sel:
                ax.scatter(*zip(*sel), marker=marker, label=label)
        if key == "lr" or getattr(space.get(key), "type", None) == "loguniform":
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # 2x10^-4, 3x10^-4, ... overlap
        if all(isinstance(x, int) for x, _, _ in pts):
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_xlabel(key)
        ax.set_ylabel(f"best {metric}")
        ax.set_title(f"best {metric} vs {key}", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
