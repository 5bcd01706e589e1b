"""Encoder families of the BERT kind (masked LMs of the installed transformers that the rule accepts): "linear",
"fast" and "sparse" are bidirectional (a later token changes an earlier output) and padding-invariant (a padded row
gives its unpadded outputs); "sparse" whose pattern covers every key equals sdpa. Float64 models, float32 states:
tolerances as in test_causal_families."""

import pytest
import torch

import hf_fastattn

from .families import VOCAB, accepted, tiny_model

ENCODER_FAMILIES = accepted("linear", masked=True)
TOL = dict(atol=1e-5, rtol=1e-4)
N, PAD = 10, 3


def test_the_bert_kind_is_accepted():
    for family in ("bert", "roberta", "electra", "xlm-roberta", "camembert", "data2vec-text", "ernie"):
        assert family in ENCODER_FAMILIES, family


@pytest.mark.parametrize("family", ENCODER_FAMILIES)
def test_encoders_are_bidirectional_and_padding_invariant(family):
    model = tiny_model(family, masked=True)
    hf_fastattn.configure(model, pattern="strided", stride=16, local=16)
    ids = torch.randint(3, VOCAB, (1, N), generator=torch.Generator().manual_seed(0))
    padded = torch.cat([ids, torch.zeros(1, PAD, dtype=ids.dtype)], dim=1)  # right padding, as encoders get it
    mask = torch.cat([torch.ones(1, N), torch.zeros(1, PAD)], dim=1).long()
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1 - 3) % (VOCAB - 3) + 3
    with torch.no_grad():
        reference = model(ids).logits
        # bidirectional where the model is: some tiny inits (NeoMME) make position 0 blind to the rest under sdpa too
        sees_ahead = not torch.allclose(model(changed).logits[0, 0], reference[0, 0], atol=1e-6)
        for impl in ("linear", "fast", "sparse"):
            model.set_attn_implementation(impl)
            out = model(ids).logits
            assert sees_ahead == (not torch.allclose(model(changed).logits[0, 0], out[0, 0], atol=1e-6)), impl
            torch.testing.assert_close(model(padded, attention_mask=mask).logits[:, :N], out, **TOL)
            if impl == "sparse":
                torch.testing.assert_close(out, reference, **TOL)
            else:
                assert not torch.allclose(out, reference, atol=1e-6), impl  # the swap took place
