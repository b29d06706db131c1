"""README's Python example runs as written and its losses are small."""
import re
from pathlib import Path


README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_core_example_runs(capsys):
    text = README.read_text()
    blocks = re.findall(r"<!-- example: core -->\s*```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README lost its tested core example"
    exec(compile(blocks[0], "README-example", "exec"), {})
    out = capsys.readouterr().out
    losses = {m.group(1): float(m.group(2)) for m in re.finditer(r"(\w+) loss ([0-9.e+-]+)", out)}
    assert set(losses) == {"cd", "direct_cd"}
    assert all(v < 0.05 for v in losses.values()), losses


def test_readme_states_the_two_commands():
    text = README.read_text()
    assert "python -m studies.score_error" in text
    assert "bash .ci/run" in text and "python -m pytest" in text
