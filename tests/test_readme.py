import re
from pathlib import Path

README = Path(__file__).parents[1] / "README.md"


def runnable_blocks() -> list[str]:
    """The README's Python blocks marked `<!-- runnable -->`."""
    return re.findall(r"<!-- runnable -->\n```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_python_example_runs_as_written(tmp_path, monkeypatch, capsys):
    blocks = runnable_blocks()
    assert blocks, "README.md has no runnable example"
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})
    assert (tmp_path / "tiny-nar" / "model_index.json").exists()
    assert (tmp_path / "tiny-nar-sample.png").exists()
    assert "15 forward passes" in capsys.readouterr().out
