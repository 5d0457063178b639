"""The m schedules' state can be checkpointed: every number in it is finite from the start."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fgjax


def test_schedule_state_is_finite_before_and_after_a_step():
  # The binaries refuse to checkpoint non-finite states; the plateau's `best` used to start at inf.
  params = {"w": jnp.ones(3)}
  est = fgjax.estimators.spsa(1, epsilon=1e-3, sign=True)
  for link in (
    fgjax.num_directions_schedule(est, [(0, 1), (2, 2)]),
    fgjax.num_directions_on_plateau(est, (1, 2), patience=1),
  ):
    opt = optax.chain(link, optax.sgd(0.1))
    state = opt.init(params)
    update = jax.jit(
      lambda p, s, opt=opt: opt.update(p, s, p, value_fn=lambda q: jnp.sum(q["w"] ** 2))
    )
    for _ in range(2):
      floats = [
        x for x in jax.tree.leaves(state) if jnp.issubdtype(jnp.result_type(x), jnp.floating)
      ]
      assert all(np.all(np.isfinite(np.asarray(x))) for x in floats)
      updates, state = update(params, state)
      params = optax.apply_updates(params, updates)
