"""The dependencies pyproject.toml declares suffice, read from pyproject.toml.

For the base install and for each extra, the closure of distributions a pip
install would bring is computed from pyproject.toml and, recursively, from the
installed distributions' own requirements (markers and requested extras
evaluated with `packaging`). A fresh interpreter then refuses to import any
third-party top-level module whose distribution is outside that closure, and
imports every module of what the extra is for, plus every module those files
import lazily (inside functions). So a new `import` of an undeclared package,
direct or on a dependency's import path, fails here, offline, in seconds; as
does the original bug, PIL imported by cram_jax.data but declared nowhere.
The base interpreter also checks the messages that name a missing extra.
"""

from __future__ import annotations

import ast
import concurrent.futures
import json
import os
import pathlib
import re
import subprocess
import sys
from importlib import metadata

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

try:
  import tomllib
except ModuleNotFoundError:  # Python 3.10: pip vendors the same parser.
  from pip._vendor import tomli as tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]
with open(ROOT / "pyproject.toml", "rb") as _f:
  PROJECT = tomllib.load(_f)["project"]
SELF = canonicalize_name(PROJECT["name"])

# What each install is for: packages whose every module must import, and
# source trees whose every import statement (lazy ones included) must resolve.
TARGETS = {
    "base": dict(
        packages=["cram_jax"],
        skip=["cram_jax.data"],
        scan=["cram_jax/*.py", "cram_jax/compress/*.py"],
    ),
    "models": dict(packages=["cram_jax.models"], scan=["cram_jax/models/*.py"]),
    "data": dict(packages=["cram_jax.data"], scan=["cram_jax/data/*.py"]),
    "experiments": dict(
        packages=["experiments"],
        scan=["experiments/*.py", "experiments/configs/*.py"],
    ),
}

DATA_MESSAGE = (
    "cram_jax.data needs the 'data' extra: pip install 'cram_jax[data]'"
    " (missing module: "
)
MODELS_MESSAGE = (
    "cram_jax.models.load_bert needs the 'models' extra: pip install"
    " 'cram_jax[models]' (missing module: safetensors)"
)


def own_requirements(extras) -> list[Requirement]:
  """Base requirements plus those of `extras`, from pyproject.toml."""
  declared = PROJECT.get("optional-dependencies", {})
  reqs = list(PROJECT.get("dependencies", []))
  for extra in extras:
    reqs += declared[extra]
  return [Requirement(r) for r in reqs]


def closure(extras) -> set[str]:
  """Canonical names of the distributions `pip install .[extras]` brings."""
  todo = [(r, frozenset({""})) for r in own_requirements(extras)]
  seen, names, problems = set(), set(), []
  while todo:
    req, wanted = todo.pop()
    if req.marker is not None and not any(
        req.marker.evaluate({"extra": e}) for e in wanted
    ):
      continue
    name = canonicalize_name(req.name)
    if name == SELF:  # A self-reference such as cram_jax[data,models].
      todo += [(r, frozenset({""})) for r in own_requirements(req.extras)]
      continue
    key = (name, frozenset(req.extras))
    if key in seen:
      continue
    seen.add(key)
    names.add(name)
    try:
      dist = metadata.distribution(req.name)
    except metadata.PackageNotFoundError:
      problems.append(f"{req} is not installed")
      continue
    if not req.specifier.contains(dist.version, prereleases=True):
      problems.append(f"{req} does not admit the installed {dist.version}")
    extras_here = frozenset({""} | set(req.extras))
    todo += [(Requirement(r), extras_here) for r in dist.requires or []]
  assert not problems, "; ".join(problems)
  return names


def lazy_imports(patterns) -> list[str]:
  """Absolute modules named by every import statement in the files."""
  found = set()
  for pattern in patterns:
    for path in sorted(ROOT.glob(pattern)):
      for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
          found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
          found.add(node.module)
  return sorted(found)


