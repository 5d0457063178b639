"""Directions and data over a device mesh with `shard_map`: K scalars on the wire per step.

Why: a forward-gradient step's whole information is its K directional derivatives, and every
device can regenerate the K directions from the shared key. So splitting the K directions over
devices (direction parallelism) or the batch (data parallelism) needs only scalars to be
communicated, whatever the model size; data-parallel backprop all-reduces a parameter-sized
gradient instead.

How: the estimator's forward calls run inside `jax.shard_map`. The per-direction keys
`split(key, K)` are sharded over the directions axis, so each device evaluates its K / n_dir
directions (the same keys as on one device); the batch (every positional argument after the
parameters) is sharded along its leading dimension over the data axis, and the per-direction losses
and derivatives are averaged over it (`pmean`, as a batch-mean loss is the mean of equal shards'
means); the directions axis then gathers the K-vectors (`all_gather`). Every device then rebuilds
the full estimate from the replicated keys with `fgjax.estimators`' own combine step, so the
result equals the single-device estimate for the same key (to float rounding of the batch mean).

Directions are drawn per global element index (`_perturbation.random_bits` hashes each element's
position in the whole leaf), so parameters may also be sharded (FSDP-style `NamedSharding` over
mesh axes other than the directions and data axes): those axes stay automatic inside the
`shard_map`, XLA partitions the elementwise draw, perturbation and update shard-locally, and no
parameter-sized array is gathered to perturb.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fgjax.estimators import _base, _perturbation
from fgjax.estimators._backprop import Backprop
from fgjax.estimators._jvp import JVP
from fgjax.estimators._spsa import SPSA


@dataclasses.dataclass(frozen=True)
class Sharded:
  """An estimator run over a device mesh; build it with `fgjax.parallel.sharded`."""

  estimator: SPSA | JVP | Backprop
  mesh: Mesh
  directions_axis: str | None = "directions"
  data_axis: str | None = "data"
  param_specs: object = None

  def __call__(self, loss_fn, params, *args, key=None, **kwargs) -> _base.Estimate:
    manual = tuple(a for a in (self.directions_axis, self.data_axis) if a is not None)
    args_spec = jax.tree.map(lambda _: P(self.data_axis), args)

    if isinstance(self.estimator, Backprop):
      # Data-parallel backprop, the baseline: each shard's gradient, all-reduced (parameter-sized).
      def local_backprop(params, args, kwargs):
        estimate = self.estimator(loss_fn, params, *args, **kwargs)
        return jax.tree.map(lambda x: _pmean(x, self.data_axis), estimate)

      return jax.shard_map(
        local_backprop,
        mesh=self.mesh,
        in_specs=(P(), args_spec, P()),
        out_specs=P(),
        axis_names=set(manual),
        check_vma=False,
      )(params, args, kwargs)

    if key is None:
      raise ValueError("key: a PRNG key is required by randomized estimators (jvp, spsa).")
    keys = jax.random.split(key, self.estimator.num_directions)
    keys_spec = P(self.directions_axis)

    def local(params, local_keys, all_keys, args, kwargs):
      problem = _base.Problem.create(params, self.estimator.mask, _scales(self.estimator))
      loss = _base.scalar_loss(loss_fn, problem.to_tree, *args, **kwargs)
      rows = _local_rows(self.estimator, problem, loss, local_keys)
      # Scalars only: per-direction losses and derivatives, averaged over the batch shards ...
      rows = jax.tree.map(lambda x: _pmean(x, self.data_axis), rows)
      # ... and the K-vectors gathered from the devices that evaluated them.
      # A "value" (the loss at w: one-sided SPSA, jvp) is the same on every directions device.
      if self.directions_axis is not None:
        value = rows.pop("value", None)
        rows = jax.tree.map(lambda x: jax.lax.all_gather(x, self.directions_axis, tiled=True), rows)
        if value is not None:
          rows["value"] = value
      return _finish(self.estimator, problem, rows, all_keys)

    estimate = jax.shard_map(
      local,
      mesh=self.mesh,
      in_specs=(P(), keys_spec, P(), args_spec, P()),
      out_specs=P(),
      axis_names=set(manual),
      check_vma=False,
    )(params, keys, keys, args, kwargs)
    if self.param_specs is None:
      return estimate
    # The estimate takes the parameters' sharding: each device combines only its shard (the draw
    # is elementwise in the global index), instead of a replicated parameter-sized gradient.
    shardings = jax.tree.map(
      lambda spec: NamedSharding(self.mesh, spec),
      self.param_specs,
      is_leaf=lambda x: isinstance(x, P),
    )
    grads = jax.lax.with_sharding_constraint(estimate.grads, shardings)
    return estimate._replace(grads=grads)


def _pmean(x, axis):
  return x if axis is None else jax.lax.pmean(x, axis)


def _scales(estimator):
  return getattr(estimator, "scales", None)


def _local_rows(estimator, problem: _base.Problem, loss, keys) -> dict:
  """This device's directions: per-direction losses and derivatives (the estimators' forward part).

  The estimators' own code (`SPSA.directional_losses`, `JVP.direction_fn`) on a slice of the keys.
  """
  chunk = _base.resolve_chunk_size(estimator.chunk_size, keys.shape[0])
  if isinstance(estimator, JVP):
    values, derivatives = _base.map_directions(estimator.direction_fn(problem, loss), keys, chunk)
    return {"value": values[0], "derivatives": derivatives}
  plus, minus = estimator.directional_losses(problem, loss, keys)
  if estimator.central:
    # The value is the mean over all K directions: computed from the gathered losses (see _finish).
    return {"plus": plus, "minus": minus, "derivatives": (plus - minus) / (2.0 * estimator.epsilon)}
  value = minus[0]
  return {"value": value, "plus": plus, "derivatives": (plus - value) / estimator.epsilon}


def _finish(estimator, problem: _base.Problem, rows: dict, keys) -> _base.Estimate:
  """The full estimate from the K gathered derivatives, on every device (replicated)."""
  derivatives = rows["derivatives"]
  if isinstance(estimator, JVP):
    keys = jax.vmap(_perturbation.tie, in_axes=(0, None))(keys, derivatives)
    grads = _base.combine(problem, derivatives, keys, 1.0, estimator.distribution)
    return _base.Estimate(rows["value"], grads, _base.health_metrics(derivatives, derivatives == 0))
  if estimator.central:
    value = jnp.mean((rows["plus"] + rows["minus"]) / 2)
    zero = rows["plus"] == rows["minus"]
  else:
    value = rows["value"]
    zero = rows["plus"] == value
  coefficients = jnp.sign(derivatives) if estimator.sign else derivatives
  grads = _base.combine(
    problem,
    coefficients,
    jax.vmap(_perturbation.tie, in_axes=(0, None))(keys, derivatives),
    estimator.epsilon,
    estimator.distribution,
    scale=estimator.sign_scale if estimator.sign else 1.0,
    central=estimator.central,
  )
  return _base.Estimate(value, grads, _base.health_metrics(derivatives, zero))


def sharded(
  estimator,
  mesh: Mesh,
  *,
  directions_axis: str | None = "directions",
  data_axis: str | None = "data",
  param_specs=None,
) -> Sharded:
  r"""`estimator` with its K directions and its batch split over the axes of a device mesh.

  With n_dir devices on `directions_axis` and n_data on `data_axis`, device (i, j) evaluates
  directions i K/n_dir ... (i + 1) K/n_dir − 1 on batch shard j:

    d_k = (1/n_data) Σ_j d_k^(j)            (pmean over the data axis: a mean loss's shards)
    [d_1 … d_K] = all_gather over the directions axis
    ĝ = (1/K) Σ_k d_k z_k                   (on every device, z_k regenerated from the key)

  So per step the devices exchange O(K) scalars (the K losses and derivatives), never a
  parameter-sized array, and ĝ equals the single-device estimate for the same key (directions are
  drawn per global element index, so it does not depend on the device count). Data-parallel
  `backprop` (the baseline) all-reduces its parameter-sized gradient instead.

  Parameters may be replicated or sharded FSDP-style over mesh axes other than these two (put them
  with `jax.device_put(params, NamedSharding(mesh, spec))`, and pass the same specs as
  `param_specs`): those axes stay automatic (GSPMD); the draw, perturbation and combine being
  elementwise in each element's global index, each device computes its own shard of the
  perturbation and of the estimate, and no parameter-sized array is gathered to perturb.

  Args:
    estimator: `fgjax.estimators.spsa`, `jvp` or `backprop` (data axis only).
    mesh: a `jax.sharding.Mesh` (`fgjax.parallel.make_mesh("directions=4,data=2")`).
    directions_axis: the mesh axis the K directions are split over (K must divide by its size),
      or None.
    data_axis: the mesh axis the batch is split over, or None. Every positional argument after
      the parameters is split along its leading dimension (which must divide by the axis size);
      keyword arguments are replicated. The loss must be a mean over the batch for the estimate
      to equal the single-device one.
    param_specs: for sharded parameters, a pytree of `PartitionSpec`s like the parameters (over
      axes other than the two above); the estimate's leaves get the same sharding. None: the
      estimate is replicated. With `_perturbation.GROUP_SMALL_LEAVES` on, shard only leaves above
      16,384 elements: smaller ones are then drawn as one concatenated group, which XLA reshuffles
      across devices when they are sharded.

  Returns:
    An estimator with the same interface: `est(loss_fn, params, *args, key=key) -> Estimate`,
    usable under `jax.jit`, in `fgjax.value_and_grad` and `fgjax.forward_gradient`.

  Example:
    >>> mesh = fgjax.parallel.make_mesh("directions=4,data=2")
    >>> est = fgjax.parallel.sharded(fgjax.estimators.spsa(num_directions=8), mesh)
    >>> loss, grads = jax.jit(fgjax.value_and_grad(loss_fn, est))(params, batch, key=key)

  Paper: Chen et al., "Stepping Forward on the Last Mile" (NeurIPS 2024) for the estimators; the
  K-scalar communication is the property this exploits (issue 11).
  """
  if not isinstance(estimator, SPSA | JVP | Backprop):
    raise ValueError(f"estimator: expected spsa, jvp or backprop, got {type(estimator).__name__}.")
  if not isinstance(mesh, Mesh):
    raise ValueError(f"mesh: expected a jax.sharding.Mesh, got {type(mesh).__name__}.")
  for name, axis in (("directions_axis", directions_axis), ("data_axis", data_axis)):
    if axis is not None and axis not in mesh.axis_names:
      raise ValueError(f"{name}: {axis!r} is not an axis of the mesh {mesh.axis_names}.")
  if directions_axis is not None and directions_axis == data_axis:
    raise ValueError("directions_axis and data_axis must be different mesh axes.")
  if isinstance(estimator, Backprop):
    directions_axis = None
  elif directions_axis is not None:
    size = mesh.shape[directions_axis]
    if estimator.num_directions % size:
      raise ValueError(
        f"num_directions={estimator.num_directions} must divide by the {directions_axis!r} axis "
        f"size {size}."
      )
  return Sharded(estimator, mesh, directions_axis, data_axis, param_specs)
