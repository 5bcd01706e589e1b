"""A user's model on a CUDA GPU: the registered attention implementations run the compiled Triton kernels (backend
"auto" picks them for CUDA tensors) and give what the same weights give on the CPU's torch path (logits, greedy
generation through the recurrent cache). Needs a CUDA GPU: skipped (and reported as skipped) without one."""

import copy

import pytest
import torch

import hf_fastattn  # noqa: F401  (registers the attention implementations)
import hf_fastattn.kernels.dispatch as dispatch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the compiled kernels)")


@pytest.fixture
def backends_chosen(monkeypatch):
    """Every backend `resolve_backend` returned while the test ran."""
    chosen = []
    resolve = dispatch.resolve_backend

    def recording(backend, *tensors):
        chosen.append(resolve(backend, *tensors))
        return chosen[-1]

    monkeypatch.setattr(dispatch, "resolve_backend", recording)
    return chosen


@pytest.mark.parametrize("impl", ["linear", "fast", "sparse"])
def test_cuda_model_matches_the_cpu_torch_path(impl, make_tiny_model, backends_chosen):
    model = make_tiny_model("llama", attn_implementation=impl)
    ids = torch.randint(3, 96, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
        gen_ref = model.generate(ids[:1, :12], max_new_tokens=16, do_sample=False)
        backends_chosen.clear()
        cuda_model = copy.deepcopy(model).cuda()
        out = cuda_model(ids.cuda()).logits.cpu()
        assert "triton" in backends_chosen, backends_chosen  # the compiled kernels ran, not the torch path
        gen = cuda_model.generate(ids[:1, :12].cuda(), max_new_tokens=16, do_sample=False).cpu()
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=1e-3)
    assert gen.tolist() == gen_ref.tolist()


@pytest.mark.parametrize("impl", ["linear", "fast"])
def test_cuda_training_step_matches_the_cpu_torch_path(impl, make_tiny_model, backends_chosen):
    """The kernels' backward in a model: the gradients of every weight equal the CPU torch path's."""
    model = make_tiny_model("llama", attn_implementation=impl).train()
    ids = torch.randint(3, 96, (2, 40), generator=torch.Generator().manual_seed(1))
    cuda_model = copy.deepcopy(model).cuda()
    model(ids, labels=ids).loss.backward()
    backends_chosen.clear()
    cuda_model(ids.cuda(), labels=ids.cuda()).loss.backward()
    assert "triton" in backends_chosen, backends_chosen
    for (name, p), p_cuda in zip(model.named_parameters(), cuda_model.parameters()):
        torch.testing.assert_close(p_cuda.grad.cpu(), p.grad, atol=2e-4, rtol=2e-3, msg=lambda m, n=name: f"{n}: {m}")
