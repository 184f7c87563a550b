import pytest
import torch

from conftest import make_text_transformer, make_transformer
from nar_diffusers import NARTransformer, NeighborScheduler
from nar_diffusers.models.embeddings import rotary_tables


def condition_kwargs(model: NARTransformer, batch: int, padded: bool = False) -> dict:
    generator = torch.Generator().manual_seed(1)
    if model.condition_type == "class":
        return {"class_labels": torch.randint(0, model.config.num_classes, (batch,), generator=generator)}
    embeds = torch.randn(batch, model.num_condition_tokens, model.config.caption_dim, generator=generator)
    kwargs = {"encoder_hidden_states": embeds}
    if padded:
        valid = torch.tensor([2, model.num_condition_tokens] + [3] * (batch - 2))[:batch]
        slots = torch.arange(model.num_condition_tokens)[None]
        kwargs["encoder_attention_mask"] = slots >= model.num_condition_tokens - valid[:, None]
    return kwargs


def stepwise_logits(model: NARTransformer, tokens: torch.LongTensor, **condition) -> torch.Tensor:
    """Logits of every token through prefill + KV-cache decoding, fed the true tokens group by group."""
    scheduler = model.token_order(tuple(tokens.shape[1:]))
    cache = model.init_kv_cache(tokens.shape[0], scheduler.coordinates[: scheduler.num_fed_tokens])
    mask = condition.pop("encoder_attention_mask", None)
    steps = []
    for step in range(len(scheduler)):
        if step == 0:
            head_logits = model.prefill(cache, encoder_attention_mask=mask, **condition)
        else:
            head_logits = model.decode(cache, scheduler.tokens_to_feed(tokens, step))
        steps.append(scheduler.mix_head_logits(head_logits, step))
    mixed = torch.cat(steps, dim=1)[:, scheduler.inverse_generation_order]
    return mixed.view(*tokens.shape, -1)


CASES = {
    "2d-class": dict(),
    "2d-class-nonsquare-grid": dict(grid_size=(3, 5)),
    "2d-raster": dict(num_decoding_heads=1),
    "3d-class": dict(grid_size=(2, 3, 3), num_decoding_heads=3, hidden_size=48, num_attention_heads=4),
    "2d-learned-positions": dict(position_embedding_type="learned"),
    "3d-learned-positions": dict(grid_size=(2, 3, 3), num_decoding_heads=3, position_embedding_type="learned"),
}


