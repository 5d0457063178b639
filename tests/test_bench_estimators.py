"""scripts/bench_estimators.py's PyTorch anchor rows and table: parsed from the anchor's JSON lines,
time only (PyTorch reports no memory on CPU), a failed anchor loses no fgjax row."""

import importlib.util
import json
import math
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
  path = ROOT / "scripts/bench_estimators.py"
  spec = importlib.util.spec_from_file_location("bench_estimators", path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # Its Flax modules are dataclasses: they look their module up.
  spec.loader.exec_module(module)
  yield module
  del sys.modules[spec.name]


def _fake_anchor(folder: pathlib.Path, body: str) -> str:
  (folder / "mezo_torch_bench.py").write_text(body)
  return str(folder)


def test_torch_rows_are_ratios_to_pytorchs_own_forward(bench, tmp_path):
  row = {"model": "resnet18", "batch": 8, "params_M": 11.17, "forward_ms": 10.0}
  row |= {"mezo_time_x": 2.5, "bp_time_x": 3.0}
  anchors = _fake_anchor(tmp_path, f"print('warming up')\nprint({json.dumps(row)!r})\n")
  rows = bench.torch_mezo(sys.executable, anchors, ["mlp", "resnet18"], [8], 1, log=lambda _: None)
  by_step = {r["step"]: r for r in rows}
  assert set(by_step) == {"torch_forward", "torch_mezo", "torch_backprop"}
  assert by_step["torch_mezo"]["model"] == "ResNet18 (PyTorch)"
  assert by_step["torch_mezo"]["time_ms"] == pytest.approx(25.0)
  assert by_step["torch_backprop"]["time_x"] == 3.0
  assert math.isnan(by_step["torch_mezo"]["total_MiB"])
  table = bench.markdown(rows)
  assert "| ResNet18 (PyTorch) | 8 | torch_mezo | 25.0 | 2.50 | - | - | - | - | - |" in table


def test_a_failed_anchor_adds_no_rows_and_says_why(bench, tmp_path):
  anchors = _fake_anchor(tmp_path, "raise SystemExit('no module named torch')\n")
  said = []
  rows = bench.torch_mezo(sys.executable, anchors, ["vit"], [8], 1, log=said.append)
  assert rows == []
  assert "no module named torch" in said[-1]
  # Models without a PyTorch twin run nothing.
  assert bench.torch_mezo(sys.executable, anchors, ["mlp", "cnn"], [8], 1, log=said.append) == []
