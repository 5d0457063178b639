"""Omniglot loader (tiny synthetic zips), episode sampler, ProtoNet head, episode learner."""

from __future__ import annotations

import io
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fgjax import data as fdata
from fgjax import fewshot, models


def _png(pixels: np.ndarray) -> bytes:
  from PIL import Image

  buffer = io.BytesIO()
  Image.fromarray(pixels.astype(np.uint8)).convert("1").save(buffer, format="PNG")
  return buffer.getvalue()


def _character(index: int, size: int = 12) -> np.ndarray:
  """White background (255) with a black bar whose row depends on the character."""
  image = np.full((size, size), 255, np.uint8)
  image[index % size, :] = 0
  return image


@pytest.fixture
def omniglot_folder(tmp_path):
  """Two zips in the authors' layout sharing one alphabet (as the small1/small2 pair does)."""
  layout = {
    "small1.zip": {"Alpha": 2, "Shared": 1},
    "small2.zip": {"Beta": 3, "Shared": 1},
  }
  for name, alphabets in layout.items():
    with zipfile.ZipFile(tmp_path / name, "w") as archive:
      for alphabet, count in alphabets.items():
        for character in range(1, count + 1):
          for drawer in range(1, 5):
            path = f"top/{alphabet}/character{character:02d}/{character:04d}_{drawer:02d}.png"
            archive.writestr(path, _png(_character(character + drawer)))
  with zipfile.ZipFile(tmp_path / "all_runs.zip", "w") as archive:
    lines = []
    for cls in range(1, 4):
      archive.writestr(f"run01/training/class{cls:02d}.png", _png(_character(cls)))
    for item, cls in enumerate([3, 1, 2], start=1):
      archive.writestr(f"run01/test/item{item:02d}.png", _png(_character(cls)))
      lines.append(f"run01/test/item{item:02d}.png run01/training/class{cls:02d}.png")
    archive.writestr("run01/class_labels.txt", "\n".join(lines) + "\n")
  return tmp_path


def test_omniglot_reads_zips_once_per_character(omniglot_folder):
  chars = fdata.omniglot(omniglot_folder, zips=("small1.zip", "small2.zip"), image_size=6)
  assert chars.alphabets == ("Alpha", "Beta", "Shared")
  assert chars.data.num_classes == 2 + 3 + 1  # "Shared" is in both zips: read once.
  assert chars.data.x.shape == (6 * 4, 6, 6, 1) and chars.data.x.dtype == np.float32
  assert list(chars.class_names[:2]) == ["Alpha/character01", "Alpha/character02"]
  assert np.bincount(chars.data.y).tolist() == [4] * 6
  assert chars.classes_of(["Beta"]).tolist() == [2, 3, 4]
  # Strokes are 1 on a 0 background; box filtering keeps the ink fraction (one row of 12) up to
  # 8-bit rounding.
  assert np.allclose(chars.data.x.mean(axis=(1, 2, 3)), 1 / 12, atol=1 / 255)
  with pytest.raises(ValueError, match="unknown alphabets"):
    chars.classes_of(["Gamma"])


def test_omniglot_runs(omniglot_folder):
  (run,) = fdata.omniglot_runs(omniglot_folder, image_size=12)
  assert run.name == "run01" and run.support_x.shape == (3, 12, 12, 1)
  assert run.query_y.tolist() == [2, 0, 1]
  # Each query is the same drawing as its class image here.
  np.testing.assert_array_equal(run.query_x, run.support_x[run.query_y])
  episode = fewshot.episode_from_run(run)
  assert episode.num_ways == 3


def test_omniglot_missing_folder_says_where(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    fdata.omniglot(tmp_path / "absent")


def _toy(num_classes=10, per_class=8, dim=3):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(num_classes * per_class, dim)).astype(np.float32)
  y = np.repeat(np.arange(num_classes), per_class).astype(np.int32)
  return fdata.Dataset(x=x, y=y, num_classes=num_classes, name="toy")


def test_episode_shapes_and_classes():
  data = _toy()
  episode = fewshot.sample_episode(
    data, np.arange(4, 10), num_ways=5, num_shots=2, num_queries=3, rng=np.random.default_rng(1)
  )
  assert episode.support_x.shape == (10, 3) and episode.query_x.shape == (15, 3)
  assert episode.support_y.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
  assert episode.query_y.tolist() == [i for i in range(5) for _ in range(3)]
  assert len(set(episode.classes.tolist())) == 5 and set(episode.classes) <= set(range(4, 10))
  # Every example belongs to its episode class, and support and queries never share an example.
  rows = {tuple(row): label for row, label in zip(data.x, data.y, strict=True)}
  for xs, ys in ((episode.support_x, episode.support_y), (episode.query_x, episode.query_y)):
    assert [rows[tuple(row)] for row in xs] == episode.classes[ys].tolist()
  shared = {tuple(r) for r in episode.support_x} & {tuple(r) for r in episode.query_x}
  assert not shared