@pytest.mark.parametrize("overrides", CASES.values(), ids=CASES.keys())
def test_teacher_forced_logits_equal_cached_step_by_step_decoding(overrides):
    model = make_transformer(**overrides)
    tokens = torch.randint(0, model.config.vocab_size, (3, *model.grid_size), generator=torch.Generator().manual_seed(0))
    condition = condition_kwargs(model, 3)
    with torch.no_grad():
        forward = model(tokens, **condition).logits
        stepwise = stepwise_logits(model, tokens, **condition)
    assert forward.shape == (3, *model.grid_size, model.config.vocab_size)
    torch.testing.assert_close(stepwise, forward, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
@pytest.mark.parametrize("grid", [(3, 4), (2, 2, 3)], ids=["2d", "3d"])
def test_caption_conditioned_teacher_forcing_equals_cached_decoding(padded, grid):
    model = make_text_transformer(grid_size=grid, num_decoding_heads=len(grid))
    tokens = torch.randint(0, model.config.vocab_size, (3, *grid), generator=torch.Generator().manual_seed(0))
    condition = condition_kwargs(model, 3, padded=padded)
    with torch.no_grad():
        forward = model(tokens, **condition).logits
        stepwise = stepwise_logits(model, tokens, **condition)
    torch.testing.assert_close(stepwise, forward, atol=1e-5, rtol=1e-5)


def test_teacher_forcing_on_a_smaller_grid_than_configured_equals_cached_decoding():
    model = make_transformer(grid_size=(5, 5))
    tokens = torch.randint(0, 48, (2, 3, 4), generator=torch.Generator().manual_seed(0))
    condition = condition_kwargs(model, 2)
    with torch.no_grad():
        torch.testing.assert_close(stepwise_logits(model, tokens, **condition), model(tokens, **condition).logits)


def test_padded_condition_tokens_have_no_influence():
    model = make_text_transformer()
    tokens = torch.randint(0, 48, (3, 4, 4), generator=torch.Generator().manual_seed(0))
    condition = condition_kwargs(model, 3, padded=True)
    changed = condition["encoder_hidden_states"].clone()
    changed[~condition["encoder_attention_mask"]] = 100.0
    with torch.no_grad():
        reference = model(tokens, **condition).logits
        perturbed = model(tokens, encoder_hidden_states=changed, encoder_attention_mask=condition["encoder_attention_mask"]).logits
        unmasked = model(tokens, encoder_hidden_states=changed).logits
    torch.testing.assert_close(perturbed, reference)
    assert not torch.allclose(unmasked, reference, atol=1e-3)


def raster_reference_logits(model: NARTransformer, tokens: torch.LongTensor, class_labels: torch.LongTensor):
    """NAR logits computed the textbook way: raster layout, explicit proximity mask, parents rule in raster."""
    grid = tuple(tokens.shape[1:])
    num_tokens = tokens[0].numel()
    coords = torch.cartesian_prod(*[torch.arange(d) for d in grid]).view(num_tokens, len(grid))
    distance = coords.sum(1)
    length = 1 + num_tokens
    mask = torch.ones(length, length, dtype=torch.bool)
    mask[0, 1:] = False
    mask[1:, 1:] = distance[None, :] <= distance[:, None]
    rope = rotary_tables(coords, model.head_dim, model.config.rope_theta, 1)
    h = torch.cat([model.class_embedding(class_labels)[:, None], model.token_embedding(tokens.flatten(1))], dim=1)
    outputs = model._head_logits(model._run_blocks(h, rope, mask[None, None]))  # (B, heads, 1 + N, V)
    logits = torch.empty(tokens.shape[0], num_tokens, outputs.shape[-1])
    strides = [grid[1], 1]
    for target in range(num_tokens):
        if target == 0:
            logits[:, 0] = outputs[:, :, 0].mean(1)
            continue
        parents = []
        for head in range(len(grid)):
            axis = len(grid) - 1 - head
            if coords[target, axis] > 0:
                parents.append(outputs[:, head, 1 + target - strides[axis]])
        logits[:, target] = torch.stack(parents).mean(0)
    return logits.view(*tokens.shape, -1)


def test_plane_order_with_block_causal_mask_equals_raster_order_with_proximity_mask():
    model = make_transformer(grid_size=(4, 5))
    tokens = torch.randint(0, 48, (2, 4, 5), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([3, 7])
    with torch.no_grad():
        torch.testing.assert_close(model(tokens, class_labels=labels).logits, raster_reference_logits(model, tokens, labels))


def test_one_head_raster_model_is_plain_causal_next_token_prediction():
    model = make_transformer(num_decoding_heads=1)
    tokens = torch.randint(0, 48, (2, 4, 4), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([1, 2])
    flat = tokens.flatten(1)
    coords = torch.cartesian_prod(torch.arange(4), torch.arange(4))[:-1]
    rope = rotary_tables(coords, model.head_dim, model.config.rope_theta, 1)
    h = torch.cat([model.class_embedding(labels)[:, None], model.token_embedding(flat[:, :-1])], dim=1)
    causal = torch.ones(16, 16, dtype=torch.bool).tril()[None, None]
    with torch.no_grad():
        expected = model.heads[0](model._run_blocks(h, rope, causal)[0])
        torch.testing.assert_close(model(tokens, class_labels=labels).logits, expected.view(2, 4, 4, -1))
    assert model.token_order((4, 4)).kind == "raster"


def test_greedy_generation_reproduces_the_argmax_of_teacher_forcing():
    model = make_transformer(grid_size=(3, 4))
    scheduler = NeighborScheduler(grid_size=(3, 4))
    labels = torch.tensor([0, 5])
    tokens = torch.full((2, 3, 4), -1)
    cache = model.init_kv_cache(2, scheduler.coordinates[: scheduler.num_fed_tokens])
    with torch.no_grad():
        for step in scheduler.timesteps:
            if step == 0:
                head_logits = model.prefill(cache, class_labels=labels)
            else:
                head_logits = model.decode(cache, scheduler.tokens_to_feed(tokens, int(step)))
            logits = scheduler.mix_head_logits(head_logits, int(step))
            tokens = scheduler.step(logits, step, tokens, do_sample=False).prev_sample
        assert (tokens >= 0).all()
        assert torch.equal(model(tokens, class_labels=labels).logits.argmax(-1), tokens)


def test_stacked_heads_read_one_more_block_each():
    model = make_transformer(grid_size=(2, 2, 2), num_decoding_heads=3)
    assert len(model.blocks) == model.config.num_layers + 2
    seen = []
    for head in model.heads:
        head.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    block_outputs = []
    for block in model.blocks:
        block.register_forward_hook(lambda module, args, out: block_outputs.append(out))
    with torch.no_grad():
        model(torch.zeros(1, 2, 2, 2, dtype=torch.long), class_labels=torch.tensor([0]))
    for head, hidden in enumerate(seen):
        assert torch.equal(hidden, block_outputs[model.config.num_layers - 1 + head][:, :])


def test_loss_is_the_mean_cross_entropy_of_the_mixed_logits():
    model = make_transformer()
    tokens = torch.randint(0, 48, (2, 4, 4))
    out = model(tokens, class_labels=torch.tensor([1, 2]), labels=tokens)
    expected = torch.nn.functional.cross_entropy(out.logits.reshape(-1, 48), tokens.reshape(-1))
    torch.testing.assert_close(out.loss, expected)


def test_a_few_optimisation_steps_reduce_the_training_loss():
    model = make_transformer(class_dropout_prob=0.0).train()
    tokens = torch.randint(0, 48, (4, 4, 4), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 3])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95))
    losses = []
    for _ in range(30):
        loss = model(tokens, class_labels=labels, labels=tokens).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_condition_dropout_applies_only_in_training():
    model = make_transformer(class_dropout_prob=1.0)
    tokens = torch.randint(0, 48, (2, 4, 4))
    with torch.no_grad():
        null = model(tokens, class_labels=torch.full((2,), 10)).logits
        model.train()
        dropped = model(tokens, class_labels=torch.tensor([1, 2])).logits
        model.eval()
        kept = model(tokens, class_labels=torch.tensor([1, 2])).logits
    torch.testing.assert_close(dropped, null)
    assert not torch.allclose(kept, null)


