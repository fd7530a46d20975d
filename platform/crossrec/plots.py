"""Pictures for people who look rather than read: a bundle's learning curves (`curves.png`) and an evaluation's
per-domain metrics beside the baselines (`crossrec evaluate --plot`). Matplotlib, files only (Agg); no Ray."""

from __future__ import annotations

from pathlib import Path

__all__ = ["plot_curves", "plot_evaluation"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path, title: str) -> Path:
    """Titles, lays out, writes (PNG by the suffix) and closes a figure."""
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def plot_curves(history: list[dict], path: str | Path, title: str = "") -> Path:
    """PNG of a training run: train loss (left) and validation NDCG@10, overall and per domain (right), per epoch;
    the best epoch (the exported checkpoint) marked."""
    import matplotlib.ticker

    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    left.plot(epochs, [h.get("train/loss") for h in history], "o-", color="tab:red")
    left.set_title("train loss (InfoNCE)", fontsize=9)
    domains = sorted({k.split("/")[1] for h in history for k in h if k.count("/") == 2 and k.endswith("ndcg@10")})
    for d in domains:
        right.plot(epochs, [h.get(f"valid/{d}/ndcg@10") for h in history], "--", marker=".", label=d)
    overall = [h.get("valid/ndcg@10") for h in history]
    right.plot(epochs, overall, "o-", color="black", label="all")
    if any(v is not None for v in overall):
        ranked = [-1.0 if v is None else float(v) for v in overall]
        best = max(range(len(history)), key=ranked.__getitem__)
        right.scatter(
            [epochs[best]],
            [overall[best]],
            s=120,
            facecolors="none",
            edgecolors="tab:green",
            zorder=3,
            label=f"best (epoch {epochs[best]}: {overall[best]:.4f})",
        )
    right.set_title("validation NDCG@10 (full ranking)", fontsize=9)
    right.legend(fontsize=7)
    for ax in (left, right):
        ax.set_xlabel("epoch")
        if len(epochs) <= 20:  # whole epochs only (one epoch would get fractional ticks around it)
            ax.set_xticks(epochs)
        else:
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    return _save(fig, path, title)


def plot_evaluation(
    metrics: dict,
    path: str | Path,
    metric_names: tuple = ("ndcg@10", "recall@10"),
    beyond: dict | None = None,
    title: str = "",
) -> Path:
    """PNG of an evaluation: for each metric a panel of grouped bars, one group per domain (and `all`), one bar
    per model (crossrec first, then the baselines). beyond: {MODEL: {DOMAIN: {"coverage@10", ...}}} adds
    catalog coverage and the share of recommendations from the most popular 10% of items."""
    import numpy as np

    plt = _pyplot()
    models = sorted(metrics, key=lambda m: (not m.startswith("crossrec"), m))
    domains = list(dict.fromkeys(d for m in models for d in metrics[m]))
    panels = [
        (name, {m: {d: metrics[m][d].get(name) for d in domains if d in metrics[m]} for m in models})
        for name in metric_names
    ]
    for name in ("coverage@10", "popular_share@10"):
        if beyond:
            panels.append((name, {m: {d: v.get(name) for d, v in beyond.get(m, {}).items()} for m in models}))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), squeeze=False)
    width = 0.8 / max(1, len(models))
    x = np.arange(len(domains))
    for ax, (name, values) in zip(axes[0], panels):
        for k, m in enumerate(models):
            ys = [values[m].get(d) or 0.0 for d in domains]
            bars = ax.bar(x + (k - (len(models) - 1) / 2) * width, ys, width, label=m)
            for b, y in zip(bars, ys):
                ax.annotate(f"{y:.3f}", (b.get_x() + b.get_width() / 2, y), ha="center", va="bottom", fontsize=6)
        ax.set_xticks(x, domains)
        ax.set_title(name, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    return _save(fig, path, title)
