"""Evaluation at scale: bulk sampling over processes (`nar-diffusers sample`) and the ADM `.npz` sample batch.

- `sample_plan`: the condition and the seed of every sample index, and the shards.
- `sample_folder`: the resumable output folder (atomic shards, completion markers, settings).
- `adm_npz`: the `.npz` the ADM (guided-diffusion) evaluation suite reads, written by streaming.
- `bulk_sampling`: `run_sampling`, behind the `sample` command (`nar_diffusers.commands.sample`).
"""

from .adm_npz import npz_layout, write_adm_npz
from .sample_plan import SamplePlan, read_prompts, sample_generators, sample_seed

__all__ = ["SamplePlan", "npz_layout", "read_prompts", "sample_generators", "sample_seed", "write_adm_npz"]
