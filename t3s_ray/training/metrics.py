"""What a step reports: its metrics from the totals summed over ranks (``step_metrics``), this process's
memory peaks, and rank 0's record of the run (``MetricsLog``: ``metrics.jsonl``, TensorBoard, a
progress line)."""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path
from typing import Any

import torch

from ..runfolder import TrainFolder


def step_metrics(totals: dict[str, float]) -> dict[str, Any]:
    """A step's metrics from its totals summed over ranks."""
    n_other = totals["targets"] - totals["anchors"]
    return {
        "padding_frac": 1 - totals["tokens"] / max(1, totals["computed_tokens"]),
        "loss": totals["loss"],
        "kept_frac": totals["kept"] / max(1, totals["targets"]),
        "anchor_frac": totals["anchors"] / max(1, totals["targets"]),
        "mean_conf_anchor": totals["conf_anchor"] / totals["anchors"] if totals["anchors"] else None,
        "mean_conf_other": totals["conf_other"] / n_other if n_other else None,
        "tokens": int(totals["tokens"]),
    }


def peak_memory_gb(device: torch.device) -> dict[str, float]:
    """This process's peak host RSS and (on CUDA) peak allocated device memory, in GB."""
    out = {"peak_host_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}  # Linux: KiB
    if device.type == "cuda":
        out["peak_device_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    return out


class MetricsLog:
    """Rank 0's record of the run: ``metrics.jsonl``, TensorBoard, a progress line every 5 steps."""

    def __init__(self, out_dir: Path, max_steps: int, resumed_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.path, self.max_steps = TrainFolder(out_dir).metrics, max_steps
        if self.path.exists():  # after a resume, drop the lines of steps that are about to be redone
            keep = [ln for ln in self.path.read_text().splitlines() if ln and json.loads(ln).get("step", 0) <= resumed_step]
            self.path.write_text("".join(ln + "\n" for ln in keep))
        self.tb = SummaryWriter(str(TrainFolder(out_dir).tensorboard))

    def write(self, metrics: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                self.tb.add_scalar(key, value, metrics["step"])
        if metrics["step"] == 1 or metrics["step"] % 5 == 0 or metrics["step"] == self.max_steps:
            print(f"[train] step {metrics['step']}/{self.max_steps} loss {metrics['loss']:.4f} "
                  f"kept {metrics['kept_frac']:.2f} anchors {metrics['anchor_frac']:.2f} "
                  f"{metrics['tokens_per_s']:.0f} tok/s", file=sys.stderr, flush=True)

    def close(self) -> None:
        self.tb.close()
