"""What makes a saved NAR pipeline self-describing and loadable by plain diffusers.

- Sampling defaults travel with the model: `sampling_defaults` (guidance scale, cfg interval, temperature, top-k,
  top-p) is part of the pipeline's config, so `save_pretrained` writes it into `model_index.json` and
  `from_pretrained` reads it back; a call that omits a setting uses it, an argument passed explicitly wins.
- Class names travel with class-conditional models: `id2label` (as DiT pipelines keep it) and `get_label_ids`.
- A folder written by `save_pretrained` holds a tiny module (a copy of `hub_modules/pipeline_nar.py`, ...) and a
  two-element `_class_name`, diffusers' mechanism for pipelines with their own code, so
  `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` loads it from anywhere; the module only
  imports the installed `nar_diffusers`. `NARPipeline.from_pretrained(folder)` keeps loading the installed class
  and never runs the folder's copy.
- `save_pretrained` (and hence `push_to_hub`) writes a model card (README.md).
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, Dict, Union

from ..schedulers.sampling import is_int, is_real, validate_sampling_args
from ..utils.atomic_files import write_text_atomically
from ..utils.model_card import build_model_card, save_model_card

SAMPLING_SETTINGS: tuple[str, ...] = ("guidance_scale", "cfg_interval", "temperature", "top_k", "top_p")
BUILTIN_SAMPLING_DEFAULTS: dict[str, float | int] = {
    "guidance_scale": 4.0, "cfg_interval": -1, "temperature": 1.0, "top_k": 0, "top_p": 1.0,
}  # fmt: skip
"""What a call uses when neither the call nor the saved pipeline sets a value."""
MODEL_CARD_FIELDS: tuple[str, ...] = ("summary", "converted_from", "base_model", "training", "license")
PIPELINE_CONFIG_KEYS: tuple[str, ...] = ("sampling_defaults", "id2label", "model_card_info")
"""The entries of `model_index.json` that are settings of the pipeline, not components."""

# Annotations of those entries in the pipelines' `__init__`. diffusers' `from_pretrained` checks the loaded values
# against them and cannot read `X | Y` inside a generic; `id2label` comes back from JSON with string keys.
SamplingDefaults = Dict[str, Union[float, int]]  # noqa: UP006, UP007
Id2Label = Dict[Union[int, str], str]  # noqa: UP006, UP007

HUB_MODULES_PACKAGE = "nar_diffusers.pipelines.hub_modules"
"""Where the modules a saved folder carries live (one file per pipeline, copied as is by `save_config`)."""


def hub_module_source(module_name: str) -> str:
    """The source of the hub module `module_name` (e.g. "pipeline_nar"), as `save_pretrained` writes it."""
    modules = resources.files(HUB_MODULES_PACKAGE)
    source = modules / f"{module_name}.py"
    if module_name.startswith("_") or not source.is_file():
        names = sorted(p.name[:-3] for p in modules.iterdir() if p.name.endswith(".py") and not p.name.startswith("_"))
        raise ValueError(f"`_hub_module_name` {module_name!r} names no hub module; allowed: {names}.")
    return source.read_text(encoding="utf-8")


def check_sampling_defaults(defaults: Mapping[str, Any] | None) -> dict[str, float | int]:
    """Validate saved sampling defaults (a subset of `SAMPLING_SETTINGS`) and return them as plain numbers."""
    if defaults is None:
        return {}
    if not isinstance(defaults, Mapping):
        raise ValueError(f"`sampling_defaults` must be a dict of {list(SAMPLING_SETTINGS)}, got {type(defaults).__name__}.")
    unknown = sorted(set(defaults) - set(SAMPLING_SETTINGS))
    if unknown:
        raise ValueError(f"Unknown `sampling_defaults` {unknown}; allowed: {list(SAMPLING_SETTINGS)}.")
    merged = {**BUILTIN_SAMPLING_DEFAULTS, **defaults}
    validate_sampling_args(merged["temperature"], merged["top_k"], merged["top_p"])
    if not is_real(merged["guidance_scale"]) or merged["guidance_scale"] < 0:
        raise ValueError(
            "`sampling_defaults['guidance_scale']` must be a finite number >= 0 (> 1 enables guidance), got "
            f"{merged['guidance_scale']!r}."
        )
    if not is_int(merged["cfg_interval"]) or merged["cfg_interval"] < -1:
        raise ValueError(f"`sampling_defaults['cfg_interval']` must be an int >= -1, got {merged['cfg_interval']!r}.")
    return {k: (int(v) if k in ("cfg_interval", "top_k") else float(v)) for k, v in defaults.items()}


def check_id2label(id2label: Mapping[Any, str] | None) -> dict[int, str] | None:
    """`{class id: name}` with int ids (JSON stores them as strings); a name may list synonyms separated by commas."""
    if id2label is None:
        return None
    if not isinstance(id2label, Mapping) or not id2label:
        raise ValueError("`id2label` must be a non-empty dict {class id: name}.")
    result: dict[int, str] = {}
    for key, name in id2label.items():
        try:
            index = int(key)
        except (TypeError, ValueError):
            raise ValueError(f"`id2label` keys must be class ids (ints), got {key!r}.") from None
        if index < 0 or not isinstance(name, str) or not name.strip():
            raise ValueError(f"`id2label` maps class ids >= 0 to non-empty names, got {key!r}: {name!r}.")
        result[index] = name
    return dict(sorted(result.items()))


class NARHubMixin:
    """Sampling defaults, class names, saving with a loadable module and a model card (see the module docstring).

    A pipeline using it sets `_hub_module_name` and calls `_register_metadata(...)` in `__init__`.
    """

    _hub_module_name: str

    def _register_metadata(
        self,
        sampling_defaults: Mapping[str, Any] | None,
        id2label: Mapping[Any, str] | None,
        model_card_info: Mapping[str, Any] | None,
    ) -> None:
        id2label = check_id2label(id2label)
        num_classes = getattr(self.transformer.config, "num_classes", None)
        if id2label is not None and (num_classes is None or max(id2label) >= num_classes):
            raise ValueError(
                f"`id2label` names class ids up to {max(id2label)}, but the transformer has "
                f"{'no classes' if num_classes is None else f'{num_classes} classes'}."
            )
        unknown = sorted(set(model_card_info or {}) - set(MODEL_CARD_FIELDS))
        if unknown:
            raise ValueError(f"Unknown `model_card_info` fields {unknown}; allowed: {list(MODEL_CARD_FIELDS)}.")
        self.register_to_config(
            sampling_defaults=check_sampling_defaults(sampling_defaults),
            id2label=id2label,
            model_card_info=dict(model_card_info or {}),
        )

    # --- sampling defaults -------------------------------------------------------------------------

    @property
    def sampling_defaults(self) -> dict[str, float | int]:
        """Every sampling setting a call uses when it omits it: the saved ones, else the built-in ones."""
        return {**BUILTIN_SAMPLING_DEFAULTS, **(self.config.get("sampling_defaults") or {})}

    def set_sampling_defaults(self, **settings: Any) -> None:
        """Update the saved sampling defaults (e.g. `guidance_scale=3.0, top_k=8`); saved with the pipeline."""
        self.register_to_config(
            sampling_defaults=check_sampling_defaults({**(self.config.get("sampling_defaults") or {}), **settings})
        )

    def _resolve_sampling(self, **passed: Any) -> dict[str, Any]:
        """The call's sampling settings: each passed value, or the default when it is None."""
        defaults = self.sampling_defaults
        return {name: defaults[name] if value is None else value for name, value in passed.items()}

    # --- class names ---------------------------------------------------------------------------------

    @property
    def labels(self) -> dict[str, int]:
        """`{class name: id}` of a class-conditional model with saved names (every comma-separated synonym)."""
        names: dict[str, int] = {}
        for index, value in (check_id2label(self.config.get("id2label")) or {}).items():
            for name in value.split(","):
                if name.strip():
                    names[name.strip()] = index
        return dict(sorted(names.items()))

    def get_label_ids(self, label: str | Sequence[str]) -> list[int]:
        """Class ids of class names, e.g. `pipe.get_label_ids(["golden retriever", "tabby"])`."""
        labels = self.labels
        if not labels:
            raise ValueError("This pipeline has no class names (`id2label`); pass class ids as `class_labels`.")
        names = [label] if isinstance(label, str) else list(label)
        ids = []
        for name in names:
            if name not in labels:
                close = difflib.get_close_matches(str(name), list(labels), n=5, cutoff=0.5)
                hint = f" Close matches: {close}." if close else ""
                raise ValueError(f"{name!r} is not a class name of this model ({len(labels)} names).{hint}")
            ids.append(labels[name])
        return ids

    # --- saving and loading --------------------------------------------------------------------------

    @classmethod
    def load_config(cls, *args, **kwargs):
        """`DiffusionPipeline.load_config`; for a concrete NAR pipeline class, a folder's two-element `_class_name`
        naming a NAR pipeline (its own module, as `save_pretrained` writes it) is read as that class's plain name,
        so `from_pretrained` uses the installed classes and never the folder's module. A folder saved by one NAR
        pipeline therefore loads into another that shares its components (e.g. `NARInpaintPipeline.from_pretrained`
        of a `NARPipeline` folder), as diffusers loads any pipeline folder into a compatible class."""
        loaded = super().load_config(*args, **kwargs)
        config = loaded[0] if isinstance(loaded, tuple) else loaded
        name = config.get("_class_name")
        if isinstance(name, (list, tuple)) and len(name) == 2 and tuple(name) in _nar_hub_classes():
            config["_class_name"] = name[1]
        return loaded

    def save_config(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs) -> None:
        """Write `model_index.json` with a two-element `_class_name` and the module it names."""
        source = hub_module_source(self._hub_module_name)
        super().save_config(save_directory, push_to_hub=push_to_hub, **kwargs)
        folder = Path(save_directory)
        write_text_atomically(folder / f"{self._hub_module_name}.py", source)
        index_path = folder / "model_index.json"
        index = json.loads(index_path.read_text(encoding="utf-8"))
        index["_class_name"] = [self._hub_module_name, type(self).__name__]
        write_text_atomically(index_path, json.dumps(index, indent=2, sort_keys=True) + "\n")

    def save_pretrained(self, save_directory: str | os.PathLike, *args, push_to_hub: bool = False, **kwargs) -> None:
        """`DiffusionPipeline.save_pretrained`, plus the model card (README.md); `push_to_hub` uploads all of it."""
        hub_kwargs = {k: kwargs.pop(k) for k in ("commit_message", "private", "create_pr", "token", "repo_id") if k in kwargs}
        super().save_pretrained(save_directory, *args, push_to_hub=False, **kwargs)
        save_model_card(self.model_card(), save_directory)
        if push_to_hub:
            from huggingface_hub import create_repo

            repo_id = hub_kwargs.get("repo_id", str(save_directory).rstrip(os.sep).split(os.sep)[-1])
            repo_id = create_repo(repo_id, exist_ok=True, private=hub_kwargs.get("private"), token=hub_kwargs.get("token")).repo_id
            self._upload_folder(
                save_directory, repo_id, token=hub_kwargs.get("token"),
                commit_message=hub_kwargs.get("commit_message"), create_pr=hub_kwargs.get("create_pr", False),
            )  # fmt: skip

    def _upload_folder(self, working_dir: str | os.PathLike, repo_id: str, *args, **kwargs):
        # diffusers' push_to_hub puts a generic card in place just before uploading: this pipeline's card wins.
        save_model_card(self.model_card(repo=repo_id), working_dir)
        return super()._upload_folder(working_dir, repo_id, *args, **kwargs)

    def model_card(self, repo: str = "path/to/this/folder"):
        """The model card of this pipeline (what `save_pretrained` writes as README.md)."""
        info = dict(self.config.get("model_card_info") or {})
        transformer = self.transformer.config
        names = check_id2label(self.config.get("id2label"))
        kind = "video" if len(transformer.grid_size) == 3 else "image"
        default_summary = (
            f"A {'class' if transformer.num_classes is not None else 'text'}-conditional {kind} generator: Neighboring "
            "Autoregressive Modeling (NAR, arXiv 2503.10696) with nar-diffusers."
        )
        return build_model_card(
            type(self).__name__,
            summary=info.get("summary") or default_summary,
            condition="class" if transformer.num_classes is not None else "text",
            grid_size=tuple(self.scheduler.config.grid_size),
            num_decoding_heads=transformer.num_decoding_heads,
            num_forward_passes=len(self.scheduler),
            sampling_defaults=self.sampling_defaults,
            repo=repo,
            base_model=info.get("base_model"),
            converted_from=info.get("converted_from"),
            training=info.get("training"),
            class_names=list(names.values()) if names else None,
            license=info.get("license") or "apache-2.0",
        )


def _nar_hub_classes() -> set[tuple[str, str]]:
    """`(module, class)` of every NAR pipeline class defined so far (the subclasses of `NARHubMixin`)."""
    found, todo = set(), list(NARHubMixin.__subclasses__())
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if isinstance(getattr(cls, "_hub_module_name", None), str):
            found.add((cls._hub_module_name, cls.__name__))
    return found


