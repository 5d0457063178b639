"""Offline sources: scikit-learn digits, MNIST IDX files, Free Spoken Digit WAV files, synthetic."""

from __future__ import annotations

import gzip
import os
import pathlib
import re
import wave
from collections.abc import Iterable, Sequence

import numpy as np

from fgjax.data._dataset import Dataset

DATA_DIR_ENV = "FGJAX_DATA_DIR"

FSDD_SAMPLE_RATE = 8000
FSDD_SPEAKERS = ("george", "jackson", "lucas", "nicolas", "theo", "yweweler")
_FSDD_NAME = re.compile(r"^(\d)_([a-z]+)_(\d+)\.wav$")


def resolve_data_folder(
  folder: str | os.PathLike | None, subfolder: str, what: str
) -> pathlib.Path:
  """The folder to read `what` from: `folder` if given, else `$FGJAX_DATA_DIR/<subfolder>`.

  Raises:
    FileNotFoundError: when neither is given or the folder does not exist; the message names the
      path looked for and how to set it.
  """
  if folder is None:
    root = os.environ.get(DATA_DIR_ENV)
    if not root:
      raise FileNotFoundError(
        f"{what}: no folder given and ${DATA_DIR_ENV} is not set. Pass the folder, or set "
        f"{DATA_DIR_ENV} to a directory that contains {subfolder}/."
      )
    path = pathlib.Path(root) / subfolder
    hint = f"(from ${DATA_DIR_ENV}={root}; it should contain {subfolder}/)"
  else:
    path = pathlib.Path(folder)
    hint = f"(pass another folder, or none and set {DATA_DIR_ENV} to a directory with {subfolder}/)"
  if not path.is_dir():
    raise FileNotFoundError(f"{what}: folder {str(path)!r} does not exist {hint}.")
  return path


def digits() -> Dataset:
  """The scikit-learn 8x8 handwritten digits (1,797 images, 10 classes); ships with scikit-learn.

  Returns:
    `Dataset` with x float32 (1797, 8, 8, 1) in [0, 1] (the 0..16 gray levels divided by 16) and y
    int32 (1797,).
  """
  from sklearn.datasets import load_digits  # Imported here: scikit-learn is slow to import.

  raw = load_digits()
  x = (raw.images / 16.0).astype(np.float32)[..., None]
  return Dataset(x=x, y=raw.target.astype(np.int32), num_classes=10, name="digits")


def _read_idx(path: pathlib.Path, magic: int) -> np.ndarray:
  """Reads a gzipped IDX file of bytes, checking its magic number (2051 images, 2049 labels)."""
  with gzip.open(path, "rb") as file:
    data = file.read()
  found = int.from_bytes(data[:4], "big")
  if found != magic:
    raise ValueError(f"mnist_idx: {path} has magic number {found}, expected {magic}.")
  num_dims = data[3]
  dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(num_dims)]
  array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * num_dims)
  if array.size != int(np.prod(dims)):
    raise ValueError(f"mnist_idx: {path} holds {array.size} bytes of data, its header says {dims}.")
  return array.reshape(dims)


def mnist_idx(
  folder: str | os.PathLike | None = None, *, split: str = "t10k", limit: int | None = None
) -> Dataset:
  """MNIST from the original gzipped IDX files (`{split}-images-idx3-ubyte.gz`, `-labels-idx1-`).

  Args:
    folder: the folder holding the files; default `$FGJAX_DATA_DIR/mnist`.
    split: file prefix, "t10k" (test set, 10,000 images) or "train".
    limit: keep only the first `limit` examples.

  Returns:
    `Dataset` with x float32 (N, 28, 28, 1) in [0, 1] and y int32 (N,).

  Raises:
    FileNotFoundError: the folder or a file is missing (the message names the path).
    ValueError: a file's magic number is not 2051 (images) / 2049 (labels), or sizes disagree.
  """
  root = resolve_data_folder(folder, "mnist", "mnist_idx")
  paths = [root / f"{split}-images-idx3-ubyte.gz", root / f"{split}-labels-idx1-ubyte.gz"]
  for path in paths:
    if not path.is_file():
      raise FileNotFoundError(f"mnist_idx: file {str(path)!r} does not exist.")
  images = _read_idx(paths[0], 2051)
  labels = _read_idx(paths[1], 2049)
  if len(images) != len(labels):
    raise ValueError(f"mnist_idx: {len(images)} images but {len(labels)} labels.")
  if limit is not None:
    images, labels = images[:limit], labels[:limit]
  x = (images.astype(np.float32) / 255.0)[..., None]
  return Dataset(x=x, y=labels.astype(np.int32), num_classes=10, name="mnist")


