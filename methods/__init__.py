"""Method plugins: one file per method, registered under the entry-point group `harness.methods`."""

__all__ = ["Context", "Method"]


def __getattr__(name: str):
    """`Context` and `Method`, imported on first use: reading the registry (the tables do)
    needs no torch."""
    if name in __all__:
        from harness_methods import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
