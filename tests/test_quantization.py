"""Quantized weights through diffusers' configs: torchao (int8 on CPU), bitsandbytes (CUDA), pipeline-level configs,
saving and reloading, and the oneDNN fast path never bypassing a quantized layer."""

import copy
import importlib.util
import os
import types

import pytest
import torch
import torch.nn.functional as F
from conftest import make_pipeline, make_transformer, make_video_pipeline, make_vqmodel
from diffusers.utils import logging
from torch.profiler import ProfilerActivity, profile

from nar_diffusers import NARPipeline, NARTransformer, NARVideoPipeline, NeighborScheduler
from nar_diffusers.models.linear import Linear, onednn_linear_active
from nar_diffusers.utils.quantization import (
    pipeline_quantization_config,
    quantized_linear_layers,
    torchao_config,
    torchao_quant_type,
    weight_bytes,
)

try:
    import torchao  # noqa: F401

    HAS_TORCHAO = True
except ImportError:
    HAS_TORCHAO = False
needs_torchao = pytest.mark.skipif(not HAS_TORCHAO, reason="torchao is not installed (the `quantization` extra)")
needs_onednn = pytest.mark.skipif(not onednn_linear_active(), reason="this PyTorch build has no oneDNN linear")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
needs_bitsandbytes = pytest.mark.skipif(
    not (torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes")), reason="needs CUDA and bitsandbytes"
)


@pytest.fixture(autouse=True)
def quiet_diffusers():
    # diffusers warns on every int8 load that it prefers bfloat16; float32 is what these tests check.
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    yield
    logging.set_verbosity(verbosity)


def _ran_onednn(fn) -> bool:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return any("_linear_pointwise" in event.name for event in prof.events())


def _linear_count(model) -> int:
    return sum(isinstance(m, torch.nn.Linear) for m in model.modules())


def _load_quantized(model, folder, quant_type="int8wo") -> NARTransformer:
    model.save_pretrained(folder)
    return NARTransformer.from_pretrained(folder, quantization_config=torchao_config(quant_type), dtype=torch.float32)


def _logits(model, seed=0):
    grid = model.config.grid_size
    ids = torch.randint(0, model.config.vocab_size, (2, *grid), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids, class_labels=torch.tensor([1, 2])).logits


# --- configs ------------------------------------------------------------------------------------------------------


def test_an_unknown_quant_type_is_a_value_error_naming_the_allowed_ones():
    with pytest.raises(ValueError, match="quant_type.*int8wo.*int8dq.*int4wo"):
        torchao_quant_type("int3")


def test_an_int4_group_size_outside_the_allowed_ones_is_a_value_error():
    with pytest.raises(ValueError, match="group_size.*32, 64, 128, 256"):
        torchao_quant_type("int4wo", group_size=100)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_int4_weight_only_without_cuda_is_refused_with_the_cpu_alternatives():
    with pytest.raises(ValueError, match="int4wo.*CUDA.*int8wo"):
        torchao_config("int4wo")


def test_a_pipeline_config_must_name_a_component():
    with pytest.raises(ValueError, match="components_to_quantize"):
        pipeline_quantization_config("int8wo", components_to_quantize=[])


# --- the oneDNN fast path -----------------------------------------------------------------------------------------


class _WrappedWeight(torch.Tensor):
    """A tensor subclass standing in for any quantizer's weight type (it reports float32 like torchao's do)."""


@needs_onednn
def test_a_tensor_subclass_weight_goes_through_f_linear_not_onednn():
    torch.manual_seed(0)
    layer = Linear(16, 24)
    layer.weight = torch.nn.Parameter(layer.weight.detach().as_subclass(_WrappedWeight), requires_grad=False)
    assert layer.weight.dtype == torch.float32 and type(layer.weight) is _WrappedWeight
    x = torch.randn(3, 16)
    with torch.no_grad():
        assert not _ran_onednn(lambda: layer(x))
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))


@needs_torchao
@needs_onednn
def test_a_torchao_int8_layer_never_takes_the_onednn_path():
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    torch.manual_seed(0)
    layer = Linear(32, 24)
    x = torch.randn(4, 32)
    with torch.no_grad():
        dense = layer(x)
        assert _ran_onednn(lambda: layer(x))
        quantize_(layer, Int8WeightOnlyConfig())
        assert not _ran_onednn(lambda: layer(x))
        # torchao's own reference: `F.linear` dispatched to its quantized weight
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=0, atol=0)
    assert not torch.equal(layer(x), dense)


# --- torchao through `from_pretrained` ----------------------------------------------------------------------------


@needs_torchao
@pytest.mark.parametrize("quant_type", ["int8wo", "int8dq"])
def test_from_pretrained_with_torchao_quantizes_every_linear_layer(quant_type, tmp_path):
    quantized = _load_quantized(make_transformer(), tmp_path, quant_type)
    layers = quantized_linear_layers(quantized)
    assert len(layers) == _linear_count(quantized) > 0
    assert set(layers.values()) == {"Int8Tensor"}
    assert quantized.config.quantization_config.quant_method == "torchao"


