import pytest
import torch

from nar_diffusers import NeighborScheduler, RasterScheduler
from nar_diffusers.pipelines.sampling_settings import SamplingSettings
from nar_diffusers.schedulers.sampling import candidate_logits, draw_uniforms, sample_tokens

GRIDS = [(16, 16), (12, 20), (4, 16, 16), (5,), (3, 1, 7)]


@pytest.mark.parametrize("grid", GRIDS)
def test_neighbor_order_visits_every_token_exactly_once(grid):
    scheduler = NeighborScheduler(grid_size=grid)
    num_tokens = torch.tensor(grid).prod().item()
    assert sorted(scheduler.generation_order.tolist()) == list(range(num_tokens))
    assert scheduler.group_offsets[-1] == num_tokens
    assert torch.equal(scheduler.generation_order[scheduler.inverse_generation_order], torch.arange(num_tokens))


@pytest.mark.parametrize("grid, steps", [((16, 16), 31), ((4, 16, 16), 34), ((12, 20), 31), ((24, 24), 47), ((5,), 5)])
def test_neighbor_step_count_is_sum_of_dims_minus_rank_plus_one(grid, steps):
    scheduler = NeighborScheduler(grid_size=grid)
    assert len(scheduler) == steps == sum(grid) - len(grid) + 1
    assert scheduler.timesteps.tolist() == list(range(steps))


@pytest.mark.parametrize("grid", GRIDS)
def test_each_plane_holds_the_tokens_at_one_manhattan_distance(grid):
    scheduler = NeighborScheduler(grid_size=grid)
    for step in range(len(scheduler)):
        distances = scheduler.coordinates[scheduler.group_slice(step)].sum(dim=1)
        assert distances.tolist() == [step] * len(distances)


@pytest.mark.parametrize("grid", GRIDS)
def test_parents_of_a_plane_lie_in_the_previous_plane_one_step_back_along_the_head_axis(grid):
    scheduler = NeighborScheduler(grid_size=grid)
    ndim = len(grid)
    fed_coords = scheduler.coordinates[: scheduler.num_fed_tokens]
    for target in range(1, scheduler.num_tokens):
        coords = scheduler.coordinates[target]
        for head in range(ndim):
            axis = ndim - 1 - head
            has_parent = bool(scheduler.parent_mask[head, target])
            assert has_parent == bool(coords[axis] > 0)
            if has_parent:
                parent = fed_coords[scheduler.parent_sources[head, target] - 1]
                expected = coords.clone()
                expected[axis] -= 1
                assert torch.equal(parent, expected)
                assert parent.sum() == coords.sum() - 1


def allowed_logits(logits, temperature=1.0, top_k=0, top_p=1.0):
    """The logits over the whole vocabulary with -inf outside the draw's candidates (`candidate_logits`)."""
    candidates, ids = candidate_logits(logits, temperature, top_k, top_p)
    if ids is None:
        return candidates
    return torch.full_like(candidates.new_empty(logits.shape), float("-inf")).scatter(-1, ids, candidates)


def test_origin_is_predicted_from_the_condition_by_every_head():
    scheduler = NeighborScheduler(grid_size=(3, 3))
    assert scheduler.parent_sources[:, 0].tolist() == [0, 0]
    assert scheduler.parent_mask[:, 0].all()


def test_mixing_takes_the_mean_over_existing_parents():
    scheduler = NeighborScheduler(grid_size=(3, 3))
    vocab = 5
    # Step 2 reads plane 1 = cells (0,1), (1,0) and predicts plane 2 = (0,2), (1,1), (2,0).
    head_logits = torch.randn(1, 2, 2, vocab)
    mixed = scheduler.mix_head_logits(head_logits, step_index=2)
    right, down = head_logits[0, 0], head_logits[0, 1]
    assert torch.allclose(mixed[0, 0], right[0])  # (0,2): right of (0,1)
    assert torch.allclose(mixed[0, 1], (right[1] + down[0]) / 2)  # (1,1): right of (1,0), down of (0,1)
    assert torch.allclose(mixed[0, 2], down[1])  # (2,0): down of (1,0)