def test_gradient_checkpointing_gives_the_same_gradients():
    tokens = torch.randint(0, 48, (2, 4, 4))
    grads = []
    for checkpointing in (False, True):
        model = make_transformer(class_dropout_prob=0.0).train()
        if checkpointing:
            model.enable_gradient_checkpointing()
        model(tokens, class_labels=torch.tensor([1, 2]), labels=tokens).loss.backward()
        grads.append(model.blocks[0].attention.qkv.weight.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_save_and_load_round_trip_in_safetensors(tmp_path):
    model = make_transformer(grid_size=(3, 5), position_embedding_type="learned")
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    loaded = NARTransformer.from_pretrained(tmp_path).eval()
    tokens = torch.randint(0, 48, (1, 3, 5))
    with torch.no_grad():
        assert torch.equal(loaded(tokens, class_labels=torch.tensor([4])).logits, model(tokens, class_labels=torch.tensor([4])).logits)
    assert loaded.grid_size == (3, 5)


@pytest.mark.parametrize(
    "overrides, name",
    [
        (dict(num_decoding_heads=3), "num_decoding_heads"),
        (dict(hidden_size=30), "hidden_size"),
        (dict(num_key_value_heads=3), "num_key_value_heads"),
        (dict(position_embedding_type="alibi"), "position_embedding_type"),
        (dict(num_classes=None), "num_classes"),
        (dict(caption_dim=16), "num_classes"),
        (dict(num_condition_tokens=4), "num_condition_tokens"),
        (dict(grid_size=(0, 4)), "grid_size"),
    ],
)
def test_invalid_configs_are_rejected_with_the_parameter_name(overrides, name):
    with pytest.raises(ValueError, match=name):
        make_transformer(**overrides)


def test_forward_rejects_a_grid_larger_than_the_model_and_the_wrong_condition():
    model = make_transformer()
    with pytest.raises(ValueError, match="grid_size"):
        model(torch.zeros(1, 5, 4, dtype=torch.long), class_labels=torch.tensor([0]))
    with pytest.raises(ValueError, match="class_labels"):
        model(torch.zeros(1, 4, 4, dtype=torch.long), encoder_hidden_states=torch.zeros(1, 1, 8))
    text_model = make_text_transformer()
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        text_model(torch.zeros(1, 4, 4, dtype=torch.long), class_labels=torch.tensor([0]))
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        text_model(torch.zeros(1, 4, 4, dtype=torch.long), encoder_hidden_states=torch.zeros(1, 5, 24))


def test_kv_cache_is_allocated_once_and_refuses_to_overflow():
    model = make_transformer()
    scheduler = NeighborScheduler(grid_size=(4, 4))
    cache = model.init_kv_cache(1, scheduler.coordinates[: scheduler.num_fed_tokens])
    buffers = [k.data_ptr() for k, _ in cache.layers]
    with torch.no_grad():
        model.prefill(cache, class_labels=torch.tensor([0]))
        model.decode(cache, torch.zeros(1, scheduler.num_fed_tokens - 1, dtype=torch.long))
        assert [k.data_ptr() for k, _ in cache.layers] == buffers
        with pytest.raises(ValueError, match="overflow"):
            model.decode(cache, torch.zeros(1, 2, dtype=torch.long))


# --- the lean decode path ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "bool-mask"])
@pytest.mark.parametrize("sdpa_gqa", [True, False], ids=["sdpa-enable-gqa", "repeat-fallback"])
def test_grouped_query_attention_equals_repeating_the_kv_heads(monkeypatch, masked, sdpa_gqa):
    import torch.nn.functional as F

    from nar_diffusers.models import attention_nar

    if sdpa_gqa and not attention_nar.SDPA_SUPPORTS_GQA:
        pytest.skip("this PyTorch has no enable_gqa")
    monkeypatch.setattr(attention_nar, "SDPA_SUPPORTS_GQA", sdpa_gqa)
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 6, 5, 8, generator=generator)
    k, v = torch.randn(2, 2, 9, 8, generator=generator), torch.randn(2, 2, 9, 8, generator=generator)
    mask = torch.rand(2, 1, 5, 9, generator=generator) > 0.4 if masked else None
    if masked:
        mask[..., 0] = True
    out = attention_nar.NARAttnProcessor()(q, k, v, mask, 0.0)
    # The published math: every KV head repeated for its 3 query heads, softmax(q k^T / sqrt(d)) v.
    k_rep, v_rep = k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1)
    scores = q @ k_rep.transpose(-1, -2) / 8**0.5
    if masked:
        scores = scores.masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(out, scores.softmax(-1) @ v_rep, rtol=0, atol=1e-6)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k_rep, v_rep, attn_mask=mask), rtol=0, atol=1e-6)


