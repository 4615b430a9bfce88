"""README.md's Python examples run as written: a newcomer copies them first."""

import re
import subprocess
import sys
import typing
from dataclasses import is_dataclass
from pathlib import Path

import pytest

from reslab import config
from reslab.data.fashion_mnist import SYSTEM

README = Path(__file__).parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_the_readme_has_python_examples():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i + 1}" for i in range(len(BLOCKS))])
def test_a_readme_python_example_runs(code, tmp_path):
    if "fit(" in code and not SYSTEM.is_dir():
        pytest.skip("trains on the Fashion-MNIST files, which are not installed")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    if "the same accuracy twice" in code:  # as its comment says: the run's own figure, then its checkpoint's
        first, second = done.stdout.strip().splitlines()[-1].split()
        assert first == second and 0 < float(first) <= 1


def test_the_config_table_names_every_key():
    """README's table of config keys lists every field of every section, so a new key is documented where a
    newcomer looks for it (its comment in reslab/config.py says what it does)."""
    rows = dict(re.findall(r"^\| `?([a-z ]+?)`? \| (.*) \|$", README.read_text(), re.M))
    hints = typing.get_type_hints(config.Config)
    sections = {"top level": config.Config, **{k: v for k, v in hints.items() if is_dataclass(v)}}
    for section, cls in sections.items():
        named = set(re.findall(r"`(\w+)`", rows[section]))
        keys = {k for k, v in typing.get_type_hints(cls).items() if not is_dataclass(v)}
        assert keys <= named, f"README's config table lacks {section}: {sorted(keys - named)}"


def test_a_readme_config_file_loads_as_its_comment_says(tmp_path):
    (block,) = re.findall(r"```yaml\n(.*?)```", README.read_text(), re.S)
    (tmp_path / "mine.yaml").write_text(block)
    mine, fast = config.load(tmp_path / "mine.yaml"), config.load("fast")
    assert mine.model.options == {**fast.model.options, "width": 2 * fast.model.options["width"]}
    assert mine.train.epochs == 12 and mine.data == fast.data and mine.optim == fast.optim