def test_mixing_the_whole_grid_equals_mixing_step_by_step():
    scheduler = NeighborScheduler(grid_size=(3, 4, 2))
    sources = torch.randn(2, 3, 1 + scheduler.num_fed_tokens, 7)
    full = scheduler.mix_head_logits(sources)
    for step in range(len(scheduler)):
        first = 0 if step == 0 else 1 + scheduler.group_offsets[step - 1]
        fed = sources[:, :, first : 1 + scheduler.group_offsets[step]] if step else sources[:, :, :1]
        assert torch.equal(scheduler.mix_head_logits(fed, step), full[:, scheduler.group_slice(step)])


def test_raster_scheduler_takes_one_token_per_step_from_the_previous_token():
    scheduler = RasterScheduler(grid_size=(3, 4))
    assert len(scheduler) == 12
    assert scheduler.num_heads == 1
    assert scheduler.generation_order.tolist() == list(range(12))
    assert scheduler.parent_sources.tolist() == [list(range(12))]  # token j <- source j (= token j - 1)


def test_set_grid_generates_a_smaller_or_non_square_grid():
    scheduler = NeighborScheduler(grid_size=(16, 16))
    scheduler.set_grid((6, 9))
    assert scheduler.grid_shape == (6, 9) and len(scheduler) == 14 and scheduler.num_tokens == 54
    scheduler.set_grid()
    assert scheduler.grid_shape == (16, 16)


@pytest.mark.parametrize("bad", [(0, 4), (4,) * 4, "16", 16, (2.5, 3)])
def test_invalid_grid_is_rejected_with_the_parameter_name(bad):
    with pytest.raises(ValueError, match="grid_size"):
        NeighborScheduler(grid_size=bad)


def test_set_grid_of_another_rank_is_rejected():
    with pytest.raises(ValueError, match="rank"):
        NeighborScheduler(grid_size=(4, 4)).set_grid((2, 4, 4))


def test_training_mask_is_the_proximity_mask():
    scheduler = NeighborScheduler(grid_size=(3, 3))
    mask = scheduler.training_attention_mask(num_condition_tokens=2)[0, 0]
    fed = scheduler.coordinates[: scheduler.num_fed_tokens].sum(dim=1)
    assert mask[:2, :2].tolist() == [[True, False], [True, True]]
    assert mask[2:, :2].all()
    assert torch.equal(mask[2:, 2:], fed[None, :] <= fed[:, None])


def test_training_mask_hides_padded_condition_keys_except_from_themselves():
    scheduler = NeighborScheduler(grid_size=(2, 2))
    condition_mask = torch.tensor([[False, True, True], [True, True, True]])
    mask = scheduler.training_attention_mask(3, condition_mask)
    assert mask.shape == (2, 1, 3 + scheduler.num_fed_tokens, 3 + scheduler.num_fed_tokens)
    assert not mask[0, 0, 1:, 0].any()
    assert mask[0, 0, 0, 0]
    assert mask[1, 0, 1:, 0].all()


@pytest.mark.parametrize("cls", [NeighborScheduler, RasterScheduler])
def test_scheduler_config_round_trips(tmp_path, cls):
    scheduler = cls(grid_size=(12, 20))
    scheduler.save_pretrained(tmp_path)
    assert (tmp_path / "scheduler_config.json").exists()
    loaded = cls.from_pretrained(tmp_path)
    assert loaded.grid_size == (12, 20) and len(loaded) == len(scheduler)


def test_step_writes_the_drawn_tokens_at_their_raster_positions():
    scheduler = NeighborScheduler(grid_size=(3, 3))
    sample = torch.full((1, 3, 3), -1)
    logits = torch.full((1, 2, 9), -10.0)
    logits[0, 0, 4] = 10.0
    logits[0, 1, 7] = 10.0
    out = scheduler.step(logits, 1, sample, do_sample=False)
    assert out.prev_sample[0, 0, 1] == 4 and out.prev_sample[0, 1, 0] == 7
    assert (out.prev_sample == -1).sum() == 7
    assert out.group_tokens.tolist() == [[4, 7]]


