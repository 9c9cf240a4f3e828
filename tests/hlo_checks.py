"""Reads the collectives out of compiled HLO text (for the sharding tests).

``collectives(compiled)`` lists every cross-device collective in a compiled
XLA program (plain or async ``-start``; ``-done`` halves are not counted twice)
with the shapes of the arrays it moves, so a test can assert what crosses
devices. Only the text of ``jax.jit(f).lower(...).compile().as_text()`` is
used: no XLA internals.

Every computation of the module is read, so a collective wrapped in an
``async-start`` computation or inside a loop body is found; counts are static
(a collective in a ``while`` body counts once, however many times it runs).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from typing import Any

# Opcodes that move data between devices (async forms end in -start/-done).
COLLECTIVE_OPS = (
    "all-gather",
    "all-reduce",
    "all-to-all",
    "ragged-all-to-all",
    "collective-broadcast",
    "collective-permute",
    "reduce-scatter",
)
# A collective moving an array of more elements than this moves a parameter
# (or a slice of one); below it, only scalars and small count vectors pass.
PARAMETER_SIZED = 64

_DEFINITION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_ARRAY = re.compile(r"\b([a-z]+[0-9]*)\[([0-9,]*)\]")
_NAME = re.compile(r"%([\w.\-]+)")


@dataclasses.dataclass(frozen=True)
class Collective:
  """One collective instruction of a compiled program.

  Attributes:
    op: the opcode without an async ``-start`` suffix, e.g. ``"all-gather"``.
    name: the instruction's name in the HLO text.
    results: ``(dtype, dims)`` of each array it writes (every element of a
      tuple result; for an async ``-start``, its whole tuple).
    operands: ``(dtype, dims)`` of each array it reads.
    line: the HLO line, for error messages.
  """

  op: str
  name: str
  results: tuple[tuple[str, tuple[int, ...]], ...]
  operands: tuple[tuple[str, tuple[int, ...]], ...]
  line: str

  @property
  def arrays(self) -> tuple[tuple[str, tuple[int, ...]], ...]:
    return self.results + self.operands

  @property
  def elements(self) -> int:
    """Elements of the largest array the collective reads or writes."""
    return max((math.prod(d) for _, d in self.arrays), default=0)

  def volume(self, limit: int = PARAMETER_SIZED) -> int:
    """Elements read plus written, over its arrays of more than ``limit``.

    Small arrays are left out so that scalars which XLA combines into one
    tuple collective with large ones do not count as parameter traffic.
    """
    return sum(math.prod(d) for _, d in self.arrays if math.prod(d) > limit)

  @property
  def key(self) -> tuple[str, tuple[tuple[str, tuple[int, ...]], ...]]:
    """What it moves (op and array shapes), independent of instruction names."""
    return self.op, tuple(sorted(self.arrays))

  def __str__(self) -> str:
    shapes = ", ".join(f"{t}[{','.join(map(str, d))}]" for t, d in self.arrays)
    return f"{self.op}({shapes})"


def _closing(text: str, start: int) -> int:
  """Index just past the parenthesis that closes the one at ``text[start]``."""
  depth = 0
  for i in range(start, len(text)):
    if text[i] == "(":
      depth += 1
    elif text[i] == ")":
      depth -= 1
      if depth == 0:
        return i + 1
  raise ValueError(f"hlo_checks: unbalanced parentheses in {text!r}")


def _split_definition(rest: str) -> tuple[str, str, str] | None:
  """``shape opcode(operands)...`` -> (shape, opcode, operands) or None."""
  rest = rest.strip()
  if rest.startswith("("):
    end = _closing(rest, 0)
  else:
    end = rest.find(" ")
    if end < 0:
      return None
  shape, tail = rest[:end], rest[end:].lstrip()
  match = re.match(r"([\w\-]+)\(", tail)
  if not match:
    return None
  open_at = match.end() - 1
  operands = tail[open_at + 1 : _closing(tail, open_at) - 1]
  return shape, match.group(1), operands


def _arrays(shape: str) -> list[tuple[str, tuple[int, ...]]]:
  return [
      (dtype, tuple(int(d) for d in dims.split(",") if d))
      for dtype, dims in _ARRAY.findall(shape)
  ]


def hlo_text(compiled: Any) -> str:
  """The optimised HLO text of a ``jax.stages.Compiled`` (or the text itself)."""
  return compiled if isinstance(compiled, str) else compiled.as_text()


def collectives(compiled: Any) -> list[Collective]:
  """Every collective of ``compiled`` (a ``Compiled`` or its HLO text)."""
  shapes: dict[str, str] = {}
  found = []
  for line in hlo_text(compiled).splitlines():
    definition = _DEFINITION.match(line)
    if not definition:
      continue
    name, rest = definition.groups()
    parts = _split_definition(rest)
    if parts is None:
      continue
    shape, opcode, operands = parts
    shapes[name] = shape
    op = opcode.removesuffix("-start")
    if op not in COLLECTIVE_OPS:
      continue
    # Operand shapes where the text prints them, else those of their definitions.
    read = _arrays(operands)
    for operand in [] if read else _NAME.findall(operands):
      if operand not in shapes:
        raise ValueError(
            f"hlo_checks: operand %{operand} of {name} is not defined above"
        )
      read += _arrays(shapes[operand])
    found.append(
        Collective(op, name, tuple(_arrays(shape)), tuple(read), line.strip())
    )
  return found


def parameter_sized(
    compiled: Any, limit: int = PARAMETER_SIZED
) -> list[Collective]:
  """The collectives of ``compiled`` moving an array of more than ``limit`` elements."""
  return [c for c in collectives(compiled) if c.elements > limit]


def volume_by_op(compiled: Any, limit: int = PARAMETER_SIZED) -> dict[str, int]:
  """Per collective op, the elements its parameter-sized arrays read and write."""
  totals = collections.Counter()
  for c in collectives(compiled):
    totals[c.op] += c.volume(limit)
  return {op: n for op, n in totals.items() if n}


def traffic(compiled: Any, limit: int = PARAMETER_SIZED) -> tuple[int, int]:
  """``(number, total volume)`` of the parameter-sized collectives."""
  found = parameter_sized(compiled, limit)
  return len(found), sum(c.volume(limit) for c in found)


def excess(
    found: list[Collective], allowed: list[Collective]
) -> list[Collective]:
  """``found`` minus ``allowed`` as multisets of (op, shapes): what is new."""
  budget = collections.Counter(c.key for c in allowed)
  extra = []
  for c in found:
    if budget[c.key]:
      budget[c.key] -= 1
    else:
      extra.append(c)
  return extra


def describe(found: list[Collective]) -> str:
  """One collective per line, with its size, for assertion messages."""
  return "\n".join(f"  {c} ({c.elements} elements)" for c in found) or "  none"
