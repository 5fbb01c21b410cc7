"""memscan: dataset-scale deduplication and memorization scanner for diffusion-model training data."""

# The one place the version is written: pyproject.toml reads it (tool.setuptools.dynamic), `memscan --version`
# prints it and summary.json records it.
__version__ = "0.1.0"
