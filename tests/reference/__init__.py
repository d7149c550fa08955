"""Slow, obviously-correct reference implementations that pycoe's fast paths are tested against.

They are test oracles, not library code: each module here mirrors one area of the library
(``transport``, ``pwlu``, ``mixture``, ...) and is imported by the tests as ``from reference.<area> import ...``.
"""
