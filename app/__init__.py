"""The shotcache service: settings, encoder and its backends, task store, evaluation and benchmarks."""

__version__ = "0.1.0"
