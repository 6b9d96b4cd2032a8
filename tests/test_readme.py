"""The README's worked example runs as written (STYLE.md habit 14) and its commands exist."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_worked_example_runs(tmp_path, monkeypatch, capsys):
    blocks = python_blocks(README.read_text())
    assert blocks, "the README has no python example"
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        exec(compile(block, str(README), "exec"), {"__name__": "__readme__"})
    out = capsys.readouterr().out
    assert "KFAC" in out and "RESIDU" in out
    assert (tmp_path / "example.h5").is_file() and (tmp_path / "errors.csv").is_file()


def test_two_commands_are_the_makefile_targets_and_ci_calls_the_second():
    text = README.read_text()
    assert "make demo" in text and "make test" in text
    makefile = (README.parent / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, flags=re.M) and re.search(r"^test:", makefile, flags=re.M)
    ci = (README.parent / ".ci" / "run").read_text()
    assert "make test" in ci


def test_cli_commands_in_the_readme_exist():
    from fisherlab.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for cmd in re.findall(r"^fisherlab (\w+)", README.read_text(), flags=re.M):
        assert cmd in sub.choices, cmd
