"""`train_and_evaluate(config, workdir)`: backprop pretraining, or last-mile adaptation.

`config.mode == "pretrain"`: float backprop on the source domain. `config.mode == "adapt"`: loads
the pretrained checkpoint of `config.adapt.pretrained` (a pretraining workdir), converts it to
`config.adapt.precision` (integer kernels with `weight_storage="integer"`), and adapts on the few
target examples with `config.adapt.method` (backprop, jvp, spsa, sign_spsa).

The jobs live in their own modules: `validation` (every flag, before anything), `build` (data,
model, checkpoints to start from: `prepare`), `checkpoints` (trusted Orbax steps), `reporting`
(progress line, metrics, plot, table); this module is the run loop. Both modes resume from the
workdir's latest good checkpoint and then end exactly as an uninterrupted run: the data order is a
function of (seed, step) and all randomness lives in the checkpointed state.

Non-finite guard: each step reports whether its loss and new parameters are finite. With
`config.nonfinite="stop"` (default) the run stops with `TrainingDiverged` at the first bad step,
before any checkpoint of it; with "skip" that update is dropped (the step still counts).
"""

from __future__ import annotations

import json
import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments import checkpoints as ckpt
from experiments import reporting
from experiments.build import Plan, _model, prepare
from experiments.reporting import summary_table  # noqa: F401  (re-exported for the binaries)
from experiments.validation import ConfigError  # noqa: F401  (re-exported for the binaries)
from fgjax import training


class TrainingDiverged(RuntimeError):
  """The loss or the parameters became NaN or infinite (`config.nonfinite="stop"`)."""


def _batch(data, batch_size: int, seed: int, step: int):
  from fgjax.data import Batch

  index = training.batch_indices(len(data), batch_size, seed, step)
  return Batch(x=data.x[index], y=data.y[index])


def _evaluate(model, params, model_state, data, batch_size) -> dict:
  return training.evaluate(
    training.make_eval_step(model), params, model_state, data.x, data.y, batch_size
  )


def _all_finite(tree) -> jax.Array:
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else True


def _saturated_fraction(params, mask) -> jax.Array | None:
  """The fraction of trainable integer weights at their grid's limit ±(2^{b-1} - 1)."""
  leaves = jax.tree.leaves(params)
  flags = jax.tree.leaves(mask) if mask is not None else [True] * len(leaves)
  at_limit = total = 0
  for leaf, on in zip(leaves, flags, strict=True):
    if on and jnp.issubdtype(leaf.dtype, jnp.integer):
      limit = 2 ** (jnp.iinfo(leaf.dtype).bits - 1) - 1
      at_limit = at_limit + jnp.sum(jnp.abs(leaf.astype(jnp.int32)) >= limit)
      total += leaf.size
  return at_limit / total if total else None


def make_guarded_step(model, optimizer, *, skip_nonfinite: bool, mask=None, **kwargs):
  """`training.train_step`, jitted with the state donated, plus health metrics: `finite` (loss and
  new parameters and model state all finite), and `saturated_fraction` for integer weights. With
  `skip_nonfinite` a non-finite update is dropped: the state stays, only the step advances."""

  def step(state, batch):
    new, metrics = training.train_step(state, batch, model=model, optimizer=optimizer, **kwargs)
    finite = jnp.isfinite(metrics["loss"]) & _all_finite((new.params, new.model_state))
    if skip_nonfinite:
      keep = lambda a, b: jnp.where(finite, a, b)
      new = new.replace(
        params=jax.tree.map(keep, new.params, state.params),
        model_state=jax.tree.map(keep, new.model_state, state.model_state),
        opt_state=jax.tree.map(keep, new.opt_state, state.opt_state),
      )
    metrics = {**metrics, "finite": finite}
    saturated = _saturated_fraction(new.params, mask)
    if saturated is not None:
      metrics["saturated_fraction"] = saturated
    return new, metrics

  return jax.jit(step, donate_argnums=0)


def _backprop_reference_memory(plan: Plan, batch) -> dict | None:
  """Peak memory of a backprop step on the same model, trainable subset and precision (float
  weights, fake quantization, when the run itself stores integer weights)."""
  config = plan.config
  adapt = config.adapt.copy_and_resolve_references()
  adapt.method = "backprop"
  adapt.m_schedule = ""  # Backprop has no directions to schedule.
  quant = None
  if adapt.precision != "float32":
    from fgjax import quant as fq

    quant = fq.preset(adapt.precision)
  model = _model(config, quant)
  variables = dict(plan.info["pretrained_float_variables"])
  params = variables.pop("params")
  mask = training.trainable_mask(params, adapt.trainable, last_k=int(adapt.last_k))
  optimizer = training.make_optimizer(adapt, mask=mask, forward=True, seed=config.seed)
  # Shapes only: nothing is computed, and the run's (donated) buffers are never touched.
  state = jax.eval_shape(
    lambda p, v: training.TrainState.create(p, v, optimizer, jax.random.key(0)), params, variables
  )
  step = training.make_train_step(model, optimizer, update_batch_stats=False)
  return training.memory_stats(step, state, batch)


