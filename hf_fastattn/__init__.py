"""hf_fastattn: fast attention for Hugging Face Transformers.

`import hf_fastattn` registers the attention implementations "linear", "fast", "sparse" and "mqa" with
transformers' `AttentionInterface` and `AttentionMaskInterface`, so that
`AutoModelForCausalLM.from_pretrained(path, attn_implementation="fast")` works.
"""

from .ops import fast_attention, linear_attention, sparse_attention

__version__ = "0.1.0"

__all__ = ["fast_attention", "linear_attention", "sparse_attention", "__version__"]
