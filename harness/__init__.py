"""erasure-arena: benchmark concept-erasure defenses for text-to-image diffusion models."""

import os

# The environment variables that set how GNU OpenMP's idle threads wait.
OPENMP_WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def _set_openmp_spin() -> None:
    """Let idle OpenMP threads spin for 10,000 rounds before they sleep, unless the user chose.

    torch's Linux wheels use GNU OpenMP, which reads these variables once, when torch is
    imported, so this runs on `import harness`. A value the user set for either wins.
    `OMP_WAIT_POLICY=PASSIVE` sleeps at once, and waking a thread costs more than a small
    operator: the shapes smoke run took 42 s with it and 21 s with this spin count (2-core
    Intel Xeon, same images). GNU OpenMP's own default of 300,000 spins (libgomp manual,
    GOMP_SPINCOUNT) made a second process on the same cores a cliff (12 s instead of 0.1 s
    per tiny-model image), and `ACTIVE` keeps a core busy while idle. docs/performance.md
    (Runner) has every measurement.
    NOTE: jobs that share the cores run slower with this setting (two smoke runs at once:
    80-82 s each, against 29 s each with PASSIVE). Set `OMP_WAIT_POLICY=PASSIVE`, or
    `OMP_NUM_THREADS=1` per job, when running several at once.
    """
    if not any(name in os.environ for name in OPENMP_WAIT_VARIABLES):
        os.environ["GOMP_SPINCOUNT"] = "10000"


_set_openmp_spin()

__version__ = "0.1.0"
