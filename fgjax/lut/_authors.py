"""Loads the tables that the TinyLUT authors publish, so that their ×4 network runs in fgjax.

The repository `Jonas-KD/TinyLUT` ships `TinyLUT_LUT/Model_V_{L1_Depth,L1_Point,UP}_x4_{H6,L2}.npy`
(int8 arrays of shape (rows, 16, 1, 1)) and the PyTorch checkpoint `model_TinyLUT.pth`, whose
`module.clip_{hh1,hl1,hh2,hl2}` (shape (1, 16, 1, 1)) are the learned clipping scales α that
decide how many rows of the point-wise and up-sampling tables belong to each channel
(`round(α_c [-32, 31])` for H6, `round(α_c [0, 3])` for L2). Their dataflow (read from their
`test_TinyLUT.py`) is `_pipeline`'s with C = 16 = s², the residual of the requantized channels in
the up-sampling stage and no residual of the input in the ensemble.

The checkpoint is read without PyTorch: it is a zip of a pickle whose tensors are references to
raw little-endian storages; a restricted unpickler rebuilds only the arrays (nothing is executed).
"""

from __future__ import annotations

import os
import pickle
import zipfile

import jax.numpy as jnp
import numpy as np

from fgjax.lut._pipeline import HIGH, LOW
from fgjax.lut._tables import TinyLUT, segments_of

AUTHORS_FILES = {
  ("high", "depth"): "Model_V_L1_Depth_x4_H6.npy",
  ("low", "depth"): "Model_V_L1_Depth_x4_L2.npy",
  ("high", "point"): "Model_V_L1_Point_x4_H6.npy",
  ("low", "point"): "Model_V_L1_Point_x4_L2.npy",
  ("high", "up"): "Model_V_UP_x4_H6.npy",
  ("low", "up"): "Model_V_UP_x4_L2.npy",
}
CLIP_KEYS = {
  ("high", 0): "clip_hh1",
  ("low", 0): "clip_hl1",
  ("high", 1): "clip_hh2",
  ("low", 1): "clip_hl2",
}
_STORAGE_DTYPES = {
  "FloatStorage": np.float32,
  "DoubleStorage": np.float64,
  "HalfStorage": np.float16,
  "LongStorage": np.int64,
  "IntStorage": np.int32,
  "ShortStorage": np.int16,
  "CharStorage": np.int8,
  "ByteStorage": np.uint8,
  "BoolStorage": np.bool_,
}


class _StorageType:
  def __init__(self, name):
    self.dtype = _STORAGE_DTYPES[name]


def _rebuild_tensor(storage, offset, size, stride, *unused):
  del unused
  itemsize = storage.dtype.itemsize
  return np.lib.stride_tricks.as_strided(
    storage[offset:], shape=tuple(size), strides=tuple(s * itemsize for s in stride)
  ).copy()


def _rebuild_parameter(data, *unused):
  del unused
  return data


class _CheckpointUnpickler(pickle.Unpickler):
  """Rebuilds a PyTorch state dict's tensors as numpy arrays; refuses any other global."""

  def __init__(self, file, archive: zipfile.ZipFile, prefix: str):
    super().__init__(file)
    self.archive, self.prefix = archive, prefix

  def find_class(self, module, name):
    if module == "collections" and name == "OrderedDict":
      import collections

      return collections.OrderedDict
    if module == "torch._utils" and name == "_rebuild_tensor_v2":
      return _rebuild_tensor
    if module == "torch._utils" and name == "_rebuild_parameter":
      return _rebuild_parameter
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name)
    raise pickle.UnpicklingError(f"checkpoint: refusing to load {module}.{name}.")

  def persistent_load(self, pid):
    _, storage_type, key, _, _ = pid
    raw = self.archive.read(f"{self.prefix}/data/{key}")
    return np.frombuffer(raw, dtype=storage_type.dtype)


