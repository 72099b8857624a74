"""Run metrics: one JSON line per logged step (the record), TensorBoard events (the view), a tqdm bar.

``metrics.jsonl`` is the source of truth; each line has ``step``, ``tokens`` and either training scalars
(``loss``, ``lr``, ``grad_norm``, ``tokens_per_s``, ``mfu``) or ``val_loss``. On resume, lines past the
checkpoint's step are dropped (they came from the part of the run that is being redone), and TensorBoard
is opened with ``purge_step`` so its view agrees.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

METRICS_NAME = "metrics.jsonl"


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All complete records of a metrics file (a torn last line from a crash is ignored)."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_NAME
    records = []
    if not path.is_file():
        return records
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class MetricsLogger:
    """Writes on the main rank only; other ranks get a logger that does nothing."""

    def __init__(self, run_dir: str | Path, *, enabled: bool = True, tensorboard: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.path = self.run_dir / METRICS_NAME
        self.tensorboard = tensorboard and enabled
        self._writer = None
        self._file = None

    def open(self, resume_step: int = 0) -> None:
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step] if resume_step else []
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        tmp.replace(self.path)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (kept open for the run)
        if self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=resume_step + 1)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled or self._file is None:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()
        if self._writer is not None:
            step = record["step"]
            for key, value in record.items():
                if key not in ("step",) and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._writer.add_scalar(f"train/{key}" if key != "val_loss" else "val/loss", value, step)
            self._writer.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def progress_bar(total: int, initial: int, enabled: bool):
    """A tqdm bar over optimizer steps (tqdm supplies the rate and the ETA)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True)


def plot_runs(run_dirs: list[str | Path], out: str | Path, labels: list[str] | None = None) -> Path:
    """Train and validation loss against tokens seen, one colour per run, into a PNG.

    ``labels`` name the runs in the legend (default: each run directory's name)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mobillama.errors import MobiLlamaError

    out = Path(out)
    if labels is not None and len(labels) != len(run_dirs):
        raise MobiLlamaError(f"plot: {len(labels)} labels for {len(run_dirs)} runs")
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, run in enumerate(run_dirs):
        run = Path(run)
        label = labels[i] if labels is not None else run.name
        records = read_metrics(run)
        if not records:
            raise MobiLlamaError(f"{run}: no {METRICS_NAME} with records (is it a run directory?)")
        color = f"C{i}"
        train = [(r["tokens"], r["loss"]) for r in records if r.get("loss") is not None]
        val = [(r["tokens"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
        if train:
            ax.plot(*zip(*train), color=color, alpha=0.8, label=f"{label} train")
        if val:
            val_on = next((r["val_on"] for r in reversed(records) if r.get("val_on")), "validation split")
            val_label = f"{label} val ({val_on})"
            ax.plot(*zip(*val), color=color, linestyle="--", marker="o", markersize=3, label=val_label)
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", ncols=2 if len(run_dirs) > 4 else 1)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(out)
    return out
