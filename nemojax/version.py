"""The package version (``nemojax.__version__``, ``nemojax --version``, the producer of written quantization
configs); keep it equal to pyproject.toml's."""
__version__ = "0.1.0"
