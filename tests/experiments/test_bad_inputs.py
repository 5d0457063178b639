"""Bad inputs to the binaries: each is one line on stderr, a non-zero exit, and no file changed.

The table runs `cli.run_or_exit` in-process (the binary's own error path: it ends in `sys.exit`),
most rows failing in validation before anything is loaded or compiled; a few rows at the end run
`python -m experiments.main` for the real exit status. Issue 10 lists the inputs that used to
end in a traceback or finish silently; they are all here.
"""

import math
import os
import pathlib
import re
import shutil
import subprocess
import sys
import types

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from experiments import checkpoints as ckpt
from experiments import cli, train
from tests.experiments.conftest import adapt_config, digits_config, snapshot

REPO = pathlib.Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("compilation_cache")
PROGRESS = re.compile(r"^(pretrain|adapt): ")


def _set(name, value):
  def mutate(config, ctx):
    target = config
    *parents, last = name.split(".")
    for part in parents:
      target = target[part]
    target[last] = value

  return mutate


def _adapt(*mutations):
  def mutate(config, ctx):
    config.mode = "adapt"
    config.adapt.pretrained = str(ctx.pretrained)
    for m in mutations:
      m(config, ctx)

  return mutate


def _both(*mutations):
  def mutate(config, ctx):
    for m in mutations:
      m(config, ctx)

  return mutate


# ------------------------------------------------------------------ workdirs that can't be used


def _workdir_is_file(config, ctx):
  ctx.workdir = ctx.tmp / "a_file"
  ctx.workdir.write_text("precious")


def _workdir_under_file(config, ctx):
  (ctx.tmp / "a_file").write_text("precious")
  ctx.workdir = ctx.tmp / "a_file" / "run"


def _unwritable(config, ctx, *, existing: bool):
  if os.geteuid() == 0:  # Root ignores permission bits: use folders no one can write into.
    ctx.workdir = pathlib.Path("/proc/self") if existing else pathlib.Path("/sys/fgjax_run/x")
    ctx.watch = []
    return
  locked = ctx.tmp / "locked"
  locked.mkdir()
  locked.chmod(0o555)
  ctx.cleanup.append(lambda: locked.chmod(0o755))
  ctx.workdir = locked if existing else locked / "run"


# ------------------------------------------------------------------ broken data files


def _mnist(corrupt):
  def mutate(config, ctx):
    folder = ctx.tmp / "mnist"
    shutil.copytree(ctx.data_dir / "mnist", folder)
    corrupt(folder / "t10k-images-idx3-ubyte.gz")
    config.data.name = "mnist"
    config.data.folder = str(folder)
    config.data.num_source = 40
    config.data.limit = 0
    ctx.watch.append(folder)

  return mutate


def _truncate(path: pathlib.Path):
  path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _fsdd(corrupt):
  def mutate(config, ctx):
    folder = ctx.tmp / "fsdd"
    shutil.copytree(ctx.data_dir / "fsdd" / "recordings", folder)
    corrupt(folder / "3_theo_1.wav")
    config.data.name = "fsdd"
    config.data.shift = "speaker"
    config.data.folder = str(folder)
    config.data.num_samples = 800
    config.data.num_mels = 16
    config.data.limit = 0
    config.model.name = "crnn"
    ctx.watch.append(folder)

  return mutate


# ------------------------------------------------------------------ broken pretrained checkpoints


def _pretrained_copy(corrupt):
  """Adapt from a copy of the pretraining workdir whose latest step (2) is corrupted."""

  def mutate(config, ctx):
    copy = ctx.tmp / "pretrained"
    shutil.copytree(ctx.pretrained, copy)
    corrupt(copy / "checkpoints" / "2")
    config.mode = "adapt"
    config.adapt.pretrained = str(copy)
    ctx.watch.append(copy)

  return mutate


def _largest_array_file(step: pathlib.Path) -> pathlib.Path:
  return max((step / "state").rglob("d/*"), key=lambda p: p.stat().st_size)


