"""Scratch buffers shared by every connection of a trio run.

A buffer that is filled and emptied without an await in between (a read batch handed to the
protocol core, ciphertext handed to the TLS object, a relay's chunk handed to a stream) needs no
owner: one per trio run serves every tunnel and every relay of it, so 10,000 idle tunnels do not
cost 10,000 buffers. Who may hold a view of each, and until when, is the zero-copy contract of
docs/DESIGN.md ("Transport objects and who owns what").
"""

from __future__ import annotations

import trio


class RunBuffer:
    """One `bytearray` of `size` bytes per trio run, made at its first use (a `memoryview`)."""

    __slots__ = ("_var", "_size")

    def __init__(self, name: str, size: int) -> None:
        self._var: trio.lowlevel.RunVar[memoryview] = trio.lowlevel.RunVar(name)
        self._size = size

    def get(self) -> memoryview:
        try:
            return self._var.get()
        except LookupError:
            view = memoryview(bytearray(self._size))
            self._var.set(view)
            return view
        except RuntimeError:  # outside trio (tests driving a class by hand): a private one
            return memoryview(bytearray(self._size))