def _cached_head_logits(model, tokens, condition, static: bool):
    """Per-step mixed logits through `decode` (with head positions) or `decode_static` (padded tables)."""
    from nar_diffusers.schedulers.token_order import mix_logits

    scheduler = model.token_order(tuple(tokens.shape[1:]))
    tables = scheduler.static_decode_tables()
    spare = tables.group_size if static else 0
    cache = model.init_kv_cache(tokens.shape[0], scheduler.coordinates[: scheduler.num_fed_tokens], num_spare_slots=spare)
    flat = tokens.flatten(1)[:, scheduler.generation_order]
    num_cond = model.num_condition_tokens
    steps = [scheduler.mix_selected_head_logits(model.prefill(cache, **condition), 0)]
    for step in range(1, len(scheduler)):
        if not static:
            fed = flat[:, scheduler.group_slice(step - 1)]
            head_logits = model.decode(cache, fed, scheduler.head_positions(step))
            steps.append(scheduler.mix_selected_head_logits(head_logits, step))
            continue
        fed = flat[:, tables.fed_positions[step]]
        key_mask = (torch.arange(cache.capacity) < num_cond + tables.fed_end[step])[None, None, None]
        if cache.key_mask is not None:
            key_mask = key_mask & cache.key_mask
        head_logits = model.decode_static(
            cache, fed, num_cond + tables.write_positions[step], key_mask, tables.head_positions[step]
        )
        mixed = mix_logits(head_logits, tables.head_index[step], tables.parent_mask[step],
                                       tables.parent_count[step])  # fmt: skip
        steps.append(mixed[:, : int(tables.target_valid[step].sum())])
    return torch.cat(steps, dim=1)[:, scheduler.inverse_generation_order].view(*tokens.shape, -1)