def _flip_a_byte(step):
  path = _largest_array_file(step)
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0xFF
  path.write_bytes(bytes(data))


def _empty_folder(step):
  shutil.rmtree(step)
  step.mkdir()


def _nan_parameters(step):
  """The step rewritten with a NaN weight and a matching checksum (as a NaN run would save)."""
  store = ckpt.Checkpoints(step.parent)
  tree, record = store.restore(2)
  tree = jax.tree.map(np.array, tree)
  first = sorted(ckpt._flat(tree["params"]))[0]
  leaf = dict(ckpt._flat(tree["params"]))[first]
  leaf.reshape(-1)[0] = np.nan
  record["checksum"] = ckpt.checksum(tree)
  shutil.rmtree(step)
  manager = ocp.CheckpointManager(step.parent, options=ocp.CheckpointManagerOptions(create=True))
  manager.save(
    2, args=ocp.args.Composite(state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(record))
  )
  manager.wait_until_finished()
  manager.close()


def _pretrained_is(fixture):
  def mutate(config, ctx):
    config.mode = "adapt"
    config.adapt.pretrained = str(getattr(ctx, fixture))

  return mutate


def _resume_adapted(*mutations):
  """Rerun the finished adaptation workdir with a changed config."""

  def mutate(config, ctx):
    config.mode = "adapt"
    config.adapt.pretrained = str(ctx.pretrained)
    ctx.workdir = ctx.adapted
    for m in mutations:
      m(config, ctx)

  return mutate


def _empty_pretrained(config, ctx):
  (ctx.tmp / "empty").mkdir()
  config.mode = "adapt"
  config.adapt.pretrained = str(ctx.tmp / "empty")


