"""Argument checks shared by the library: clear, early errors for bad inputs.

Everything here runs in Python, on values known before tracing or on static
shapes and dtypes at trace time, so it costs nothing inside a compiled step. The
one exception is :func:`check_traced_range`, for a value only known at run time.
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from cram_jax.compress import select as select_lib

# Compressor factories, registered by :func:`factory`: passing one uncalled
# (``cram(opt, global_magnitude, ...)``) gets a "did you mean" hint.
_FACTORIES: set[Callable[..., Any]] = set()


def factory(fn: Callable[..., Any]) -> Callable[..., Any]:
  """Marks ``fn`` as a compressor factory (see :func:`check_compressor`)."""
  _FACTORIES.add(fn)
  return fn


def is_traced(x: Any) -> bool:
  return isinstance(x, jax.core.Tracer)


def short(value: Any, limit: int = 80) -> str:
  """``repr(value)`` on one line, cut to ``limit`` characters."""
  if is_traced(value):
    aval = getattr(value, "aval", None)
    return f"<traced {aval.str_short() if aval is not None else 'value'}>"
  text = " ".join(repr(value).split())
  return text if len(text) <= limit else text[: limit - 3] + "..."


def dtype_of(value: Any) -> np.dtype | None:
  """The dtype of a number or array, None for anything else (str, None, ...)."""
  if isinstance(value, (str, bytes)) or value is None:
    return None
  dtype = getattr(value, "dtype", None)
  if dtype is not None:
    return dtype
  if isinstance(value, numbers.Number):
    return np.result_type(value)
  return None


def check_int(
    value: Any,
    name: str,
    owner: str,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
) -> int:
  """A Python or NumPy integer (not a bool) in ``[minimum, maximum]``, as int."""
  if isinstance(value, (bool, np.bool_)) or not isinstance(
      value, (int, np.integer)
  ):
    raise TypeError(f"{owner}: {name} must be an int, got {short(value)}")
  value = int(value)
  if (minimum is not None and value < minimum) or (
      maximum is not None and value > maximum
  ):
    bounds = (
        f">= {minimum}"
        if maximum is None
        else f"<= {maximum}"
        if minimum is None
        else f"in [{minimum}, {maximum}]"
    )
    raise ValueError(f"{owner}: {name} must be {bounds}, got {value}")
  return value


def check_positive_int(value: Any, name: str, owner: str) -> None:
  """A size: an integer >= 1 (a bool is an int to Python, never a size)."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise TypeError(
        f"{owner}: {name} must be a positive int, got "
        f"{type(value).__name__} {value!r}"
    )
  if value < 1:
    raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")


def check_real(value: Any, name: str, owner: str) -> Any:
  """A real scalar: a Python/NumPy number or a 0-d array, never a bool.

  Returns a float for concrete values and the tracer itself for traced ones;
  the range is the caller's to check.
  """
  dtype = dtype_of(value)
  if (
      dtype is None
      or dtype == np.bool_
      or not (
          jnp.issubdtype(dtype, jnp.integer)
          or jnp.issubdtype(dtype, jnp.floating)
      )
  ):
    raise TypeError(
        f"{owner}: {name} must be a real number, got {short(value)}"
        + ("" if dtype is None else f" (dtype {dtype})")
    )
  if np.ndim(value) != 0:
    raise ValueError(
        f"{owner}: {name} must be a scalar, got shape {np.shape(value)}"
    )
  return value if is_traced(value) else float(value)


def check_bool(value: Any, name: str, owner: str) -> bool:
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(
        f"{owner}: {name} must be True or False, got {short(value)}"
    )
  return bool(value)


def check_axis(axis: Any, ndim: int, owner: str, what: str = "x") -> int:
  """An int axis valid for ``ndim`` dimensions, returned non-negative."""
  axis = check_int(axis, "axis", owner)
  if not -ndim <= axis < ndim:
    raise ValueError(f"{owner}: {what} has {ndim} dimensions, no axis {axis}")
  return axis % ndim


_KEY_DATA_SHAPE = (2,)  # raw uint32 data of the default threefry key


