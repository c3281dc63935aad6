"""Run one of the project's command lines inside this process, its output in a log file.

The mini builds and the demo chain a dozen stages, each a command line a user could type
(`train_compass.py annotate ...`, `-m evaluation.sriqa ...`). Run as subprocesses, every stage first paid
5-10 s of library imports (torch, diffusers, transformers, pyiqa, bitsandbytes) before doing anything; in
this process they are paid once. The stage still runs as it would from a shell: its file executes as
`__main__` with `sys.argv` set to the command line, in the repository, and what it prints goes to the log.

What a subprocess would have isolated and this does not: process-wide state a stage leaves behind (torch's
RNG, which every stage reseeds; the libraries' logging handlers, bound to the terminal when they were
imported, so the libraries' own warnings print there rather than in the log). Stages that must be separate
processes (torchrun, a server) are started with subprocess by their callers.
"""

from __future__ import annotations

import contextlib
import gc
import os
import runpy
import sys
import time
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository: the stages run from there


@contextlib.contextmanager
def _as_command_line(argv: list[str], env: dict[str, str] | None):
    """sys.argv, the working directory and (optionally) environment variables of a command line, restored after."""
    saved_argv, saved_cwd, saved_env = sys.argv[:], os.getcwd(), dict(os.environ)
    sys.argv = argv
    os.chdir(ROOT)
    os.environ.update(env or {})
    try:
        yield
    finally:
        sys.argv = saved_argv
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)


def run_command(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> float:
    """Run `python <cmd>` in this process: `cmd` is ["train_sft.py", *args] or ["-m", "evaluation.sriqa", *args].

    Returns the wall time in seconds. A stage that fails (exits non-zero or raises) stops the caller with a
    SystemExit naming the command and showing the last lines of `log`, where the traceback is.
    """
    module = cmd[0] == "-m"
    target = cmd[1] if module else str(ROOT / cmd[0])
    args = cmd[2:] if module else cmd[1:]
    log.parent.mkdir(parents=True, exist_ok=True)
    start, code = time.time(), 0
    with open(log, "w") as f, _as_command_line([target, *args], env), \
            contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        try:
            if module:
                with warnings.catch_warnings():  # runpy warns when the module was imported before (the demo
                    # imports helpers from mini.build_compass): it still runs afresh as __main__, as `python -m` would
                    warnings.filterwarnings("ignore", "'.*' found in sys.modules", RuntimeWarning)
                    runpy.run_module(target, run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(target, run_name="__main__")
        except SystemExit as exit_:  # what `sys.exit(...)` / `raise SystemExit("message")` would do in a shell
            if isinstance(exit_.code, str):
                print(exit_.code)
                code = 1
            else:
                code = exit_.code or 0
        except Exception:  # noqa: BLE001 - reported below with the log, as a crashed process would be
            traceback.print_exc()
            code = 1
    gc.collect()  # the stage's models and optimizer go before the next stage builds its own
    if code:
        raise SystemExit(f"{' '.join(cmd[:2])} failed (exit {code}); last lines of {log}:\n{log.read_text()[-3000:]}")
    return time.time() - start
