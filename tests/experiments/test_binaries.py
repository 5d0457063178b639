"""The binaries end to end on tiny data: every config, resumption, and one-line errors."""

import gzip
import os
import pathlib
import subprocess
import sys
import wave

import jax
import numpy as np
import pytest
from absl import logging

from experiments import train
from experiments.configs import digits_demo, fsdd_speaker, mnist_shift

REPO = pathlib.Path(__file__).resolve().parents[2]
logging.set_verbosity(logging.WARNING)


def _write_mnist(folder: pathlib.Path, num: int = 60) -> None:
  """A tiny MNIST in the IDX format: random 28x28 images, balanced labels."""
  folder.mkdir(parents=True)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (num, 28, 28), dtype=np.uint8)
  labels = (np.arange(num) % 10).astype(np.uint8)
  header = lambda magic, dims: (
    magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims)
  )
  with gzip.open(folder / "t10k-images-idx3-ubyte.gz", "wb") as file:
    file.write(header(2051, images.shape) + images.tobytes())
  with gzip.open(folder / "t10k-labels-idx1-ubyte.gz", "wb") as file:
    file.write(header(2049, labels.shape) + labels.tobytes())


def _write_fsdd(folder: pathlib.Path, takes: int = 2) -> None:
  """A tiny FSDD: 6 speakers x 10 digits x `takes` WAV files of 0.1 s of noise."""
  folder.mkdir(parents=True)
  rng = np.random.default_rng(0)
  for speaker in ("george", "jackson", "lucas", "nicolas", "theo", "yweweler"):
    for digit in range(10):
      for take in range(takes):
        samples = (rng.standard_normal(800) * 3000).astype("<i2")
        with wave.open(str(folder / f"{digit}_{speaker}_{take}.wav"), "wb") as file:
          file.setnchannels(1)
          file.setsampwidth(2)
          file.setframerate(8000)
          file.writeframes(samples.tobytes())


def _tiny(config):
  """Two steps of everything, on tiny models."""
  config.pretrain.steps = 2
  config.pretrain.batch_size = 8
  config.adapt.steps = 2
  config.adapt.batch_size = 8
  config.adapt.num_directions = 2
  config.log_every = 1
  config.checkpoint_every = 1
  config.eval_batch_size = 64
  config.model.kwargs.features = (4,)
  config.model.kwargs.hidden = 8
  return config


def _config_value(name):
  try:
    return getattr(jax.config, name)
  except AttributeError:
    return jax.config.read(name)


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
  """A persistent compilation cache for this module: the runs here compile the same steps again
  and again (each run builds fresh jitted functions), and XLA:CPU compiles take seconds."""
  names = (
    "jax_compilation_cache_dir",
    "jax_persistent_cache_min_compile_time_secs",
    "jax_persistent_cache_min_entry_size_bytes",
    "jax_disable_most_optimizations",
  )
  before = {name: _config_value(name) for name in names}
  jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  # Tiny models run in microseconds either way; XLA's optimizations only cost compile time here.
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  for name, value in before.items():
    jax.config.update(name, value)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("data")
  _write_mnist(root / "mnist")
  _write_fsdd(root / "fsdd" / "recordings")
  return root


def _digits_config():
  config = _tiny(digits_demo.get_config())
  config.data.limit = 200
  config.data.shots = 2
  return config


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("pretrained")
  train.train_and_evaluate(_digits_config(), str(workdir))
  return workdir


@pytest.mark.parametrize(
  "module", [digits_demo, mnist_shift, fsdd_speaker], ids=lambda m: m.__name__
)
def test_config_runs_two_steps(module, data_dir, tmp_path):
  config = _tiny(module.get_config())
  config.data.shots = 1
  config.adapt.num_directions = 1
  # The backprop memory reference is one more compile; the digits run checks it.
  config.adapt.compare_backprop_memory = config.data.name == "digits"
  if config.data.name == "mnist":
    config.data.folder = str(data_dir / "mnist")
    config.data.num_source = 40
  elif config.data.name == "fsdd":
    config.data.folder = str(data_dir / "fsdd" / "recordings")
    config.data.num_samples = 800
    config.data.num_mels = 16
  else:
    config.data.limit = 200
  summary = train.train_and_evaluate(config, str(tmp_path / "pre"))
  assert summary["steps"] == 2 and 0.0 <= summary["source_accuracy"] <= 1.0
  config.mode = "adapt"
  config.adapt.pretrained = str(tmp_path / "pre")
  summary = train.train_and_evaluate(config, str(tmp_path / "adapt"))
  assert summary["steps"] == 2
  assert summary["total_passes"]["forward"] == 2 * 2 * 1  # central SPSA: 2K per step
  assert summary["memory_bytes"]["total"] > 0
  if config.adapt.compare_backprop_memory:
    assert summary["backprop_memory_bytes"]["total"] > 0
  for name in ("summary.json", "summary.md", "metrics.jsonl", "config.json"):
    assert (tmp_path / "adapt" / name).is_file()
  assert list((tmp_path / "adapt" / "tensorboard").iterdir())


