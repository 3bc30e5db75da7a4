"""The picture of a sweep's results (results.png in the sweep folder): the metric against each
parameter (finished trials filled, pruned ones hollow at their last reported value), and the
best value so far over the trials in the order they started."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

from pipeline.outputs import atomic_write


def _numeric(values: list) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def plot_results(path: Path, rows: list[dict], params: list[str], metric: str, goal: str) -> Path | None:
    """Write the PNG (atomically); None when no trial has a value yet (nothing to draw)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a cluster node
    import matplotlib.pyplot as plt

    scored = [r for r in rows if r.get(metric) is not None and r["status"] in ("done", "pruned")]
    if not scored:
        return None
    n = len(params) + 1
    cols = min(n, 3)
    fig, axes = plt.subplots(math.ceil(n / cols), cols, figsize=(4.2 * cols, 3.4 * math.ceil(n / cols)), squeeze=False)
    for ax, name in zip(axes.flat, params):
        values = [r.get(name) for r in scored]
        if _numeric(values):
            x, labels = values, None
            if values and min(values) > 0 and max(values) / min(values) > 10:
                ax.set_xscale("log")
        else:  # categorical (lists, text): one column per value, in the order first seen
            labels = list(dict.fromkeys(json.dumps(v) for v in values))
            x = [labels.index(json.dumps(v)) for v in values]
            ax.set_xticks(range(len(labels)), labels, rotation=30, fontsize=7)
        for status, style in (("done", {"color": "C0"}), ("pruned", {"facecolors": "none", "edgecolors": "C1"})):
            pts = [(xi, r[metric]) for xi, r in zip(x, scored) if r["status"] == status]
            if pts:
                ax.scatter(*zip(*pts), s=22, label=status, **style)
        ax.set_xlabel(name, fontsize=8)
        ax.set_ylabel(metric, fontsize=8)
    ax = axes.flat[len(params)]
    done = sorted((r for r in scored if r["status"] == "done" and r.get("order") is not None), key=lambda r: r["order"])
    if done:
        better = min if goal == "minimize" else max
        best, curve = None, []
        for r in done:
            best = r[metric] if best is None else better(best, r[metric])
            curve.append(best)
        ax.step(range(1, len(curve) + 1), curve, where="post", color="C0")
        ax.scatter(range(1, len(curve) + 1), [r[metric] for r in done], s=10, color="C0", alpha=0.4)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("finished trials, in order started", fontsize=8)
    ax.set_ylabel(f"best {metric} so far ({goal})", fontsize=8)
    for extra in list(axes.flat)[n:]:
        extra.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    data = buf.getvalue()
    atomic_write(path, lambda f: f.write(data), "sweep results picture", need=len(data))
    return Path(path)


def publish_to_wandb(out_dir: Path, rows: list[dict], name: str, log=print) -> str | None:
    """The picture and table to wandb when the trials log there (their logger.backend): one run,
    `<sweep>-results` in the sweep's group, online when the trials' mode resolves to online, else
    an offline run in the sweep folder that `wandb sync` uploads later. Returns its mode."""
    import yaml

    from pipeline.tracking import resolve_wandb_mode

    picture = Path(out_dir) / "results.png"
    config = next((Path(r["run_dir"]) / "config.yaml" for r in rows if (Path(r["run_dir"]) / "config.yaml").is_file()), None)
    if config is None or not picture.is_file():
        return None
    try:  # a trial's config: read for three names, nothing in it runs
        logger = (yaml.safe_load(config.read_text()) or {}).get("logger") or {}
    except (OSError, yaml.YAMLError):
        return None
    if logger.get("backend") != "wandb":
        return None
    mode, _ = resolve_wandb_mode(str(logger.get("mode", "auto")))
    if mode == "disabled":
        return None
    import hashlib

    import wandb

    columns = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in ("run_dir", "order")]
    run_id = "sweep-" + hashlib.sha1(str(Path(out_dir).resolve()).encode()).hexdigest()[:12]  # one run per folder
    try:
        run = wandb.init(project=str(logger.get("project") or "vaepipe"), entity=logger.get("entity") or None,
                         group=name, name=f"{name}-results", job_type="sweep-results", dir=str(out_dir), mode=mode,
                         id=run_id, resume="allow")
        run.log({"sweep/results": wandb.Image(str(picture)),
                 "sweep/table": wandb.Table(columns=columns, data=[[str(r.get(k, "")) for k in columns] for r in rows])})
        run.finish()
    except Exception as err:  # noqa: BLE001 - the trials are done; the tracker's trouble is only reported
        log(f"results not sent to wandb ({type(err).__name__}: {err}); they are in {out_dir}")
        return None
    log(f"results picture and table: wandb run {name}-results ({mode})")
    return mode
