"""Generation strategies: Jacobi parallel decoding (exactly greedy) and its DDGviz picture."""

from .ddgviz import ddgviz  # matplotlib is imported only when a picture is drawn
from .jacobi import MODES, JacobiDecoderOutput, jacobi_decoding, jacobi_generate

__all__ = ["MODES", "JacobiDecoderOutput", "ddgviz", "jacobi_decoding", "jacobi_generate"]
