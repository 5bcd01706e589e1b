"""Generation strategies: Jacobi parallel decoding (exactly greedy) and its DDGviz picture."""

from .jacobi import MODES, JacobiDecoderOutput, jacobi_decoding, jacobi_generate


def __getattr__(name):
    # ddgviz pulls in matplotlib: import it only when asked for
    if name == "ddgviz":
        from .ddgviz import ddgviz

        return ddgviz
    raise AttributeError(name)


__all__ = ["MODES", "JacobiDecoderOutput", "ddgviz", "jacobi_decoding", "jacobi_generate"]
