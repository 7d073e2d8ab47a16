"""SLURM's compressed host lists (``node[01-04,07],gpu5``) expanded without ``scontrol``; no torch."""

from __future__ import annotations

import re
from collections.abc import Iterator

from dtrain.errors import UserError

# A name's parts: literal text, and bracketed ranges as (first, last, width) triples.
_Parts = list[list[tuple[int, int, int]] | str]


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``node[01-04,07],gpu5`` -> ``node01``."""
    host = next(hostnames(nodelist), None)
    if host is None:
        raise UserError(f"SLURM's node list {nodelist!r} is empty; export MASTER_ADDR=<host of task 0>")
    return host


def hostnames(nodelist: str) -> Iterator[str]:
    """The hosts of a SLURM node list, in order, without asking ``scontrol``.

    The compressed form is a comma-separated list of names, each with any number of bracketed ranges:
    ``node[01-04,07]`` is node01..node04 and node07 (zero padding kept), ``rack[1-2]-n[1-2]`` every
    combination. The whole list is checked first (a malformed one raises :class:`UserError`), then hosts
    are made one at a time: the first host of ``n[1-99999999]`` costs nothing.
    """
    names: list[_Parts] = []
    for name in _split_top_level(nodelist.strip(), nodelist):
        parts: _Parts = []
        for match in re.finditer(r"([^\[\]]*)(?:\[([^\[\]]*)\])?", name):
            literal, ranges = match.groups()
            if literal:
                parts.append(literal)
            if ranges is not None:
                parts.append(_parse_ranges(ranges, nodelist))
        names.append(parts)
    for parts in names:
        yield from _combine(parts, "")


def _combine(parts: _Parts, prefix: str) -> Iterator[str]:
    if not parts:
        yield prefix
        return
    first, rest = parts[0], parts[1:]
    if isinstance(first, str):
        yield from _combine(rest, prefix + first)
        return
    for low, high, width in first:
        for number in range(low, high + 1):
            yield from _combine(rest, prefix + str(number).zfill(width))


def _split_top_level(text: str, nodelist: str) -> list[str]:
    """Split at the commas outside brackets, checking that brackets pair up."""
    names, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        elif char == "," and depth == 0:
            names.append(text[start:i])
            start = i + 1
        if depth not in (0, 1):
            raise UserError(f"SLURM's node list {nodelist!r} has unbalanced brackets")
    if depth:
        raise UserError(f"SLURM's node list {nodelist!r} has unbalanced brackets")
    names.append(text[start:])
    for name in names:
        if not name.strip() and text:
            raise UserError(f"SLURM's node list {nodelist!r} has an empty host name")
    return [name.strip() for name in names if name.strip()]


def _parse_ranges(ranges: str, nodelist: str) -> list[tuple[int, int, int]]:
    """``01-04,07`` -> [(1, 4, 2), (7, 7, 2)]: (first, last, width), the width of the first number kept."""
    out = []
    for item in ranges.split(","):
        low, sep, high = item.strip().partition("-")
        if not low.isdigit() or (sep and not high.isdigit()) or (sep and int(high) < int(low)):
            raise UserError(f"SLURM's node list {nodelist!r} has a bad range [{ranges}]")
        out.append((int(low), int(high or low), len(low)))
    return out
