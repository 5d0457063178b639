"""Data for last-mile adaptation: offline sources, TFDS, audio features, splits and shifts.

Everything here is numpy (no JAX, no TensorFlow at import time). Offline sources read a folder given
as an argument or found under `$FGJAX_DATA_DIR` (`mnist/`, `fsdd/recordings/`, `omniglot/`);
`tfds_source` needs the optional extra `pip install fgjax[tfds]`.
"""

from fgjax.data._audio import (
  hz_to_mel,
  log_mel_spectrogram,
  mel_center_frequencies,
  mel_filterbank,
  mel_to_hz,
)
from fgjax.data._corruptions import CORRUPTIONS, SEVERITIES, corrupt
from fgjax.data._dataset import Batch, Dataset
from fgjax.data._omniglot import (
  OMNIGLOT_BACKGROUND_ZIPS,
  Omniglot,
  OneShotRun,
  omniglot,
  omniglot_runs,
  omniglot_tfds,
)
from fgjax.data._shifts import add_noise, adjust_brightness, adjust_contrast, gaussian_blur, rotate
from fgjax.data._sources import (
  DATA_DIR_ENV,
  FSDD_SAMPLE_RATE,
  FSDD_SPEAKERS,
  digits,
  fsdd,
  mnist_idx,
  pad_or_trim,
  read_wav,
  synthetic,
)
from fgjax.data._splits import batches, few_shot, speaker_split, split
from fgjax.data._tfds import TFDS_NAMES, tfds_source

__all__ = [
  "CORRUPTIONS",
  "DATA_DIR_ENV",
  "FSDD_SAMPLE_RATE",
  "FSDD_SPEAKERS",
  "OMNIGLOT_BACKGROUND_ZIPS",
  "SEVERITIES",
  "TFDS_NAMES",
  "Batch",
  "Dataset",
  "Omniglot",
  "OneShotRun",
  "add_noise",
  "adjust_brightness",
  "adjust_contrast",
  "batches",
  "corrupt",
  "digits",
  "few_shot",
  "fsdd",
  "gaussian_blur",
  "hz_to_mel",
  "log_mel_spectrogram",
  "mel_center_frequencies",
  "mel_filterbank",
  "mel_to_hz",
  "mnist_idx",
  "omniglot",
  "omniglot_runs",
  "omniglot_tfds",
  "pad_or_trim",
  "read_wav",
  "rotate",
  "speaker_split",
  "split",
  "synthetic",
  "tfds_source",
]
