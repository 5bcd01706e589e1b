"""hf_fastattn: fast attention for Hugging Face Transformers.

`import hf_fastattn` registers the attention implementations "linear", "fast", "sparse" and "mqa" with
transformers' `AttentionInterface` and `AttentionMaskInterface`, so that
`AutoModelForCausalLM.from_pretrained(path, attn_implementation="fast")` works; `hf_fastattn.register_attention_variant`
adds another (see the README's "Adding an attention variant"). Causal "linear" and "fast" models
then `generate` with a constant-size `RecurrentCache` instead of a growing K/V cache. Options go in `config.fastattn`
(see `FastAttnOptions`; set them with `hf_fastattn.configure(model_or_config, **options)`).
`hf_fastattn.convert(model, method)` converts a checkpoint (T2R, Hedgehog, MQA/GQA, ...); after `import hf_fastattn`,
`from_pretrained` restores converted checkpoints. `model.generate(ids, custom_generate=hf_fastattn.jacobi_decoding)`
decodes greedily with Jacobi / lookahead guesses (exactly greedy's output). `hf_fastattn.load_causal_lm(name)` loads
a local folder, a Hub id, a `.gguf` file or a short name such as "smollm2-135m" (fetched once, offline after).
"""

from .conversion import convert  # also registers converted model types with the Auto classes
from .generation import jacobi_decoding, jacobi_generate
from .integration.cache import RecurrentCache
from .integration.compatibility import incompatibility
from .integration.patching import (
    enable_recurrent_decoding,
    install_attn_implementation_checks,
    install_generate_hook,
)
from .integration.registry import FastAttnOptions, configure, register
from .integration.variants import (
    register_attention_variant,
    unregister_attention_variant,
    variant_names,
    variant_options,
)
from .loading import load_causal_lm
from .ops import fast_attention, linear_attention, sparse_attention

register()
install_generate_hook()
install_attn_implementation_checks()

__version__ = "0.1.0"


def __getattr__(name: str):
    # IMPLEMENTATIONS: the registered variants' names, read when asked (it includes variants registered later)
    if name == "IMPLEMENTATIONS":
        return variant_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "IMPLEMENTATIONS",
    "FastAttnOptions",
    "RecurrentCache",
    "__version__",
    "configure",
    "convert",
    "enable_recurrent_decoding",
    "fast_attention",
    "incompatibility",
    "jacobi_decoding",
    "jacobi_generate",
    "linear_attention",
    "load_causal_lm",
    "register",
    "register_attention_variant",
    "sparse_attention",
    "unregister_attention_variant",
    "variant_names",
    "variant_options",
]
