"""Omniglot handwritten characters: the authors' zip files (offline) or TFDS, and Lake's 20 runs.

Omniglot (Lake, Salakhutdinov and Tenenbaum, Science 2015) has 1,623 characters from 50 alphabets,
each drawn once by 20 people, as 105x105 1-bit images: the few-shot benchmark of ProtoNets (Snell
et al. 2017) and of "Stepping Forward on the Last Mile" (Chen et al., NeurIPS 2024, Table 1, 28x28).

- `omniglot` reads the original `images_background*.zip` files of the authors' repository (a
  folder given as an argument, or `$FGJAX_DATA_DIR/omniglot`); characters that appear in two zips
  (the "small" subsets share Greek and Latin) are kept once.
- `omniglot_runs` reads `all_runs.zip`: the 20 standard 20-way 1-shot runs on the evaluation
  alphabets (disjoint from every background alphabet).
- `omniglot_tfds` reads TFDS's `omniglot` (all 50 alphabets) for users who have TensorFlow.

Images become float32 (N, size, size, 1) in [0, 1] with the strokes at 1 (the files draw black on
white), downsampled with an area (box) filter, as is usual for 28x28 Omniglot.
"""

from __future__ import annotations

import dataclasses
import io
import os
import pathlib
import re
import zipfile
from collections.abc import Sequence

import numpy as np

from fgjax.data._dataset import Dataset
from fgjax.data._sources import resolve_data_folder

OMNIGLOT_BACKGROUND_ZIPS = ("images_background_small1.zip", "images_background_small2.zip")
OMNIGLOT_RUNS_ZIP = "all_runs.zip"
# <top folder>/<Alphabet>/characterNN/<charid>_<drawer>.png
_IMAGE_PATH = re.compile(r"^[^/]+/([^/]+)/(character\d+)/(\d+)_(\d+)\.png$")


@dataclasses.dataclass(frozen=True, eq=False)
class Omniglot:
  """Omniglot characters in memory, with the alphabet of every class.

  Attributes:
    data: `Dataset` of images (N, size, size, 1) float32 in [0, 1] (strokes = 1) and class labels
      y in [0, num_classes); classes are sorted by (alphabet, character).
    class_names: "Alphabet/characterNN" of each class, shape (num_classes,).
    class_alphabets: the alphabet of each class, shape (num_classes,).
    drawers: the drawer (1..20) of each image, shape (N,).
  """

  data: Dataset
  class_names: np.ndarray
  class_alphabets: np.ndarray
  drawers: np.ndarray

  @property
  def alphabets(self) -> tuple[str, ...]:
    """The alphabets present, sorted."""
    return tuple(sorted(set(self.class_alphabets.tolist())))

  def classes_of(self, alphabets: Sequence[str]) -> np.ndarray:
    """The class ids whose alphabet is in `alphabets` (sorted).

    Raises:
      ValueError: an alphabet that is not in this set (the message lists the valid ones).
    """
    unknown = sorted(set(alphabets) - set(self.alphabets))
    if unknown:
      raise ValueError(f"Omniglot: unknown alphabets {unknown}; present: {list(self.alphabets)}.")
    return np.flatnonzero(np.isin(self.class_alphabets, list(alphabets)))


@dataclasses.dataclass(frozen=True)
class OneShotRun:
  """One of Lake et al.'s 20-way 1-shot runs: one training image per class, 20 test items.

  Attributes:
    support_x: the 20 training images (20, size, size, 1), class `i` at row `i`.
    support_y: `arange(20)`.
    query_x: the 20 test items (20, size, size, 1).
    query_y: the class of each test item (from `class_labels.txt`).
    name: "run01" ... "run20".
  """

  support_x: np.ndarray
  support_y: np.ndarray
  query_x: np.ndarray
  query_y: np.ndarray
  name: str