def test_step_returns_a_new_grid_and_leaves_its_input_untouched():
    scheduler = NeighborScheduler(grid_size=(3, 3))
    sample = torch.full((1, 3, 3), -1)
    out = scheduler.step(torch.randn(1, 1, 9), 0, sample, do_sample=False)
    assert (sample == -1).all()
    assert out.prev_sample.data_ptr() != sample.data_ptr() and out.prev_sample[0, 0, 0] >= 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_rows_are_drawn_without_crashing_and_finite_rows_are_unchanged(bad):
    logits = torch.randn(3, 2, 10)
    poisoned = logits.clone()
    poisoned[1, 0, 4] = bad
    poisoned[2, 1] = bad
    for kwargs in (dict(), dict(top_k=3), dict(top_p=0.5), dict(temperature=0.0)):
        drawn = sample_tokens(poisoned, generator=torch.Generator().manual_seed(0), **kwargs)
        clean = sample_tokens(logits, generator=torch.Generator().manual_seed(0), **kwargs)
        assert ((drawn >= 0) & (drawn < 10)).all()
        assert torch.equal(drawn[0], clean[0]) and drawn[1, 1] == clean[1, 1] and drawn[2, 0] == clean[2, 0]
    assert sample_tokens(poisoned, do_sample=False).shape == (3, 2)


def test_sampling_settings_accept_numpy_numbers():
    import numpy as np

    logits = torch.randn(2, 3, 20)
    expected = sample_tokens(logits, 0.7, 4, 0.9, generator=torch.Generator().manual_seed(1))
    generator = torch.Generator().manual_seed(1)
    drawn = sample_tokens(logits, np.float32(0.7), np.int64(4), np.float64(0.9), generator=generator)
    assert torch.equal(drawn, expected)
    scheduler = NeighborScheduler(grid_size=(2, 2))
    scheduler.step(logits[:, :1], 0, torch.full((2, 2, 2), -1), top_k=np.int64(4), top_p=np.float32(0.9))


def test_greedy_top_k_one_and_tiny_top_p_all_pick_the_argmax():
    logits = torch.randn(4, 3, 50)
    greedy = sample_tokens(logits, do_sample=False)
    assert torch.equal(greedy, logits.argmax(-1))
    assert torch.equal(sample_tokens(logits, top_k=1, generator=torch.Generator().manual_seed(0)), greedy)
    assert torch.equal(sample_tokens(logits, top_p=1e-6, generator=torch.Generator().manual_seed(0)), greedy)


def test_top_k_keeps_exactly_k_candidates_and_top_p_keeps_the_smallest_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isfinite(allowed_logits(logits, top_k=2)).sum() == 2
    kept = torch.isfinite(allowed_logits(logits, top_p=0.7))
    assert kept.tolist() == [[True, True, False, False]]
    kept = torch.isfinite(allowed_logits(logits, top_p=0.85))
    assert kept.tolist() == [[True, True, True, False]]


