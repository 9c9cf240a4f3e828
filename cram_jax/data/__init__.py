"""tensorflow-datasets sources and grain input pipelines.

`make_pipeline(name, split, ...)` is the entry point; see its docstring.

Needs the `data` extra (`pip install 'cram_jax[data]'`): importing this
package without it raises an ImportError that says so.
"""

try:
  from cram_jax.data import squad_metric
  from cram_jax.data.digits import prepare_digits
  from cram_jax.data.pipeline import make_dataset, make_pipeline
  from cram_jax.data.sampling import steps_per_epoch
  from cram_jax.data.sources import default_data_dir, open_source
  from cram_jax.data.text import (
      postprocess_squad,
      squad_references,
      wordpiece_tokenizer,
  )
except ModuleNotFoundError as error:
  # A third-party module of the extra (tensorflow_datasets, grain, tokenizers,
  # PIL, ... or one of theirs) is absent; name the extra, not just the module.
  if (error.name or '').partition('.')[0] == 'cram_jax':
    raise
  raise ImportError(
      "cram_jax.data needs the 'data' extra: pip install 'cram_jax[data]'"
      f' (missing module: {error.name})',
      name=error.name,
  ) from error

__all__ = [
    'default_data_dir',
    'make_dataset',
    'make_pipeline',
    'open_source',
    'postprocess_squad',
    'prepare_digits',
    'squad_metric',
    'squad_references',
    'steps_per_epoch',
    'wordpiece_tokenizer',
]
