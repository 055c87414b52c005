"""C++ tile compositor with a hand-written backward; falls back to pure torch when unavailable."""

from __future__ import annotations

from ._composite_torch import composite_torch as composite

__all__ = ["composite"]