def test_sampling_follows_the_distribution_and_the_generator():
    probs = torch.tensor([0.7, 0.2, 0.1])
    logits = probs.log().expand(20000, 3)
    draws = sample_tokens(logits, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(torch.bincount(draws, minlength=3) / 20000, probs, atol=0.02)
    again = sample_tokens(logits, generator=torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)


def test_low_temperature_sharpens_towards_the_argmax():
    logits = torch.tensor([[1.0, 0.5, 0.0]]).expand(2000, 3)
    draws = sample_tokens(logits, temperature=0.01, generator=torch.Generator().manual_seed(0))
    assert (draws == 0).all()


@pytest.mark.parametrize(
    "kwargs, name", [({"temperature": -1.0}, "temperature"), ({"top_k": -1}, "top_k"), ({"top_p": 0.0}, "top_p"),
                     ({"top_p": 1.5}, "top_p"), ({"temperature": float("nan")}, "temperature"),
                     ({"temperature": float("inf")}, "temperature"), ({"top_k": True}, "top_k"),
                     ({"top_k": 2.0}, "top_k")]
)
def test_sampling_settings_reject_bad_values_once_at_the_boundary(kwargs, name):
    settings = dict(guidance_scale=1.0, cfg_interval=-1, temperature=1.0, top_k=0, top_p=1.0) | kwargs
    with pytest.raises(ValueError, match=name):
        SamplingSettings.checked(1, "image", **settings)


def test_step_checks_the_shape_of_its_logits():
    scheduler = NeighborScheduler(grid_size=(2, 2))
    with pytest.raises(ValueError, match="logits"):
        scheduler.step(torch.zeros(1, 2, 4), 0, torch.zeros(1, 2, 2, dtype=torch.long))


# --- head positions and the static tables -----------------------------------------------------------------------

ORDERS = [(NeighborScheduler, (4, 4)), (NeighborScheduler, (3, 5)), (NeighborScheduler, (2, 3, 3)),
          (NeighborScheduler, (5,)), (RasterScheduler, (3, 3))]  # fmt: skip


def _selected(scheduler, head_logits, step):
    """Head logits `(B, heads, n_fed, V)` restricted to `head_positions(step)`."""
    positions = scheduler.head_positions(step)
    if positions is None:
        return head_logits
    return torch.stack([head_logits[:, k, positions[k]] for k in range(scheduler.num_heads)], dim=1)


@pytest.mark.parametrize("cls, grid", ORDERS)
def test_mixing_logits_at_the_head_positions_equals_mixing_every_fed_token(cls, grid):
    scheduler = cls(grid_size=grid)
    evaluated = every_fed_token = 0
    for step in range(len(scheduler)):
        num_fed = 1 if step == 0 else len(range(*scheduler.group_slice(step - 1).indices(scheduler.num_tokens)))
        head_logits = torch.randn(2, scheduler.num_heads, num_fed, 7)
        selected = _selected(scheduler, head_logits, step)
        evaluated += selected.shape[1] * selected.shape[2]
        every_fed_token += scheduler.num_heads * num_fed
        torch.testing.assert_close(
            scheduler.mix_selected_head_logits(selected, step), scheduler.mix_head_logits(head_logits, step),
            rtol=0, atol=1e-6,
        )
    assert evaluated <= every_fed_token
    if grid in ((4, 4), (5,), (3, 3)):
        # Square grids and raster order: every head is evaluated once per (target, parent) pair, no logits that no
        # target reads (16x16: 482 head evaluations instead of 512).
        assert evaluated == int(scheduler.parent_mask.sum())


@pytest.mark.parametrize("cls, grid", ORDERS)
def test_static_tables_pad_the_per_step_plan_to_one_shape(cls, grid):
    scheduler = cls(grid_size=grid)
    tables = scheduler.static_decode_tables()
    steps, size = len(scheduler), tables.group_size
    assert size == max(b - a for a, b in zip(scheduler.group_offsets, scheduler.group_offsets[1:]))
    assert tables.fed_positions.shape == tables.target_positions.shape == (steps, size)
    assert tables.head_positions.shape == (steps, scheduler.num_heads, tables.num_head_positions)
    for step in range(1, steps):
        fed = torch.arange(scheduler.num_tokens)[scheduler.group_slice(step - 1)]
        targets = torch.arange(scheduler.num_tokens)[scheduler.group_slice(step)]
        n, t = len(fed), len(targets)
        assert torch.equal(tables.fed_positions[step, :n], fed) and (tables.fed_positions[step, n:] == 0).all()
        assert torch.equal(tables.write_positions[step, :n], fed)
        assert (tables.write_positions[step, n:] >= scheduler.num_fed_tokens).all()  # spare slots
        assert tables.fed_end[step] == scheduler.generated_before(step)
        assert torch.equal(tables.target_positions[step, :t], targets)
        assert (tables.target_positions[step, t:] >= scheduler.num_tokens).all()  # dummy cells, all distinct
        assert len(set(tables.target_positions[step].tolist())) == size
        assert tables.target_valid[step].sum() == t and not tables.parent_mask[step, :, t:].any()
        # Mixing through the padded tables gives the step's mixed logits on the real targets.
        head_logits = torch.randn(2, scheduler.num_heads, size, 5)
        padded = torch.stack([head_logits[:, k, tables.head_positions[step, k]] for k in range(scheduler.num_heads)], 1)
        from nar_diffusers.schedulers.token_order import mix_logits

        mixed = mix_logits(padded, tables.head_index[step], tables.parent_mask[step], tables.parent_count[step])
        torch.testing.assert_close(mixed[:, :t], scheduler.mix_head_logits(head_logits[:, :, :n], step), rtol=0, atol=0)


# --- the inverse-CDF draw -----------------------------------------------------------------------------------------


def _reference_draw(logits, uniforms, temperature=1.0, top_k=0, top_p=1.0):
    """One row at a time in float64 Python: sort the allowed tokens as the sampler does, walk the CDF."""
    out = []
    for row, u in zip(logits.reshape(-1, logits.shape[-1]).double(), uniforms.reshape(-1).tolist()):
        row = row / max(temperature, 1e-5)
        order = list(range(len(row)))
        if top_k:
            order = torch.topk(row, top_k).indices.tolist()
        elif top_p < 1:
            order = torch.sort(row, descending=True).indices.tolist()
        values = row[order]
        probs = torch.softmax(values, 0)
        if top_p < 1:
            before = probs.cumsum(0) - probs
            probs = torch.where((before > top_p) & (torch.arange(len(probs)) > 0), 0.0, probs)
        cdf = probs.cumsum(0)
        out.append(order[min(int((cdf < u * cdf[-1]).sum()), len(order) - 1)])
    return torch.tensor(out).view(logits.shape[:-1])


@pytest.mark.parametrize(
    "kwargs", [dict(), dict(top_k=5), dict(top_p=0.6), dict(top_k=8, top_p=0.7, temperature=0.5), dict(temperature=2.0)]
)
def test_inverse_cdf_draw_equals_a_reference_walk_of_the_cdf(kwargs):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 40, 30, generator=generator) * 2
    uniforms = torch.rand(3, 40, generator=generator)
    drawn = sample_tokens(logits, uniforms=uniforms, **kwargs)
    reference = _reference_draw(logits, uniforms, **kwargs)
    # float32 vs float64 cumulative sums may disagree only for a uniform within rounding of a CDF step.
    assert (drawn != reference).sum() <= 1


