"""TinyLUT: exact conversion, H6/L2 split, table sizes, integer-only inference, SPSA on tables."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fgjax
import fgjax.lut as lut_lib
import fgjax.testing


def random_variables(net, x, seed):
  """A random network with every stage active: nonzero output layers, varied clipping scales.

  Built from the parameter shapes (`jax.eval_shape`) with numpy draws: nothing to compile.
  """
  shapes = jax.eval_shape(net.init, jax.random.key(0), x)
  rng = np.random.default_rng(seed)

  def leaf(path, shape):
    name = jax.tree_util.keystr(path)
    if "alpha" in name:
      value = rng.uniform(0.3, 1.0, shape.shape)
    elif "w1" in name:
      value = 1.5 * rng.normal(size=shape.shape)
    elif "b1" in name:
      value = rng.uniform(-1.0, 1.0, shape.shape)
    else:
      fan_in = shape.shape[-2] if len(shape.shape) == 3 else 1
      value = rng.normal(size=shape.shape) * (0.3 if "3" in name else 1.0) / np.sqrt(fan_in)
    return jnp.asarray(value, jnp.float32)

  return jax.tree_util.tree_map_with_path(leaf, shapes)


@pytest.fixture(scope="module")
def small():
  net = lut_lib.TinyLUTNet(upscale=2, channels=4, hidden=8)
  x = jnp.asarray(np.random.default_rng(0).integers(-128, 128, (2, 8, 8)), jnp.int32)
  return net, random_variables(net, x, seed=1), x


def test_split_recombine_exact():
  x = jnp.arange(-128, 128, dtype=jnp.int32)
  high, low = lut_lib.split_high_low(x)
  assert int(high.min()) == -32 and int(high.max()) == 31
  assert int(low.min()) == 0 and int(low.max()) == 3
  np.testing.assert_array_equal(lut_lib.recombine_high_low(high, low), x)


def test_tables_reproduce_network_exactly(small):
  net, variables, x = small
  lut = lut_lib.convert(variables, net)
  expected = np.asarray(jax.jit(net.apply)(variables, x))
  np.testing.assert_array_equal(np.asarray(jax.jit(lut_lib.lut_apply)(lut, x)), expected)
  # The ordinary per-pixel float network computes the same integers (up to float ties).
  per_pixel = np.asarray(jax.jit(lambda v, x: net.apply(v, x, mode="per_pixel"))(variables, x))
  assert np.mean(per_pixel == expected) > 0.99


def test_entries_within_discretization_bound(small):
  """Every entry of every table is its MLP's value rounded: |entry − f(v)| ≤ 1/2 where in range."""
  net, variables, _ = small
  lut = lut_lib.convert(variables, net)
  params = lut_lib.branch_params(variables)
  checked = 0
  for branch in (lut_lib.HIGH, lut_lib.LOW):
    tables = lut.tables[branch.name]
    grid = jnp.arange(branch.lo, branch.hi + 1, dtype=jnp.float32)
    raw = lut_lib._network.bank_mlp(
      params[branch.name]["depth"], jnp.broadcast_to(grid, (9, branch.size)), branch
    )
    pairs = [(np.asarray(tables["depth"]).reshape(-1), np.asarray(raw).reshape(-1))]
    for stage, index in (("point", 0), ("up", 1)):
      first, rows = np.asarray(lut.segments[branch.name][index]).T
      # Channel c's rows hold its MLP at round(α_c v) for v in [lo, hi]: `first` and up.
      values = [first[c] + np.arange(rows[c]) for c in range(len(rows))]
      width = int(rows.max())
      padded = np.stack([np.pad(v, (0, width - len(v)), mode="edge") for v in values])
      raw = np.asarray(
        lut_lib._network.bank_mlp(
          params[branch.name][stage], jnp.asarray(padded, jnp.float32), branch
        )
      )
      raw = np.concatenate([raw[c, : rows[c]] for c in range(len(rows))])
      pairs.append((np.asarray(tables[stage]).reshape(-1), raw.reshape(-1)))
    for table, raw in pairs:
      assert table.shape == raw.shape
      inside = np.abs(raw) < 127
      assert inside.mean() > 0.5  # the bound is tested on most entries
      np.testing.assert_array_less(np.abs(table.astype(np.float64) - raw)[inside], 0.5 + 1e-4)
      # Out of range, the entry saturates: clipped to int8 with the sign of f(v).
      np.testing.assert_array_equal(table[~inside], np.clip(np.round(raw[~inside]), -128, 127))
      checked += table.size
  assert checked == lut_lib.table_bytes(lut, include_requant=False)


def test_table_bytes_formula_matches_arrays(small):
  net, variables, _ = small
  lut = lut_lib.convert(variables, net)
  arrays = sum(int(np.size(t)) for t in jax.tree.leaves(lut.tables))
  assert lut_lib.table_bytes(lut, include_requant=False) == arrays
  requant = sum(int(np.size(q)) for q in jax.tree.leaves(lut.requant))
  assert lut_lib.table_bytes(lut) == arrays + requant
  assert lut_lib.naive_lut_bytes(4, 4, sampling_bits=4) == 17**4 * 16


