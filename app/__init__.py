"""The shotcache service: settings, encoder and its backends, task store, evaluation and benchmarks."""

import os

__version__ = "0.1.0"

# OpenBLAS (numpy's BLAS) keeps its worker threads spinning for 2^28 cycles (~0.1 s) after each threaded call.
# On a host whose cores the encoder uses, that spin takes a core from the next encoder call: with predicts of
# several queries at once (classify_stages.PredictCoalescer) the stand-in's batch of 8 took 73-77 ms instead
# of 40 (docs/benchmarks.md, request path). 2^20 cycles (~0.3 ms) frees the core at once and kept the cache
# methods' tune times. OpenBLAS reads this once, when numpy loads: setting it here, before any of the
# service's modules import numpy, covers `shotcache serve`; an explicit setting is kept.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "20")