def as_key(key: Any, owner: str = "as_key") -> jax.Array:
  """A typed PRNG key from a typed key, raw uint32 key data or an int seed."""
  if isinstance(key, (bool, np.bool_)) or key is None:
    raise TypeError(
        f"{owner}: key must be a PRNG key or an int seed, got {key!r}"
    )
  if isinstance(key, (int, np.integer)):
    return jax.random.key(int(key))
  dtype = getattr(key, "dtype", None)
  if not isinstance(key, (jax.Array, np.ndarray)) or dtype is None:
    raise TypeError(
        f"{owner}: key must be a PRNG key (jax.random.key(seed)) or an int "
        f"seed, got {short(key)}"
    )
  if jnp.issubdtype(dtype, jax.dtypes.prng_key):
    if key.shape != ():
      raise ValueError(
          f"{owner}: key must be a single PRNG key, got an array of keys of "
          f"shape {key.shape}"
      )
    return key
  if dtype == np.uint32:
    if key.shape != _KEY_DATA_SHAPE:
      raise ValueError(
          f"{owner}: raw uint32 key data must have shape {_KEY_DATA_SHAPE}, got "
          f"shape {key.shape}"
      )
    return jax.random.wrap_key_data(key)
  raise TypeError(
      f"{owner}: key must be a PRNG key or an int seed, got an array of dtype "
      f"{dtype}"
  )


def check_optimizer(optimizer: Any, owner: str) -> None:
  """TypeError unless ``optimizer`` is an optax GradientTransformation."""
  if isinstance(optimizer, optax.GradientTransformation):
    return
  if callable(optimizer):
    name = getattr(optimizer, "__qualname__", None) or short(optimizer)
    module = getattr(optimizer, "__module__", "") or ""
    if module.startswith("optax"):
      name = f"optax.{name}"
    raise TypeError(
        f"{owner}: optimizer must be an optax.GradientTransformation, got the "
        f"callable {name}; did you mean {name}(...)?"
    )
  raise TypeError(
      f"{owner}: optimizer must be an optax.GradientTransformation, got "
      f"{short(optimizer)}"
  )


def check_compressor(compressor: Any, owner: str) -> None:
  """TypeError unless ``compressor`` is a compressor (not its factory)."""
  if compressor in _FACTORIES:
    name = compressor.__name__
    raise TypeError(
        f"{owner}: got the compressor factory {name} itself; did you mean "
        f"{name}(...)? e.g. {name}(0.9)"
    )
  if not callable(compressor):
    raise TypeError(
        f"{owner}: compressor must be callable (params, key) -> "
        f"(params, masks), got {short(compressor)}"
    )


def _kind(dtype: Any) -> str:
  if dtype == jax.dtypes.float0:
    return "float0"
  for kind in ("bool", "integer", "floating", "complexfloating"):
    if jnp.issubdtype(dtype, getattr(jnp, kind if kind != "bool" else "bool_")):
      return kind
  if jnp.issubdtype(dtype, jax.dtypes.prng_key):
    return "PRNG key"
  return str(dtype)


def _shape_dtype(x: Any) -> tuple[tuple[int, ...], Any]:
  shape = getattr(x, "shape", None)
  dtype = getattr(x, "dtype", None)
  if shape is None or dtype is None:
    shape, dtype = np.shape(x), jnp.result_type(x)
  return tuple(shape), dtype


def _paths(tree: Any, is_leaf: Callable[[Any], bool] | None = None):
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
  return (
      [select_lib.path_str(p) for p, _ in flat],
      [x for _, x in flat],
      treedef,
  )


