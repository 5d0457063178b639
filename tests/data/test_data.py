"""Tests for fgjax.data: offline sources, audio features, splits, batching and domain shifts."""

import ast
import dataclasses
import gzip
import itertools
import pathlib
import wave

import numpy as np
import pytest

from fgjax import data

SHARED = pathlib.Path(__file__).resolve().parents[3] / "shared" / "data"
MNIST_DIR = SHARED / "mnist"
FSDD_DIR = SHARED / "fsdd" / "recordings"


# Sources ------------------------------------------------------------------------------------------


def test_digits_shapes_and_range():
  digits = data.digits()
  assert digits.x.shape == (1797, 8, 8, 1) and digits.x.dtype == np.float32
  assert digits.x.min() == 0.0 and digits.x.max() == 1.0
  assert digits.y.shape == (1797,) and set(np.unique(digits.y)) == set(range(10))
  assert digits.num_classes == 10 and len(digits) == 1797


def _write_idx(path, array, magic):
  header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
  with gzip.open(path, "wb") as file:
    file.write(header + array.astype(np.uint8).tobytes())


def test_mnist_idx_round_trip(tmp_path):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (5, 28, 28))
  labels = rng.integers(0, 10, 5)
  _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images, 2051)
  _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels, 2049)
  mnist = data.mnist_idx(tmp_path)
  np.testing.assert_array_equal(mnist.x[..., 0], images.astype(np.float32) / np.float32(255))
  np.testing.assert_array_equal(mnist.y, labels)
  assert len(data.mnist_idx(tmp_path, limit=2)) == 2


def test_mnist_idx_rejects_wrong_magic(tmp_path):
  _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((1, 2, 2)), 2049)
  _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros((1,)), 2049)
  with pytest.raises(ValueError, match="magic number 2049, expected 2051"):
    data.mnist_idx(tmp_path)


@pytest.mark.skipif(not MNIST_DIR.is_dir(), reason=f"real MNIST IDX files not found at {MNIST_DIR}")
def test_mnist_idx_real_files():
  mnist = data.mnist_idx(MNIST_DIR)
  assert mnist.x.shape == (10000, 28, 28, 1) and mnist.x.dtype == np.float32
  assert 0.0 <= mnist.x.min() and mnist.x.max() <= 1.0
  # Class counts of the MNIST test set (shared/data/README.md).
  expected = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
  np.testing.assert_array_equal(np.bincount(mnist.y), expected)


def test_missing_folders_name_the_path(tmp_path, monkeypatch):
  missing = tmp_path / "nowhere"
  with pytest.raises(FileNotFoundError, match="nowhere"):
    data.mnist_idx(missing)
  with pytest.raises(FileNotFoundError, match="nowhere"):
    data.fsdd(missing)
  monkeypatch.delenv("FGJAX_DATA_DIR", raising=False)
  with pytest.raises(FileNotFoundError, match="FGJAX_DATA_DIR"):
    data.mnist_idx()
  monkeypatch.setenv("FGJAX_DATA_DIR", str(tmp_path))
  with pytest.raises(FileNotFoundError, match=str(tmp_path / "fsdd" / "recordings")):
    data.fsdd()
  # An existing folder without the files names the missing file.
  with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte.gz"):
    data.mnist_idx(tmp_path)


def _write_wav(path, samples, rate=8000):
  with wave.open(str(path), "wb") as file:
    file.setnchannels(1)
    file.setsampwidth(2)
    file.setframerate(rate)
    file.writeframes(samples.astype("<i2").tobytes())


