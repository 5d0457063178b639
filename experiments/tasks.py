"""Last-mile tasks: a source domain to pretrain on and a shifted target domain to adapt to.

`build_task(config.data, seed)` returns four `Dataset`s: `source_train` (pretraining),
`source_test`, `target_train` (the few adaptation examples) and `target_test` (the rest of the
target domain). Splits depend only on the seed.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np

from fgjax import data as fdata
from fgjax.data import Dataset

TASKS = ("digits", "mnist", "fsdd", "synthetic")
SHIFTS = ("none", "rotate", "noise", "rotate_noise", "speaker")


class Task(NamedTuple):
  source_train: Dataset
  source_test: Dataset
  target_train: Dataset
  target_test: Dataset


def shift_images(data: Dataset, shift: str, *, degrees: float, noise_std: float, seed: int):
  """The target domain of image data: rotated, noisy, or both."""
  x = data.x
  if shift in ("rotate", "rotate_noise"):
    x = np.clip(fdata.rotate(x, degrees), 0.0, 1.0)  # Bilinear, zero fill.
  if shift in ("noise", "rotate_noise"):
    x = fdata.add_noise(x, noise_std, seed)
  return dataclasses.replace(data, x=x.astype(np.float32))


def few_shot(data: Dataset, shots: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Indices of `shots` examples per class (chosen by seed) and of all the others.

  Unlike `fgjax.data.few_shot`, which raises when a class has fewer than `shots` examples, a class
  short of examples (or absent) here gives what it has: the target domain is a random part of the
  data, so small or imbalanced data (`data.limit`, a few FSDD takes) can leave a class short.
  """
  order = np.random.default_rng([seed, 7]).permutation(len(data))
  chosen = []
  for label in range(data.num_classes):
    chosen.extend(order[data.y[order] == label][:shots].tolist())
  chosen = np.sort(np.asarray(chosen, np.int64))
  rest = np.setdiff1d(np.arange(len(data)), chosen)
  return chosen, rest


def _image_task(data: Dataset, config, seed: int) -> Task:
  """Source: upright images; target: a disjoint part of the data, shifted."""
  num_source = int(config.num_source) if config.num_source else int(round(0.6 * len(data)))
  if not 0 < num_source < len(data):
    raise ValueError(f"data.num_source={num_source} must be in (0, {len(data)}).")
  num_test = max(1, num_source // 5)
  source_train, source_test, target = fdata.split(
    data, (num_source - num_test, num_test, len(data) - num_source), seed
  )
  target = shift_images(
    target, config.shift, degrees=config.rotate_degrees, noise_std=config.noise_std, seed=seed
  )
  support, rest = few_shot(target, int(config.shots), seed)
  return Task(source_train, source_test, target.subset(support), target.subset(rest))


def _fsdd_task(config, seed: int) -> Task:
  """Pretrain on five speakers; adapt with `shots` recordings per digit of the sixth, test on the
  rest of the sixth's. Inputs are log-mel spectrograms normalized by the source statistics."""
  takes = range(int(config.takes)) if config.takes else None
  waves = fdata.fsdd(config.folder or None, takes=takes, num_samples=int(config.num_samples))
  if config.target_speaker not in set(waves.speakers.tolist()):
    raise ValueError(f"data.target_speaker={config.target_speaker!r} is not in the recordings.")
  features = fdata.log_mel_spectrogram(
    waves.x, num_samples=int(config.num_samples), num_mels=int(config.num_mels)
  )[..., None]
  data = dataclasses.replace(waves, x=features)
  is_target = data.speakers == config.target_speaker
  source, target = data.subset(np.flatnonzero(~is_target)), data.subset(np.flatnonzero(is_target))
  num_test = max(1, len(source) // 10)
  source_train, source_test = fdata.split(source, (len(source) - num_test, num_test), seed + 1)
  mean = source_train.x.mean()
  std = source_train.x.std() + 1e-6
  normalize = lambda d: dataclasses.replace(d, x=((d.x - mean) / std).astype(np.float32))
  source_train, source_test, target = map(normalize, (source_train, source_test, target))
  support, rest = few_shot(target, int(config.shots), seed)
  return Task(source_train, source_test, target.subset(support), target.subset(rest))


def build_task(config, seed: int) -> Task:
  """Loads and splits the data named by `config.name` (see the configs' `data` fields).

  Raises:
    ValueError: unknown task or shift, bad sizes; FileNotFoundError: missing data folder.
  """
  if config.name not in TASKS:
    raise ValueError(f"data.name: unknown task {config.name!r}; valid: {', '.join(TASKS)}.")
  if config.shift not in SHIFTS:
    raise ValueError(f"data.shift: unknown {config.shift!r}; valid: {', '.join(SHIFTS)}.")
  if (config.name == "fsdd") != (config.shift == "speaker"):
    raise ValueError("data.shift='speaker' goes with data.name='fsdd' (and only with it).")
  if config.name == "fsdd":
    return _fsdd_task(config, seed)
  if config.name == "digits":
    data = fdata.digits()
  elif config.name == "mnist":
    data = fdata.mnist_idx(config.folder or None)
  else:
    data = fdata.synthetic(num_examples=512, shape=(8, 8, 1), seed=seed)
  if config.limit:
    data = data.subset(np.arange(min(int(config.limit), len(data))))
  return _image_task(data, config, seed)
