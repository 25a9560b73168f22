"""A jaxmoe server on a free localhost port, in a thread of the test process."""

from __future__ import annotations

import socket
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


def wait_healthy(url: str, timeout_s: float, what: str = "the test server") -> None:
    """Until `url`/health answers 200; RuntimeError after `timeout_s`."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not start in {timeout_s:.0f} s")


class ServerThread:
    def __init__(self, engine, generation_config, tokenizer_path, model_path=TINY, **opts):
        self.state = make_state(engine, generation_config, tokenizer_path, model_path, **opts)
        self.port = free_port()
        config = uvicorn.Config(app_with_lifespan(self.state), host="127.0.0.1", port=self.port, log_level="warning",
                                timeout_graceful_shutdown=2)  # fmt: skip
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, api_key: str = "unused") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=120)

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        wait_healthy(self.url, 30)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
