"""slmb: describe a small transformer language model as JSON, compile it, train it, generate with it."""

__version__ = "0.1.0"
