"""What a run reports: a progress bar with ETA, `metrics.jsonl`, TensorBoard scalars and a loss-curve PNG.

Only the first rank writes. Every logged step is one JSON object per line in RUN_DIR/metrics.jsonl
(step, loss, lr, grad_norm, tokens_per_s, ... and eval_loss when evaluated); the PNG is drawn from that file
at the end, so an interrupted and resumed run still gets one continuous curve.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class MetricsLog:
    def __init__(
        self,
        run_dir: Path,
        total_steps: int,
        start_step: int,
        enabled: bool,
        tensorboard: bool,
        desc: str = "sft",
        show: str = "loss",
    ) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.enabled, self.show = enabled, show
        self._bar = None
        self._tb = None
        if not enabled:
            return
        from tqdm import tqdm

        if start_step == 0 and self.path.exists():
            self.path.unlink()  # a fresh run: no stale curve from a previous one in the same directory
        self._truncate_after(start_step)
        self._bar = tqdm(total=total_steps, initial=start_step, desc=desc, unit="step", dynamic_ncols=True)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tensorboard"))

    def _truncate_after(self, step: int) -> None:
        """Resuming from `step`: drop records of steps after it (they were never checkpointed)."""
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float):
                    self._tb.add_scalar(key, value, record["step"])
        if self._bar is not None and self.show in record:
            self._bar.set_postfix({self.show: f"{record[self.show]:.4f}", "lr": f"{record['lr']:.2e}"})

    def advance(self) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss(metrics_path: Path, out_png: Path) -> Path:
    """Training (and eval, if any) loss against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if r.get("eval_loss") is not None]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss")
    if evals:
        ax.plot(*zip(*evals, strict=True), marker="o", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (per token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png


def plot_metrics(metrics_path: Path, out_png: Path, keys: tuple[str, ...]) -> Path:
    """One panel per metric against step (RL: reward, response length, KL, entropy)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.5), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), int | float)]
        if points:
            ax.plot(*zip(*points, strict=True))
        ax.set_xlabel("step")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png
