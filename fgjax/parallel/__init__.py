"""Scale-out on JAX's SPMD engine: directions and data over a device mesh, K scalars on the wire.

- `sharded`: an estimator whose K directions and batch are split over mesh axes (`shard_map`).
- `make_mesh`: a mesh from a spec such as "directions=4,data=2" (the binaries' `--config.mesh`).
- `communicated_bytes`: bytes moved by the collectives of a compiled computation (from its HLO).
"""

from fgjax.parallel._hlo import collectives, communicated_bytes
from fgjax.parallel._mesh import make_mesh, parse_mesh
from fgjax.parallel._sharded import Sharded, sharded

__all__ = ["Sharded", "collectives", "communicated_bytes", "make_mesh", "parse_mesh", "sharded"]