def test_fsdd_reads_wav_files_from_the_environment_folder(tmp_path, monkeypatch):
  folder = tmp_path / "fsdd" / "recordings"
  folder.mkdir(parents=True)
  rng = np.random.default_rng(0)
  written = {}
  for digit, speaker, take, length in [
    (3, "theo", 10, 9000),
    (3, "theo", 2, 100),
    (1, "ann", 0, 8),
  ]:
    samples = rng.integers(-32768, 32768, length)
    _write_wav(folder / f"{digit}_{speaker}_{take}.wav", samples)
    written[(digit, speaker, take)] = samples / 32768.0
  (folder / "README.md").write_text("not a recording")
  monkeypatch.setenv("FGJAX_DATA_DIR", str(tmp_path))
  fsdd = data.fsdd(num_samples=1000)
  # Fixed order: digit, speaker, take (numerically, so take 2 before take 10).
  assert fsdd.y.tolist() == [1, 3, 3]
  assert fsdd.speakers.tolist() == ["ann", "theo", "theo"]
  np.testing.assert_allclose(fsdd.x[1, :100], written[(3, "theo", 2)])
  assert not fsdd.x[1, 100:].any()  # zero padding
  np.testing.assert_allclose(fsdd.x[2], written[(3, "theo", 10)][:1000])  # trimmed
  assert len(data.fsdd(speakers=["theo"], num_samples=1000)) == 2
  assert data.fsdd(takes=[10], num_samples=1000).y.tolist() == [3]
  _write_wav(folder / "5_bob_0.wav", np.zeros(10), rate=16000)
  with pytest.raises(ValueError, match="16000 Hz"):
    data.fsdd(digits=[5])


@pytest.mark.skipif(not FSDD_DIR.is_dir(), reason=f"real FSDD recordings not found at {FSDD_DIR}")
def test_fsdd_real_recordings_and_speaker_split():
  fsdd = data.fsdd(FSDD_DIR, takes=[0])  # one take per speaker and digit: 60 files
  assert fsdd.x.shape == (60, 8000) and fsdd.x.dtype == np.float32
  assert np.abs(fsdd.x).max() <= 1.0 and np.abs(fsdd.x).max() > 0.01
  assert sorted(set(fsdd.speakers)) == sorted(data.FSDD_SPEAKERS)
  np.testing.assert_array_equal(np.bincount(fsdd.y), [6] * 10)
  others, theo = data.speaker_split(fsdd, held_out="theo")
  assert len(theo) == 10 and set(theo.speakers) == {"theo"}
  assert len(others) == 50 and "theo" not in set(others.speakers)
  assert len(data.fsdd(FSDD_DIR, limit=3)) == 3


def test_speaker_split_errors():
  with pytest.raises(ValueError, match="no speakers"):
    data.speaker_split(data.synthetic(10))
  dataset = dataclasses.replace(data.synthetic(4), speakers=np.array(["a", "a", "b", "b"]))
  with pytest.raises(ValueError, match="theo"):
    data.speaker_split(dataset)
  others, held = data.speaker_split(dataset, held_out=["b"])
  assert others.speakers.tolist() == ["a", "a"] and held.speakers.tolist() == ["b", "b"]


def test_synthetic_is_deterministic_and_balanced():
  first, second = (
    data.synthetic(100, (4, 4, 1), 5, seed=3),
    data.synthetic(100, (4, 4, 1), 5, seed=3),
  )
  np.testing.assert_array_equal(first.x, second.x)
  np.testing.assert_array_equal(np.bincount(first.y), [20] * 5)
  assert first.x.shape == (100, 4, 4, 1)
  with pytest.raises(ValueError, match="labels"):
    data.Dataset(x=np.zeros((3, 2)), y=np.zeros(2), num_classes=2, name="bad")


def test_tfds_source_without_tensorflow_says_how_to_install():
  try:
    import tensorflow  # noqa: F401
    import tensorflow_datasets  # noqa: F401
  except ImportError:
    with pytest.raises(ImportError, match=r"pip install 'fgjax\[tfds\]'"):
      data.tfds_source("mnist", "test", download=False)
  else:
    pytest.skip("TensorFlow is installed; the loader would read or download real data.")


