"""Pipeline loading that checks the sizes of every model a folder describes before diffusers builds any of them.

`NARTransformer` and `LARPTokenizer` check their own configs when they load (`SizeGuardedConfigMixin`); a diffusers
`VQModel` does not, and checking all components first also refuses a bad folder before a large, valid component
has been loaded in vain. A Hub id is checked once its files are downloaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from diffusers.models import VQModel

from ..models.larp_tokenizer import LARPTokenizer
from ..models.transformer_nar import NARTransformer
from ..utils.size_guard import SizeGuardError, check_model_config

# The component classes whose configs a pipeline folder may hold, by the class name `model_index.json` gives.
GUARDED_COMPONENTS: dict[str, type] = {
    "NARTransformer": NARTransformer, "LARPTokenizer": LARPTokenizer, "VQModel": VQModel,
}  # fmt: skip


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise SizeGuardError(f"{path} is not a readable JSON file: {' '.join(str(err).split())}") from None


def check_pipeline_folder(folder: str | os.PathLike, skip: set[str] | frozenset[str] = frozenset()) -> None:
    """Run `check_model_config` on the config of every transformer / tokenizer component of a pipeline `folder`
    (components named in `skip`, e.g. passed to `from_pretrained` as objects, are not read). A folder without a
    `model_index.json`, or a component without a config, is left to diffusers to report."""
    folder = Path(folder)
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        return
    index = _read_json(index_file)
    if not isinstance(index, dict):
        raise SizeGuardError(f"{index_file} must hold a JSON object naming the pipeline's components.")
    for name, entry in index.items():
        if name.startswith("_") or name in skip or not isinstance(entry, (list, tuple)) or len(entry) != 2:
            continue
        config_file = folder / name / "config.json"
        model_class = GUARDED_COMPONENTS.get(str(entry[1]))
        if model_class is None or not config_file.is_file():
            continue
        check_model_config(model_class, _read_json(config_file), str(config_file))


class GuardedLoadingMixin:
    """`from_pretrained` (and `download`) check every component config of the folder first (see the module
    docstring); put it before `DiffusionPipeline` in a pipeline's bases."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs):
        if os.path.isdir(pretrained_model_name_or_path):
            check_pipeline_folder(pretrained_model_name_or_path, skip=set(kwargs))
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def download(cls, *args, **kwargs) -> str:
        folder = super().download(*args, **kwargs)
        check_pipeline_folder(folder, skip=set(kwargs))
        return folder
