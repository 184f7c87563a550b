import json
import logging

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file

from conftest import make_pipeline, make_text_pipeline
from nar_diffusers import NARPipeline


def greedy(pipe, **kwargs):
    if pipe.transformer.condition_type == "class":
        kwargs.setdefault("class_labels", [1, 4])
    else:
        kwargs.setdefault("prompt", ["a red fox", "a cat"])
    return pipe(output_type="latent", do_sample=False, guidance_scale=1.0, **kwargs).images


def save_random_lora(pipe, folder, seed: int, rank: int = 4, alpha: int = 8, with_config: bool = False) -> None:
    """Attach a LoRA with random (non-zero) weights to `pipe.transformer`, save it, then remove it.

    With `with_config`, its LoraConfig goes into the file metadata (as the training script does).
    """
    transformer = pipe.transformer
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=["qkv", "out_proj"])
    transformer.add_adapter(config, adapter_name="tmp")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    NARPipeline.save_lora_weights(
        folder,
        transformer_lora_layers=get_peft_model_state_dict(transformer, adapter_name="tmp"),
        transformer_lora_adapter_metadata=config.to_dict() if with_config else None,
    )
    transformer.delete_adapters("tmp")


def snapshot(transformer) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in transformer.state_dict().items()}


def assert_unchanged(transformer, before: dict[str, torch.Tensor], adapters=(), atol: float = 0.0) -> None:
    """Same parameters (names and values) as `before`, and only the adapters `adapters`."""
    assert set(getattr(transformer, "peft_config", None) or {}) == set(adapters)
    if not adapters:
        assert not any(isinstance(module, BaseTunerLayer) for module in transformer.modules())
    after = transformer.state_dict()
    assert list(after) == list(before)
    for key, value in after.items():
        torch.testing.assert_close(value, before[key], atol=atol, rtol=0)


@pytest.fixture
def lora_dirs(tmp_path):
    source = make_text_pipeline()
    first, second = tmp_path / "lora_a", tmp_path / "lora_b"
    save_random_lora(source, first, seed=1)
    save_random_lora(source, second, seed=2)
    return first, second


def test_saved_lora_file_has_the_diffusers_layout(lora_dirs):
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


def lora_delta(folder) -> dict[str, torch.Tensor]:
    """`lora_B @ lora_A` per base weight name, from a diffusers-layout file saved without metadata (scale 1.0)."""
    from safetensors.torch import load_file

    state = load_file(folder / "pytorch_lora_weights.safetensors")
    modules = {key.removeprefix("transformer.").split(".lora_")[0] for key in state}
    return {f"{m}.weight": state[f"transformer.{m}.lora_B.weight"] @ state[f"transformer.{m}.lora_A.weight"]
            for m in modules}


def test_fuse_then_unload_bakes_the_lora_into_the_base_weights(lora_dirs):
    pipe = make_text_pipeline()
    base_weights = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    pipe.load_lora_weights(lora_dirs[0], adapter_name="a")
    with_lora = greedy(pipe)
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    assert not any(isinstance(m, BaseTunerLayer) for m in pipe.transformer.modules())
    delta = lora_delta(lora_dirs[0])
    assert delta and set(pipe.transformer.state_dict()) == set(base_weights)
    for key, value in pipe.transformer.state_dict().items():
        torch.testing.assert_close(value, base_weights[key] + delta.get(key, 0), atol=1e-6, rtol=0)
    assert torch.equal(greedy(pipe), with_lora)


def test_unfuse_then_unload_returns_the_base_weights(lora_dirs):
    pipe = make_text_pipeline()
    base = greedy(pipe)
    base_weights = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    pipe.load_lora_weights(lora_dirs[0], adapter_name="a")
    with_lora = greedy(pipe)
    pipe.fuse_lora()
    qkv = pipe.transformer.blocks[0].attention.qkv
    assert not torch.allclose(qkv.base_layer.weight, base_weights["blocks.0.attention.qkv.weight"])
    assert torch.equal(greedy(pipe), with_lora)
    pipe.unfuse_lora()
    pipe.unload_lora_weights()
    assert_unchanged(pipe.transformer, base_weights, atol=1e-6)
    assert torch.equal(greedy(pipe), base)


def test_unload_without_fusing_returns_the_base_weights(lora_dirs):
    pipe = make_text_pipeline()
    base_weights = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    pipe.load_lora_weights(lora_dirs[0], adapter_name="a")
    pipe.unload_lora_weights()
    assert_unchanged(pipe.transformer, base_weights, atol=1e-6)


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


# Loading a LoRA that does not fit: errors name the modules, and nothing is left half-loaded.