def check_same_tree(
    reference: Any,
    other: Any,
    *,
    owner: str,
    reference_name: str = "params",
    other_name: str,
    allow_none: bool = False,
    kind: str | None = None,
) -> Any:
  """Checks that ``other`` matches ``reference`` leaf for leaf; returns it.

  Leaves are matched by key path; each pair must agree in shape and in dtype
  kind (bool / integer / floating / ...), or have ``kind`` when given. With
  ``allow_none``, a None in ``other`` stands for any leaf. The error names the
  first mismatching leaf with both shapes. Containers of other types with the
  same paths (a dict for a FrozenDict, say) are accepted: the result is
  ``other`` rebuilt in the structure of ``reference``.

  Static shapes only: at trace time under ``jit`` this costs nothing per step.
  """
  r_paths, r_leaves, r_def = _paths(reference)
  o_paths, o_leaves, _ = _paths(
      other, is_leaf=(lambda x: x is None) if allow_none else None
  )
  if r_paths != o_paths:
    missing = [p for p in r_paths if p not in set(o_paths)]
    extra = [p for p in o_paths if p not in set(r_paths)]
    detail = (
        f"leaves missing from {other_name}: {missing[:6]}; extra leaves in "
        f"{other_name}: {extra[:6]}"
        if missing or extra
        else "the same leaves in another order"
    )
    raise ValueError(
        f"{owner}: {other_name} does not match the {reference_name} tree "
        f"({detail}; {reference_name} has {len(r_paths)} leaves, "
        f"{other_name} {len(o_paths)})"
    )
  for path, r, o in zip(r_paths, r_leaves, o_leaves):
    if o is None and allow_none:
      continue
    if not (
        isinstance(o, (jax.Array, np.ndarray, np.generic, numbers.Number))
        or hasattr(o, "shape")
    ):
      raise TypeError(
          f"{owner}: {other_name} leaf '{path}' is not an array: {short(o)}"
      )
    r_shape, r_dtype = _shape_dtype(r)
    o_shape, o_dtype = _shape_dtype(o)
    if r_shape != o_shape:
      raise ValueError(
          f"{owner}: {other_name} leaf '{path}' has shape {o_shape}, the "
          f"{reference_name} leaf has shape {r_shape}"
      )
    want = kind or _kind(r_dtype)
    if _kind(o_dtype) != want:
      raise TypeError(
          f"{owner}: {other_name} leaf '{path}' has dtype {o_dtype}, "
          + (
              f"not {kind}"
              if kind
              else f"the {reference_name} leaf has dtype {r_dtype} ({want})"
          )
      )
  return jax.tree.unflatten(r_def, o_leaves)


def check_floating_tree(tree: Any, *, owner: str, name: str = "params") -> None:
  """TypeError naming the first leaf of ``tree`` that is not floating point."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    _, dtype = _shape_dtype(leaf)
    if not jnp.issubdtype(dtype, jnp.floating):
      raise TypeError(
          f"{owner}: {name} leaf '{select_lib.path_str(path)}' has dtype "
          f"{dtype}; only floating-point leaves can be trained"
      )


def check_compressor_output(
    output: Any, params: Any, *, owner: str, name: str = "compressor"
) -> tuple[Any, Any]:
  """Checks ``compressor(params, key)``'s ``(compressed, masks)`` against params."""
  if not isinstance(output, (tuple, list)) or len(output) != 2:
    got = (
        f"a {type(output).__name__} of length {len(output)}"
        if isinstance(output, (tuple, list))
        else f"a {type(output).__name__}"
    )
    raise TypeError(
        f"{owner}: {name} must return a pair (compressed_params, masks), got "
        f"{got}; a function returning params only can return "
        "(f(p), jax.tree.map(lambda _: None, p)) instead"
    )
  compressed, masks = output
  compressed = check_same_tree(
      params,
      compressed,
      owner=owner,
      other_name=f"{name}'s compressed params",
  )
  masks = check_same_tree(
      params,
      masks,
      owner=owner,
      other_name=f"{name}'s masks",
      allow_none=True,
      kind="bool",
  )
  return compressed, masks


def _raise_out_of_range(value, low, high, message):
  value = np.asarray(value)
  bad = ~((value >= low) & (value <= high))  # NaN is bad too
  if np.any(bad):
    raise ValueError(f"{message}{value[bad].ravel()[0]}")
  return value


def check_traced_range(
    value: Any, low: Any, high: Any, message: str
) -> jax.Array:
  """``value``, raising ``ValueError(message + offending value)`` at run time
  if it leaves ``[low, high]`` (or is NaN). Use the returned value: the check
  is part of it (XLA drops a check whose result is unused).

  A traced value cannot be checked at trace time. The check is a compare and a
  ``lax.cond`` whose taken branch passes the value through a host
  ``jax.pure_callback`` that raises, only for a bad value: no host round trip
  otherwise. Under plain ``jax.jit`` on CPU the error surfaces as a
  ``ValueError`` carrying ``message`` (other backends may wrap it in a
  ``JaxRuntimeError``) (``checkify`` would need the caller
  to wrap the function, and would otherwise fail or stay silent). Not a
  ``jax.debug.callback``: a side-effecting operation anywhere in a program
  made XLA on CPU run BERT-base's global mask 1.6x slower.
  """
  value = jnp.asarray(value)
  bad = jnp.any(~((value >= low) & (value <= high)))

  def report(v):
    # The host re-checks: under vmap the cond runs both branches.
    return jax.pure_callback(
        functools.partial(
            _raise_out_of_range, low=low, high=high, message=message
        ),
        jax.ShapeDtypeStruct(v.shape, v.dtype),
        v,
        vmap_method="expand_dims",
    )

  return lax.cond(bad, report, lambda v: v, value)