def test_tensorflow_is_imported_only_inside_functions():
  """No module of fgjax.data imports TensorFlow (Datasets) at import time: an optional extra."""
  for path in pathlib.Path(data.__file__).parent.glob("*.py"):
    for node in ast.parse(path.read_text()).body:  # top-level statements only
      if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom):
        names = [node.module or ""]
      else:
        continue
      assert not any(name.startswith("tensorflow") for name in names), (path, names)


# Audio --------------------------------------------------------------------------------------------


def test_mel_scale_round_trip():
  hz = np.array([0.0, 100.0, 1000.0, 3999.0])
  np.testing.assert_allclose(data.mel_to_hz(data.hz_to_mel(hz)), hz, atol=1e-6)
  np.testing.assert_allclose(data.hz_to_mel(1000.0), 1000.0, atol=0.1)  # HTK: 1 kHz ~ 1000 mel


def test_mel_filterbank_is_triangular_and_covers_every_filter():
  bank = data.mel_filterbank(num_fft=256, num_mels=40, sample_rate=8000)
  assert bank.shape == (129, 40)
  assert bank.min() >= 0.0 and bank.max() <= 1.0
  assert (bank.max(axis=0) > 0.3).all()  # no empty filter at this resolution
  # Peaks increase with the filter index, following the mel centers.
  centers = data.mel_center_frequencies(40, 8000)
  peaks = bank.argmax(axis=0) * 8000 / 256
  assert (np.diff(peaks) >= 0).all()
  np.testing.assert_allclose(peaks, centers, atol=8000 / 256)


