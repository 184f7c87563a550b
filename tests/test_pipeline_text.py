import numpy as np
import pytest
import torch

from conftest import make_text_pipeline
from nar_diffusers import NARPipeline


@pytest.fixture
def text_pipe() -> NARPipeline:
    return make_text_pipeline()


def generate(pipe, seed=0, **kwargs):
    return pipe(generator=torch.Generator().manual_seed(seed), output_type="latent", **kwargs).images


def record_prefill(pipe) -> dict:
    """Wrap `transformer.prefill` to keep the condition it receives."""
    seen = {}
    original = pipe.transformer.prefill

    def prefill(cache, **kwargs):
        seen.update(kwargs)
        return original(cache, **kwargs)

    pipe.transformer.prefill = prefill
    return seen


def test_encode_prompt_moves_valid_tokens_to_the_end_and_zeroes_padding(text_pipe):
    prompts = ["a red fox", "a photo of a cat"]
    embeds, mask = text_pipe.encode_prompt(prompts)
    assert embeds.shape == (2, 6, 24) and mask.shape == (2, 6)
    # "a red fox" + eos = 4 valid tokens, "a photo of a cat" + eos = 6.
    assert mask.tolist() == [[False, False, True, True, True, True], [True] * 6]
    assert (embeds[0, :2] == 0).all()
    inputs = text_pipe.tokenizer(prompts, padding="max_length", max_length=6, return_tensors="pt")
    with torch.no_grad():
        t5 = text_pipe.text_encoder(inputs.input_ids, attention_mask=inputs.attention_mask).last_hidden_state
    torch.testing.assert_close(embeds[0, 2:], t5[0, :4])
    torch.testing.assert_close(embeds[1], t5[1])


def test_shorter_max_sequence_length_still_fills_the_model_condition_slots(text_pipe):
    embeds, mask = text_pipe.encode_prompt("a photo of a cat", max_sequence_length=3)
    assert embeds.shape == (1, 6, 24)
    assert mask.tolist() == [[False, False, False, True, True, True]]


def test_padded_condition_keys_are_masked_in_generation(text_pipe):
    seen = record_prefill(text_pipe)
    generate(text_pipe, prompt="a red fox", guidance_scale=1.0)
    assert seen["encoder_attention_mask"].tolist() == [[False, False, True, True, True, True]]


def test_unconditional_branch_is_the_learned_table_with_the_prompt_padding_mask(text_pipe):
    seen = record_prefill(text_pipe)
    generate(text_pipe, prompt="a red fox", guidance_scale=3.0)
    states, mask = seen["encoder_hidden_states"], seen["encoder_attention_mask"]
    assert states.shape[0] == 2
    torch.testing.assert_close(states[1], text_pipe.transformer.caption_projection.uncond_embedding)
    assert torch.equal(mask[1], mask[0]) and not mask[1].all()


def test_negative_prompt_replaces_the_learned_unconditional_caption(text_pipe):
    seen = record_prefill(text_pipe)
    generate(text_pipe, prompt="a red fox", negative_prompt="a small dog on the grass", guidance_scale=3.0)
    negative, negative_mask = text_pipe.encode_prompt("a small dog on the grass")
    torch.testing.assert_close(seen["encoder_hidden_states"][1], negative[0])
    assert torch.equal(seen["encoder_attention_mask"][1], negative_mask[0])


def test_prompt_embeds_path_equals_the_prompt_path(text_pipe):
    embeds, mask = text_pipe.encode_prompt(["a red fox", "a photo of a cat"])
    from_prompt = generate(text_pipe, prompt=["a red fox", "a photo of a cat"], guidance_scale=2.0)
    from_embeds = generate(text_pipe, prompt_embeds=embeds, prompt_attention_mask=mask, guidance_scale=2.0)
    assert torch.equal(from_prompt, from_embeds)


def test_pipeline_without_text_encoder_accepts_prompt_embeds_only():
    pipe = make_text_pipeline(with_text_encoder=False)
    embeds = torch.randn(1, 6, 24)
    assert generate(pipe, prompt_embeds=embeds).shape == (1, 4, 4)
    with pytest.raises(ValueError, match="text_encoder"):
        pipe(prompt="a cat")


def test_text_pipeline_round_trips_with_its_tokenizer_and_t5(tmp_path, text_pipe):
    text_pipe.save_pretrained(tmp_path)
    assert (tmp_path / "text_encoder").is_dir() and (tmp_path / "tokenizer").is_dir()
    loaded = NARPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert torch.equal(generate(loaded, seed=2, prompt="a red fox"), generate(text_pipe, seed=2, prompt="a red fox"))


