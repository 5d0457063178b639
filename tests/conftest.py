"""Shared fixtures: small models and real data (scikit-learn's digits), nothing downloaded."""

import os

# Tests run on the CPU with 2 cores; keep XLA from grabbing an accelerator if one is present.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
