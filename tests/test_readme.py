"""The Python examples of the README and of docs/*.md run as written: each ```python block,
saved to a file and run with ``python file.py`` in an empty folder, exits with status 0.
Each is meant to take a few seconds (under 10 s on two cores); the timeout only catches a
hang."""

import glob
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
DOCS = sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
BLOCK = re.compile(r"^```python\n(.*?)^```", re.M | re.S)


def _text(path=README):
    with open(path, encoding="utf-8") as f:
        return f.read()


def _blocks_of(path):
    text = _text(path)
    name = os.path.relpath(path, ROOT)
    return [(name, text.count("\n", 0, m.start()) + 1, m.group(1))
            for m in BLOCK.finditer(text)]


def _blocks():
    return [pytest.param(name, line, code, id=f"{name}:line{line}")
            for path in [README, *DOCS] for name, line, code in _blocks_of(path)]


def _section(title):
    """The README's section under the heading ``title`` (any level), up to the next heading
    of the same or a higher level."""
    text = _text()
    head = re.search(rf"^(#+) {re.escape(title)}\n", text, re.M)
    level = len(head.group(1))
    end = re.compile(rf"^#{{1,{level}}} ", re.M).search(text, head.end())
    return text[head.start():end.start() if end else len(text)]


def test_readme_has_python_blocks():
    assert len(_blocks_of(README)) >= 3


@pytest.mark.parametrize("name, line, code", _blocks())
def test_python_block_runs_as_a_script(name, line, code, tmp_path):
    script = tmp_path / f"block_line{line}.py"
    script.write_text(code, encoding="utf-8")
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (f"{name}: block at line {line} failed:\n{done.stdout[-2000:]}"
                                  f"\n{done.stderr[-4000:]}")


CHECK_NAMES = """
import importlib, json, sys
import ntkdist
attrs, imports = json.loads(sys.argv[1])
missing = []
for name in attrs:  # reached from a plain `import ntkdist`, as the prose and blocks use them
    obj = ntkdist
    for part in name.split(".")[1:]:
        if not hasattr(obj, part):
            missing.append(name)
            break
        obj = getattr(obj, part)
for module, names in imports:  # `from ntkdist.x import a, b`
    mod = importlib.import_module(module)
    missing += [f"{module}.{n}" for n in names if not hasattr(mod, n)]
print(json.dumps(missing))
"""


def test_names_in_the_python_api_section_exist():
    """Every ``ntkdist.…`` name the section mentions exists: attributes after a plain
    ``import ntkdist`` (checked in a fresh interpreter, where no other test has imported
    submodules), and what its ``from ntkdist.… import …`` lines import."""
    section = _section("Python API")
    imports = [(m, [n.strip() for n in names.split(",")]) for m, names in
               re.findall(r"^\s*from (ntkdist(?:\.\w+)*) import ([\w, ]+)$", section, re.M)]
    modules = {m for m, _ in imports}
    attrs = sorted(set(re.findall(r"\bntkdist(?:\.[A-Za-z_]\w*)+", section)) - modules)
    assert {"ntkdist.bounds.lambda_min_bounds", "ntkdist.solvers.dense_smallest",
            "ntkdist.NtkdistError"} <= set(attrs)
    done = subprocess.run([sys.executable, "-c", CHECK_NAMES, json.dumps([attrs, imports])],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-4000:]
    assert json.loads(done.stdout) == [], "named in README's Python API but missing"
