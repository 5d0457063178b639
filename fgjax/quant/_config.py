"""Quantization settings (`QuantConfig`) and named presets (`preset`)."""

import dataclasses

from fgjax.quant._integer import STORAGE_BITS

ACT_GRANULARITIES = ("per_tensor", "per_token")
WEIGHT_STORAGES = ("float", "integer")
COMPUTE_DTYPES = ("bfloat16",)
MIN_BITS = 2
MAX_BITS = 16


def _check_bits(name: str, bits) -> None:
  if bits is None:
    return
  if isinstance(bits, bool) or not isinstance(bits, int):
    raise ValueError(f"{name} must be an int in [{MIN_BITS}, {MAX_BITS}] or None, got {bits!r}.")
  if not MIN_BITS <= bits <= MAX_BITS:
    raise ValueError(f"{name} must be in [{MIN_BITS}, {MAX_BITS}] or None, got {bits}.")


@dataclasses.dataclass(frozen=True)
class QuantConfig:
  """How one layer quantizes its weights and input activations.

  Weights use symmetric per-output-channel scales and activations symmetric per-tensor or per-token
  scales, both calibrated by abs-max:

  .. math::
    s = \\max|x| / (2^{b-1} - 1), \\qquad
    q = \\operatorname{clip}(\\operatorname{round}(x / s), -(2^{b-1}-1), 2^{b-1}-1), \\qquad
    \\hat x = s\\, q .

  The product of an integer activation and an integer weight is computed with integer operands and
  int32 accumulation, then rescaled by :math:`s_x s_w` (see `fgjax.quant.dot_general`).

  Attributes:
    weight_bits: bits of the integer weights (2..16); `None` keeps weights in float.
    act_bits: bits of the integer input activations (2..16); `None` keeps activations in float.
    symmetric: only symmetric (zero-point free) quantization is implemented; `False` is rejected.
    act_granularity: `"per_tensor"` (one activation scale per call) or `"per_token"` (one scale per
      row of the activation, i.e. shared over the contracting axes; for convolutions one scale per
      example, since the window sum mixes pixels).
    weight_storage: `"float"`: float master weights quantized on the fly in each forward (AQT-style
      fake-quant training); `"integer"`: the `kernel` param itself is an integer array whose
      dtype is the bit width (int4, int8 or int16, so `weight_bits` must be 4, 8 or 16) and its
      per-output-channel float scale lives in the `"quant"` collection as `kernel_scale`, so
      fixed-point training can perturb and update the integers on their grid.
    compute_dtype: `None` or `"bfloat16"`: cast float operands to bfloat16 with float32
      accumulation. Only allowed when neither side is integer-quantized.

  Example:
    >>> QuantConfig(weight_bits=8, act_bits=8)
    QuantConfig(weight_bits=8, act_bits=8, symmetric=True, act_granularity='per_tensor', \
weight_storage='float', compute_dtype=None)
  """

  weight_bits: int | None = None
  act_bits: int | None = None
  symmetric: bool = True
  act_granularity: str = "per_tensor"
  weight_storage: str = "float"
  compute_dtype: str | None = None

  def __post_init__(self):
    _check_bits("weight_bits", self.weight_bits)
    _check_bits("act_bits", self.act_bits)
    if self.symmetric is not True:
      raise ValueError(f"symmetric={self.symmetric!r}: only symmetric quantization is implemented.")
    if self.act_granularity not in ACT_GRANULARITIES:
      raise ValueError(
        f"act_granularity must be one of {ACT_GRANULARITIES}, got {self.act_granularity!r}."
      )
    if self.weight_storage not in WEIGHT_STORAGES:
      raise ValueError(
        f"weight_storage must be one of {WEIGHT_STORAGES}, got {self.weight_storage!r}."
      )
    if self.weight_storage == "integer" and self.weight_bits is None:
      raise ValueError('weight_storage="integer" needs weight_bits (an int), got weight_bits=None.')
    if self.weight_storage == "integer" and self.weight_bits not in STORAGE_BITS:
      raise ValueError(
        f'weight_storage="integer" needs weight_bits in {STORAGE_BITS} (stored as int4, int8, '
        f"int16: the dtype carries the bit width), got {self.weight_bits}."
      )
    if self.compute_dtype is not None:
      if self.compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(
          f"compute_dtype must be None or one of {COMPUTE_DTYPES}, got {self.compute_dtype!r}."
        )
      if self.weight_bits is not None or self.act_bits is not None:
        raise ValueError(
          "compute_dtype applies to float layers only; got it together with "
          f"weight_bits={self.weight_bits}, act_bits={self.act_bits}."
        )

  @property
  def is_float(self) -> bool:
    """True when no side is integer-quantized (the layer computes in float)."""
    return self.weight_bits is None and self.act_bits is None


_PRESETS: dict[str, QuantConfig | None] = {
  "float32": None,
  "bf16": QuantConfig(compute_dtype="bfloat16"),
  "w16a16": QuantConfig(weight_bits=16, act_bits=16),
  "w16a8": QuantConfig(weight_bits=16, act_bits=8),
  "w8a8": QuantConfig(weight_bits=8, act_bits=8),
  "w4a8": QuantConfig(weight_bits=4, act_bits=8),
}
PRESET_NAMES = tuple(_PRESETS)


def preset(name: str, **overrides) -> QuantConfig | None:
  """The named quantization setting of the paper's tables ("Stepping Forward on the Last Mile").

  `"float32"` returns `None`, which layers read as "no quantization": `Dense(..., quant=None)` is
  exactly `flax.linen.Dense`. The others: `"bf16"` (bfloat16 operands, float32 accumulation),
  `"w16a16"`, `"w16a8"`, `"w8a8"`, `"w4a8"` (`w<weight bits>a<activation bits>`, per-channel
  weights, per-tensor activations).

  Args:
    name: one of `PRESET_NAMES`.
    **overrides: fields of `QuantConfig` to replace, e.g. `weight_storage="integer"`.

  Returns:
    A `QuantConfig`, or `None` for `"float32"`.

  Raises:
    ValueError: unknown name (the message lists the valid names), or overrides on `"float32"`, or
      overrides that make an invalid config.

  Example:
    >>> preset("w8a8", weight_storage="integer").weight_storage
    'integer'
  """
  if name not in _PRESETS:
    raise ValueError(f"Unknown quantization preset {name!r}; valid names: {', '.join(_PRESETS)}.")
  config = _PRESETS[name]
  if config is None:
    if overrides:
      raise ValueError(f'preset "float32" means no quantization; cannot apply {overrides}.')
    return None
  return dataclasses.replace(config, **overrides)