LR = "optimizer_kwargs.learning_rate"
CASES = {
  # Values: ranges, names, finiteness.
  "unknown mode": _set("mode", "train"),
  "negative seed": _set("seed", -1),
  "pretrain.steps 0": _set("pretrain.steps", 0),
  "pretrain.steps negative": _set("pretrain.steps", -5),
  "pretrain.batch_size 0": _set("pretrain.batch_size", 0),
  "pretrain.batch_size negative": _set("pretrain.batch_size", -8),
  "eval_batch_size 0": _set("eval_batch_size", 0),
  "log_every 0": _set("log_every", 0),
  "checkpoint_every 0": _set("checkpoint_every", 0),
  "eval_every negative": _set("eval_every", -1),
  "unknown nonfinite policy": _set("nonfinite", "ignore"),
  "pretrain lr NaN": _set(f"pretrain.{LR}", math.nan),
  "pretrain lr inf": _set(f"pretrain.{LR}", math.inf),
  "pretrain lr negative": _set(f"pretrain.{LR}", -0.1),
  "unknown optimizer": _set("pretrain.optimizer", "adamm"),
  "unknown schedule": _set("pretrain.schedule", "exponential"),
  "unknown task": _set("data.name", "cifar"),
  "unknown shift": _set("data.shift", "blur"),
  "shots 0": _set("data.shots", 0),
  "limit negative": _set("data.limit", -1),
  "noise_std negative": _set("data.noise_std", -0.3),
  "rotate_degrees NaN": _set("data.rotate_degrees", math.nan),
  "missing data folder": _set("data.folder", "/no/such/folder"),
  "unknown model": _set("model.name", "resnet9000"),
  "weight_storage int": _adapt(_set("adapt.weight_storage", "int")),
  "unknown method": _adapt(_set("adapt.method", "adam")),
  "unknown preset": _adapt(_set("adapt.precision", "w3a3")),
  "unknown rounding": _adapt(_set("adapt.rounding", "up")),
  "unknown trainable subset": _adapt(_set("adapt.trainable", "some")),
  "unknown distribution": _adapt(_set("adapt.distribution", "uniform")),
  "num_directions 0": _adapt(_set("adapt.num_directions", 0)),
  "last_k 0": _adapt(_set("adapt.last_k", 0)),
  "m_schedule unreadable": _adapt(_set("adapt.m_schedule", "1-3")),
  "m_schedule not from step 0": _adapt(_set("adapt.m_schedule", "5:1,10:3")),
  "m_schedule with m 0": _adapt(_set("adapt.m_schedule", "plateau:1,0")),
  "m_patience 0": _adapt(_set("adapt.m_schedule", "plateau:1,3"), _set("adapt.m_patience", 0)),
  "m_schedule with backprop": _adapt(
    _set("adapt.m_schedule", "0:1"),
    _set("adapt.method", "backprop"),
    _set("adapt.weight_storage", "float"),
  ),
  "epsilon NaN": _adapt(_set("adapt.epsilon", math.nan)),
  "epsilon 0": _adapt(_set("adapt.epsilon", 0.0)),
  "adapt lr NaN": _adapt(_set(f"adapt.{LR}", math.nan)),
  "adapt lr inf": _adapt(_set(f"adapt.{LR}", math.inf)),
  "adapt lr negative": _adapt(_set(f"adapt.{LR}", -1.0)),
  "adapt.steps 0": _adapt(_set("adapt.steps", 0)),
  "backprop on integer weights": _adapt(_set("adapt.method", "backprop")),
  "integer weights at float32": _adapt(_set("adapt.precision", "float32")),
  "no pretrained workdir": _adapt(_set("adapt.pretrained", "")),
  "missing pretrained workdir": _adapt(_set("adapt.pretrained", "/no/such/run")),
  "pretrained workdir without checkpoints": _empty_pretrained,
  # The workdir.
  "workdir is a file": _workdir_is_file,
  "workdir under a file": _workdir_under_file,
  "unwritable workdir": lambda c, ctx: _unwritable(c, ctx, existing=True),
  "unwritable parent": lambda c, ctx: _unwritable(c, ctx, existing=False),
  # Data files.
  "MNIST gzip truncated": _mnist(_truncate),
  "MNIST not gzip": _mnist(lambda p: p.write_bytes(b"not a gzip file" * 10)),
  "FSDD text named .wav": _fsdd(lambda p: p.write_text("hello, I am text\n")),
  "FSDD zero-byte .wav": _fsdd(lambda p: p.write_bytes(b"")),
  "FSDD unknown target speaker": _both(
    _fsdd(lambda p: None), _set("data.target_speaker", "nobody")
  ),
  "too little data for a split": _set("data.limit", 5),
  # The pretrained checkpoint.
  "pretrained truncated file": _pretrained_copy(lambda s: _truncate(_largest_array_file(s))),
  "pretrained missing _METADATA": _pretrained_copy(lambda s: (s / "state" / "_METADATA").unlink()),
  "pretrained empty step folder": _pretrained_copy(_empty_folder),
  "pretrained byte flip": _pretrained_copy(_flip_a_byte),
  "pretrained NaN parameters": _pretrained_copy(_nan_parameters),
  "pretrained of another model": _adapt(_set("model.kwargs.hidden", 16)),
  "pretrained is an adaptation": _pretrained_is("adapted"),
  # Resuming the finished adaptation with another config.
  "resume with another method": _resume_adapted(_set("adapt.method", "spsa")),
  "resume with another epsilon": _resume_adapted(_set("adapt.epsilon", 64.0)),
  "resume with fewer steps": _resume_adapted(_set("adapt.steps", 1)),
  "pretrain into an adaptation workdir": _both(
    _resume_adapted(), _set("mode", "pretrain"), _set("pretrain.steps", 2)
  ),
}


