"""tensorflow-datasets sources and grain input pipelines."""
