"""TinyLUT: restoration networks as tiny look-up tables, and adapting the tables from forward calls.

Li et al., "TinyLUT: Tiny Look-Up Table for Efficient Image Restoration at the Edge" (NeurIPS
2024): a separable network (9 one-pixel depth tables, point-wise and up-sampling tables) on the
H6/L2 split of each pixel, with learned clipping. Train `TinyLUTNet` by backprop, `convert` it to
int8 tables, run them with `lut_apply` (gathers and integer adds only), and adapt the table
entries on the device with forward calls only (SPSA on the integer grid; docs/tinylut.md).
"""

from fgjax.lut._authors import load_authors_tables, read_torch_state_dict
from fgjax.lut._images import (
  add_gaussian_noise,
  bicubic_downscale,
  from_pixels,
  psnr_y,
  rgb_to_y,
  ssim_y,
  to_pixels,
)
from fgjax.lut._network import TinyLUTNet, branch_params
from fgjax.lut._pipeline import HIGH, LOW, Branch, recombine_high_low, split_high_low
from fgjax.lut._tables import (
  TinyLUT,
  convert,
  float_network_bytes,
  lut_apply,
  naive_lut_bytes,
  segment_rows,
  table_bytes,
)

__all__ = [
  "HIGH",
  "LOW",
  "Branch",
  "TinyLUT",
  "TinyLUTNet",
  "add_gaussian_noise",
  "bicubic_downscale",
  "branch_params",
  "convert",
  "float_network_bytes",
  "from_pixels",
  "load_authors_tables",
  "lut_apply",
  "naive_lut_bytes",
  "psnr_y",
  "read_torch_state_dict",
  "recombine_high_low",
  "rgb_to_y",
  "segment_rows",
  "split_high_low",
  "ssim_y",
  "table_bytes",
  "to_pixels",
]
