import os
import re

from tests.conftest import ROOT


def readme_setup_commands() -> list[str]:
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_readme_opens_with_two_setup_commands():
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    assert text.index("```bash") < text.index("\n## ")  # before any other section
    cmds = readme_setup_commands()
    assert len(cmds) == 2
    assert "fqtrain" in cmds[0] and "pip install" in cmds[0]
    assert cmds[1].startswith("pytest")


def test_ci_runs_the_readme_commands_verbatim():
    ci = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read().splitlines()
    for cmd in readme_setup_commands():
        assert cmd in ci, f".ci/run does not run the README command: {cmd}"


def test_readme_names_files_that_exist():
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = text.split("## Read these first", 1)[1].split("\n## ", 1)[0]
    for path in re.findall(r"`([\w/]+\.py)`", section):
        assert os.path.isfile(os.path.join(ROOT, path)), path
