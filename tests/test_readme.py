"""The README's commands are the ones that exist: no drift between docs, scripts, Makefile and CI."""
import re
import shlex
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def shell_lines(text: str) -> list[str]:
    """Commands of the ```bash blocks, continuation lines joined."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        lines += [l.split("#")[0].strip() for l in joined.splitlines() if l.strip()]
    return [l for l in lines if l]


def script_calls(lines):
    """(script, flags) for every python/torchrun call of a repository script."""
    for line in lines:
        words = shlex.split(line)
        scripts = [w for w in words if w.endswith(".py") and (ROOT / w).is_file()]
        if scripts and words[0] in ("python", "$PYTHON", "torchrun"):
            after = words[words.index(scripts[0]) + 1:]
            yield scripts[0], [w.split("=")[0] for w in after if w.startswith("--")]


@lru_cache(maxsize=None)
def help_text(script: str) -> str:
    run = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert run.returncode == 0, run.stderr
    return run.stdout


SHELL_FILES = ["test.sh", "train.sh", "demo.sh"]
CALLS = sorted(set((s, tuple(f)) for s, f in script_calls(shell_lines(README))) |
               set((s, tuple(f)) for name in SHELL_FILES if (ROOT / name).exists()
                   for s, f in script_calls(shell_lines("```bash\n" + (ROOT / name).read_text()
                                                        + "```"))))


def test_the_readme_names_the_commands_ci_runs():
    assert "make test" in README and "make demo" in README
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^test:.*\n\t.*pytest -q tests", makefile, flags=re.M)
    assert re.search(r"^demo:.*\n\t.*bash demo.sh", makefile, flags=re.M)
    assert "python -m pytest -q tests" in README


def test_every_script_call_is_found():
    scripts = {s for s, _ in CALLS}
    assert {"test.py", "train.py", "predict.py", "dataset/make_dataset_new.py",
            "dataset/make_meta.py"} <= scripts


@pytest.mark.parametrize("script,flags", CALLS, ids=[f"{s} {' '.join(f)}"[:60] for s, f in CALLS])
def test_every_flag_in_readme_and_shell_scripts_exists(script, flags):
    known = help_text(script)
    missing = [f for f in flags if not re.search(rf"{re.escape(f)}\b", known)]
    assert not missing, f"{script} does not accept {missing}"


def test_shell_scripts_exist_and_are_referenced():
    for name in ("test.sh", "train.sh"):
        assert (ROOT / name).exists() and f"bash {name}" in README
