"""The binaries end to end on tiny data: every config, resuming bitwise after a kill (pretraining
with Adam and batch statistics, fixed-point adaptation), corrupt checkpoints, divergence."""

import io
import json
import pathlib
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from experiments import build, cli, reporting, train
from experiments import checkpoints as ckpt
from experiments.configs import digits_demo, fsdd_speaker, mnist_shift
from fgjax import training
from tests.experiments.conftest import adapt_config, digits_config, tiny

pytestmark = pytest.mark.usefixtures("compilation_cache")


@pytest.mark.parametrize(
  "module", [digits_demo, mnist_shift, fsdd_speaker], ids=lambda m: m.__name__
)
def test_config_runs_two_steps(module, data_dir, tmp_path):
  config = tiny(module.get_config())
  config.eval_every = 1
  config.data.shots = 1
  config.adapt.num_directions = 1
  # The backprop memory reference is one more compile; the digits run checks it.
  config.adapt.compare_backprop_memory = config.data.name == "digits"
  if config.data.name == "mnist":
    config.data.folder = str(data_dir / "mnist")
    config.data.num_source = 40
  elif config.data.name == "fsdd":
    config.data.folder = str(data_dir / "fsdd" / "recordings")
    config.data.num_samples = 800
    config.data.num_mels = 16
  else:
    config.data.limit = 200
    config.adapt.batch_size = 16  # More than the 10 adaptation examples: capped, and said so.
  summary = train.train_and_evaluate(config, str(tmp_path / "pre"))
  assert summary["steps"] == 2 and 0.0 <= summary["source_accuracy"] <= 1.0
  config.mode = "adapt"
  config.adapt.pretrained = str(tmp_path / "pre")
  summary = train.train_and_evaluate(config, str(tmp_path / "adapt"))
  assert summary["steps"] == 2
  assert summary["batch_size"] == min(config.adapt.batch_size, summary["train_examples"])
  assert summary["batch_size_requested"] == config.adapt.batch_size
  assert summary["total_passes"]["forward"] == 2 * 2 * 1  # central SPSA: 2K per step
  assert summary["memory_bytes"]["total"] > 0
  if config.adapt.compare_backprop_memory:
    assert summary["backprop_memory_bytes"]["total"] > 0
  for name in ("summary.json", "summary.md", "metrics.jsonl", "config.json", "curves.png"):
    assert (tmp_path / "adapt" / name).is_file()
  assert list((tmp_path / "adapt" / "tensorboard").iterdir())
  # Eval accuracy curves, source and target, at step 0, every eval_every steps and at the end.
  records = [json.loads(line) for line in (tmp_path / "adapt" / "metrics.jsonl").open()]
  evals = [
    r["step"] for r in records if "eval/target_accuracy" in r and "eval/source_accuracy" in r
  ]
  assert evals == [0, 1, 2]
  assert summary["adapted_accuracy"] == records[-1]["eval/target_accuracy"]
  assert all("saturated_fraction" in r for r in records if "loss" in r)  # Integer weights.
  # The summary says how many integer updates rounded away (the w8a8 stall, issue 8).
  assert 0.0 <= summary["zero_update_rate"] <= 1.0
  assert "% zero updates" in (tmp_path / "adapt" / "summary.md").read_text()


def _final_state(workdir):
  store = ckpt.Checkpoints(pathlib.Path(workdir) / "checkpoints")
  return store.restore(store.steps()[0])[0]


def _assert_bitwise_equal(a, b):
  a, b = ckpt._flat(a), ckpt._flat(b)
  assert sorted(a) == sorted(b)
  for path in a:
    assert a[path].dtype == b[path].dtype, path
    np.testing.assert_array_equal(np.asarray(a[path]), np.asarray(b[path]), err_msg=path)


def _resume_config(mode, pretrained):
  if mode == "adapt":
    # Fixed-point sign-m-SPSA with stochastic rounding: the perturbation key and the rounding key
    # (both in the optimizer state) have to come back from the checkpoint.
    config = adapt_config(pretrained)
    assert config.adapt.weight_storage == "integer" and config.adapt.rounding == "stochastic"
    config.adapt.steps = 5
  else:
    # Adam (two moments and a count in the optimizer state) on a model with batch statistics.
    config = digits_config()
    assert config.pretrain.optimizer == "adam"
    config.model.name = "crnn"
    config.pretrain.steps = 5
  config.checkpoint_every = 2
  return config