def _final_params(workdir):
  directory = pathlib.Path(workdir) / "checkpoints"
  raw, _ = train._restore_raw(directory, train._latest_step(directory))
  return raw["params"]


def test_interrupted_adaptation_resumes_bitwise(pretrained, tmp_path):
  # Fixed-point sign-m-SPSA with stochastic rounding: the perturbation key and the rounding key
  # (both in the optimizer state) have to come back from the checkpoint.
  config = _digits_config()
  config.mode = "adapt"
  config.adapt.pretrained = str(pretrained)
  assert config.adapt.weight_storage == "integer" and config.adapt.rounding == "stochastic"
  config.adapt.steps = 5
  config.checkpoint_every = 2
  config.adapt.compare_backprop_memory = False
  train.train_and_evaluate(config, str(tmp_path / "straight"))
  interrupted = config.copy_and_resolve_references()
  interrupted.stop_after = 3  # Killed after step 3; the last checkpoint is step 2.
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(interrupted, str(tmp_path / "resumed"))
  assert train._latest_step(tmp_path / "resumed" / "checkpoints") == 2
  summary = train.train_and_evaluate(config, str(tmp_path / "resumed"))
  assert summary["steps"] == 5
  straight, resumed = _final_params(tmp_path / "straight"), _final_params(tmp_path / "resumed")
  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed), strict=True):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  steps = [
    int(line.split('"step": ')[1].split(",")[0])
    for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
  ]
  assert steps == [1, 2, 3, 4, 5]


def _snapshot(folder: pathlib.Path) -> dict:
  return {
    str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_size)
    for p in sorted(folder.rglob("*"))
  }


def _run_main(args, workdir):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("FGJAX_DATA_DIR", None)
  return subprocess.run(
    [sys.executable, "-m", "experiments.main", f"--workdir={workdir}", *args],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )


DIGITS = "--config=experiments/configs/digits_demo.py"
TINY = ["--config.pretrain.steps=1", "--config.data.limit=200", "--config.data.shots=2"]


@pytest.mark.parametrize(
  "case, args",
  [
    ("bad flag", [DIGITS, "--config.no_such_field=1"]),
    ("bad flag value", [DIGITS, "--config.pretrain.steps=many"]),
    ("missing config", ["--config=experiments/configs/no_such_config.py"]),
    ("unknown model", [DIGITS, *TINY, "--config.model.name=resnet9000"]),
    (
      "unknown preset",
      [
        DIGITS,
        *TINY,
        "--config.mode=adapt",
        "--config.adapt.precision=w3a3",
        "--config.adapt.pretrained=PRETRAINED",
      ],
    ),
    (
      "unknown method",
      [
        DIGITS,
        *TINY,
        "--config.mode=adapt",
        "--config.adapt.method=adam",
        "--config.adapt.pretrained=PRETRAINED",
      ],
    ),
    (
      "missing data folder",
      ["--config=experiments/configs/mnist_shift.py", "--config.data.folder=/no/such/folder"],
    ),
    (
      "checkpoint of another model",
      [
        DIGITS,
        *TINY,
        "--config.mode=adapt",
        "--config.adapt.pretrained=PRETRAINED",
        "--config.model.kwargs.hidden=16",
      ],
    ),
  ],
)
def test_errors_are_one_line_and_write_nothing(case, args, pretrained, tmp_path):
  workdir = tmp_path / "workdir"
  workdir.mkdir()
  (workdir / "keep.txt").write_text("precious")
  before = _snapshot(workdir)
  args = [a.replace("PRETRAINED", str(pretrained)) for a in args]
  result = _run_main(args, workdir)
  assert result.returncode != 0, result.stdout
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert len(lines) == 1, f"{case}: {result.stderr}"
  assert lines[0].startswith("error:"), lines[0]
  assert _snapshot(workdir) == before
