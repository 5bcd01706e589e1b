"""Conversion of pretrained checkpoints to efficient attention: T2R, Hedgehog / LoLCATs, linear, fast, MQA / GQA.

    model = hf_fastattn.conversion.convert(model, "hedgehog", hybrid=True)

then uptrain with `hf_fastattn.conversion.distill` (attention transfer, then LoRA or full fine-tuning with the HF
`Trainer`) and `save_pretrained`; importing this package registers the converted model types with the Auto classes
(see `modeling`).
"""

from .core import (
    CONVERSION_METHODS,
    MethodConfig,
    conversion_spec,
    convert,
    method_config,
    register_conversion_method,
)
from .families import FAMILIES
from .modeling import ConvertedModel, register_auto_classes

register_auto_classes()

__all__ = [
    "CONVERSION_METHODS",
    "FAMILIES",
    "ConvertedModel",
    "MethodConfig",
    "conversion_spec",
    "convert",
    "method_config",
    "register_conversion_method",
]