@pytest.mark.parametrize("kwargs", [dict(top_k=3), dict(top_p=0.5), dict(top_k=4, top_p=0.6)])
def test_draws_stay_inside_the_top_k_and_top_p_candidates(kwargs):
    logits = torch.randn(5, 12, generator=torch.Generator().manual_seed(3)).repeat_interleave(2000, dim=0)
    drawn = sample_tokens(logits, generator=torch.Generator().manual_seed(0), **kwargs)
    allowed = torch.isfinite(allowed_logits(logits, **kwargs))
    assert allowed.gather(1, drawn[:, None]).all()
    # Every allowed candidate is reached (the draw is not stuck on the argmax).
    for row in range(5):
        rows = slice(row * 2000, (row + 1) * 2000)
        assert set(drawn[rows].tolist()) == set(allowed[row * 2000].nonzero().flatten().tolist())


def test_inverse_cdf_frequencies_follow_the_probabilities():
    probs = torch.tensor([0.4, 0.25, 0.2, 0.1, 0.05])
    n = 40000
    drawn = sample_tokens(probs.log().expand(n, 5), generator=torch.Generator().manual_seed(0))
    observed = torch.bincount(drawn, minlength=5).double()
    chi_square = float(((observed - n * probs) ** 2 / (n * probs)).sum())
    assert chi_square < 20.5  # the 0.9995 quantile for 4 degrees of freedom


def test_top_k_candidates_come_from_topk_in_descending_order():
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.0, 0.5]])
    candidates, ids = candidate_logits(logits, top_k=3)
    assert ids.tolist() == [[1, 3, 4]] and torch.equal(candidates, logits[:, [1, 3, 4]])
    candidates, ids = candidate_logits(logits)
    assert ids is None and torch.equal(candidates, logits)


def test_uniforms_come_from_each_rows_generator_and_feed_the_step():
    uniforms = draw_uniforms(2, 5, [torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)])
    assert torch.equal(uniforms[1], torch.rand(5, generator=torch.Generator().manual_seed(4)))
    assert torch.equal(draw_uniforms(2, 5, torch.Generator().manual_seed(3)),
                       torch.rand(2, 5, generator=torch.Generator().manual_seed(3)))  # fmt: skip
    with pytest.raises(ValueError, match="generator"):
        draw_uniforms(3, 5, [torch.Generator()])

    scheduler = NeighborScheduler(grid_size=(3, 3))
    logits = torch.randn(2, 2, 9)
    step_uniforms = uniforms[:, 1:3]
    out = scheduler.step(logits, 1, torch.full((2, 3, 3), -1), top_k=4, uniforms=step_uniforms)
    assert torch.equal(out.group_tokens, sample_tokens(logits, top_k=4, uniforms=step_uniforms))
    # Without uniforms, the step draws its own from the generator (custom loops keep working).
    seeded = scheduler.step(logits, 1, torch.full((2, 3, 3), -1), generator=torch.Generator().manual_seed(0))
    again = scheduler.step(logits, 1, torch.full((2, 3, 3), -1), generator=torch.Generator().manual_seed(0))
    assert torch.equal(seeded.group_tokens, again.group_tokens)
    with pytest.raises(ValueError, match="uniforms"):
        scheduler.step(logits, 1, torch.full((2, 3, 3), -1), uniforms=uniforms)
