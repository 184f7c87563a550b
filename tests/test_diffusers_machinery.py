"""diffusers' own machinery works on NAR models: attention backends, repeated-block compilation, interrupt, scheduler
compatibles, LoRA scale through attention_kwargs."""

import pytest
import torch
from conftest import make_pipeline, make_transformer
from peft import LoraConfig

from nar_diffusers import NeighborScheduler, RasterScheduler


def greedy(pipe, **kwargs):
    return pipe(class_labels=[1, 7], do_sample=False, guidance_scale=2.0, output_type="latent", **kwargs).images


def test_attention_backend_switch_changes_the_processor_and_keeps_the_outputs():
    model = make_transformer()  # grouped-query attention: 4 heads over 2 KV heads
    tokens = torch.randint(0, 48, (2, 4, 4), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([1, 2])
    with torch.no_grad():
        reference = model(tokens, class_labels=labels).logits
    processors = [block.attention.processor for block in model.blocks]
    try:
        model.set_attention_backend("_native_math")
        assert all(str(p._attention_backend.value) == "_native_math" for p in processors)
        with torch.no_grad():
            dispatched = model(tokens, class_labels=labels).logits
        torch.testing.assert_close(dispatched, reference, atol=1e-5, rtol=1e-5)
        model.reset_attention_backend()
        assert all(p._attention_backend is None for p in processors)
    finally:
        model.set_attention_backend("native")
        model.reset_attention_backend()


def test_compile_repeated_blocks_compiles_each_block_and_keeps_the_tokens():
    pipe = make_pipeline()
    expected = greedy(pipe)
    pipe.transformer.compile_repeated_blocks(backend="eager")
    assert all(hasattr(block, "_compiled_call_impl") and block._compiled_call_impl is not None for block in pipe.transformer.blocks)
    assert torch.equal(greedy(pipe), expected)


def test_interrupt_stops_after_the_current_step():
    pipe = make_pipeline()

    def stop_after_two(pipeline, step, timestep, kwargs):
        if step == 2:
            pipeline._interrupt = True
        return {}

    tokens = greedy(pipe, callback_on_step_end=stop_after_two)
    generated = (tokens >= 0).sum(dim=(1, 2))
    assert torch.equal(generated, torch.tensor([6, 6]))  # planes 0, 1, 2 of a 4x4 grid: 1 + 2 + 3 cells
    assert (greedy(pipe) >= 0).all()  # the next call starts uninterrupted
    images = pipe(class_labels=[1], callback_on_step_end=stop_after_two, output_type="np").images
    assert images.shape == (1, 8, 8, 3)


def test_scheduler_compatibles_are_the_nar_token_orders():
    scheduler = NeighborScheduler(grid_size=(4, 4))
    assert set(scheduler.compatibles) == {NeighborScheduler, RasterScheduler}
    assert RasterScheduler.from_config(scheduler.config).grid_size == scheduler.grid_size


def test_lora_scale_through_attention_kwargs():
    pipe = make_pipeline()
    base = greedy(pipe)
    pipe.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["qkv", "out_proj"], init_lora_weights=False))
    adapted = greedy(pipe)
    assert not torch.equal(adapted, base)
    assert torch.equal(greedy(pipe, attention_kwargs={"scale": 0.0}), base)
    assert torch.equal(greedy(pipe, attention_kwargs={"scale": 1.0}), adapted)
    assert torch.equal(greedy(pipe), adapted)  # the scale applies to one call only
    with pytest.raises(ValueError, match="Unknown `attention_kwargs`"):
        greedy(pipe, attention_kwargs={"temperature": 2.0})
