import json
import os

import pytest

from nar_diffusers.utils.atomic_files import write_json_atomically, write_text_atomically


def test_replaces_the_file_and_leaves_no_temporary_behind(tmp_path):
    path = tmp_path / "results.md"
    path.write_text("old")
    write_text_atomically(path, "new")
    assert path.read_text() == "new"
    assert os.listdir(tmp_path) == ["results.md"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "results.json"
    write_json_atomically(path, {"a": 1})
    with pytest.raises(TypeError):
        write_json_atomically(path, {"a": object()})  # not JSON: fails before anything is written
    assert json.loads(path.read_text()) == {"a": 1}
    with pytest.raises(TypeError):
        write_text_atomically(path, b"bytes are not text")  # fails while writing the temporary file
    assert json.loads(path.read_text()) == {"a": 1}
    assert os.listdir(tmp_path) == ["results.json"]