@pytest.mark.parametrize("mode", ["pretrain", "adapt"])
def test_interrupted_run_resumes_bitwise(mode, pretrained, tmp_path):
  config = _resume_config(mode, pretrained)
  train.train_and_evaluate(config, str(tmp_path / "straight"))
  interrupted = config.copy_and_resolve_references()
  interrupted.stop_after = 3  # Killed after step 3; the last checkpoint is step 2.
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(interrupted, str(tmp_path / "resumed"))
  assert ckpt.Checkpoints(tmp_path / "resumed" / "checkpoints").steps()[0] == 2
  if mode == "pretrain":  # Adapting from the unfinished pretraining is allowed, with a warning.
    adapt = adapt_config(tmp_path / "resumed")
    adapt.model.name = config.model.name
    plan = build.prepare(adapt, str(tmp_path / "adapt_unused"))
    assert any("step 2 of a pretraining planned for 5 steps" in note for note in plan.notes)
  summary = train.train_and_evaluate(config, str(tmp_path / "resumed"))
  assert summary["steps"] == 5
  straight, resumed = _final_state(tmp_path / "straight"), _final_state(tmp_path / "resumed")
  if mode == "pretrain":
    assert "batch_stats" in straight["model_state"]
    assert any(".mu." in key for key in straight["opt_state"])  # Adam's first moment, by path.
  _assert_bitwise_equal(straight, resumed)
  records = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").open()]
  assert [r["step"] for r in records] == [0, 1, 2, 3, 4, 5]


def test_rerun_of_a_finished_workdir_says_complete(adapted, pretrained, capsys):
  before = (adapted / "summary.json").read_text()
  summary = train.train_and_evaluate(adapt_config(pretrained), str(adapted))
  assert "already complete" in capsys.readouterr().err
  assert (adapted / "summary.json").read_text() == before
  assert summary == json.loads(before)


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(adapted, pretrained, tmp_path):
  workdir = tmp_path / "adapted"
  shutil.copytree(adapted, workdir)
  final = _final_state(workdir)
  # Step 2 rewritten with one weight changed by one grid step but its original record: Orbax
  # reads it fine (as after a same-size byte flip in the array data), only the checksum can tell.
  store = ckpt.Checkpoints(workdir / "checkpoints")
  tree, record = store.restore(2)
  store.close()
  tree = jax.tree.map(np.array, tree)
  weight = max(ckpt._flat(tree["params"]).values(), key=np.size)
  weight.reshape(-1)[0] += 1
  shutil.rmtree(workdir / "checkpoints" / "2")
  options = ocp.CheckpointManagerOptions(create=True)
  with ocp.CheckpointManager(workdir / "checkpoints", options=options) as manager:
    args = ocp.args.Composite(state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(record))
    manager.save(2, args=args)
  with pytest.raises(ckpt.CorruptCheckpoint, match="checksum"):
    ckpt.Checkpoints(workdir / "checkpoints").restore(2)
  warnings = []
  step, _, _, corrupt = ckpt.Checkpoints(workdir / "checkpoints").latest_good(warnings.append)
  assert step == 1 and corrupt == [2] and "checksum" in warnings[0]
  assert "falling back to checkpoint step 1" in warnings[1]
  summary = train.train_and_evaluate(adapt_config(pretrained), str(workdir))
  assert summary["steps"] == 2
  assert len(list((workdir / "corrupt_checkpoints").iterdir())) == 1  # Kept for inspection.
  # Step 2 recomputed from step 1 is the step 2 that was lost.
  _assert_bitwise_equal(final, _final_state(workdir))


