"""The README's python blocks, by section, so tests can run them verbatim."""

from __future__ import annotations

import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def readme_blocks(heading: str) -> list[str]:
  """The python blocks of the README section titled `heading`."""
  text = README.read_text()
  match = re.search(
      rf"^##+ {re.escape(heading)}\n(.*?)(?=^## )", text, re.M | re.S
  )
  assert match, f"README has no section {heading!r}"
  blocks = re.findall(r"```python\n(.*?)```", match.group(1), re.S)
  assert blocks, f"README section {heading!r} has no python block"
  return blocks


def run_readme_block(
    heading: str, namespace: dict, index: int | None = None
) -> dict:
  """Executes the section's blocks (or only block `index`) in `namespace`.

  `namespace` holds the names the README says the block assumes; the names the
  block defines are added to it.
  """
  blocks = readme_blocks(heading)
  source = "\n".join(blocks) if index is None else blocks[index]
  code = compile(source, f"README.md: {heading}", "exec")
  exec(code, namespace)  # noqa: S102
  return namespace