def test_lut_inference_is_integer_only(small):
  net, variables, x = small
  lut = lut_lib.convert(variables, net)
  jaxpr = jax.make_jaxpr(lambda t, x: lut_lib.lut_apply(t, x))(lut, x)

  for eqn in fgjax.testing.jaxpr_equations(jaxpr):
    # Integer multiplies (table indices) are allowed; no contraction and no float value at all.
    assert eqn.primitive.name not in ("dot_general", "conv_general_dilated"), eqn
    for var in eqn.outvars:
      assert not jnp.issubdtype(var.aval.dtype, jnp.floating), eqn


def test_spsa_on_table_entries_lowers_loss(small):
  net, variables, x = small
  lut = lut_lib.convert(variables, net)
  target = jnp.asarray(np.asarray(lut_lib.lut_apply(lut, x)), jnp.float32) + 12.0

  def loss(tables):
    out = lut_lib.lut_apply(lut.replace(tables=tables), x).astype(jnp.float32)
    return jnp.mean((out - target) ** 2)

  scales = {p: 1.0 for p in fgjax.leaf_paths(lut.tables)}
  est = fgjax.estimators.spsa(4, epsilon=1.0, sign=True, distribution="rademacher", scales=scales)
  opt = fgjax.integer_optimizer(
    optax.chain(fgjax.forward_gradient(est), optax.sgd(0.5)), scales=scales, rounding="stochastic"
  )

  @jax.jit
  def step(tables, state):
    updates, state = opt.update(tables, state, tables, value_fn=loss)
    return fgjax.apply_integer_updates(tables, updates), state

  tables, state = lut.tables, opt.init(lut.tables)
  before = float(loss(tables))
  for _ in range(60):
    tables, state = step(tables, state)
  assert all(t.dtype == jnp.int8 for t in jax.tree.leaves(tables))
  assert float(loss(tables)) < 0.7 * before


def test_authors_format_loader(tmp_path):
  """Synthetic tables in the authors' layout (rows, 16, 1, 1) int8 and given clipping scales."""
  rng = np.random.default_rng(0)
  clips = {
    k: rng.uniform(0.3, 1.0, 16).astype(np.float32)
    for k in ("clip_hh1", "clip_hl1", "clip_hh2", "clip_hl2")
  }

  def rows(alpha, lo, hi):
    q = np.round(alpha[:, None] * np.arange(lo, hi + 1, dtype=np.float32))
    return int((q.max(1) - q.min(1) + 1).sum())

  shapes = {
    "Model_V_L1_Depth_x4_H6.npy": 576,
    "Model_V_L1_Depth_x4_L2.npy": 36,
    "Model_V_L1_Point_x4_H6.npy": rows(clips["clip_hh1"], -32, 31),
    "Model_V_L1_Point_x4_L2.npy": rows(clips["clip_hl1"], 0, 3),
    "Model_V_UP_x4_H6.npy": rows(clips["clip_hh2"], -32, 31),
    "Model_V_UP_x4_L2.npy": rows(clips["clip_hl2"], 0, 3),
  }
  for name, n in shapes.items():
    np.save(tmp_path / name, rng.integers(-5, 6, (n, 16, 1, 1)).astype(np.int8))
  lut = lut_lib.load_authors_tables(str(tmp_path), clips=clips)
  assert lut_lib.table_bytes(lut, include_requant=False) == 16 * sum(shapes.values())
  out = jax.jit(lut_lib.lut_apply)(lut, jnp.zeros((6, 6), jnp.int32))
  assert out.shape == (24, 24) and out.dtype == jnp.int32


@pytest.mark.skipif(
  not os.environ.get("FGJAX_TINYLUT_DIR"),
  reason="set FGJAX_TINYLUT_DIR to the authors' TinyLUT_LUT folder",
)
def test_authors_published_tables():
  """Their ×4 tables load (37,776 B) and run right: clearly better than bicubic on a photo."""
  import skimage.data
  import skimage.transform

  lut = lut_lib.load_authors_tables(os.environ["FGJAX_TINYLUT_DIR"])
  assert lut_lib.table_bytes(lut, include_requant=False) == 37776
  hr = np.asarray(skimage.data.astronaut())[:192, :192]
  low = lut_lib.bicubic_downscale(hr, 4)
  pixels = jnp.asarray(lut_lib.to_pixels(np.moveaxis(low, -1, 0)))  # channel by channel
  out = np.moveaxis(lut_lib.from_pixels(jax.jit(lut_lib.lut_apply)(lut, pixels)), 0, -1)
  bicubic = skimage.transform.resize(low.astype(float), hr.shape, order=3, preserve_range=True)
  bicubic = np.clip(np.round(bicubic), 0, 255).astype(np.uint8)
  # Measured: 33.25 dB against 31.07 dB; a wrong dataflow falls far below bicubic.
  assert lut_lib.psnr_y(out, hr, 4) > lut_lib.psnr_y(bicubic, hr, 4) + 1.0