def decode_image(png: bytes, image_size: int = 28) -> np.ndarray:
  """A PNG character image as float32 (size, size) in [0, 1], strokes 1, box-filtered to size.

  Args:
    png: the file's bytes (any PIL-readable image; Omniglot's are 105x105 1-bit, black strokes).
    image_size: output side; the original size when 0 or equal to it.

  Returns:
    float32 (image_size, image_size).
  """
  from PIL import Image  # Imported here: Pillow comes with matplotlib, only images need it.

  with Image.open(io.BytesIO(png)) as image:
    gray = image.convert("L")
    if image_size and gray.size != (image_size, image_size):
      gray = gray.resize((image_size, image_size), Image.Resampling.BOX)
    pixels = np.asarray(gray, np.float32) / 255.0
  return 1.0 - pixels


def _zip_path(folder: pathlib.Path, name: str) -> pathlib.Path:
  path = folder / name
  if not path.is_file():
    raise FileNotFoundError(f"omniglot: file {str(path)!r} does not exist.")
  return path


def omniglot(
  folder: str | os.PathLike | None = None,
  *,
  zips: Sequence[str] = OMNIGLOT_BACKGROUND_ZIPS,
  image_size: int = 28,
  alphabets: Sequence[str] | None = None,
) -> Omniglot:
  """Omniglot background characters from the authors' zip files, without downloading.

  Args:
    folder: the folder holding the zips; default `$FGJAX_DATA_DIR/omniglot`.
    zips: which zip files to read (the full `images_background.zip` works too); a character found
      in several (same alphabet and character folder) is read once, from the first.
    image_size: side of the square output images (105 keeps the originals).
    alphabets: keep only these alphabets (default: all).

  Returns:
    `Omniglot`: images, labels, class names, alphabets, drawers. With the two "small" zips: 8
    alphabets, 244 classes, 4,880 images.

  Raises:
    FileNotFoundError: the folder or a zip is missing.
    ValueError: a zip holds no character image.

  Example:
    >>> chars = fgjax.data.omniglot("../shared/data/omniglot")
    >>> pretrain = chars.classes_of(["Greek", "Korean"])
  """
  root = resolve_data_folder(folder, "omniglot", "omniglot")
  found: dict[tuple[str, str], dict[int, bytes]] = {}
  for name in zips:
    with zipfile.ZipFile(_zip_path(root, name)) as archive:
      seen_here: dict[tuple[str, str], dict[int, bytes]] = {}
      for member in archive.namelist():
        match = _IMAGE_PATH.match(member)
        if match is None:
          continue
        alphabet, character, _, drawer = match.groups()
        if alphabets is not None and alphabet not in alphabets:
          continue
        if (alphabet, character) in found:
          continue
        seen_here.setdefault((alphabet, character), {})[int(drawer)] = archive.read(member)
      if not seen_here and alphabets is None:
        raise ValueError(f"omniglot: {name} holds no <alphabet>/characterNN/*.png image.")
      found.update(seen_here)
  classes = sorted(found)
  images, labels, drawers = [], [], []
  for label, key in enumerate(classes):
    for drawer, png in sorted(found[key].items()):
      images.append(decode_image(png, image_size))
      labels.append(label)
      drawers.append(drawer)
  x = np.stack(images)[..., None] if images else np.zeros((0, image_size, image_size, 1))
  data = Dataset(
    x=x.astype(np.float32),
    y=np.asarray(labels, np.int32),
    num_classes=len(classes),
    name="omniglot",
  )
  return Omniglot(
    data=data,
    class_names=np.asarray([f"{a}/{c}" for a, c in classes]),
    class_alphabets=np.asarray([a for a, _ in classes]),
    drawers=np.asarray(drawers, np.int32),
  )


