"""Run observability: metrics to JSONL and CSV, and a one-line progress display."""

from __future__ import annotations

import csv
import io
import json
import math
import numbers
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO

CSV_HEADER = ("step", "split", "name", "value")


def _number(value: Any) -> int | float:
  """An int stays an int (counts such as `examples`); anything else is a float."""
  if isinstance(value, numbers.Integral) and not isinstance(value, bool):
    return int(value)
  return float(value)


def format_metrics(metrics: Mapping[str, Any], digits: int = 4) -> str:
  """`accuracy 0.9125 loss 0.2811 examples 360`: floats with `digits` decimals,
  ints as ints."""
  return " ".join(
      f"{k} {v}" if isinstance(_number(v), int) else f"{k} {v:.{digits}f}"
      for k, v in metrics.items()
  )


def _keep_lines(path: str, keep: Callable[[str], bool]) -> None:
  """Rewrites `path` (atomically) with only its complete lines that `keep` accepts.

  A line without its newline was torn by a kill mid-write and is always dropped.
  """
  if not os.path.exists(path):
    return
  with open(path, newline="") as f:
    lines = f.readlines()
  kept = [line for line in lines if line.endswith("\n") and keep(line)]
  if kept == lines:
    return
  temporary = f"{path}.tmp"
  with open(temporary, "w", newline="") as f:
    f.writelines(kept)
    f.flush()
    os.fsync(f.fileno())
  os.replace(temporary, path)


def _jsonl_row_up_to(step: int) -> Callable[[str], bool]:
  def keep(line: str) -> bool:
    try:
      row = json.loads(line)
    except ValueError:
      return False
    return (
        isinstance(row, dict)
        and isinstance(row.get("step"), int)
        and row["step"] <= step
    )

  return keep


def _csv_row_up_to(step: int) -> Callable[[str], bool]:
  def keep(line: str) -> bool:
    fields = next(csv.reader(io.StringIO(line)), [])
    if tuple(fields) == CSV_HEADER:
      return True
    if len(fields) != len(CSV_HEADER):
      return False
    try:
      return int(fields[0]) <= step
    except ValueError:
      return False

  return keep


class MetricsWriter:
  """Appends `{step, split, ...metrics}` rows to `metrics.jsonl` and long-format
  `metrics.csv` (`step,split,name,value`), so rows with new metrics never break
  the CSV header. Appending makes a resumed run continue the same files.

  Args:
    workdir: where the two files go.
    enabled: False writes nothing (processes other than the first).
    keep_up_to_step: a resumed run's restored step (0 for a fresh start):
      rows of later steps, written after that checkpoint by the run that was
      killed, are removed first, as is a line torn by the kill; each
      (step, split) is then written once. None keeps the files as they are.
  """

  def __init__(
      self,
      workdir: str | os.PathLike,
      *,
      enabled: bool = True,
      keep_up_to_step: int | None = None,
  ):
    self.enabled = enabled
    # The rows kept from an earlier session, by (step, split).
    self.rows: dict[tuple[int, str], dict[str, Any]] = {}
    self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
    self.csv_path = os.path.join(workdir, "metrics.csv")
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      if keep_up_to_step is not None:
        _keep_lines(self.jsonl_path, _jsonl_row_up_to(keep_up_to_step))
        _keep_lines(self.csv_path, _csv_row_up_to(keep_up_to_step))
        if os.path.exists(self.jsonl_path):
          self.rows = {
              (row["step"], row["split"]): row
              for row in read_jsonl(self.jsonl_path)
          }
      if not os.path.exists(self.csv_path) or not os.path.getsize(
          self.csv_path
      ):
        with open(self.csv_path, "w", newline="") as f:
          csv.writer(f).writerow(CSV_HEADER)

  def write(self, step: int, split: str, metrics: dict[str, Any]) -> None:
    if not self.enabled:
      return
    values = {k: _number(v) for k, v in metrics.items()}
    with open(self.jsonl_path, "a") as f:
      f.write(json.dumps({"step": int(step), "split": split, **values}) + "\n")
    with open(self.csv_path, "a", newline="") as f:
      writer = csv.writer(f)
      for name, value in values.items():
        writer.writerow([int(step), split, name, value])


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def format_duration(seconds: float | None) -> str:
  """`0:04:07`, `1 day, 2:03:04`; `?` when unknown."""
  if seconds is None or not math.isfinite(seconds):
    return "?"
  seconds = max(int(round(seconds)), 0)
  days, rest = divmod(seconds, 86400)
  hours, rest = divmod(rest, 3600)
  text = f"{hours}:{rest // 60:02d}:{rest % 60:02d}"
  return f"{days} day{'s' if days > 1 else ''}, {text}" if days else text


