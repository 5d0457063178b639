"""TensorFlow Datasets loaders, imported lazily (optional dependency `fgjax[tfds]`)."""

from __future__ import annotations

import os

import numpy as np

from fgjax.data._dataset import Dataset
from fgjax.data._sources import pad_or_trim

# Names this loader was written for; others with an "image" (or "audio") and a "label" feature
# work too.
TFDS_NAMES = (
  "mnist",
  "fashion_mnist",
  "cifar10",
  "cifar100",
  "cifar10_corrupted",
  "spoken_digit",
  "omniglot",
)


def _import_tfds():
  try:
    import tensorflow  # noqa: F401  (tfds.load reads through tf.data)
    import tensorflow_datasets
  except ImportError as error:
    raise ImportError(
      "tfds_source needs TensorFlow Datasets and TensorFlow, which fgjax does not install by "
      f"default: pip install 'fgjax[tfds]' (import failed: {error}). The offline sources "
      "(digits, mnist_idx, fsdd) need neither."
    ) from error
  return tensorflow_datasets


def tfds_source(
  name: str,
  split: str,
  data_dir: str | os.PathLike | None = None,
  *,
  download: bool = True,
  limit: int | None = None,
  num_samples: int = 8000,
) -> Dataset:
  """Loads a TensorFlow Datasets split into memory as a `Dataset`.

  Images become float32 in [0, 1] with shape (N, height, width, channels); audio (spoken_digit)
  becomes float32 in [-1, 1) padded or cut to `num_samples`, with the speaker parsed from the file
  name.
  Examples: `tfds_source("cifar10", "test")`, `tfds_source("cifar10_corrupted/gaussian_noise_3",
    "test")`,
  `tfds_source("mnist", "train[:1000]")`.

  Args:
    name: a TFDS name (see `TFDS_NAMES`), with an optional "/config".
    split: a TFDS split string, e.g. "train", "test[:10%]".
    data_dir: where TFDS keeps its data (default: TFDS's own default, `~/tensorflow_datasets`).
    download: let TFDS download and prepare the data when it is missing.
    limit: keep only the first `limit` examples.
    num_samples: fixed audio length.

  Raises:
    ImportError: TensorFlow or TensorFlow Datasets is missing (the message says `pip install
      fgjax[tfds]`).
  """
  tfds = _import_tfds()
  if limit is not None:
    split = f"{split}[:{limit}]"
  data, info = tfds.load(
    name, split=split, data_dir=data_dir, download=download, with_info=True, shuffle_files=False
  )
  num_classes = info.features["label"].num_classes
  if "audio" in info.features:
    waves, labels, speakers = [], [], []
    for example in tfds.as_numpy(data):
      audio = np.asarray(example["audio"], np.float32)
      if np.issubdtype(example["audio"].dtype, np.integer):
        audio = audio / 32768.0
      waves.append(pad_or_trim(audio, num_samples))
      labels.append(example["label"])
      filename = example.get("audio/filename", b"")
      filename = filename.decode() if isinstance(filename, bytes) else str(filename)
      parts = os.path.basename(filename).split("_")
      speakers.append(parts[1] if len(parts) >= 3 else "")
    return Dataset(
      x=np.stack(waves),
      y=np.asarray(labels, np.int32),
      num_classes=num_classes,
      name=name,
      speakers=np.asarray(speakers),
    )
  images, labels = [], []
  for batch in tfds.as_numpy(data.batch(1024)):
    images.append(batch["image"])
    labels.append(batch["label"])
  x = np.concatenate(images).astype(np.float32) / 255.0
  return Dataset(x=x, y=np.concatenate(labels).astype(np.int32), num_classes=num_classes, name=name)
