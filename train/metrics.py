"""Run-directory outputs on rank 0: one console line per logged step, metrics.jsonl, TensorBoard."""
from __future__ import annotations

import json
import math
import os
import sys
import time


def _fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class MetricsWriter:
    """Writes what rank 0 logs. Other ranks get an instance that does nothing."""

    def __init__(self, run_dir: str, total_steps: int, enabled: bool, tensorboard: bool,
                 progress_bar: bool, logger):
        self.enabled = enabled
        self.total_steps = total_steps
        self.logger = logger
        self.jsonl = None
        self.tb = None
        self.progress = enabled and progress_bar and sys.stdout.isatty()
        if not enabled:
            return
        self.jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "a", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(run_dir, "tb"))

    def log(self, step: int, metrics: dict, elapsed: float, steps_done_this_run: int) -> None:
        if not self.enabled:
            return
        record = {"step": step, **metrics, "time": time.time()}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    self.tb.add_scalar(key if "/" in key else f"train/{key}", value, step)
            self.tb.flush()
        eta = elapsed / max(1, steps_done_this_run) * (self.total_steps - step)
        self.clear_progress()
        self.logger.info(self.line(step, metrics, eta))

    def line(self, step: int, m: dict, eta: float) -> str:
        parts = [f"step {step:>{len(str(self.total_steps))}}/{self.total_steps}",
                 f"loss {m['loss']:.4f}", f"lr {m['lr']:.2e}", f"gnorm {m['grad_norm']:.3f}",
                 f"tok/s {m['tokens_per_sec']:,.0f}"]
        if m.get("tflops") is not None:
            parts.append(f"TFLOP/s {m['tflops']:.1f}")
        if m.get("mfu") is not None:
            parts.append(f"MFU {100 * m['mfu']:.1f}%")
        if m.get("fallback_ratio") is not None:
            parts.append(f"fallback {100 * m['fallback_ratio']:.2f}%")
        if m.get("peak_mem_gib") is not None:
            parts.append(f"mem {m['peak_mem_gib']:.2f}GiB")
        if m.get("skipped_steps"):
            parts.append(f"skipped {m['skipped_steps']}")
        parts.append(f"eta {_fmt_time(eta)}")
        return " | ".join(parts)

    def log_eval(self, step: int, val_loss: float) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, "val_loss": val_loss, "time": time.time()}) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            self.tb.add_scalar("val/loss", val_loss, step)
            self.tb.flush()
        self.clear_progress()
        self.logger.info(f"step {step}/{self.total_steps} | val_loss {val_loss:.4f} "
                         f"| val_ppl {math.exp(min(val_loss, 50)):.2f}")

    def show_progress(self, step: int) -> None:
        if self.progress:
            width = 30
            done = int(width * step / self.total_steps)
            sys.stdout.write(f"\r[{'#' * done}{'.' * (width - done)}] {step}/{self.total_steps}")
            sys.stdout.flush()

    def clear_progress(self) -> None:
        if self.progress:
            sys.stdout.write("\r\033[K")
            sys.stdout.flush()

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