def read_wav(path: str | os.PathLike) -> tuple[np.ndarray, int]:
  """Reads a mono 16-bit PCM WAV file with the standard library's `wave` module.

  Returns:
    `(samples, sample_rate)`: float32 samples in [-1, 1) and the rate in Hz.

  Raises:
    ValueError: the file is not mono 16-bit PCM.
  """
  with wave.open(str(path), "rb") as file:
    if file.getnchannels() != 1 or file.getsampwidth() != 2:
      raise ValueError(
        f"read_wav: {path} has {file.getnchannels()} channels of {8 * file.getsampwidth()} bits; "
        "expected mono 16-bit PCM."
      )
    rate = file.getframerate()
    frames = file.readframes(file.getnframes())
  return np.frombuffer(frames, dtype="<i2").astype(np.float32) / 32768.0, rate


def pad_or_trim(samples: np.ndarray, length: int) -> np.ndarray:
  """Zero-pads (at the end) or cuts the last axis of `samples` to `length`."""
  samples = samples[..., :length]
  missing = length - samples.shape[-1]
  if missing:
    samples = np.pad(samples, [(0, 0)] * (samples.ndim - 1) + [(0, missing)])
  return samples


def fsdd(
  folder: str | os.PathLike | None = None,
  *,
  speakers: Iterable[str] | None = None,
  digits: Iterable[int] | None = None,
  takes: Iterable[int] | None = None,
  limit: int | None = None,
  num_samples: int = FSDD_SAMPLE_RATE,
) -> Dataset:
  """The Free Spoken Digit Dataset: WAV files `{digit}_{speaker}_{take}.wav`, 8 kHz mono 16-bit.

  Files are read in a fixed order (digit, speaker, take, numerically), after the filters, so results
  are the same on every machine. Each recording is zero-padded or cut to `num_samples` (default 1
  s); feed `log_mel_spectrogram(data.x)` to a model.

  Args:
    folder: the `recordings/` folder; default `$FGJAX_DATA_DIR/fsdd/recordings`.
    speakers: keep only these speakers (default all six, see `FSDD_SPEAKERS`).
    digits: keep only these digits.
    takes: keep only these take indices (0..49 per speaker and digit); e.g. `range(2)` for a quick
      load.
    limit: keep at most this many files (after the filters, in the fixed order).
    num_samples: length of every waveform.

  Returns:
    `Dataset` with x float32 (N, num_samples) in [-1, 1), y int32 digits, and `speakers` (N,) str.

  Raises:
    FileNotFoundError: the folder is missing, or no file matches (the message names the folder).
    ValueError: a file is not 8 kHz mono 16-bit.
  """
  root = resolve_data_folder(folder, os.path.join("fsdd", "recordings"), "fsdd")
  keep_speakers = None if speakers is None else set(speakers)
  keep_digits = None if digits is None else set(digits)
  keep_takes = None if takes is None else set(takes)
  entries = []
  for path in root.iterdir():
    match = _FSDD_NAME.match(path.name)
    if match is None:
      continue
    digit, speaker, take = int(match.group(1)), match.group(2), int(match.group(3))
    if keep_speakers is not None and speaker not in keep_speakers:
      continue
    if keep_digits is not None and digit not in keep_digits:
      continue
    if keep_takes is not None and take not in keep_takes:
      continue
    entries.append((digit, speaker, take, path))
  entries.sort(key=lambda entry: entry[:3])
  if limit is not None:
    entries = entries[:limit]
  if not entries:
    raise FileNotFoundError(
      f"fsdd: no matching '{{digit}}_{{speaker}}_{{take}}.wav' in {str(root)!r}."
    )
  waves = np.zeros((len(entries), num_samples), np.float32)
  for row, (_, _, _, path) in enumerate(entries):
    samples, rate = read_wav(path)
    if rate != FSDD_SAMPLE_RATE:
      raise ValueError(f"fsdd: {path} is sampled at {rate} Hz, expected {FSDD_SAMPLE_RATE}.")
    waves[row] = pad_or_trim(samples, num_samples)
  return Dataset(
    x=waves,
    y=np.array([entry[0] for entry in entries], np.int32),
    num_classes=10,
    name="fsdd",
    speakers=np.array([entry[1] for entry in entries]),
  )


def synthetic(
  num_examples: int = 256,
  shape: Sequence[int] = (8, 8, 1),
  num_classes: int = 10,
  *,
  seed: int = 0,
  noise: float = 0.1,
) -> Dataset:
  """A learnable toy problem for tests: each class is a fixed random pattern plus Gaussian noise.

  Args:
    num_examples: N.
    shape: shape of one input.
    num_classes: number of classes (labels are balanced: example i has label i mod num_classes, then
      shuffled).
    seed: makes everything deterministic.
    noise: standard deviation of the per-example noise around the class pattern.

  Returns:
    `Dataset` with x float32 (N, *shape) and y int32 (N,).
  """
  rng = np.random.default_rng(seed)
  patterns = rng.uniform(0.0, 1.0, (num_classes, *shape)).astype(np.float32)
  y = rng.permutation(np.arange(num_examples) % num_classes).astype(np.int32)
  x = patterns[y] + noise * rng.standard_normal((num_examples, *shape)).astype(np.float32)
  return Dataset(x=x, y=y, num_classes=num_classes, name="synthetic")