@pytest.mark.parametrize("frequency", [300.0, 1000.0, 2500.0])
def test_log_mel_of_a_sine_peaks_at_the_nearest_mel_bin(frequency):
  time = np.arange(8000) / 8000
  sine = 0.5 * np.sin(2 * np.pi * frequency * time)
  features = data.log_mel_spectrogram(sine)
  assert features.shape == (1 + (8000 - 256) // 80, 40) == (97, 40)
  centers = data.mel_center_frequencies(40, 8000)
  assert features.mean(axis=0).argmax() == np.abs(centers - frequency).argmin()


def test_log_mel_pads_to_fixed_length_and_batches():
  waves = np.zeros((3, 4000), np.float32)
  features = data.log_mel_spectrogram(waves)
  assert features.shape == (3, 97, 40)
  np.testing.assert_allclose(features, np.log(1e-6), rtol=1e-6)  # silence sits at the floor


# Splits and batches -------------------------------------------------------------------------------


def test_split_is_deterministic_disjoint_and_complete():
  dataset = dataclasses.replace(data.synthetic(50), x=np.arange(50))
  train, test = data.split(dataset, (0.8, 0.2), seed=0)
  again, _ = data.split(dataset, (0.8, 0.2), seed=0)
  other, _ = data.split(dataset, (0.8, 0.2), seed=1)
  assert (len(train), len(test)) == (40, 10)
  np.testing.assert_array_equal(train.x, again.x)
  assert not np.array_equal(train.x, other.x)
  assert sorted(np.concatenate([train.x, test.x]).tolist()) == list(range(50))
  np.testing.assert_array_equal(train.y, dataset.y[train.x])  # labels follow their inputs
  parts = data.split(dataset, (10, 5, 5), seed=0)
  assert [len(p) for p in parts] == [10, 5, 5]
  assert len(set(np.concatenate([p.x for p in parts]).tolist())) == 20
  with pytest.raises(ValueError, match="all ints"):
    data.split(dataset, (10, 0.5), seed=0)
  with pytest.raises(ValueError, match="do not fit"):
    data.split(dataset, (40, 20), seed=0)


def test_few_shot_takes_k_per_class():
  dataset = dataclasses.replace(data.synthetic(60, num_classes=3), x=np.arange(60))
  support, rest = data.few_shot(dataset, shots=4, seed=0)
  assert support.y.tolist() == [0] * 4 + [1] * 4 + [2] * 4
  assert not set(support.x.tolist()) & set(rest.x.tolist())
  assert len(support) + len(rest) == 60
  again, _ = data.few_shot(dataset, shots=4, seed=0)
  np.testing.assert_array_equal(support.x, again.x)
  with pytest.raises(ValueError, match="fewer than 30"):
    data.few_shot(dataset, shots=30, seed=0)


def test_batches_cover_each_epoch_once_and_are_reproducible():
  dataset = dataclasses.replace(data.synthetic(10), x=np.arange(10))
  epoch = list(data.batches(dataset, 4, seed=0))
  assert [len(b.x) for b in epoch] == [4, 4, 2]
  assert sorted(np.concatenate([b.x for b in epoch]).tolist()) == list(range(10))
  np.testing.assert_array_equal(epoch[0].y, dataset.y[epoch[0].x])
  assert [b.x.tolist() for b in data.batches(dataset, 4, seed=0)] == [b.x.tolist() for b in epoch]
  dropped = list(data.batches(dataset, 4, seed=0, epochs=2, drop_remainder=True))
  assert [len(b.x) for b in dropped] == [4, 4, 4, 4]
  assert not np.array_equal(dropped[0].x, dropped[2].x)  # each epoch has its own order
  ordered = next(data.batches(dataset, 3))
  assert ordered.x.tolist() == [0, 1, 2]
  assert len(list(itertools.islice(data.batches(dataset, 3, seed=0, epochs=None), 100))) == 100


# Domain shifts ------------------------------------------------------------------------------------


@pytest.fixture(name="images")
def _images():
  return np.random.default_rng(0).uniform(size=(3, 9, 9, 2)).astype(np.float32)


def test_rotate_by_zero_is_identity_and_by_90_is_rot90(images):
  np.testing.assert_allclose(data.rotate(images, 0.0), images, atol=1e-6)
  np.testing.assert_allclose(data.rotate(images, 90.0), np.rot90(images, 1, axes=(1, 2)), atol=1e-5)
  np.testing.assert_allclose(
    data.rotate(images, 180.0), np.rot90(images, 2, axes=(1, 2)), atol=1e-5
  )
  np.testing.assert_allclose(data.rotate(images[0], -90.0), np.rot90(images[0], -1), atol=1e-5)
  assert data.rotate(images, 30.0).shape == images.shape


def test_add_noise_is_seeded_with_the_given_std(images):
  noisy = data.add_noise(images, 0.1, seed=0, clip=False)
  np.testing.assert_array_equal(noisy, data.add_noise(images, 0.1, seed=0, clip=False))
  residual = noisy - images
  # 486 samples: the sample std is within 15% of 0.1 with overwhelming probability (fixed seed).
  assert abs(residual.std() - 0.1) < 0.015 and abs(residual.mean()) < 0.015
  clipped = data.add_noise(images, 1.0, seed=0)
  assert clipped.min() >= 0.0 and clipped.max() <= 1.0


def test_contrast_brightness_blur(images):
  np.testing.assert_allclose(data.adjust_contrast(images, 1.0), images, atol=1e-6)
  flat = data.adjust_contrast(images, 0.0)
  np.testing.assert_allclose(
    flat, np.broadcast_to(images.mean(axis=(1, 2, 3), keepdims=True), images.shape), atol=1e-6
  )
  assert data.adjust_contrast(images, 0.5).std() < images.std()
  np.testing.assert_allclose(data.adjust_brightness(images, 0.0), images)
  assert data.adjust_brightness(images, 2.0).min() == 1.0
  np.testing.assert_allclose(data.gaussian_blur(images, 0.0), images, atol=1e-6)
  constant = np.full((1, 9, 9, 1), 0.3, np.float32)
  np.testing.assert_allclose(data.gaussian_blur(constant, 2.0), constant, atol=1e-6)
  assert data.gaussian_blur(images, 1.0).std() < images.std()
