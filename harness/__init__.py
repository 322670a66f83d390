"""erasure-arena: benchmark concept-erasure defenses for text-to-image diffusion models."""

import os

# OpenMP threads that spin while waiting make torch on a small CPU up to 100x slower as
# soon as a second process competes for the cores (measured on 2 cores: 0.1 s against
# 12 s per tiny-model image). Passive waiting costs little alone and avoids that cliff.
# It must be set before torch starts its thread pool, hence here; a user's value wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
