"""Deprecated: the command moved to `nar_diffusers.commands.generate` (`nar-diffusers generate`)."""

from .commands import warn_moved
from .commands.generate import (  # noqa: F401
    MAX_GRID_SCALE,
    SCHEDULER_NAMES,
    SCHEDULERS,
    add_arguments,
    available_devices,
    check_model_folder,
    check_output,
    check_output_fits,
    is_local_path,
    load_pipeline,
    pipeline_class_of,
    resolve_class_labels,
    resolve_device,
    run,
)

warn_moved("nar_diffusers.generate", "nar_diffusers.commands.generate")