@needs_torchao
def test_the_quantized_model_equals_torchao_applied_directly_and_differs_from_float32(tmp_path):
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    dense = make_transformer()
    loaded = _load_quantized(dense, tmp_path)
    reference = copy.deepcopy(dense)
    quantize_(reference, Int8WeightOnlyConfig())
    ours, theirs, full = _logits(loaded), _logits(reference), _logits(dense)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert (ours - full).abs().max() > 0  # quantization is active
    torch.testing.assert_close(ours, full, rtol=0, atol=5e-2)  # and only rounds the weights
    if onednn_linear_active():
        assert _ran_onednn(lambda: _logits(dense)) and not _ran_onednn(lambda: _logits(loaded))


@needs_torchao
def test_a_quantized_model_saves_to_safetensors_and_reloads_quantized_without_unpickling(tmp_path, monkeypatch):
    quantized = _load_quantized(make_transformer(), tmp_path / "dense")
    quantized.save_pretrained(tmp_path / "int8")
    assert sorted(os.listdir(tmp_path / "int8")) == ["config.json", "diffusion_pytorch_model.safetensors"]

    def no_pickle(*args, **kwargs):
        raise AssertionError("torch.load (pickle) was called")

    monkeypatch.setattr(torch, "load", no_pickle)
    reloaded = NARTransformer.from_pretrained(tmp_path / "int8", dtype=torch.float32)
    assert len(quantized_linear_layers(reloaded)) == _linear_count(reloaded)
    torch.testing.assert_close(_logits(reloaded), _logits(quantized), rtol=0, atol=0)


@needs_torchao
def test_a_quantized_model_saved_as_bin_reloads_with_weights_only(tmp_path, monkeypatch):
    quantized = _load_quantized(make_transformer(), tmp_path / "dense")
    quantized.save_pretrained(tmp_path / "int8", safe_serialization=False)
    calls = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    reloaded = NARTransformer.from_pretrained(tmp_path / "int8", dtype=torch.float32)
    assert calls and all(flag is True for flag in calls)
    torch.testing.assert_close(_logits(reloaded), _logits(quantized), rtol=0, atol=0)


@needs_torchao
def test_weight_bytes_count_what_an_int8_weight_stores_not_the_float32_it_reports(tmp_path):
    dense = make_transformer()
    quantized = _load_quantized(dense, tmp_path)
    linear_bytes = sum(m.weight.numel() * 4 for m in dense.modules() if isinstance(m, torch.nn.Linear))
    assert weight_bytes(dense) == sum(t.numel() * t.element_size() for t in (*dense.parameters(), *dense.buffers()))
    saved = weight_bytes(dense) - weight_bytes(quantized)
    assert 0.7 * linear_bytes <= saved < 0.75 * linear_bytes  # int8 data (1/4) plus one float32 scale per row


# --- pipelines ----------------------------------------------------------------------------------------------------


@needs_torchao
@pytest.mark.parametrize("make, pipeline_class", [(make_pipeline, NARPipeline), (make_video_pipeline, NARVideoPipeline)])
def test_a_pipeline_quantization_config_quantizes_the_transformer_only(make, pipeline_class, tmp_path):
    make().save_pretrained(tmp_path / "dense")
    pipe = pipeline_class.from_pretrained(
        tmp_path / "dense", quantization_config=pipeline_quantization_config("int8wo"), dtype=torch.float32
    )
    assert len(quantized_linear_layers(pipe.transformer)) == _linear_count(pipe.transformer)
    assert quantized_linear_layers(pipe.vqvae) == {}
    pipe.set_progress_bar_config(disable=True)
    tokens = pipe(class_labels=[1, 2], guidance_scale=2.0, do_sample=False, output_type="latent", return_dict=False)[0]
    assert tuple(tokens.shape) == (2, *pipe.transformer.config.grid_size)

    pipe.save_pretrained(tmp_path / "int8")
    reloaded = pipeline_class.from_pretrained(tmp_path / "int8", dtype=torch.float32)
    assert len(quantized_linear_layers(reloaded.transformer)) == _linear_count(reloaded.transformer)
    reloaded.set_progress_bar_config(disable=True)
    again = reloaded(class_labels=[1, 2], guidance_scale=2.0, do_sample=False, output_type="latent", return_dict=False)
    assert torch.equal(again[0], tokens)