def test_sampler_is_reproducible_and_disjoint_from_pretraining():
  data = _toy()
  pretrain, held_out = np.arange(0, 4), np.arange(4, 10)
  sampler = fewshot.EpisodeSampler(
    data, held_out, num_ways=3, num_shots=1, num_queries=2, seed=7, exclude=pretrain
  )
  seen = set()
  for episode in sampler.take(50):
    seen |= set(episode.classes.tolist())
  assert seen <= set(held_out.tolist()) and len(seen) == 6
  np.testing.assert_array_equal(sampler[3].support_x, sampler[3].support_x)
  assert not np.array_equal(sampler[3].classes, sampler[4].classes) or not np.array_equal(
    sampler[3].support_x, sampler[4].support_x
  )
  with pytest.raises(ValueError, match="excluded"):
    fewshot.EpisodeSampler(data, [3, 4, 5], num_ways=2, num_shots=1, num_queries=1, exclude=[3])
  with pytest.raises(ValueError, match="fewer than"):
    fewshot.EpisodeSampler(data, held_out, num_ways=2, num_shots=5, num_queries=5)
  with pytest.raises(ValueError, match="only 6 classes"):
    fewshot.EpisodeSampler(data, held_out, num_ways=7, num_shots=1, num_queries=1)


def test_prototypes_and_logits_by_hand():
  embeddings = jnp.array([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0], [1.0, 1.0]])
  labels = jnp.array([0, 0, 1, 1])
  centers = fewshot.prototypes(embeddings, labels, 2)
  np.testing.assert_allclose(centers, [[1.0, 0.0], [0.5, 2.5]])
  query = jnp.array([[1.0, 2.0]])
  # ||(1,2)-(1,0)||² = 4, ||(1,2)-(0.5,2.5)||² = 0.5.
  np.testing.assert_allclose(fewshot.protonet_logits(query, centers), [[-4.0, -0.5]])
  head = fewshot.prototype_head(centers)
  linear = query @ head["kernel"] + head["bias"]
  # The linear form differs from the ProtoNet logits by ||f||² = 5, the same for every class.
  np.testing.assert_allclose(linear, [[-4.0 + 5.0, -0.5 + 5.0]], rtol=1e-6)
  # A temperature divides every logit; ||(1,0)-(0.5,2.5)||² = 6.5 for the one pair, both ways.
  head = fewshot.prototype_head(centers, temperature=2.0)
  np.testing.assert_allclose(query @ head["kernel"] + head["bias"], [[0.5, 2.25]], rtol=1e-6)
  assert float(fewshot.mean_prototype_distance(centers)) == pytest.approx(6.5)


def _tiny_cnn(num_classes, quant):
  return models.SmallCNN(features=(4,), hidden=8, num_classes=num_classes, quant=quant)


@pytest.fixture(scope="module")
def toy_episode():
  rng = np.random.default_rng(0)
  x = rng.uniform(size=(3 * 5, 8, 8, 1)).astype(np.float32)
  y = np.repeat(np.arange(3), 5).astype(np.int32)
  data = fdata.Dataset(x=x, y=y, num_classes=3, name="toy")
  episode = fewshot.sample_episode(data, [0, 1, 2], num_ways=3, num_shots=2, num_queries=3, rng=rng)
  pretrained = _tiny_cnn(3, None).init(jax.random.key(1), jnp.asarray(x[:1]))
  return episode, pretrained


def test_zero_shot_learner_is_the_protonet(toy_episode):
  episode, pretrained = toy_episode
  learner = fewshot.EpisodeLearner(
    _tiny_cnn, pretrained, fewshot.FinetuneConfig("none"), 3, example_shape=(8, 8, 1)
  )
  model = _tiny_cnn(3, None)
  features = lambda x: fewshot.embed(model, pretrained, jnp.asarray(x))  # noqa: E731
  centers = fewshot.prototypes(features(episode.support_x), jnp.asarray(episode.support_y), 3)
  predicted = np.argmax(fewshot.protonet_logits(features(episode.query_x), centers), -1)
  expected = float(np.mean(predicted == episode.query_y))
  assert learner(episode)["zero_shot"] == pytest.approx(expected)


