"""hf_fastattn: fast attention for Hugging Face Transformers.

`import hf_fastattn` registers the attention implementations "linear", "fast", "sparse" and "mqa" with
transformers' `AttentionInterface` and `AttentionMaskInterface`, so that
`AutoModelForCausalLM.from_pretrained(path, attn_implementation="fast")` works. Options go in `config.fastattn`
(see `FastAttnOptions`; set them with `hf_fastattn.configure(model_or_config, **options)`).
"""

from .integration.registry import IMPLEMENTATIONS, SUPPORTED_MODEL_TYPES, FastAttnOptions, configure, register
from .ops import fast_attention, linear_attention, sparse_attention

register()

__version__ = "0.1.0"

__all__ = [
    "IMPLEMENTATIONS",
    "SUPPORTED_MODEL_TYPES",
    "FastAttnOptions",
    "__version__",
    "configure",
    "fast_attention",
    "linear_attention",
    "register",
    "sparse_attention",
]