# --- quality ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_model() -> NARTransformer:
    """A tiny class-conditional NAR model trained (600 steps, ~40 s) on scikit-learn's 8x8 digits, pixels as 9
    tokens: enough for its samples to be read as the digit asked for about 90% of the time."""
    from sklearn.datasets import load_digits

    from nar_diffusers.commands.demo.common import train_token_model

    digits = load_digits()
    tokens = torch.as_tensor(digits.images // 2, dtype=torch.long)
    settings = types.SimpleNamespace(model_size="tiny", batch_size=32, steps=600, learning_rate=3e-3, warmup_steps=10)
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        return train_token_model("nar", tokens, torch.as_tensor(digits.target), settings, 0, "cpu", vocab_size=9)
    finally:
        logging.set_verbosity(verbosity)


def _greedy(transformer, guidance_scales=(1.0, 2.0, 3.0)) -> torch.Tensor:
    pipe = NARPipeline(transformer=transformer, vqvae=make_vqmodel(9), scheduler=NeighborScheduler(grid_size=(8, 8)))
    pipe.set_progress_bar_config(disable=True)
    labels = list(range(10))
    return torch.cat([
        pipe(class_labels=labels, guidance_scale=g, do_sample=False, output_type="latent").images
        for g in guidance_scales
    ])  # fmt: skip


@needs_torchao
def test_int8_weights_keep_greedy_tokens_of_a_trained_digits_model_on_95_percent_of_cells(digits_model, tmp_path):
    quantized = _load_quantized(digits_model, tmp_path)
    dense_tokens, int8_tokens = _greedy(digits_model), _greedy(quantized)
    assert dense_tokens.numel() == 3 * 10 * 64
    assert (dense_tokens == int8_tokens).float().mean() >= 0.95


def _digit_accuracy(transformer, kv_cache_dtype=None, samples_per_class: int = 50) -> float:
    """Sampled grids (tokens = pixel intensity // 2) read by a logistic regression fitted on the real digits."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    digits = load_digits()
    classifier = LogisticRegression(max_iter=2000, random_state=0).fit(digits.data, digits.target)
    pipe = NARPipeline(transformer=transformer, vqvae=make_vqmodel(9), scheduler=NeighborScheduler(grid_size=(8, 8)))
    pipe.set_progress_bar_config(disable=True)
    labels = torch.arange(10).repeat_interleave(samples_per_class)
    tokens = pipe(class_labels=labels.tolist(), guidance_scale=2.0, temperature=0.6, top_k=3, output_type="latent",
                  generator=torch.Generator().manual_seed(0), kv_cache_dtype=kv_cache_dtype).images  # fmt: skip
    return float((classifier.predict((tokens * 2).flatten(1).numpy()) == labels.numpy()).mean())


@needs_torchao
@pytest.mark.skipif(not hasattr(torch, "float8_e4m3fn"), reason="this torch has no float8_e4m3fn")
def test_int8_weights_and_a_float8_cache_keep_the_digit_classifier_accuracy_within_2_points(digits_model, tmp_path):
    reference = _digit_accuracy(digits_model)
    assert reference > 0.8  # the trained model draws recognisable digits: the comparison means something
    quantized = _load_quantized(digits_model, tmp_path)
    for transformer, kv_cache_dtype in ((quantized, None), (digits_model, torch.float8_e4m3fn),
                                        (quantized, torch.float8_e4m3fn)):  # fmt: skip
        assert abs(_digit_accuracy(transformer, kv_cache_dtype) - reference) <= 0.02


# --- bitsandbytes and int4 (CUDA) ---------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_bitsandbytes_without_a_gpu_is_refused_by_diffusers(tmp_path):
    from diffusers import BitsAndBytesConfig

    make_transformer().save_pretrained(tmp_path)
    with pytest.raises(RuntimeError, match="GPU"):
        NARTransformer.from_pretrained(tmp_path, quantization_config=BitsAndBytesConfig(load_in_8bit=True))


@needs_bitsandbytes
@pytest.mark.parametrize("bits, layer_type", [(8, "Linear8bitLt"), (4, "Linear4bit")])
def test_bitsandbytes_replaces_every_linear_layer_and_generates_on_cuda(bits, layer_type, tmp_path):
    from diffusers import BitsAndBytesConfig

    make_pipeline(hidden_size=64).save_pretrained(tmp_path)
    config = (BitsAndBytesConfig(load_in_8bit=True) if bits == 8 else
              BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float16))  # fmt: skip
    transformer = NARTransformer.from_pretrained(tmp_path, subfolder="transformer", quantization_config=config,
                                                 dtype=torch.float16)  # fmt: skip
    assert set(quantized_linear_layers(transformer).values()) == {layer_type}
    pipe = NARPipeline.from_pretrained(tmp_path, transformer=transformer, dtype=torch.float16).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    tokens = pipe(class_labels=[1, 2], guidance_scale=2.0, do_sample=False, output_type="latent").images
    assert tuple(tokens.shape) == (2, 4, 4)


@needs_torchao
@needs_cuda
def test_int4_weight_only_quantizes_and_generates_on_cuda(tmp_path):
    make_pipeline(hidden_size=128, num_attention_heads=4).save_pretrained(tmp_path)
    pipe = NARPipeline.from_pretrained(
        tmp_path, quantization_config=pipeline_quantization_config("int4wo", group_size=32), dtype=torch.bfloat16,
        device_map="cuda",
    )  # fmt: skip
    assert quantized_linear_layers(pipe.transformer)
    pipe.set_progress_bar_config(disable=True)
    tokens = pipe(class_labels=[1, 2], guidance_scale=2.0, do_sample=False, output_type="latent").images
    assert tuple(tokens.shape) == (2, 4, 4)
