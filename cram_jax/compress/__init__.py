"""Compression operators on params pytrees."""
from cram_jax.compress.select import DEFAULT, Selection, path_str
