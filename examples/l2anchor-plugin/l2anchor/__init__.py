"""L2Anchor, a method plugin for cl-harness (registered as `l2anchor`)."""

from l2anchor.method import L2Anchor

__all__ = ["L2Anchor"]
