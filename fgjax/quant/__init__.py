"""Integer quantization for Flax layers, with a forward mode (jvp) that follows straight-through.

Configs (`QuantConfig`, `preset`), forward-mode-safe quantized ops (`dot_general`,
`conv_general_dilated`), layers (`Dense`, `DenseGeneral`, `Conv`; `quant=None` is plain Flax),
exact integer products on an int8 x int8 -> int32 unit (`integer_dot_general`,
`integer_conv_general_dilated`), fixed-point parameters (`quantize_params`,
`dequantize_params`) and integer helpers
(`saturating_add`, `round_nearest`, `round_stochastic`). Paper: "Stepping Forward on the Last
Mile" (NeurIPS 2024).
"""

from fgjax.quant._accumulate import (
  ACCUMULATOR_BITS,
  ExactSum,
  integer_conv_general_dilated,
  integer_dot_general,
)
from fgjax.quant._aqt import (
  AqtConvGeneralDilated,
  AqtDotGeneral,
  AqtEinsum,
  aqt_dot_general_config,
  aqt_fixed_point,
  aqt_merge,
  straight_through_conv_general_dilated,
  straight_through_dot_general,
)
from fgjax.quant._config import PRESET_NAMES, QuantConfig, preset
from fgjax.quant._fixed_point import (
  FixedPointVariables,
  bind_frozen,
  contraction_operand_dtypes,
  from_fixed_point,
  integer_mask,
  integer_storage,
  leaf_scales,
  master_weight_storage,
  merge,
  to_fixed_point,
)
from fgjax.quant._integer import (
  STORAGE_BITS,
  bits_of,
  dequantize,
  integer_dtype,
  max_int,
  quantize_kernel,
  round_nearest,
  round_stochastic,
  saturating_add,
)
from fgjax.quant._layers import (
  KERNEL_SCALE,
  QUANT_COLLECTION,
  Conv,
  Dense,
  DenseGeneral,
  dequantize_params,
  quantize_params,
)
from fgjax.quant._ops import conv_general_dilated, dot_general

__all__ = [
  "AqtConvGeneralDilated",
  "AqtDotGeneral",
  "AqtEinsum",
  "aqt_dot_general_config",
  "aqt_fixed_point",
  "aqt_merge",
  "straight_through_conv_general_dilated",
  "straight_through_dot_general",
  "ACCUMULATOR_BITS",
  "ExactSum",
  "integer_conv_general_dilated",
  "integer_dot_general",
  "KERNEL_SCALE",
  "PRESET_NAMES",
  "QUANT_COLLECTION",
  "Conv",
  "Dense",
  "DenseGeneral",
  "FixedPointVariables",
  "QuantConfig",
  "STORAGE_BITS",
  "bind_frozen",
  "bits_of",
  "contraction_operand_dtypes",
  "conv_general_dilated",
  "dequantize",
  "dequantize_params",
  "dot_general",
  "from_fixed_point",
  "integer_dtype",
  "integer_mask",
  "integer_storage",
  "leaf_scales",
  "master_weight_storage",
  "max_int",
  "merge",
  "preset",
  "quantize_kernel",
  "quantize_params",
  "round_nearest",
  "round_stochastic",
  "saturating_add",
  "to_fixed_point",
]
