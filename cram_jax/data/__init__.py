"""tensorflow-datasets sources and grain input pipelines.

`make_pipeline(name, split, ...)` is the entry point; see its docstring.
"""

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