def read_torch_state_dict(path: str) -> dict:
  """The arrays of a PyTorch (zip-format) state dict as numpy, without PyTorch."""
  with zipfile.ZipFile(path) as archive:
    pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")]
    if not pickles:
      raise ValueError(f"path: {path!r} is not a zip-format PyTorch checkpoint.")
    prefix = pickles[0][: -len("/data.pkl")]
    with archive.open(pickles[0]) as file:
      return dict(_CheckpointUnpickler(file, archive, prefix).load())


def load_authors_tables(
  lut_dir: str, checkpoint: str | None = None, clips: dict | None = None
) -> TinyLUT:
  """The authors' published ×4 TinyLUT tables as a `TinyLUT` for `lut_apply`.

  Args:
    lut_dir: the folder with the six `Model_V_*_x4_{H6,L2}.npy` files (`TinyLUT_LUT`).
    checkpoint: their `model_TinyLUT.pth` (for the clipping scales); default
      `lut_dir/../model_TinyLUT.pth`, else `lut_dir/model_TinyLUT.pth`. Not needed when `clips`
      is given.
    clips: optional `{"clip_hh1": (16,), "clip_hl1": ..., "clip_hh2": ..., "clip_hl2": ...}`.

  Returns:
    A `TinyLUT` with upscale 4, C = 16, the up-sampling residual and no input residual. Run it on
    an 8-bit channel minus 128; the authors add 128 to the result.

  Raises:
    ValueError: a missing file, or tables whose rows do not match the clipping scales.

  Example:
    >>> lut = fgjax.lut.load_authors_tables("TinyLUT/TinyLUT_LUT")
    >>> sr = fgjax.lut.lut_apply(lut, y_channel.astype(np.int32) - 128) + 128
  """
  arrays = {}
  for key, name in AUTHORS_FILES.items():
    path = os.path.join(lut_dir, name)
    if not os.path.exists(path):
      raise ValueError(f"lut_dir: {path!r} not found (expected the authors' TinyLUT_LUT folder).")
    arrays[key] = np.load(path).reshape(-1, 16).astype(np.int8)
  if clips is None:
    if checkpoint is None:
      candidates = [os.path.join(lut_dir, os.pardir, "model_TinyLUT.pth")]
      candidates.append(os.path.join(lut_dir, "model_TinyLUT.pth"))
      checkpoint = next((c for c in candidates if os.path.exists(c)), candidates[0])
    if not os.path.exists(checkpoint):
      raise ValueError(f"checkpoint: {checkpoint!r} not found (it holds the clipping scales).")
    state = read_torch_state_dict(checkpoint)
    clips = {name: state[f"module.{name}"] for name in CLIP_KEYS.values()}
  tables, requant, segments = {}, {}, {}
  for branch in (HIGH, LOW):
    values = np.arange(branch.lo, branch.hi + 1, dtype=np.float32)
    alpha = [np.asarray(clips[CLIP_KEYS[(branch.name, i)]], np.float32).reshape(-1) for i in (0, 1)]
    rounded = np.stack([np.round(a[:, None] * values[None, :]) for a in alpha])  # as torch.round
    requant[branch.name] = jnp.asarray(np.clip(rounded, branch.lo, branch.hi).astype(np.int8))
    segments[branch.name] = jnp.asarray(segments_of(rounded))
    for stage, index in (("point", 0), ("up", 1)):
      rows = int(segments_of(rounded[index])[:, 1].sum())
      have = arrays[(branch.name, stage)].shape[0]
      if have != rows:
        raise ValueError(
          f"lut_dir: {AUTHORS_FILES[(branch.name, stage)]} has {have} rows, the clipping scales "
          f"give {rows}."
        )
    tables[branch.name] = {
      "depth": jnp.asarray(arrays[(branch.name, "depth")].reshape(9, branch.size, 16)),
      "point": jnp.asarray(arrays[(branch.name, "point")]),
      "up": jnp.asarray(arrays[(branch.name, "up")]),
    }
  return TinyLUT(tables, requant, segments, upscale=4, up_residual=True, global_residual=False)
