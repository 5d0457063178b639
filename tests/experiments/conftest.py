"""Fixtures of the binaries' tests: tiny configs, tiny data files, one tiny pretraining."""

import gzip
import pathlib
import wave

import jax
import numpy as np
import pytest
from absl import logging

from experiments import train
from experiments.configs import digits_demo

# Orbax warns through absl about the files it can't find; the tests look at our own stderr lines.
logging.set_verbosity(logging.ERROR)


def write_mnist(folder: pathlib.Path, num: int = 60) -> None:
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


def write_fsdd(folder: pathlib.Path, takes: int = 2) -> None:
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


def tiny(config):
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


def digits_config():
  config = tiny(digits_demo.get_config())
  config.data.limit = 200
  config.data.shots = 2
  config.adapt.compare_backprop_memory = False
  return config


def adapt_config(pretrained):
  config = digits_config()
  config.mode = "adapt"
  config.adapt.pretrained = str(pretrained)
  return config


def snapshot(*folders: pathlib.Path) -> dict:
  """Every file under `folders` with its size, mtime and bytes' hash."""
  out = {}
  for folder in folders:
    for p in sorted(pathlib.Path(folder).rglob("*")):
      if p.is_file():
        out[str(p)] = (p.stat().st_mtime_ns, p.stat().st_size, hash(p.read_bytes()))
  return out


def _config_value(name):
  try:
    return getattr(jax.config, name)
  except AttributeError:
    return jax.config.read(name)


@pytest.fixture(scope="session")
def compilation_cache(tmp_path_factory):
  """A persistent compilation cache for these tests: the runs here compile the same steps again
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


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("data")
  write_mnist(root / "mnist")
  write_fsdd(root / "fsdd" / "recordings")
  return root


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory, compilation_cache):
  """A finished two-step pretraining workdir (checkpoints of steps 1 and 2)."""
  workdir = tmp_path_factory.mktemp("pretrained")
  train.train_and_evaluate(digits_config(), str(workdir))
  return workdir


@pytest.fixture(scope="session")
def adapted(tmp_path_factory, pretrained):
  """A finished two-step adaptation workdir (fixed-point sign-m-SPSA from `pretrained`)."""
  workdir = tmp_path_factory.mktemp("adapted")
  train.train_and_evaluate(adapt_config(pretrained), str(workdir))
  return workdir