DECODE_CASES = {**CASES, "2d-text-padded": dict(text=True), "3d-text-padded": dict(text=True, grid_size=(2, 2, 3),
                                                                                   num_decoding_heads=3)}  # fmt: skip


@pytest.mark.parametrize("overrides", DECODE_CASES.values(), ids=DECODE_CASES.keys())
def test_logits_only_at_head_positions_and_the_static_decode_equal_full_decoding(overrides):
    overrides = dict(overrides)
    text = overrides.pop("text", False)
    model = (make_text_transformer if text else make_transformer)(**overrides)
    tokens = torch.randint(0, model.config.vocab_size, (3, *model.grid_size), generator=torch.Generator().manual_seed(0))
    condition = condition_kwargs(model, 3, padded=text)
    with torch.no_grad():
        reference = stepwise_logits(model, tokens, **condition)  # every head at every fed token
        selected = _cached_head_logits(model, tokens, dict(condition), static=False)
        static = _cached_head_logits(model, tokens, dict(condition), static=True)
    torch.testing.assert_close(selected, reference, rtol=0, atol=1e-6)
    torch.testing.assert_close(static, reference, rtol=1e-5, atol=1e-5)


def test_spare_kv_slots_carry_zero_positions_and_are_not_used_by_eager_decoding():
    model = make_transformer()
    scheduler = model.token_order((4, 4))
    cache = model.init_kv_cache(1, scheduler.coordinates[: scheduler.num_fed_tokens], num_spare_slots=4)
    assert cache.max_length == 16 and cache.capacity == 20 and cache.layers[0][0].shape[2] == 20
    assert (cache.rope[0][16:] == 0).all() and (cache.rope[1][16:] == 0).all()
    model.prefill(cache, class_labels=torch.tensor([1]))
    model.decode(cache, torch.zeros(1, scheduler.num_fed_tokens, dtype=torch.long))
    with pytest.raises(ValueError, match="overflow"):
        model.decode(cache, torch.zeros(1, 1, dtype=torch.long))


@pytest.mark.parametrize("guided", [True, False, "tensor-true", "tensor-false"])
def test_guidance_inside_the_heads_equals_guiding_the_head_logits(guided):
    model = make_transformer()
    scheduler = model.token_order((4, 4))
    flag = torch.tensor(guided == "tensor-true") if isinstance(guided, str) else guided
    on = guided in (True, "tensor-true")
    labels = torch.tensor([1, 7, 10, 10])  # conditional rows, then the unconditional (null class) rows
    coords = scheduler.coordinates[: scheduler.num_fed_tokens]
    plain_cache, guided_cache = model.init_kv_cache(4, coords), model.init_kv_cache(4, coords)
    fed = torch.randint(0, 48, (2, 2), generator=torch.Generator().manual_seed(0)).repeat(2, 1)
    with torch.no_grad():
        for plain, mixed in (
            (model.prefill(plain_cache, class_labels=labels),
             model.prefill(guided_cache, class_labels=labels, guidance_scale=3.0, guided=flag)),
            (model.decode(plain_cache, fed[:, :1]),
             model.decode(guided_cache, fed[:, :1], guidance_scale=3.0, guided=flag)),
        ):  # fmt: skip
            cond, uncond = plain.chunk(2)
            expected = uncond + 3.0 * (cond - uncond) if on else cond
            assert mixed.shape == expected.shape
            torch.testing.assert_close(mixed, expected, rtol=1e-5, atol=1e-5)
