"""erasure-arena: benchmark concept-erasure defenses for text-to-image diffusion models."""

import os


def _set_openmp_spin() -> None:
    """Let idle OpenMP threads spin for 10,000 rounds before they sleep, unless the user chose.

    torch's Linux wheels use GNU OpenMP, which reads these variables once, when torch is
    imported, so this runs on `import harness`. A value the user set for either wins.
    Measured on 2 cores (Intel Xeon, torch 2.13), the shapes smoke run of 48 images took
    21 s with this spin count and 42 s with `OMP_WAIT_POLICY=PASSIVE`. Passive threads
    sleep at once, and waking them costs more than a small operator. With one thread the
    run took 26 s. Every setting gave the same images.
    With two processes on the same cores, a batch-1 UNet forward took 86 ms with this spin
    count, 25 ms with PASSIVE, 32 ms with `OMP_WAIT_POLICY=ACTIVE` (endless spinning) and
    560 ms with 100,000 spins. GNU OpenMP's own default is 300,000 spins (libgomp manual,
    GOMP_SPINCOUNT), and with it an earlier measurement saw 12 s instead of 0.1 s per
    tiny-model image. ACTIVE is not used because its idle threads keep a core busy (3 CPU
    seconds during a 3-second sleep), which slows any other process, such as one this
    process waits for.
    NOTE: jobs that share the cores run slower with this setting (two smoke runs at once:
    80-82 s each, against 29 s each with PASSIVE). Set `OMP_WAIT_POLICY=PASSIVE`, or
    `OMP_NUM_THREADS=1` per job, when running several at once.
    """
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        os.environ["GOMP_SPINCOUNT"] = "10000"


_set_openmp_spin()

__version__ = "0.1.0"
