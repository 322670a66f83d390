"""erasure-arena: benchmark concept-erasure defenses for text-to-image diffusion models."""

import os


def _set_openmp_spin() -> None:
    """Let idle OpenMP threads spin for 10,000 rounds before they sleep, unless the user chose.

    torch's Linux wheels use GNU OpenMP, which reads these variables once, when torch is
    imported, so this runs on `import harness`. A value the user set for either wins.
    Measured on 2 cores (Intel Xeon, torch 2.13), the shapes smoke run of 24 images took
    21 s with this spin count and 42 s with `OMP_WAIT_POLICY=PASSIVE`. Passive threads
    sleep at once, and waking them costs more than a small operator. With one thread the
    run took 26 s.
    GNU OpenMP's own default spins 300,000 rounds (libgomp manual, GOMP_SPINCOUNT). With
    it, a second process on the same cores made a tiny-model image take 12 s instead of
    0.1 s, because each process waited on the other's spinning threads.
    NOTE: spinning still costs when jobs share the cores. Two smoke runs at once took 81 s
    each with this setting and 29 s each with `OMP_WAIT_POLICY=PASSIVE`, which is the
    setting for several jobs on the same cores (or `OMP_NUM_THREADS=1` per job).
    """
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        os.environ["GOMP_SPINCOUNT"] = "10000"


_set_openmp_spin()

__version__ = "0.1.0"
