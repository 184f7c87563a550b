import argparse

import pytest
import torch

from nar_diffusers.training.factory import build_transformer
from nar_diffusers.training.optimization import (
    add_optimizer_arguments,
    check_optimizer_arguments,
    weight_decay_parameter_groups,
)

CAPTION_DIM = 24


def test_weight_decay_on_matrices_and_tables_but_not_on_norms():
    model = build_transformer("tiny", "nar", (4, 4), 16, caption_dim=CAPTION_DIM, num_condition_tokens=4)
    decay, no_decay = weight_decay_parameter_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    decayed = {id(p) for p in decay["params"]}
    linear_weights = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    tables = {id(model.token_embedding.weight), id(model.caption_projection.uncond_embedding)}
    assert linear_weights | tables == decayed
    norms = {id(p) for name, p in model.named_parameters() if "norm" in name}
    assert norms == {id(p) for p in no_decay["params"]}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_optimizer_flags_are_shared_with_per_script_defaults_and_checked():
    parser = argparse.ArgumentParser()
    add_optimizer_arguments(parser, lr_scheduler="constant", adam_weight_decay=0.0)
    args = parser.parse_args([])
    assert (args.learning_rate, args.lr_scheduler, args.adam_weight_decay, args.adam_beta2) == (1e-4, "constant", 0.0, 0.95)
    assert parser.parse_args(["--weight_decay", "0.1"]).adam_weight_decay == 0.1  # the older spelling
    with pytest.raises(SystemExit):
        parser.parse_args(["--lr_scheduler", "exponential"])
    for flag, value in (("--learning_rate", "0"), ("--adam_beta2", "1.0"), ("--adam_weight_decay", "-1")):
        with pytest.raises(ValueError, match=flag):
            check_optimizer_arguments(parser.parse_args([flag, value]))
