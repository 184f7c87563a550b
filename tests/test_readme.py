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


def test_readme_opens_with_the_two_commands_of_a_fresh_machine():
    """Before any detail: one command installs and runs the demo, one installs the test extras and runs the suite
    with the same pins as CI (.ci/run)."""
    text = README.read_text()
    first_block = re.search(r"```bash\n(.*?)```", text, flags=re.S)
    assert text.index(first_block.group(0)) < text.index("\n## ")
    commands = [line.split("#")[0].strip() for line in first_block.group(1).splitlines() if line.strip()]
    assert len(commands) == 2
    ci = (README.parent / ".ci" / "run").read_text()
    torch_pin = re.search(r"pip install (torch==\S+)", ci).group(1)
    assert commands[0].startswith(f"pip install {torch_pin} -e . &&") and "nar-diffusers demo" in commands[0]
    assert commands[1].startswith(f'pip install {torch_pin} -e ".[test]" &&') and "pytest" in commands[1]
    assert '-e ".[test]"' in ci and "pytest" in ci


def test_readme_fits_a_screen_and_cites_the_papers():
    """A front door, not a manual: the detail lives in docs/ (tests/test_docs.py checks the pages)."""
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    assert "2503.10696" in text and "2406.06525" in text  # NAR and LlamaGen
    assert len(runnable_blocks()) == 1, "the README has one usage block; further examples belong in docs/"
