"""`kv_cache_dtype`: the KV cache stored in 16-bit floats or float8 (per-slot scales), read back in the model dtype;
and the class models' unconditional branch prefilled once for every row."""

import pytest
import torch

from conftest import make_pipeline, make_text_pipeline, make_transformer, make_video_pipeline
from nar_diffusers import NARInpaintPipeline, NeighborScheduler
from nar_diffusers.models.kv_cache import FLOAT8, KVCacheLayer, NARKVCache, resolve_kv_cache_dtype
from nar_diffusers.models.packed_rows import PackedRows

needs_float8 = pytest.mark.skipif(FLOAT8 is None, reason="this torch has no float8_e4m3fn")
LOW_PRECISION = [torch.bfloat16, pytest.param(FLOAT8, marks=needs_float8, id="float8_e4m3fn")]


def latent(pipe, **kwargs):
    out = pipe(output_type="latent", **kwargs)
    return out.frames if hasattr(out, "frames") else out.images


def fit(pipe, steps: int = 40) -> None:
    """Teach the tiny transformer one random token grid per class (teacher-forced, with the null class dropped in),
    so that its greedy predictions mean something: random weights give near-tied logits that any rounding flips."""
    transformer = pipe.transformer
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(transformer.config.num_classes)
    grids = torch.randint(0, transformer.config.vocab_size, (len(labels), *transformer.config.grid_size),
                          generator=generator)  # fmt: skip
    optimizer = torch.optim.Adam(transformer.parameters(), lr=1e-2)
    torch.manual_seed(0)
    transformer.train()
    for _ in range(steps):
        loss = transformer(grids, class_labels=labels, labels=grids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    transformer.eval()


# --- the argument ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [torch.int8, "fp8", torch.float64, 16])
def test_bad_kv_cache_dtype_is_a_value_error_naming_it_and_the_allowed_values(bad):
    pipe = make_pipeline()
    pipe.transformer.prefill = None  # nothing may run before the check
    with pytest.raises(ValueError, match=r"`kv_cache_dtype`.*torch.bfloat16.*got"):
        latent(pipe, class_labels=[1], kv_cache_dtype=bad)


def test_none_and_the_model_dtype_are_the_default_and_names_work():
    assert resolve_kv_cache_dtype(None, torch.float64) is torch.float64
    assert resolve_kv_cache_dtype(torch.float64, torch.float64) is torch.float64
    assert resolve_kv_cache_dtype("bfloat16", torch.float32) is torch.bfloat16


def test_float32_default_is_unchanged_the_cache_buffers_are_read_as_they_are():
    pipe = make_pipeline()
    kwargs = dict(class_labels=[1, 7, 3], guidance_scale=3.0, generator=torch.Generator().manual_seed(0))
    default = latent(pipe, **kwargs)
    for dtype in (torch.float32, "float32"):
        kwargs["generator"] = torch.Generator().manual_seed(0)
        assert torch.equal(latent(pipe, kv_cache_dtype=dtype, **kwargs), default)
    transformer = pipe.transformer
    cache = transformer.init_kv_cache(2, pipe.scheduler.coordinates[:5])
    assert cache.dtype == torch.float32 and cache.scales is None
    layer = cache.layer(0)
    keys, values = layer.read(torch.float32)
    assert keys is layer.keys and values is layer.values  # no copy, no conversion


# --- allocation, write and read ----------------------------------------------------------------------------------


@needs_float8
def test_float8_cache_allocates_float8_buffers_with_one_scale_per_row_head_and_slot():
    transformer = make_transformer()
    coordinates = NeighborScheduler(grid_size=(4, 4)).coordinates[:15]
    full = transformer.init_kv_cache(3, coordinates)
    small = transformer.init_kv_cache(3, coordinates, dtype=FLOAT8, num_spare_slots=4)
    keys, _ = small.layers[0]
    assert keys.dtype == FLOAT8 and keys.shape == (3, 2, 20, 8)
    assert small.scales[0][0].shape == (3, 2, 20, 1) and small.scales[0][0].dtype == torch.float32
    assert small.compute_dtype == torch.float32 and len(small.scales) == len(small.layers)
    half = transformer.init_kv_cache(3, coordinates, dtype=torch.bfloat16)
    assert half.nbytes * 2 == full.nbytes
    # float8: a quarter of float32, plus a float32 scale per head_dim (8 here) elements.
    assert small.nbytes == (full.nbytes // 16) * 20 // 4 + (full.nbytes // 16) * 20 // 8


@needs_float8
def test_float8_keeps_every_token_within_e4m3_precision_even_far_above_the_prefill():
    cache = NARKVCache(1, 2, 2, 16, max_length=6, dtype=FLOAT8, device=torch.device("cpu"))
    layer = cache.layer(0)
    torch.manual_seed(0)
    small = torch.randn(2, 2, 1, 16) * 0.01
    large = torch.randn(2, 2, 3, 16) * 1e4  # later tokens far beyond the condition's range
    layer.write(small, small, 0)
    layer.write(large, -large, 1)
    layer.write(torch.zeros(2, 2, 1, 16), torch.zeros(2, 2, 1, 16), 4)
    keys, values = layer.read(torch.float32, end=5)
    expected = torch.cat([small, large, torch.zeros(2, 2, 1, 16)], dim=2)
    assert torch.isfinite(keys).all() and torch.isfinite(values).all()
    absmax = expected.abs().amax(-1, keepdim=True)
    assert ((keys - expected).abs() <= absmax / 16 + 1e-30).all()  # e4m3: 3 mantissa bits, relative to each slot
    assert ((keys - expected).abs() <= expected.abs() / 16 + absmax / 448 / 2**9).all()
    assert torch.equal(values[:, :, 1:4], -keys[:, :, 1:4]) and (keys[:, :, 4] == 0).all()
    assert keys.dtype == torch.float32 and cache.layers[0][0].dtype == FLOAT8


@needs_float8
def test_the_three_write_modes_store_the_same_float8_bits():
    torch.manual_seed(0)
    k, v = torch.randn(2, 2, 3, 8), torch.randn(2, 2, 3, 8)

    def cache():
        return NARKVCache(1, 2, 2, 8, max_length=8, dtype=FLOAT8, device=torch.device("cpu"))

    eager, static, packed = cache(), cache(), cache()
    eager.layer(0).write(k, v, 2)
    static.layer(0).write(k, v, torch.tensor([2, 3, 4]))
    # Packed: row 0's three tokens, then row 1's, as one sequence (the serving engine's layout).
    rows, slots = torch.tensor([0, 0, 0, 1, 1, 1]), torch.tensor([2, 3, 4, 2, 3, 4])
    pk, pv = (t.transpose(1, 2).reshape(1, 6, 2, 8).transpose(1, 2) for t in (k, v))
    packed.layer(0).write(pk, pv, PackedRows(rows, torch.tensor([0, 1, 2] * 2), slots, 2, 3, 5))
    for other in (static, packed):
        for mine, theirs in zip(eager.buffers(), other.buffers()):
            assert torch.equal(mine.view(torch.uint8) if mine.dtype == FLOAT8 else mine,
                               theirs.view(torch.uint8) if theirs.dtype == FLOAT8 else theirs)  # fmt: skip
    assert (eager.layers[0][0][:, :, 2:5].float() != 0).any()


@needs_float8
def test_moving_zeroing_and_row_views_carry_the_scales():
    cache = NARKVCache(2, 4, 2, 8, max_length=4, dtype=FLOAT8, device=torch.device("cpu"))
    cache.rows(1, 2).layer(1).write(torch.full((1, 2, 1, 8), 900.0), torch.full((1, 2, 1, 8), -3.0), 0)
    cache.move_rows(torch.tensor([1]), torch.tensor([3]))
    keys, values = cache.layer(1).read(torch.float32)
    assert (keys[3, :, 0] == 900).all() and (values[3, :, 0] == -3).all() and (keys[0] == 0).all()
    cache.zero_()
    assert all((t == 0).all() for t in cache.buffers() if t.dtype == FLOAT8)
    assert all((t == 1).all() for pair in cache.scales for t in pair)


def test_layer_read_upcasts_half_precision_storage_to_the_compute_dtype():
    layer = KVCacheLayer(torch.ones(1, 1, 3, 2, dtype=torch.bfloat16), torch.ones(1, 1, 3, 2, dtype=torch.bfloat16))
    keys, values = layer.read(torch.float32, end=2)
    assert keys.dtype == values.dtype == torch.float32 and keys.shape == (1, 1, 2, 2)


# --- generation ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_low_precision_cache_keeps_greedy_image_tokens_of_a_fitted_model(dtype):
    pipe = make_pipeline()
    fit(pipe)
    kwargs = dict(class_labels=list(range(10)) * 2, guidance_scale=2.0, do_sample=False)
    reference = latent(pipe, **kwargs)
    tokens = latent(pipe, kv_cache_dtype=dtype, **kwargs)
    assert (tokens == reference).float().mean() >= 0.95


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_low_precision_cache_keeps_greedy_video_tokens_of_a_fitted_model(dtype):
    pipe = make_video_pipeline()
    fit(pipe)
    kwargs = dict(class_labels=list(range(10)), guidance_scale=2.0, do_sample=False)
    reference = latent(pipe, **kwargs)
    tokens = latent(pipe, kv_cache_dtype=dtype, **kwargs)
    assert tokens.shape == (10, 2, 4, 4) and (tokens == reference).float().mean() >= 0.95


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_low_precision_static_and_compiled_paths_draw_the_eager_tokens(dtype):
    pipe = make_pipeline()
    kwargs = dict(class_labels=[1, 7, 3], guidance_scale=3.0, kv_cache_dtype=dtype)
    eager = latent(pipe, generator=torch.Generator().manual_seed(0), **kwargs)
    pipe.enable_static_decode()
    static = latent(pipe, generator=torch.Generator().manual_seed(0), **kwargs)
    assert pipe._static_runner.state.kv_cache.dtype == dtype
    pipe.enable_static_decode(compile=True, backend="eager")
    compiled = latent(pipe, generator=torch.Generator().manual_seed(0), **kwargs)
    assert torch.equal(eager, static) and torch.equal(eager, compiled)


@needs_float8
def test_static_buffers_follow_the_kv_cache_dtype_between_calls():
    pipe = make_pipeline()
    pipe.enable_static_decode()
    latent(pipe, class_labels=[1], kv_cache_dtype=FLOAT8)
    assert pipe._static_runner.state.kv_cache.dtype == FLOAT8
    latent(pipe, class_labels=[1])
    assert pipe._static_runner.state.kv_cache.dtype == torch.float32


@needs_float8
def test_text_and_inpainting_calls_take_the_kv_cache_dtype():
    pipe = make_text_pipeline()
    tokens = latent(pipe, prompt=["a photo of a cat", "a red fox"], kv_cache_dtype=FLOAT8, guidance_scale=2.0)
    assert tokens.shape == (2, 4, 4) and (tokens >= 0).all()
    inpaint = NARInpaintPipeline(**make_pipeline().components)
    inpaint.set_progress_bar_config(disable=True)
    known = torch.randint(0, 48, (4, 4))
    known[2:] = -1
    tokens = latent(inpaint, tokens=known, class_labels=[3], kv_cache_dtype="float8_e4m3fn")
    assert torch.equal(tokens[0, :2], known[:2]) and (tokens >= 0).all()
    with pytest.raises(ValueError, match="`kv_cache_dtype`"):
        latent(inpaint, tokens=known, class_labels=[3], kv_cache_dtype="int4")


# --- the shared unconditional prefill ------------------------------------------------------------------------------


def prefill_batches(pipe) -> list[int]:
    """Record the cache rows every `prefill` call of `pipe`'s transformer runs."""
    seen, prefill = [], pipe.transformer.prefill

    def recording(kv_cache, **kwargs):
        seen.append(kv_cache.batch_size)
        return prefill(kv_cache, **kwargs)

    pipe.transformer.prefill = recording
    return seen


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static"])
@pytest.mark.parametrize("sampling", [dict(do_sample=False), dict(top_k=5)], ids=["greedy", "sampled"])
def test_class_models_prefill_the_null_class_once_and_draw_the_same_tokens(static, sampling):
    pipe = make_pipeline().to(torch.float64)
    if static:
        pipe.enable_static_decode()
    seen = prefill_batches(pipe)
    kwargs = dict(class_labels=[1, 7, 3, 3], guidance_scale=4.0, **sampling)
    shared = latent(pipe, generator=torch.Generator().manual_seed(0), **kwargs)
    pipe.share_unconditional_prefill = False
    separate = latent(pipe, generator=torch.Generator().manual_seed(0), **kwargs)
    assert seen == [5, 8]  # 4 conditional rows + 1 null row, against 4 + 4
    assert torch.equal(shared, separate)


def test_shared_prefill_writes_every_unconditional_row_as_its_own_prefill_would():
    pipe = make_pipeline().to(torch.float64)
    caches = []
    init = pipe.transformer.init_kv_cache
    pipe.transformer.init_kv_cache = lambda *args, **kwargs: caches.append(init(*args, **kwargs)) or caches[-1]
    for share in (True, False):
        pipe.share_unconditional_prefill = share
        latent(pipe, class_labels=[2, 5, 9], guidance_scale=2.0, callback_on_step_end=_stop)
    for (shared_keys, shared_values), (keys, values) in zip(caches[0].layers, caches[1].layers):
        torch.testing.assert_close(shared_keys[:, :, :1], keys[:, :, :1], rtol=0, atol=1e-12)
        torch.testing.assert_close(shared_values[:, :, :1], values[:, :, :1], rtol=0, atol=1e-12)
    assert (caches[0].layers[0][1][3:, :, 0] != 0).all()  # values (condition keys: zero rotary, as published)


def _stop(pipe, step, timestep, kwargs):
    pipe._interrupt = True  # stop after the prefill: only the condition slots are written
    return {}


def test_text_models_and_unguided_calls_keep_one_prefill_row_per_branch():
    pipe = make_text_pipeline()
    seen = prefill_batches(pipe)
    latent(pipe, prompt=["a photo of a cat", "a red fox"], guidance_scale=2.0)
    class_pipe = make_pipeline()
    seen_class = prefill_batches(class_pipe)
    latent(class_pipe, class_labels=[1, 2], guidance_scale=1.0)
    latent(class_pipe, class_labels=[1], guidance_scale=2.0)
    assert seen == [4] and seen_class == [2, 2]


# --- the cache's size ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static"])
@pytest.mark.parametrize("make", [make_pipeline, make_video_pipeline], ids=["image", "video"])
def test_the_cache_holds_exactly_the_condition_and_the_fed_tokens(make, static):
    pipe = make()
    caches = []
    init = pipe.transformer.init_kv_cache
    pipe.transformer.init_kv_cache = lambda *args, **kwargs: caches.append(init(*args, **kwargs)) or caches[-1]
    if static:
        pipe.enable_static_decode()
    latent(pipe, class_labels=[1, 2], guidance_scale=2.0)
    cache, scheduler = caches[0], pipe.scheduler
    assert cache.batch_size == 4 and cache.max_length == 1 + scheduler.num_fed_tokens
    spare = scheduler.static_decode_tables().group_size if static else 0
    assert cache.capacity == cache.max_length + spare and cache.layers[0][0].shape[2] == cache.capacity
    if not static:
        assert cache.length == cache.max_length  # every slot written, none left over