def _eval_scalars(plan: Plan, state, eval_batch: int) -> dict:
  source = _evaluate(plan.model, state.params, state.model_state, plan.task.source_test, eval_batch)
  target = _evaluate(plan.model, state.params, state.model_state, plan.task.target_test, eval_batch)
  return {
    "eval/source_accuracy": source["accuracy"],
    "eval/target_accuracy": target["accuracy"],
    "eval/source_loss": source["loss"],
    "eval/target_loss": target["loss"],
  }


def run(plan: Plan, progress: reporting.Progress | None = None) -> dict:
  """Trains, checkpoints, logs, evaluates; returns the summary (also written to the workdir)."""
  config, workdir = plan.config, plan.workdir
  progress = progress or reporting.Progress(config.mode)
  for note in plan.notes:
    progress.close()
    print(note, file=sys.stderr)
  section = config.pretrain if config.mode == "pretrain" else config.adapt
  total_steps = int(section.steps)
  if plan.complete is not None:
    progress.close()
    print(
      f"already complete: {str(workdir)!r} holds the final step {total_steps} and its summary "
      "(kept as it is; nothing was run).",
      file=sys.stderr,
    )
    return plan.complete
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
  requested_batch = int(section.batch_size)
  batch_size = min(requested_batch, len(plan.train_data))
  if batch_size < requested_batch:
    progress.close()
    print(
      f"note: --config.{config.mode}.batch_size={requested_batch} is more than the "
      f"{len(plan.train_data)} training examples; using batches of {batch_size}.",
      file=sys.stderr,
    )
  eval_batch = int(config.eval_batch_size)
  eval_every = int(config.eval_every)
  task = plan.task
  store = ckpt.Checkpoints(workdir / "checkpoints", create=True)

  state = plan.state
  if plan.resume is not None:
    resume_step, tree, corrupt = plan.resume
    state = ckpt.from_savable(tree, plan.state)
    progress.close()
    if corrupt:
      aside = workdir / "corrupt_checkpoints"
      store.set_aside(corrupt, aside)
      print(f"Moved the corrupt steps {corrupt} to {str(aside)!r}.", file=sys.stderr)
    print(f"Resuming from the checkpoint of step {resume_step}.", file=sys.stderr)
  start = int(state.step)
  mask = plan.info.get("mask")

  writer = reporting.MetricWriter(workdir, plan.resume[0] if plan.resume else None)
  zero_shot = zero_shot_float = None
  try:
    progress.phase("evaluating the starting model")
    if config.mode == "adapt":
      float_model = _model(config, None)
      pre = dict(plan.info["pretrained_float_variables"])
      pre_params = pre.pop("params")
      zero_shot_float = _evaluate(float_model, pre_params, pre, task.target_test, eval_batch)
      zero_shot = _evaluate(
        plan.model, plan.state.params, plan.state.model_state, task.target_test, eval_batch
      )
    if start == 0:
      writer.write(0, _eval_scalars(plan, state, eval_batch))
    progress.phase("compiling the training step")
    step_fn = make_guarded_step(
      plan.model,
      plan.optimizer,
      skip_nonfinite=config.nonfinite == "skip",
      mask=mask,
      **plan.step_kwargs,
    )
    first_batch = _batch(plan.train_data, batch_size, config.seed, 0)
    # Compiled once, ahead of time: the same executable gives the memory estimate and runs steps.
    step_fn, memory = training.compile_with_memory(step_fn, state, first_batch)

    progress.start_steps(total_steps, start)
    stop_at = int(config.stop_after)
    begin = time.time()
    skipped = 0
    moved = []  # fixed point: the fraction of integer weights each step moved (kept on device)
    used_m = []  # m schedules: the m each step of this process used (kept on device)
    warned_saturation = False
    last_saved = plan.resume[0] if plan.resume else None
    last_eval = None
    for step in range(start, total_steps):
      if stop_at and step >= stop_at:
        # Simulated interruption (tests): leave without saving, as a killed process would.
        store.wait()
        raise KeyboardInterrupt(f"stopped at step {step} (config.stop_after)")
      batch = _batch(plan.train_data, batch_size, config.seed, step)
      state, metrics = step_fn(state, batch)
      if "changed_fraction" in metrics:
        moved.append(metrics["changed_fraction"])
      if "num_directions" in metrics:
        used_m.append(metrics["num_directions"])
      done = step + 1
      if not bool(metrics["finite"]):
        if config.nonfinite == "stop":
          progress.close()
          loss = float(metrics["loss"])
          kept = f"step {last_saved}" if last_saved is not None else "none"
          raise TrainingDiverged(
            f"step {done}: the loss ({loss}) or the parameters became non-finite; the run is "
            f"stopped and this state was not saved (last checkpoint: {kept}). Lower "
            f"--config.{config.mode}.optimizer_kwargs.learning_rate, or "
            "--config.nonfinite=skip to drop such updates."
          )
        skipped += 1
      log_now = done % int(config.log_every) == 0 or done == total_steps
      record = {}
      if log_now:
        record = {k: v for k, v in jax.device_get(metrics).items() if k != "finite"}
        if config.nonfinite == "skip":
          record["skipped_updates"] = skipped
        saturated = record.get("saturated_fraction")
        if saturated is not None and saturated > config.saturation_warning:
          if not warned_saturation:
            progress.close()
            print(
              f"warning: step {done}: {100 * saturated:.1f} % of the trainable integer weights "
              f"sit at their grid's limit (> {100 * config.saturation_warning:.1f} %); the "
              "learning rate or epsilon may be too large.",
              file=sys.stderr,
            )
            warned_saturation = True
      if (eval_every and done % eval_every == 0) or done == total_steps:
        last_eval = _eval_scalars(plan, state, eval_batch)
        record.update(last_eval)
      if record:
        writer.write(done, record)
      if log_now:
        extra = ""
        if last_eval is not None:
          extra = f" target acc {100 * last_eval['eval/target_accuracy']:.1f} %"
        progress.update(done, float(record["loss"]), extra)
      if done % int(config.checkpoint_every) == 0 or done == total_steps:
        try:
          store.save(done, state, config)
        except ckpt.NonFiniteState as error:  # E.g. an optimizer moment (the guard sees params).
          progress.close()
          raise TrainingDiverged(f"step {done}: {error}; the run is stopped.") from None
        last_saved = done
    progress.close()
    store.wait()
    seconds = time.time() - begin
  finally:
    writer.close()
    store.wait()  # Saves in flight finish (they are finite) even when the run stops.

  if last_eval is None:  # Resumed at the final step, before the summary was written.
    last_eval = _eval_scalars(plan, state, eval_batch)
  summary = {k: v for k, v in plan.info.items() if k not in ("pretrained_float_variables", "mask")}
  summary.update(
    steps=total_steps,
    batch_size=batch_size,
    batch_size_requested=requested_batch,
    precision=config.adapt.precision if config.mode == "adapt" else "float32",
    train_examples=len(plan.train_data),
    seconds_this_run=round(seconds, 2),
    memory_bytes=memory,
    nonfinite=config.nonfinite,
    skipped_updates=skipped,
  )
  source, target = last_eval["eval/source_accuracy"], last_eval["eval/target_accuracy"]
  if config.mode == "pretrain":
    summary.update(source_accuracy=source, target_zero_shot_accuracy=target)
  else:
    passes = training.forward_passes_per_step(config.adapt)
    total_passes = {k: v * total_steps for k, v in passes.items()}
    num_directions = int(config.adapt.num_directions)
    if config.adapt.m_schedule:
      # The m each step used (this process's steps; a resumed run counts only those).
      ms = [int(m) for m in np.asarray(jax.device_get(used_m)).reshape(-1)]
      per_step = [training.forward_passes_per_step(config.adapt, m) for m in ms]
      total_passes = {k: sum(p[k] for p in per_step) for k in passes}
      passes = {k: v / max(len(ms), 1) for k, v in total_passes.items()}  # The mean.
      num_directions = ms[-1] if ms else num_directions
      summary.update(m_schedule=config.adapt.m_schedule, num_directions_used=ms)
    summary.update(
      zero_shot_accuracy_float32=zero_shot_float["accuracy"],
      zero_shot_accuracy=zero_shot["accuracy"],
      adapted_accuracy=target,
      source_accuracy_after=source,
      passes_per_step=passes,
      total_passes=total_passes,
      num_directions=num_directions,
    )
    if moved:
      # The paper's w8a8 stall in one number: the share of steps x weights that did not move.
      changed = float(jnp.mean(jnp.stack(moved)))
      summary.update(rounding=config.adapt.rounding, zero_update_rate=1.0 - changed)
    if config.adapt.compare_backprop_memory:
      summary["backprop_memory_bytes"] = _backprop_reference_memory(plan, first_batch)
  summary = _finite_json(summary)
  png = workdir / "curves.png"
  reporting.plot_curves(workdir / "metrics.jsonl", png, f"{config.mode}: {workdir.name}")
  summary["curves_png"] = png.name
  (workdir / "summary.md").write_text(summary_table([summary]) + f"\n\n![curves]({png.name})\n")
  # Written last: its presence marks the workdir complete.
  (workdir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
  store.close()
  return summary


def _finite_json(value):
  """NaN/inf as strings: summary.json stays valid JSON."""
  if isinstance(value, dict):
    return {k: _finite_json(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_finite_json(v) for v in value]
  if isinstance(value, (float, np.floating)) and not math.isfinite(value):
    return str(float(value))
  return value


def train_and_evaluate(config, workdir: str) -> dict:
  """Validates and prepares (`build.prepare`, raises ConfigError before writing anything), then
  `run`s, with a progress line on stderr from the first second."""
  progress = reporting.Progress(config.get("mode", "run"))
  try:
    plan = prepare(config, workdir, progress.phase)
  finally:
    progress.close()
  return run(plan, progress)
