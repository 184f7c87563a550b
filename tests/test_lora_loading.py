import pytest
import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from conftest import make_pipeline, make_text_pipeline
from nar_diffusers import NARPipeline


def greedy(pipe, **kwargs):
    if pipe.transformer.condition_type == "class":
        kwargs.setdefault("class_labels", [1, 4])
    else:
        kwargs.setdefault("prompt", ["a red fox", "a cat"])
    return pipe(output_type="latent", do_sample=False, guidance_scale=1.0, **kwargs).images


def save_random_lora(pipe, folder, seed: int, rank: int = 4, alpha: int = 8) -> None:
    """Attach a LoRA with random (non-zero) weights to `pipe.transformer`, save it, then remove it."""
    transformer = pipe.transformer
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=["qkv", "out_proj"]), adapter_name="tmp")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    NARPipeline.save_lora_weights(folder, transformer_lora_layers=get_peft_model_state_dict(transformer, adapter_name="tmp"))
    transformer.delete_adapters("tmp")


@pytest.fixture
def lora_dirs(tmp_path):
    source = make_text_pipeline()
    first, second = tmp_path / "lora_a", tmp_path / "lora_b"
    save_random_lora(source, first, seed=1)
    save_random_lora(source, second, seed=2)
    return first, second


def test_saved_lora_file_has_the_diffusers_layout(lora_dirs):
    from safetensors.torch import load_file

    state = load_file(lora_dirs[0] / "pytorch_lora_weights.safetensors")
    assert state and all(key.startswith("transformer.") and "lora" in key for key in state)


def test_loading_a_lora_changes_the_output_and_scale_zero_or_unload_gives_the_base_back(lora_dirs):
    pipe = make_text_pipeline()
    base = greedy(pipe)
    pipe.load_lora_weights(lora_dirs[0], adapter_name="a")
    with_lora = greedy(pipe)
    assert not torch.equal(with_lora, base)
    pipe.set_adapters(["a"], adapter_weights=[0.0])
    assert torch.equal(greedy(pipe), base)
    pipe.set_adapters(["a"], adapter_weights=[1.0])
    assert torch.equal(greedy(pipe), with_lora)
    pipe.unload_lora_weights()
    assert torch.equal(greedy(pipe), base)


def test_lora_loads_from_a_file_path_and_from_a_state_dict(lora_dirs):
    from safetensors.torch import load_file

    by_folder = make_text_pipeline()
    by_folder.load_lora_weights(lora_dirs[0])
    by_file = make_text_pipeline()
    by_file.load_lora_weights(str(lora_dirs[0] / "pytorch_lora_weights.safetensors"))
    by_dict = make_text_pipeline()
    by_dict.load_lora_weights(load_file(lora_dirs[0] / "pytorch_lora_weights.safetensors"))
    assert torch.equal(greedy(by_folder), greedy(by_file))
    assert torch.equal(greedy(by_folder), greedy(by_dict))


def test_two_adapters_combine_with_weights(lora_dirs):
    pipe = make_text_pipeline()
    pipe.load_lora_weights(lora_dirs[0], adapter_name="a")
    pipe.load_lora_weights(lora_dirs[1], adapter_name="b")
    assert set(pipe.get_list_adapters()["transformer"]) == {"a", "b"}
    pipe.set_adapters(["a", "b"], adapter_weights=[1.0, 0.0])
    only_a = greedy(pipe)
    pipe.set_adapters(["a"])
    assert torch.equal(only_a, greedy(pipe))
    pipe.set_adapters(["a", "b"], adapter_weights=[1.0, 1.0])
    assert pipe.get_active_adapters() == ["a", "b"]
    assert not torch.equal(greedy(pipe), only_a)


def test_fuse_then_unfuse_restores_the_base_weights(lora_dirs):
    pipe = make_text_pipeline()
    base_weights = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    pipe.load_lora_weights(lora_dirs[0], adapter_name="a")
    with_lora = greedy(pipe)
    pipe.fuse_lora()
    qkv = pipe.transformer.blocks[0].attention.qkv
    assert not torch.allclose(qkv.base_layer.weight, base_weights["blocks.0.attention.qkv.weight"])
    assert torch.equal(greedy(pipe), with_lora)
    pipe.unfuse_lora()
    torch.testing.assert_close(qkv.base_layer.weight, base_weights["blocks.0.attention.qkv.weight"], atol=1e-6, rtol=0)
    pipe.unload_lora_weights()
    for key, value in pipe.transformer.state_dict().items():
        torch.testing.assert_close(value, base_weights[key], atol=1e-6, rtol=0)


def test_lora_works_on_class_conditional_pipelines_too(tmp_path):
    source = make_pipeline()
    save_random_lora(source, tmp_path, seed=3)
    pipe = make_pipeline()
    base = greedy(pipe)
    pipe.load_lora_weights(tmp_path)
    assert not torch.equal(greedy(pipe), base)


def test_a_checkpoint_without_lora_keys_is_rejected():
    pipe = make_pipeline()
    with pytest.raises(ValueError, match="lora"):
        pipe.load_lora_weights({"transformer.blocks.0.attention.qkv.weight": torch.zeros(1)})
