"""common/commands.py: a project command line run in this process behaves as it would from a shell."""

import os
import sys

import pytest

from common.commands import ROOT, run_command

PROBE = """
import os, sys
print("argv", sys.argv[1:])
print("cwd", os.getcwd())
print("env", os.environ.get("OARS_PROBE"))
print("main", __name__)
if "--fail" in sys.argv:
    raise SystemExit("--fail: refused")
if "--crash" in sys.argv:
    raise ValueError("a crash inside the stage")
sys.exit(0)
"""


@pytest.fixture
def probe(tmp_path, monkeypatch):
    (tmp_path / "oars_probe_stage.py").write_text(PROBE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_a_command_sees_its_argv_the_repository_and_its_env_and_nothing_leaks(probe):
    argv, cwd = sys.argv[:], os.getcwd()
    os.chdir(probe)
    try:
        seconds = run_command(["-m", "oars_probe_stage", "--x", "1"], probe / "logs" / "a.log", env={"OARS_PROBE": "on"})
    finally:
        os.chdir(cwd)
    lines = (probe / "logs" / "a.log").read_text().splitlines()
    assert lines == ["argv ['--x', '1']", f"cwd {ROOT}", "env on", "main __main__"]
    assert seconds >= 0 and sys.argv == argv and "OARS_PROBE" not in os.environ


def test_a_failing_command_stops_the_caller_with_its_message_and_the_log(probe):
    cwd = os.getcwd()
    with pytest.raises(SystemExit, match=r"(?s)oars_probe_stage failed \(exit 1\).*b\.log.*--fail: refused"):
        run_command(["-m", "oars_probe_stage", "--fail"], probe / "b.log")
    with pytest.raises(SystemExit, match=r"(?s)Traceback.*ValueError: a crash inside the stage"):
        run_command(["-m", "oars_probe_stage", "--crash"], probe / "c.log")
    assert os.getcwd() == cwd


def test_a_project_script_runs_from_its_file_name(tmp_path):
    run_command(["infer.py", "--help"], tmp_path / "help.log")
    text = (tmp_path / "help.log").read_text()
    assert text.startswith("usage: infer.py") and "--lora" in text