def test_diverging_run_exits_nonzero_and_saves_nothing_nonfinite(tmp_path, capsys):
  config = digits_config()
  config.pretrain.steps = 4
  config.pretrain.optimizer = "sgd"
  config.pretrain.optimizer_kwargs.learning_rate = 1e12
  workdir = tmp_path / "diverged"
  with pytest.raises(SystemExit) as exit_info:
    cli.run_or_exit(config, str(workdir))
  assert exit_info.value.code == cli.EXIT_DIVERGED
  error = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
  assert len(error) == 1 and "non-finite" in error[0], error
  store = ckpt.Checkpoints(workdir / "checkpoints")
  for step in store.steps():
    tree, _ = store.restore(step)  # Raises CorruptCheckpoint on a NaN or an infinity.
    assert not ckpt.nonfinite_leaves(tree)
  assert not (workdir / "summary.json").exists()
  # Whatever the guard misses (it watches the loss and the parameters), saving refuses.
  nan_state = training.TrainState(
    step=jax.numpy.int32(1),
    params={"w": jax.numpy.array([np.nan])},
    model_state={},
    opt_state=(),
    rng=jax.random.key(0),
  )
  with pytest.raises(ckpt.NonFiniteState):
    ckpt.Checkpoints(tmp_path / "never", create=True).save(1, nan_state, config)
  assert not (tmp_path / "never").exists() or not list((tmp_path / "never").iterdir())
  # Adapting from it is refused only if it saved something non-finite; with `skip` the run ends.
  config.nonfinite = "skip"
  summary = train.train_and_evaluate(config, str(tmp_path / "skipped"))
  assert summary["skipped_updates"] >= 1
  assert not ckpt.nonfinite_leaves(_final_state(tmp_path / "skipped"))


class _Terminal(io.StringIO):
  def isatty(self):
    return True


def test_progress_line_redraws_cleanly():
  stream = _Terminal()
  progress = reporting.Progress("adapt", stream)
  progress.phase("compiling the training step, which takes a while")
  progress.start_steps(total=10, start=0)
  progress.update(1, 2.5)
  progress.close()
  frames = stream.getvalue().split("\r")[1:]
  assert frames[0].startswith("adapt: compiling") and "loss 2.5000" in frames[1]
  # The shorter step line covers every character of the longer phase line.
  assert len(frames[1].rstrip("\n")) >= len(frames[0])
  assert stream.getvalue().endswith("\n")


def test_nonfinite_guard_costs_no_step_memory(pretrained):
  # The guard (finiteness and saturation reductions) must not change the memory the step is
  # compared by: XLA's estimate of temp memory, guarded vs plain `training.make_train_step`.
  plan = build.prepare(adapt_config(pretrained), str(pretrained.parent / "unused_workdir"))
  batch = train._batch(plan.train_data, 8, 0, 0)
  plain = training.make_train_step(plan.model, plan.optimizer, **plan.step_kwargs)
  guarded = train.make_guarded_step(
    plan.model, plan.optimizer, skip_nonfinite=False, mask=plan.info["mask"], **plan.step_kwargs
  )
  plain_memory = training.memory_stats(plain, plan.state, batch)
  guarded_memory = training.memory_stats(guarded, plan.state, batch)
  assert guarded_memory["temp"] <= plain_memory["temp"] * 1.01 + 1024
  assert guarded_memory["total"] <= plain_memory["total"] * 1.01 + 1024


def test_adaptation_runs_an_m_schedule(pretrained, tmp_path):
  # Issue 9: `--config.adapt.m_schedule` reaches the binary's step (it used to find only
  # ForwardGradientState); fixed-point sign-m-SPSA with m = 1, then m = 2 from step 1.
  config = adapt_config(pretrained)
  assert config.adapt.weight_storage == "integer"
  config.adapt.m_schedule = "0:1,1:2"
  summary = train.train_and_evaluate(config, str(tmp_path / "adapt"))
  assert summary["num_directions_used"] == [1, 2]
  assert summary["total_passes"]["forward"] == 2 * 1 + 2 * 2  # central SPSA: 2m per step
  assert summary["m_schedule"] == "0:1,1:2"
  records = [json.loads(line) for line in (tmp_path / "adapt" / "metrics.jsonl").open()]
  assert [r["num_directions"] for r in records if "loss" in r] == [1, 2]
  assert "m 0:1,1:2" in (tmp_path / "adapt" / "summary.md").read_text()
