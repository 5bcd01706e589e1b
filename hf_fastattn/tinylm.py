"""Deprecated location, kept for one release: the small teacher moved to `hf_fastattn.showcase.tinylm` (the
showcase, apart from the library core); import it from there."""

from .showcase.tinylm import *  # noqa: F401,F403
from .showcase.tinylm import __all__  # noqa: F401