@pytest.mark.parametrize(
  "method, precision, trainable",
  [("backprop", "float32", "full"), ("sign_spsa", "w8a8", "linear_probe")],
)
def test_learner_runs_and_reports(toy_episode, method, precision, trainable):
  episode, pretrained = toy_episode
  config = fewshot.FinetuneConfig(
    method, precision, trainable, steps=2, learning_rate=1e-2, epsilon=0.05
  )
  learner = fewshot.EpisodeLearner(_tiny_cnn, pretrained, config, 3, example_shape=(8, 8, 1))
  result = learner(episode, seed=0)
  assert set(result) == {"zero_shot", "accuracy", "final_loss"}
  assert 0.0 <= result["accuracy"] <= 1.0 and np.isfinite(result["final_loss"])


def test_learner_compiles_once_across_episodes_and_seeds(toy_episode):
  # Compile time dominates a row of the study (minutes for a ResNet sign-m-SPSA row, ~1 s an
  # episode after it): episodes, prototypes, grid steps and a rebound backbone are arguments, so
  # the episode function compiles once per setting (as optax tests "no recompilation").
  episode, pretrained = toy_episode
  config = fewshot.FinetuneConfig("sign_spsa", "w8a8", "full", steps=2, epsilon=0.05)
  learner = fewshot.EpisodeLearner(_tiny_cnn, pretrained, config, 3, example_shape=(8, 8, 1))
  learner(episode, seed=0)
  other = episode._replace(support_x=episode.support_x[::-1], query_x=episode.query_x[::-1])
  learner(other, seed=1)
  learner.rebind(jax.tree.map(lambda a: a * 1.1, pretrained))
  learner(episode, seed=2)
  assert learner._run._cache_size() == 1


def test_finetune_config_validates():
  with pytest.raises(ValueError, match="method"):
    fewshot.FinetuneConfig("adam")
  with pytest.raises(ValueError, match="needs float weights"):
    fewshot.FinetuneConfig("backprop", "w8a8")


def test_mean_confidence_interval():
  mean, half = fewshot.mean_confidence_interval([0.0, 1.0, 0.0, 1.0])
  assert mean == 0.5 and half == pytest.approx(1.96 * np.std([0, 1, 0, 1], ddof=1) / 2)


def test_random_shift_keeps_the_ink():
  image = np.zeros((1, 8, 8, 1), np.float32)
  image[0, 3:5, 3:5] = 1.0
  shifted = fewshot.random_shift(jnp.asarray(image), jax.random.key(0), 2)
  assert shifted.shape == image.shape and float(shifted.sum()) == 4.0


def test_random_shift_edge_padding_keeps_a_uniform_background_uniform():
  # A grey (corrupted) background: zero padding would draw a black frame, edge padding does not.
  image = jnp.full((4, 8, 8, 1), 0.3)
  edge = fewshot.random_shift(image, jax.random.key(0), 2, padding="edge")
  np.testing.assert_allclose(edge, image)
  zeros = fewshot.random_shift(image, jax.random.key(0), 2)
  assert float(zeros.min()) == 0.0  # some image moved: a zero border came in
  with pytest.raises(ValueError, match="shift_padding"):
    fewshot.FinetuneConfig(shift_padding="reflect")


def test_omniglot_tfds_needs_tensorflow_and_says_so():
  try:
    import tensorflow_datasets  # noqa: F401

    pytest.skip("TensorFlow Datasets is installed; this test checks the message without it.")
  except ImportError:
    pass
  with pytest.raises(ImportError, match="pip install"):
    fdata.omniglot_tfds("test", download=False)


def _study_script():
  import importlib.util
  import pathlib

  path = pathlib.Path(__file__).resolve().parents[2] / "scripts/fewshot_study.py"
  spec = importlib.util.spec_from_file_location("fewshot_study", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_study_corruption_shifts_support_and_queries_only(toy_episode):
  # The cross-domain setting: the same episode (classes, labels, shapes), images corrupted, the
  # same draw on every call (so every row of a run meets the same shifted episode).
  study = _study_script()
  episode, _ = toy_episode
  args = study.parse_args(["--corruption", "impulse_noise:5"])
  first, again = study.shifted(episode, 7, args), study.shifted(episode, 7, args)
  for name in ("support_x", "query_x"):
    assert getattr(first, name).shape == getattr(episode, name).shape
    assert not np.allclose(getattr(first, name), getattr(episode, name))
    np.testing.assert_array_equal(getattr(first, name), getattr(again, name))
  np.testing.assert_array_equal(first.support_y, episode.support_y)
  np.testing.assert_array_equal(first.query_y, episode.query_y)
  assert study.setting_label("5w1s", args) == "5w1s+impulse_noise5"
  clean = study.parse_args([])
  assert study.shifted(episode, 7, clean) is episode
  assert study.setting_label("5w1s", clean) == "5w1s"
