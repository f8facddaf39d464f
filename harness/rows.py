"""Where a method's row goes in every table and plot: the paper's order (each method's
`table_rank`), then alphabetical. Tables, plots and the report import it from here."""

from __future__ import annotations

from harness.summary import TUNED
from harness_methods.registry import table_entry


def plugin_of(label: str) -> str:
    """The method plugin of a row label ("olora (tuned)" -> "olora")."""
    return label.removesuffix(TUNED)


def method_key(label: str) -> tuple:
    """Where a method's row goes: the paper's order, then alphabetical."""
    return table_entry(plugin_of(label))[0], label


def sorted_methods(methods) -> list[str]:
    """Method labels in the tables' order."""
    return sorted(methods, key=method_key)
