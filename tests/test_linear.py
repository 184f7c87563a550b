import pytest
import torch
import torch.nn.functional as F
from conftest import make_pipeline, make_text_transformer
from torch.profiler import ProfilerActivity, profile

from nar_diffusers.models.linear import Linear, onednn_linear_active, set_onednn_linear

needs_onednn = pytest.mark.skipif(not onednn_linear_active(), reason="this PyTorch build has no oneDNN linear")


def _ran_onednn(fn) -> bool:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return any("_linear_pointwise" in event.name for event in prof.events())


@pytest.fixture
def onednn_off():
    previous = set_onednn_linear(False)
    yield
    set_onednn_linear(previous)


@needs_onednn
@pytest.mark.parametrize("shape", [(1, 16), (2, 5, 16), (3, 1, 4, 16)])
@pytest.mark.parametrize("bias", [False, True])
def test_cpu_inference_runs_through_onednn_and_equals_f_linear(shape, bias):
    torch.manual_seed(0)
    layer = Linear(16, 24, bias=bias)
    x = torch.randn(shape)
    with torch.no_grad():
        assert _ran_onednn(lambda: layer(x))
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-6)


@needs_onednn
def test_training_uses_f_linear_and_gets_gradients():
    layer = Linear(16, 24)
    x = torch.randn(3, 16)
    assert not _ran_onednn(lambda: layer(x).sum().backward())
    assert layer.weight.grad is not None and layer.bias.grad is not None


@needs_onednn
def test_other_dtypes_use_f_linear():
    layer = Linear(16, 24).to(torch.bfloat16)
    with torch.no_grad():
        assert not _ran_onednn(lambda: layer(torch.randn(2, 16, dtype=torch.bfloat16)))


@needs_onednn
def test_the_onednn_path_can_be_switched_off(onednn_off):
    layer = Linear(16, 24)
    with torch.no_grad():
        assert not onednn_linear_active()
        assert not _ran_onednn(lambda: layer(torch.randn(2, 16)))


def test_linear_keeps_the_nn_linear_state_dict_and_type():
    layer = Linear(16, 24, bias=False)
    assert isinstance(layer, torch.nn.Linear)
    assert list(layer.state_dict()) == ["weight"]


def test_switch_rejects_non_bool():
    with pytest.raises(TypeError, match="enabled"):
        set_onednn_linear("yes")


def test_every_linear_layer_of_the_transformers_has_the_fast_path():
    for model in (make_pipeline().transformer, make_text_transformer()):
        layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        assert layers and all(isinstance(m, Linear) for m in layers)


@needs_onednn
def test_generation_gives_the_same_tokens_with_and_without_onednn():
    pipe = make_pipeline()
    kwargs = dict(class_labels=[1, 2], guidance_scale=3.0, output_type="latent", height=4, width=4)
    fast = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    previous = set_onednn_linear(False)
    try:
        reference = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    finally:
        set_onednn_linear(previous)
    assert torch.equal(fast, reference)
