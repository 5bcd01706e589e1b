"""Built-in conversion methods, one module each; importing this package registers them by name."""

from . import hedgehog, linear_fast, mqa, t2r  # noqa: F401
