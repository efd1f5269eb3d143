"""What a run reports: the progress bar, TensorBoard scalars, the loss-curve PNG, the last line."""
from __future__ import annotations

import logging
import os

logger = logging.getLogger("train_network")


class RunLog:
    """Progress bar and tracker of one run; only the main process writes."""

    def __init__(self, args, accelerator, log_with: str | None, logging_dir: str | None, max_steps: int,
                 initial_step: int, descriptions=None):
        from tqdm.auto import tqdm

        self.args = args
        self.accelerator = accelerator
        self.tracking = bool(accelerator.is_main_process and log_with and logging_dir)
        self.descriptions = descriptions
        if self.tracking:
            accelerator.init_trackers("network_train",
                                      config={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))})
        self.progress = tqdm(total=max_steps, initial=initial_step, desc="steps", dynamic_ncols=True,
                             disable=args.no_progress or not accelerator.is_main_process)

    def update(self, global_step: int, losses: list, lrs: list, optimizer) -> None:
        """After an update: the bar, and the loss, per-group lrs and (every ``--optimizer_log_every``
        steps) the optimizer's diagnostics to the tracker."""
        loss = losses[-1]
        self.progress.update(1)
        self.progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lrs[0]:.2e}", refresh=False)
        if not self.tracking:
            return
        logs = {"loss/current": loss, "loss/average": sum(losses[-50:]) / len(losses[-50:])}
        for i, lr in enumerate(lrs):
            d = self.descriptions
            logs[f"lr/{d[i] if d and i < len(d) else f'group{i}'}"] = lr
        every = self.args.optimizer_log_every
        if every and global_step % every == 0 and hasattr(optimizer, "diagnostics_scalars"):
            logs.update(optimizer.diagnostics_scalars())
        self.accelerator.log(logs, step=global_step)

    def close(self) -> None:
        self.progress.close()


def plot_losses(losses, path: str, title: str | None = None) -> str | None:
    """The loss curve (raw and a running mean) as a PNG titled with the run, written atomically;
    None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # pragma: no cover - matplotlib is a dependency, but plots are optional
        return None
    steps = range(1, len(losses) + 1)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, losses, lw=0.8, alpha=0.5, label="loss")
    if len(losses) >= 10:
        k = max(2, len(losses) // 20)
        smooth = [sum(losses[max(0, i - k + 1): i + 1]) / len(losses[max(0, i - k + 1): i + 1]) for i in range(len(losses))]
        ax.plot(steps, smooth, lw=1.5, label=f"mean of {k}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if title:
        ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def summary_line(global_step: int, elapsed: float, losses: list, optimizer_name: str, file: str, plot) -> str:
    tail = losses[-10:] if losses else [float("nan")]
    return (f"done: {global_step} steps in {elapsed:.1f}s | loss {losses[0] if losses else float('nan'):.4f} -> "
            f"{sum(tail) / len(tail):.4f} (mean of last {len(tail)}) | {optimizer_name} | saved {file}"
            + (f" | curve {plot}" if plot else ""))
