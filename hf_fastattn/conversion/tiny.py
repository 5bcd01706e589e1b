"""Deprecated location, kept for one release: the tiny offline stand-ins (`tiny_tokenizer`, `tiny_llama`, `corpus`)
now live in `hf_fastattn.showcase.tinylm`, the showcase's tiny teacher; import them from there. Nothing in the library core
imports this module."""

from ..showcase.tinylm import corpus, tiny_llama, tiny_tokenizer

__all__ = ["corpus", "tiny_llama", "tiny_tokenizer"]
