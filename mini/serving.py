"""Start and stop a local OpenAI-compatible reward server (`transformers serve`) for tests, demo, bench.

At full scale the COMPASS reward model is served by vLLM on another machine (README, "Serving"); on a
CPU, `transformers serve` exposes the same `/v1/chat/completions` endpoint. This helper binds it to
127.0.0.1 on a free port, waits for `/health`, and stops the process it started (by PID) on exit.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command(model_dir: str | Path, port: int, host: str = "127.0.0.1", device: str = "cpu") -> list[str]:
    """The `transformers serve` command line (the CLI installed next to this Python)."""
    cli = Path(sys.executable).with_name("transformers")
    return [str(cli), "serve", str(model_dir), "--host", host, "--port", str(port), "--device", device]


@contextmanager
def serve_locally(model_dir: str | Path, port: int | None = None, timeout: float = 180.0,
                  log_path: str | Path | None = None) -> Iterator[str]:
    """Run `transformers serve MODEL_DIR` on 127.0.0.1 while the block runs; yields the base URL.

    Raises RuntimeError with the server's last log lines if it exits or is not healthy in `timeout` s.
    """
    import requests

    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(log_path, "w") if log_path else open(os.devnull, "w")
    proc = subprocess.Popen(serve_command(model_dir, port), stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                tail = Path(log_path).read_text()[-2000:] if log_path else "(pass log_path to keep the log)"
                raise RuntimeError(f"`transformers serve {model_dir}` exited with code {proc.returncode}:\n{tail}")
            try:
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"`transformers serve {model_dir}` not healthy at {url} after {timeout:.0f} s")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()  # only the process this function started, by its PID
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