def test_num_images_per_prompt_repeats_each_prompt(text_pipe):
    images = generate(text_pipe, prompt=["a red fox", "a cat"], num_images_per_prompt=2, do_sample=False)
    assert images.shape == (4, 4, 4)
    assert torch.equal(images[0], images[1]) and torch.equal(images[2], images[3])


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(prompt=["a cat", "a dog"], negative_prompt=["x", "y", "z"]), "negative_prompt"),
        (dict(prompt="a photo of a cat on the grass by the sea", truncation=False), "max_sequence_length"),
        (dict(prompt="a cat", class_labels=[1]), "class_labels"),
        (dict(), "prompt"),
        (dict(prompt="a cat", prompt_embeds=torch.zeros(1, 6, 24)), "prompt"),
        (dict(prompt_embeds=torch.zeros(1, 5, 24)), "prompt_embeds"),
        (dict(prompt_embeds=torch.zeros(1, 6, 24), prompt_attention_mask=torch.ones(1, 5)), "prompt_attention_mask"),
        (dict(prompt="a cat", max_sequence_length=7), "max_sequence_length"),
        (dict(prompt=["a cat", 3]), "prompt"),
        (dict(prompt="a cat", negative_prompt=123), "negative_prompt"),
        (dict(prompt="a cat", negative_prompt=[]), "negative_prompt"),
        (dict(prompt=["a", "b", "c"], negative_prompt_embeds=torch.zeros(4, 6, 24)), "negative_prompt_embeds"),
        (dict(prompt_embeds=torch.zeros(0, 6, 24)), "prompt_embeds"),
        (dict(prompt_embeds=torch.zeros(1, 6, 24, dtype=torch.long)), "prompt_embeds"),
        (dict(prompt_embeds=torch.full((1, 6, 24), float("nan"))), "prompt_embeds"),
        (dict(prompt="a cat", negative_prompt_embeds=torch.full((1, 6, 24), float("inf"))), "negative_prompt_embeds"),
        (
            dict(prompt_embeds=torch.zeros(1, 6, 24), negative_prompt_embeds=torch.zeros(1, 6, 24),
                 negative_prompt_attention_mask=torch.ones(1, 5)),
            "negative_prompt_attention_mask",
        ),
        (dict(prompt_embeds=torch.zeros(1, 6, 24), negative_prompt_attention_mask=torch.ones(1, 6)),
         "negative_prompt_attention_mask"),
        (dict(prompt="a cat", max_sequence_length=3.0), "max_sequence_length"),
    ],
)
def test_bad_text_inputs_raise_a_value_error_naming_the_parameter(text_pipe, kwargs, name):
    with pytest.raises(ValueError, match=name):
        text_pipe(output_type="latent", **kwargs)


def test_bad_inputs_are_rejected_before_the_text_encoder_runs(text_pipe):
    calls = []
    text_pipe.text_encoder.register_forward_pre_hook(lambda module, args: calls.append(1))
    with pytest.raises(ValueError, match="generator"):
        text_pipe(prompt=["a cat", "a dog"], generator=[torch.Generator()], output_type="latent")
    with pytest.raises(ValueError, match="negative_prompt_embeds"):
        text_pipe(prompt=["a cat", "a dog"], negative_prompt_embeds=torch.zeros(3, 6, 24), output_type="latent")
    assert calls == []


def test_negative_prompt_embeds_with_their_mask_go_to_the_unconditional_branch(text_pipe):
    seen = record_prefill(text_pipe)
    negative, negative_mask = text_pipe.encode_prompt(["a small dog on the grass", "a cat"])
    generate(text_pipe, prompt=["a red fox", "a photo of a cat"], negative_prompt_embeds=negative,
             negative_prompt_attention_mask=negative_mask, guidance_scale=3.0)
    torch.testing.assert_close(seen["encoder_hidden_states"][2:], negative)
    assert torch.equal(seen["encoder_attention_mask"][2:], negative_mask)


def test_numpy_max_sequence_length_and_num_images_are_accepted(text_pipe):
    expected = generate(text_pipe, prompt="a red fox", max_sequence_length=4, num_images_per_prompt=2)
    again = generate(text_pipe, prompt="a red fox", max_sequence_length=np.int64(4), num_images_per_prompt=np.int32(2))
    assert torch.equal(again, expected)
