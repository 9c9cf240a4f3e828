"""Run observability: metrics to JSONL and CSV, and a one-line progress display."""

from __future__ import annotations

import csv
import json
import os
import sys
import time
from typing import Any, TextIO


class MetricsWriter:
  """Appends `{step, split, ...metrics}` rows to `metrics.jsonl` and long-format
  `metrics.csv` (`step,split,name,value`), so rows with new metrics never break
  the CSV header. Appending makes a resumed run continue the same files."""

  def __init__(self, workdir: str | os.PathLike, *, enabled: bool = True):
    self.enabled = enabled
    self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
    self.csv_path = os.path.join(workdir, "metrics.csv")
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      if not os.path.exists(self.csv_path):
        with open(self.csv_path, "w", newline="") as f:
          csv.writer(f).writerow(["step", "split", "name", "value"])

  def write(self, step: int, split: str, metrics: dict[str, Any]) -> None:
    if not self.enabled:
      return
    values = {k: float(v) for k, v in metrics.items()}
    with open(self.jsonl_path, "a") as f:
      f.write(json.dumps({"step": int(step), "split": split, **values}) + "\n")
    with open(self.csv_path, "a", newline="") as f:
      writer = csv.writer(f)
      for name, value in values.items():
        writer.writerow([int(step), split, name, value])


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


class Progress:
  """`step 120/1000 [12%] 3.1 step/s 397 ex/s loss 0.41` on one line (a TTY) or
  one line per report (a log file)."""

  def __init__(
      self,
      total_steps: int,
      batch_size: int,
      *,
      start_step: int = 0,
      stream: TextIO | None = None,
      enabled: bool = True,
  ):
    self.total = total_steps
    self.batch_size = batch_size
    self.stream = stream or sys.stdout
    self.enabled = enabled
    self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
    self._last_step, self._last_time = start_step, time.perf_counter()

  def update(self, step: int, metrics: dict[str, float]) -> dict[str, float]:
    """Reports progress; returns the measured rates."""
    now = time.perf_counter()
    elapsed = max(now - self._last_time, 1e-9)
    rate = (step - self._last_step) / elapsed
    self._last_step, self._last_time = step, now
    rates = {
        "steps_per_second": rate,
        "examples_per_second": rate * self.batch_size,
    }
    if self.enabled:
      shown = " ".join(f"{k} {v:.4g}" for k, v in metrics.items())
      line = (
          f"step {step}/{self.total} [{100 * step / max(self.total, 1):3.0f}%] "
          f"{rate:.2f} step/s {rate * self.batch_size:.0f} ex/s {shown}"
      )
      self.stream.write(("\r" + line) if self.tty else line + "\n")
      self.stream.flush()
    return rates

  def message(self, text: str) -> None:
    if self.enabled:
      self.stream.write(("\n" if self.tty else "") + text + "\n")
      self.stream.flush()