def save_peft_adapter(folder, seed: int = 0, rank: int = 4, alpha: int = 8, **transformer_overrides):
    """Save a random LoRA with peft's own `save_pretrained` (adapter_model.safetensors + adapter_config.json).

    Returns the weights with the LoRA merged in, computed by peft (the reference for a correct load).
    """
    transformer = make_text_pipeline(with_text_encoder=False, **transformer_overrides).transformer
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=["qkv", "out_proj"], init_lora_weights=False)
    model = get_peft_model(transformer, config)
    model.save_pretrained(folder)
    return {k: v.clone() for k, v in model.merge_and_unload().state_dict().items()}


def fused_weights(pipe) -> dict[str, torch.Tensor]:
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    return pipe.transformer.state_dict()


@pytest.mark.parametrize("source", ["folder", "file"])
def test_peft_format_adapter_loads_with_rank_and_alpha_from_its_adapter_config(tmp_path, source):
    merged = save_peft_adapter(tmp_path, rank=4, alpha=8)  # scale alpha / rank = 2
    assert all(key.startswith("base_model.model.") for key in load_file(tmp_path / "adapter_model.safetensors"))
    pipe = make_text_pipeline()
    pipe.load_lora_weights(tmp_path if source == "folder" else str(tmp_path / "adapter_model.safetensors"))
    assert pipe.transformer.blocks[2].attention.qkv.scaling["default_0"] == 2.0
    weights = fused_weights(pipe)
    assert set(weights) == set(merged)
    for key, value in weights.items():
        torch.testing.assert_close(value, merged[key], atol=1e-6, rtol=0)


def test_lora_keys_without_the_transformer_prefix_load_like_the_diffusers_layout(lora_dirs):
    state = load_file(lora_dirs[0] / "pytorch_lora_weights.safetensors")
    reference = make_text_pipeline()
    reference.load_lora_weights(lora_dirs[0])
    pipe = make_text_pipeline()
    pipe.load_lora_weights({key.removeprefix("transformer."): value for key, value in state.items()})
    assert torch.equal(greedy(pipe), greedy(reference))


def test_lora_from_a_deeper_model_is_rejected_naming_the_extra_blocks_and_changes_nothing(tmp_path):
    save_random_lora(make_text_pipeline(num_layers=3), tmp_path, seed=1)  # 4 blocks; the test model has 3
    pipe = make_text_pipeline()
    before = snapshot(pipe.transformer)
    with pytest.raises(ValueError, match=r"do not exist in the transformer") as error:
        pipe.load_lora_weights(tmp_path)
    assert "blocks.3.attention.qkv" in str(error.value) and "blocks.{0-2}.attention.qkv" in str(error.value)
    assert_unchanged(pipe.transformer, before)


def test_lora_for_another_model_is_rejected_when_no_key_matches():
    pipe = make_text_pipeline()
    before = snapshot(pipe.transformer)
    state = {
        "unet.down_blocks.0.attentions.0.to_q.lora_A.weight": torch.zeros(4, 32),
        "unet.down_blocks.0.attentions.0.to_q.lora_B.weight": torch.zeros(32, 4),
    }
    with pytest.raises(ValueError, match=r"None of the LoRA's modules exists in the transformer.*unet\.down_blocks"):
        pipe.load_lora_weights(state)
    assert_unchanged(pipe.transformer, before)


def test_lora_whose_shapes_do_not_fit_is_rejected_and_changes_nothing(tmp_path):
    save_random_lora(make_text_pipeline(hidden_size=64), tmp_path, seed=1)
    pipe = make_text_pipeline()
    before = snapshot(pipe.transformer)
    with pytest.raises(ValueError, match=r"(?s)does not fit.*blocks\.0\.attention\.qkv: `lora_A.weight` \(4, 64\)"):
        pipe.load_lora_weights(tmp_path)
    assert_unchanged(pipe.transformer, before)


def test_lora_from_a_model_with_fewer_blocks_and_no_config_loads_with_a_warning_naming_the_uncovered_ones(
    tmp_path, caplog
):
    save_random_lora(make_text_pipeline(num_layers=1), tmp_path, seed=1)  # 2 blocks; the test model has 3
    pipe = make_text_pipeline()
    with caplog.at_level(logging.WARNING):
        pipe.load_lora_weights(tmp_path)
    assert "covers only some of the transformer's blocks" in caplog.text
    assert "blocks.2.attention.out_proj, blocks.2.attention.qkv" in caplog.text


def test_lora_from_a_model_with_fewer_blocks_is_rejected_when_its_config_targets_every_block(tmp_path):
    save_random_lora(make_text_pipeline(num_layers=1), tmp_path / "diffusers", seed=1, with_config=True)
    save_peft_adapter(tmp_path / "peft", num_layers=1)
    for folder in (tmp_path / "diffusers", tmp_path / "peft"):
        pipe = make_text_pipeline()
        before = snapshot(pipe.transformer)
        with pytest.raises(ValueError, match=r"no weights for blocks\.2\.attention\.out_proj, blocks\.2\.attention"):
            pipe.load_lora_weights(folder)
        assert_unchanged(pipe.transformer, before)


