"""A jaxmoe server on a free localhost port, in a thread of the test process."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import openai
import uvicorn

from jaxmoe.serve.launch import app_with_lifespan, make_state

TINY = Path(__file__).resolve().parents[1] / "checkpoints" / "jaxmoe-tiny"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, timeout_s: float, what: str, proc: subprocess.Popen) -> None:
    """Until the server process `proc` answers `url`/health with 200 (a process says it is
    listening no other way); RuntimeError as soon as it exits, or after `timeout_s`."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before it answered")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not start in {timeout_s:.0f} s")


class _Server(uvicorn.Server):
    """uvicorn's Server that sets `settled` once it listens or has given up (`started` says which)."""

    def __init__(self, config: uvicorn.Config):
        super().__init__(config)
        self.settled = threading.Event()

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)  # the lifespan (the batcher's start), then the socket
        self.settled.set()

    def run(self, sockets=None) -> None:
        try:
            super().run(sockets)
        finally:
            self.settled.set()


class ServerThread:
    def __init__(self, engine, generation_config, tokenizer_path, model_path=TINY, **opts):
        self.state = make_state(engine, generation_config, tokenizer_path, model_path, **opts)
        self.port = free_port()
        config = uvicorn.Config(app_with_lifespan(self.state), host="127.0.0.1", port=self.port, log_level="warning",
                                timeout_graceful_shutdown=2)  # fmt: skip
        self.server = _Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, api_key: str = "unused") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=120)

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        if not self.server.settled.wait(30) or not self.server.started:
            raise RuntimeError("the test server did not start")
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
