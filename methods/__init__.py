"""Method plugins: one file per method, registered under the entry-point group `harness.methods`."""

from harness_methods.base import Context, Method

__all__ = ["Context", "Method"]