def omniglot_runs(
  folder: str | os.PathLike | None = None, *, image_size: int = 28
) -> list[OneShotRun]:
  """Lake et al.'s 20 one-shot runs (20-way 1-shot, 20 queries each) from `all_runs.zip`.

  Args:
    folder: the folder holding `all_runs.zip`; default `$FGJAX_DATA_DIR/omniglot`.
    image_size: side of the square output images.

  Returns:
    The runs, sorted by name (run01 ... run20).

  Raises:
    FileNotFoundError: the folder or the zip is missing.
    ValueError: a run's `class_labels.txt` names an image that is not in the zip.
  """
  root = resolve_data_folder(folder, "omniglot", "omniglot_runs")
  runs = []
  with zipfile.ZipFile(_zip_path(root, OMNIGLOT_RUNS_ZIP)) as archive:
    members = set(archive.namelist())
    names = sorted({m.split("/")[0] for m in members if m.endswith("/class_labels.txt")})
    for name in names:
      pairs = []
      for line in archive.read(f"{name}/class_labels.txt").decode().splitlines():
        if line.strip():
          query, answer = line.split()
          pairs.append((query, answer))
      classes = sorted({answer for _, answer in pairs})
      for path in [p for pair in pairs for p in pair]:
        if path not in members:
          raise ValueError(f"omniglot_runs: {name}/class_labels.txt names {path}, not in the zip.")
      read = lambda path: decode_image(archive.read(path), image_size)  # noqa: E731
      support_x = np.stack([read(c) for c in classes])[..., None]
      query_x = np.stack([read(q) for q, _ in pairs])[..., None]
      query_y = np.asarray([classes.index(a) for _, a in pairs], np.int32)
      runs.append(
        OneShotRun(
          support_x=support_x.astype(np.float32),
          support_y=np.arange(len(classes), dtype=np.int32),
          query_x=query_x.astype(np.float32),
          query_y=query_y,
          name=name,
        )
      )
  return runs


def omniglot_tfds(
  split: str = "train",
  data_dir: str | os.PathLike | None = None,
  *,
  image_size: int = 28,
  download: bool = True,
) -> Omniglot:
  """Omniglot from TensorFlow Datasets (all 50 alphabets), as `omniglot` returns it.

  TFDS splits: "train" (30 background alphabets, 964 characters), "test" (20 evaluation
  alphabets, 659), "small1", "small2". Needs `pip install 'fgjax[tfds]'`; classes are TFDS's
  labels renumbered in (alphabet, label) order; drawers are not in TFDS and are set to 0.

  Args:
    split: a TFDS split string.
    data_dir: TFDS's data folder (default `~/tensorflow_datasets`).
    image_size: side of the square output images.
    download: let TFDS download and prepare the data when it is missing.

  Raises:
    ImportError: TensorFlow or TensorFlow Datasets is missing.
  """
  from fgjax.data._tfds import _import_tfds

  tfds = _import_tfds()
  from PIL import Image

  data, info = tfds.load(
    "omniglot", split=split, data_dir=data_dir, download=download, with_info=True
  )
  alphabet_names = info.features["alphabet"].names
  images, keys = [], []
  for example in tfds.as_numpy(data):
    gray = Image.fromarray(np.asarray(example["image"], np.uint8)).convert("L")
    if gray.size != (image_size, image_size):
      gray = gray.resize((image_size, image_size), Image.Resampling.BOX)
    images.append(1.0 - np.asarray(gray, np.float32) / 255.0)
    keys.append((alphabet_names[int(example["alphabet"])], int(example["label"])))
  classes = sorted(set(keys))
  index = {key: i for i, key in enumerate(classes)}
  return Omniglot(
    data=Dataset(
      x=np.stack(images)[..., None].astype(np.float32),
      y=np.asarray([index[k] for k in keys], np.int32),
      num_classes=len(classes),
      name="omniglot",
    ),
    class_names=np.asarray([f"{a}/label{label}" for a, label in classes]),
    class_alphabets=np.asarray([a for a, _ in classes]),
    drawers=np.zeros(len(keys), np.int32),
  )
