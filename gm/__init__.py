"""gm: reproducible training of generative image models."""

__version__ = "0.1.0"