class Progress:
  """`step 120/1000 [ 12%] 3.10 step/s 397 ex/s elapsed 0:00:41 eta 0:04:43 |
  loss 0.4100` on one line (a TTY) or one line per report (a log file).

  Rates count training steps only: the first step of a session (which compiles
  the step; reported once through :meth:`compiled`) and the seconds passed to
  :meth:`exclude` (evaluation, checkpoints) are left out. The ETA extrapolates
  the wall time per step since compilation, evaluations and checkpoints
  included. Elapsed is the wall time of this session.
  """

  def __init__(
      self,
      total_steps: int,
      batch_size: int,
      *,
      start_step: int = 0,
      stream: TextIO | None = None,
      enabled: bool = True,
      clock: Callable[[], float] = time.perf_counter,
  ):
    self.total = total_steps
    self.batch_size = batch_size
    self.stream = stream or sys.stdout
    self.enabled = enabled
    self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
    self._clock = clock
    self._start = clock()
    self._last_step, self._last_time = start_step, self._start
    self._excluded = 0.0
    self._eta_step, self._eta_time = start_step, self._start

  def compiled(self, what: str, seconds: float, step: int) -> None:
    """Reports a compilation once; rates and ETA restart after `step`."""
    self.message(f"compiled {what} in {seconds:.1f} s")
    now = self._clock()
    self._last_step, self._last_time, self._excluded = step, now, 0.0
    self._eta_step, self._eta_time = step, now

  def exclude(self, seconds: float) -> None:
    """Leaves `seconds` (an evaluation, a checkpoint) out of the next rate."""
    self._excluded += seconds

  def update(self, step: int, metrics: dict[str, float]) -> dict[str, float]:
    """Reports progress; returns the measured rates (none when no step was
    timed since the last report, e.g. right after compilation)."""
    now = self._clock()
    steps = step - self._last_step
    seconds = now - self._last_time - self._excluded
    rates = {}
    if steps > 0 and seconds > 0:
      rate = steps / seconds
      rates = {
          "steps_per_second": rate,
          "examples_per_second": rate * self.batch_size,
      }
    self._last_step, self._last_time, self._excluded = step, now, 0.0
    done = step - self._eta_step
    eta = (
        (now - self._eta_time) / done * (self.total - step)
        if done > 0
        else None
    )
    if self.enabled:
      speed = (
          f"{rates['steps_per_second']:.2f} step/s "
          f"{rates['examples_per_second']:.0f} ex/s"
          if rates
          else "-- step/s"
      )
      line = (
          f"step {step}/{self.total} [{100 * step / max(self.total, 1):3.0f}%] "
          f"{speed} elapsed {format_duration(now - self._start)} "
          f"eta {format_duration(eta)} | {format_metrics(metrics)}"
      )
      self.stream.write(("\r" + line) if self.tty else line + "\n")
      self.stream.flush()
    return rates

  def message(self, text: str) -> None:
    if self.enabled:
      self.stream.write(("\n" if self.tty else "") + text + "\n")
      self.stream.flush()
