"""The optimizer of the published training (AdamW, betas 0.9 / 0.95, decay on 2+-dim parameters) and the optimizer
flags every training script shares."""

from __future__ import annotations

from typing import Any

import torch
from diffusers.optimization import SchedulerType


def weight_decay_parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW parameter groups, as the published training makes them: every parameter with two or more
    dimensions (Linear weights, embedding tables, the unconditional caption table) decays; the 1-D norm weights do
    not. Frozen parameters are left out."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (decay if parameter.dim() >= 2 else no_decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(
    model: torch.nn.Module,
    learning_rate: float = 1e-4,
    betas: tuple[float, float] = (0.9, 0.95),
    weight_decay: float = 0.05,
    eps: float = 1e-8,
) -> torch.optim.AdamW:
    """AdamW with the published betas (0.9, 0.95) and decoupled weight decay on the 2+-dimensional parameters."""
    if learning_rate <= 0:
        raise ValueError(f"`--learning_rate` must be positive, got {learning_rate}.")
    if weight_decay < 0:
        raise ValueError(f"`--weight_decay` must be >= 0, got {weight_decay}.")
    groups = weight_decay_parameter_groups(model, weight_decay)
    if not groups[0]["params"] and not groups[1]["params"]:
        raise ValueError("The model has no trainable parameters.")
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=eps)


LR_SCHEDULERS: tuple[str, ...] = tuple(s.value for s in SchedulerType if s.value != "piecewise_constant")
"""The `diffusers.optimization.get_scheduler` names the training scripts offer (piecewise_constant needs a rule
string no flag provides)."""


def add_optimizer_arguments(
    parser,
    *,
    learning_rate: float = 1e-4,
    lr_scheduler: str = "cosine",
    lr_warmup_steps: int = 0,
    adam_beta2: float = 0.95,
    adam_weight_decay: float = 0.05,
) -> None:
    """Add the optimizer flags every training script shares to an argparse parser or group: `--learning_rate`,
    `--lr_scheduler`, `--lr_warmup_steps`, `--adam_beta1`, `--adam_beta2`, `--adam_epsilon`, `--adam_weight_decay`
    (also spelled `--weight_decay`) and `--max_grad_norm`. The keyword arguments set each script's defaults."""
    parser.add_argument("--learning_rate", type=float, default=learning_rate, help="Peak learning rate.")
    parser.add_argument("--lr_scheduler", type=str, default=lr_scheduler, choices=list(LR_SCHEDULERS))
    parser.add_argument("--lr_warmup_steps", type=int, default=lr_warmup_steps, help="Linear warmup steps.")
    parser.add_argument("--adam_beta1", type=float, default=0.9)
    parser.add_argument("--adam_beta2", type=float, default=adam_beta2)
    parser.add_argument("--adam_epsilon", type=float, default=1e-8)
    parser.add_argument(
        "--adam_weight_decay", "--weight_decay", dest="adam_weight_decay", type=float, default=adam_weight_decay,
        help="Decoupled weight decay on every parameter of 2+ dims (not on norm weights), as published.",
    )
    parser.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm; <= 0 disables it.")


def check_optimizer_arguments(args) -> None:
    """Reject optimizer flag values that cannot train, naming the flag."""
    if args.learning_rate <= 0:
        raise ValueError(f"`--learning_rate` must be positive, got {args.learning_rate}.")
    if args.lr_warmup_steps < 0:
        raise ValueError(f"`--lr_warmup_steps` must be >= 0, got {args.lr_warmup_steps}.")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0.0 <= getattr(args, name) < 1.0:
            raise ValueError(f"`--{name}` must be in [0, 1), got {getattr(args, name)}.")
    if args.adam_epsilon <= 0:
        raise ValueError(f"`--adam_epsilon` must be positive, got {args.adam_epsilon}.")
    if args.adam_weight_decay < 0:
        raise ValueError(f"`--adam_weight_decay` must be >= 0, got {args.adam_weight_decay}.")


def optimizer_settings(args) -> dict[str, Any]:
    """The flags of `add_optimizer_arguments` as keyword arguments of `NARTrainingConfig` and `train_vqmodel`."""
    return {
        "learning_rate": args.learning_rate,
        "adam_betas": (args.adam_beta1, args.adam_beta2),
        "adam_epsilon": args.adam_epsilon,
        "weight_decay": args.adam_weight_decay,
        "max_grad_norm": args.max_grad_norm if args.max_grad_norm > 0 else None,
        "lr_scheduler": args.lr_scheduler,
        "lr_warmup_steps": args.lr_warmup_steps,
    }