def test_lora_whose_rank_contradicts_its_config_is_rejected(tmp_path):
    save_peft_adapter(tmp_path, rank=4)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))
    with pytest.raises(ValueError, match=r"rank 4 in the weights but r=8 in the adapter config"):
        make_text_pipeline().load_lora_weights(tmp_path)


@pytest.mark.parametrize(
    "setting, message",
    [({"peft_type": "LOHA"}, "only LoRA adapters"), ({"init_lora_weights": "pissa"}, "modified base model"),
     ({"modules_to_save": ["heads"]}, "does not support")],
)
def test_adapter_configs_this_loader_cannot_honour_are_rejected(tmp_path, setting, message):
    save_peft_adapter(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, **setting}))
    pipe = make_text_pipeline()
    before = snapshot(pipe.transformer)
    with pytest.raises(ValueError, match=message):
        pipe.load_lora_weights(tmp_path)
    assert_unchanged(pipe.transformer, before)


def test_non_finite_lora_weights_are_rejected(lora_dirs):
    state = load_file(lora_dirs[0] / "pytorch_lora_weights.safetensors")
    state["transformer.blocks.1.attention.qkv.lora_B.weight"][0, 0] = float("nan")
    pipe = make_text_pipeline()
    with pytest.raises(ValueError, match=r"non-finite.*blocks\.1\.attention\.qkv\.lora_B\.weight"):
        pipe.load_lora_weights(state)
    assert not getattr(pipe.transformer, "peft_config", None)


@pytest.mark.parametrize("existing_adapter", [False, True])
def test_a_failure_midway_through_loading_leaves_the_transformer_as_it_was(lora_dirs, monkeypatch, existing_adapter):
    import peft

    pipe = make_text_pipeline()
    if existing_adapter:
        pipe.load_lora_weights(lora_dirs[0], adapter_name="a")
        pipe.set_adapters(["a"], adapter_weights=[0.5])
        with_a = greedy(pipe)
    before = snapshot(pipe.transformer)

    def fail(*args, **kwargs):
        raise RuntimeError("simulated failure while copying the LoRA weights")

    monkeypatch.setattr(peft, "set_peft_model_state_dict", fail)
    # Only the feed-forward: these layers get new LoRA wrappers, which must go again.
    state = {}
    for block in range(3):
        state[f"transformer.blocks.{block}.feed_forward.w1.lora_A.weight"] = torch.randn(2, 32)
        state[f"transformer.blocks.{block}.feed_forward.w1.lora_B.weight"] = torch.randn(96, 2)
        state[f"transformer.blocks.{block}.attention.qkv.lora_A.weight"] = torch.randn(2, 32)
        state[f"transformer.blocks.{block}.attention.qkv.lora_B.weight"] = torch.randn(64, 2)
    with pytest.raises(RuntimeError, match="simulated failure"):
        pipe.load_lora_weights(state, adapter_name="b")
    assert_unchanged(pipe.transformer, before, adapters=["a"] if existing_adapter else [])
    if existing_adapter:
        assert pipe.get_active_adapters() == ["a"]
        assert torch.equal(greedy(pipe), with_a)


@pytest.mark.parametrize(
    "weights",
    [float("nan"), float("inf"), [1.0, float("-inf")], "1.0", True, {"transfomer": 1.0}, {"transformer": float("nan")}],
)
def test_set_adapters_rejects_adapter_weights_that_are_not_finite_numbers(lora_dirs, weights):
    pipe = make_text_pipeline()
    pipe.load_lora_weights(lora_dirs[0], adapter_name="a")
    pipe.load_lora_weights(lora_dirs[1], adapter_name="b")
    with pytest.raises(ValueError, match="`adapter_weights`"):
        pipe.set_adapters(["a", "b"], adapter_weights=weights)


def test_set_adapters_accepts_numbers_none_and_per_component_dicts(lora_dirs):
    pipe = make_text_pipeline()
    pipe.load_lora_weights(lora_dirs[0], adapter_name="a")
    pipe.load_lora_weights(lora_dirs[1], adapter_name="b")
    pipe.set_adapters(["a", "b"], adapter_weights=[1.0, 0])
    only_a = greedy(pipe)
    pipe.set_adapters(["a", "b"], adapter_weights=({"transformer": 1}, {"transformer": 0.0}))
    assert torch.equal(greedy(pipe), only_a)
    pipe.set_adapters(["a", "b"], adapter_weights=[None, 0.0])
    assert torch.equal(greedy(pipe), only_a)


def test_fuse_lora_rejects_a_non_finite_scale(lora_dirs):
    pipe = make_text_pipeline()
    pipe.load_lora_weights(lora_dirs[0])
    before = snapshot(pipe.transformer)
    with pytest.raises(ValueError, match="`lora_scale`"):
        pipe.fuse_lora(lora_scale=float("nan"))
    assert_unchanged(pipe.transformer, before, adapters=["default_0"])