# Runs in a fresh interpreter: refuse modules outside the closure, then import.
CHILD = r"""
import importlib, importlib.abc, importlib.metadata, json, pkgutil, re, sys
cfg = json.loads(sys.argv[1])
sys.path.insert(0, cfg["root"])
allowed = set(cfg["allowed"])
canon = lambda n: re.sub(r"[-_.]+", "-", n).lower()
providers = {
    top: {canon(d) for d in dists}
    for top, dists in importlib.metadata.packages_distributions().items()
}
ours = {"cram_jax", "experiments"}

class Refuse(importlib.abc.MetaPathFinder):
  def find_spec(self, fullname, path=None, target=None):
    top = fullname.partition(".")[0]
    # No distribution provides the interpreter's private modules (such as
    # _sysconfigdata_*): they cannot be declared, and are let through.
    if top in sys.stdlib_module_names or top in ours or top not in providers:
      return None
    if providers[top] & allowed:
      return None
    raise ModuleNotFoundError(
        f"No module named {fullname!r} (refused: from"
        f" {sorted(providers[top])}, outside the declared dependencies)",
        name=fullname)

sys.meta_path.insert(0, Refuse())

def walk(name):
  module = importlib.import_module(name)
  for info in pkgutil.iter_modules(getattr(module, "__path__", [])):
    child = f"{name}.{info.name}"
    if child not in cfg["skip"]:
      walk(child)

for package in cfg["packages"]:
  walk(package)
for name in cfg["lazy"]:
  importlib.import_module(name)
errors = {}
for label, statement in cfg["expect_errors"].items():
  try:
    exec(statement, {})
    errors[label] = None
  except ImportError as e:
    errors[label] = str(e)
print("RESULT" + json.dumps(errors))
"""


def child_config(target: str) -> dict:
  extras = [] if target == "base" else [target]
  spec = TARGETS[target]
  expect_errors = {}
  if target == "base":
    expect_errors = {
        "data": "import cram_jax.data",
        "models": "import cram_jax.models; cram_jax.models.load_bert('m', {})",
    }
  return dict(
      root=str(ROOT),
      allowed=sorted(closure(extras)),
      packages=spec["packages"],
      skip=spec.get("skip", []),
      lazy=lazy_imports(spec["scan"]),
      expect_errors=expect_errors,
  )


def run_child(config: dict) -> subprocess.CompletedProcess:
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env["JAX_PLATFORMS"] = "cpu"
  return subprocess.run(
      [sys.executable, "-c", CHILD, json.dumps(config)],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
  )


@pytest.fixture(scope="module")
def imports():
  """The four interpreters, run side by side: {target: CompletedProcess}."""
  configs = {t: child_config(t) for t in TARGETS}
  with concurrent.futures.ThreadPoolExecutor(len(configs)) as pool:
    futures = {t: pool.submit(run_child, c) for t, c in configs.items()}
    return {t: f.result() for t, f in futures.items()}


def result(proc: subprocess.CompletedProcess) -> dict:
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [s for s in proc.stdout.splitlines() if s.startswith("RESULT")][-1]
  return json.loads(line.removeprefix("RESULT"))


@pytest.mark.parametrize("target", list(TARGETS))
def test_declared_dependencies_suffice_to_import(imports, target):
  result(imports[target])


def test_missing_extras_are_named(imports):
  errors = result(imports["base"])
  assert errors["data"] is not None and errors["data"].startswith(DATA_MESSAGE)
  assert errors["models"] == MODELS_MESSAGE


def test_closure_leaves_out_what_extras_add():
  # The refusal above can only bite if the closures differ where it matters.
  base, data = closure([]), closure(["data"])
  assert {"grain", "tensorflow-datasets", "pillow"} <= data - base
  assert "safetensors" in closure(["models"]) - base
  assert {"ml-collections", "matplotlib"} <= (closure(["experiments"]) - data)


def test_every_requirement_admits_its_pin():
  pins = {}
  for line in (ROOT / "requirements.txt").read_text().splitlines():
    line = line.split("#")[0].strip()
    if line:
      req = Requirement(line)
      (version,) = [s.version for s in req.specifier if s.operator == "=="]
      pins[canonicalize_name(req.name)] = version
  declared = own_requirements(PROJECT.get("optional-dependencies", {}))
  problems = []
  for req in declared:
    name = canonicalize_name(req.name)
    if name == SELF:
      continue
    if name not in pins:
      problems.append(f"{req.name} is not pinned in requirements.txt")
    elif not req.specifier.contains(pins[name], prereleases=True):
      problems.append(f"{req} does not admit the pin {pins[name]}")
  assert not problems, "; ".join(problems)


def test_refusal_names_the_module():
  # The finder must refuse, not skip: a closure without grain cannot import it.
  config = dict(
      root=str(ROOT),
      allowed=[],
      packages=[],
      skip=[],
      lazy=[],
      expect_errors={"grain": "import grain"},
  )
  errors = result(run_child(config))
  assert re.search(r"No module named 'grain' \(refused", errors["grain"])
