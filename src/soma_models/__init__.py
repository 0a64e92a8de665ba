"""soma-models: build, train and check Soma network models, exactly as the chain scores them."""

__version__ = "0.2.0"