def _error_lines(stderr: str) -> list[str]:
  return [line for line in stderr.splitlines() if line.strip() and not PROGRESS.match(line)]


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_changes_nothing(case, tmp_path, data_dir, capsys, request):
  ctx = types.SimpleNamespace(tmp=tmp_path, data_dir=data_dir, cleanup=[], watch=[])
  ctx.pretrained = request.getfixturevalue("pretrained")
  if "resume" in case or "adaptation" in case:
    ctx.adapted = request.getfixturevalue("adapted")
  ctx.workdir = tmp_path / "workdir"
  ctx.workdir.mkdir()
  (ctx.workdir / "keep.txt").write_text("precious")
  config = digits_config()
  ctx.watch.append(ctx.pretrained)
  try:
    CASES[case](config, ctx)
    if hasattr(ctx, "adapted"):
      ctx.watch.append(ctx.adapted)
    if ctx.workdir.is_dir() and ctx.workdir != pathlib.Path("/proc/self"):
      ctx.watch.append(ctx.workdir)
    ctx.watch.append(tmp_path)
    before = snapshot(*ctx.watch)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
      cli.run_or_exit(config, str(ctx.workdir))
    stderr = capsys.readouterr().err
    assert exit_info.value.code not in (0, None), stderr
    lines = _error_lines(stderr)
    assert len(lines) == 1, f"{case}: {stderr}"
    assert lines[0].startswith("error: "), lines[0]
    assert snapshot(*ctx.watch) == before, case
  finally:
    for undo in ctx.cleanup:
      undo()


def test_resume_with_another_method_lists_the_differences(adapted, pretrained, capsys):
  config = adapt_config(pretrained)
  config.adapt.method = "spsa"
  saved_epsilon = config.adapt.epsilon
  config.adapt.epsilon = 2 * saved_epsilon
  with pytest.raises(SystemExit):
    cli.run_or_exit(config, str(adapted))
  message = _error_lines(capsys.readouterr().err)[0]
  assert "adapt.method: 'sign_spsa' -> 'spsa'" in message
  assert f"adapt.epsilon: {saved_epsilon!r} -> {2 * saved_epsilon!r}" in message
  assert "force_resume" in message


def _run_main(args, workdir):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("FGJAX_DATA_DIR", None)
  return subprocess.run(
    [sys.executable, "-m", "experiments.main", f"--workdir={workdir}", *args],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )


DIGITS = "--config=experiments/configs/digits_demo.py"


@pytest.mark.parametrize(
  "case, args",
  [
    ("bad flag", [DIGITS, "--config.no_such_field=1"]),
    ("bad flag value", [DIGITS, "--config.pretrain.steps=many"]),
    ("missing config", ["--config=experiments/configs/no_such_config.py"]),
    ("learning rate NaN", [DIGITS, "--config.pretrain.optimizer_kwargs.learning_rate=nan"]),
    ("batch size 0", [DIGITS, "--config.pretrain.batch_size=0"]),
  ],
)
def test_binary_exits_2_with_one_line(case, args, tmp_path):
  workdir = tmp_path / "workdir"
  workdir.mkdir()
  (workdir / "keep.txt").write_text("precious")
  before = snapshot(workdir)
  result = _run_main(args, workdir)
  assert result.returncode == 2, result.stderr
  lines = _error_lines(result.stderr)
  assert len(lines) == 1, f"{case}: {result.stderr}"
  assert lines[0].startswith("error:"), lines[0]
  assert snapshot(workdir) == before


def test_an_unexpected_error_is_one_line_with_the_traceback_in_a_file(monkeypatch, capsys):
  def broken(config, workdir):
    raise RuntimeError("something nobody expected")

  monkeypatch.setattr(train, "train_and_evaluate", broken)
  with pytest.raises(SystemExit) as exit_info:
    cli.run_or_exit(digits_config(), "/tmp/unused")
  assert exit_info.value.code == cli.EXIT_OS
  lines = _error_lines(capsys.readouterr().err)
  assert len(lines) == 1 and "unexpected RuntimeError: something nobody expected" in lines[0]
  saved = pathlib.Path(lines[0].split("traceback in ")[1].rstrip(")"))
  assert "Traceback" in saved.read_text()
  saved.unlink()
