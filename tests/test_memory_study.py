"""scripts/memory_study.py on a tiny conv net: rows compile, buffers add up, and the memory claim
it pictures holds (a forward-gradient step needs less scratch than backprop when activations
dominate)."""

import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def study():
  spec = importlib.util.spec_from_file_location("memory_study", ROOT / "scripts/memory_study.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_spsa_step_needs_less_scratch_than_backprop_on_a_conv_net(study, tmp_path):
  # Wide activations (32x32 maps, batch 16), few weights: backprop keeps every activation for the
  # backward pass, SPSA runs forwards only.
  spec = study.ModelSpec("tiny", "SmallCNN", "small_cnn", {}, (16, 32, 32, 3))
  backprop = study.step_memory(spec, "backprop", "float32", "full", num_directions=2)
  spsa = study.step_memory(spec, "spsa", "float32", "full", num_directions=2)
  assert spsa["temp_bytes"] < 0.5 * backprop["temp_bytes"]
  for row in (backprop, spsa):
    assert row["trainable_params"] == row["params"] > 0
    assert row["weights_bytes"] == 4 * row["params"]  # float32 weights
    assert row["inference_temp_bytes"] <= row["temp_bytes"]
  rows = [backprop, spsa]
  table = study.ratio_table([{**r, "model": "mlp"} for r in rows])
  assert "x |" in table


def test_grid_puts_the_core_rows_first_and_prompts_only_for_vits(study):
  vit = study.grid(study.SPECS["vit_base"], "core")
  assert vit[:2] == [("backprop", "float32", "full"), ("spsa", "float32", "full")]
  assert ("spsa", "float32", "prompts") in vit
  assert not any(subset == "prompts" for _, _, subset in study.grid(study.SPECS["mlp"], "full"))
