"""What a run tells people: the progress line, metrics.jsonl + TensorBoard, the curves' PNG and
the Markdown summary table."""

from __future__ import annotations

import json
import pathlib
import sys
import time

EVAL_PREFIX = "eval/"


class Progress:
  """One status line on stderr from the first second: the phase (loading data, compiling), then
  step, steps/s, ETA and the last loss. On a terminal it redraws in place (padded, so a shorter
  line leaves no stale characters); elsewhere it prints a line per update."""

  def __init__(self, label: str, stream=None):
    self.label = label
    self.stream = stream or sys.stderr
    self.tty = getattr(self.stream, "isatty", lambda: False)()
    self.start_time = time.time()
    self._width = 0
    self._steps = None

  def _draw(self, text: str) -> None:
    line = f"{self.label}: {text}"
    if self.tty:
      self.stream.write("\r" + line.ljust(self._width))
      self._width = len(line)
    else:
      self.stream.write(line + "\n")
    self.stream.flush()

  def phase(self, text: str) -> None:
    """A phase before the steps: `loading data`, `compiling the step`..."""
    self._draw(f"{text} ({time.time() - self.start_time:.0f} s)")

  def start_steps(self, total: int, start: int) -> None:
    self._steps = (total, start, time.time())

  def update(self, step: int, loss: float, extra: str = "") -> None:
    total, start, begin = self._steps
    done = step - start
    elapsed = max(time.time() - begin, 1e-9)
    rate = done / elapsed
    eta = f"{(total - step) / rate:.0f}s" if rate > 0 else "?"
    filled = int(24 * step / max(total, 1))
    bar = "#" * filled + "." * (24 - filled)
    self._draw(
      f"[{bar}] {step}/{total} {rate:.1f} steps/s ETA {eta} loss {loss:.4f}{extra}".rstrip()
    )

  def close(self) -> None:
    if self.tty and self._width:
      self.stream.write("\n")
      self.stream.flush()
    self._width = 0


def _json_value(value):
  value = float(value)
  return value if value == value and abs(value) != float("inf") else str(value)


class MetricWriter:
  """JSON lines in `workdir/metrics.jsonl` and TensorBoard events in `workdir/tensorboard`.

  After a resume from step `resume_step`, the records of later steps (logged by the interrupted
  run, recomputed now) are dropped, so the file reads like one uninterrupted run.
  """

  def __init__(self, workdir: pathlib.Path, resume_step: int | None):
    self.path = workdir / "metrics.jsonl"
    if self.path.exists():
      keep = []
      for line in self.path.read_text().splitlines():
        try:
          record = json.loads(line)
        except json.JSONDecodeError:
          continue  # A line cut by a kill.
        if resume_step is not None and record.get("step", 0) <= resume_step:
          keep.append(line)
      self.path.write_text("".join(line + "\n" for line in keep))
    from tensorboardX import SummaryWriter

    self.tensorboard = SummaryWriter(str(workdir / "tensorboard"), purge_step=resume_step)

  def write(self, step: int, scalars: dict) -> None:
    record = {"step": int(step), **{k: _json_value(v) for k, v in scalars.items()}}
    with self.path.open("a") as file:
      file.write(json.dumps(record) + "\n")
    for name, value in scalars.items():
      self.tensorboard.add_scalar(name, float(value), step)

  def close(self) -> None:
    self.tensorboard.flush()
    self.tensorboard.close()


def read_metrics(path: pathlib.Path) -> list[dict]:
  if not path.exists():
    return []
  records = []
  for line in path.read_text().splitlines():
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      continue
  return records


def plot_curves(metrics_path: pathlib.Path, png_path: pathlib.Path, title: str) -> None:
  """Training loss and eval accuracies (source and target test sets) against the step."""
  import matplotlib

  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  records = read_metrics(metrics_path)
  fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(9, 3.4))
  train = [(r["step"], r["loss"]) for r in records if isinstance(r.get("loss"), float)]
  if train:
    loss_ax.plot(*zip(*train, strict=True), color="tab:gray")
    if all(loss > 0 for _, loss in train):
      loss_ax.set_yscale("log")  # A diverging run spans many decades.
  loss_ax.set(xlabel="step", ylabel="training loss (batch)", title="loss")
  for key, label in (("source_accuracy", "source test"), ("target_accuracy", "target test")):
    points = [(r["step"], 100 * r[EVAL_PREFIX + key]) for r in records if EVAL_PREFIX + key in r]
    if points:
      acc_ax.plot(*zip(*points, strict=True), marker="o", markersize=3, label=label)
  acc_ax.set(xlabel="step", ylabel="accuracy %", title="eval accuracy")
  acc_ax.legend(loc="lower right")
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(png_path, dpi=80)
  plt.close(fig)


def _kib(nbytes) -> str:
  return "-" if nbytes is None or nbytes < 0 else f"{nbytes / 1024:.0f}"


def _pct(value) -> str:
  return "-" if value is None else f"{100 * value:.1f}"


def summary_table(summaries: list[dict]) -> str:
  """A Markdown table, one row per run (pretraining or adaptation)."""
  header = (
    "| run | method | precision | trainable | zero-shot acc % | adapted acc % | steps "
    "| passes (fwd/bwd/jvp) | step temp KiB | step total KiB | backprop temp / total KiB |"
  )
  lines = [header, "|" + "---|" * 11]
  for s in summaries:
    if s["mode"] == "pretrain":
      row = [
        "pretrain",
        "backprop",
        "float32",
        "full",
        _pct(s.get("target_zero_shot_accuracy")),
        f"source {_pct(s.get('source_accuracy'))}",
        str(s["steps"]),
        f"{s['steps']}/{s['steps']}/0",
        _kib(s["memory_bytes"]["temp"]),
        _kib(s["memory_bytes"]["total"]),
        "-",
      ]
    else:
      total = s["total_passes"]
      ref = s.get("backprop_memory_bytes") or {}
      precision = s["precision"] + (" int" if s["weight_storage"] == "integer" else "")
      if s.get("zero_update_rate") is not None:
        precision += f", {s['rounding']}, {_pct(s['zero_update_rate'])} % zero updates"
      row = [
        s.get("name", "adapt"),
        s["method"] + _directions(s),
        precision,
        f"{s['trainable']} ({s['trainable_params']}/{s['total_params']})",
        f"{_pct(s['zero_shot_accuracy'])} (float {_pct(s['zero_shot_accuracy_float32'])})",
        _pct(s["adapted_accuracy"]),
        str(s["steps"]),
        f"{total['forward']}/{total['backward']}/{total['jvp']}",
        _kib(s["memory_bytes"]["temp"]),
        _kib(s["memory_bytes"]["total"]),
        f"{_kib(ref.get('temp'))} / {_kib(ref.get('total'))}" if ref else "-",
      ]
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines)


def _directions(summary: dict) -> str:
  """ " K=4", or the m schedule (" m 0:1,200:3"); nothing for backprop."""
  if summary["method"] == "backprop":
    return ""
  if summary.get("m_schedule"):
    return f" m {summary['m_schedule']}"
  return f" K={summary['num_directions']}"
