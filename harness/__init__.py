"""harness: a benchmark harness for continual-learning methods on language models."""

__version__ = "0.1.0"
