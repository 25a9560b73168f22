"""A jaxmoe server on a free localhost port, in a thread of the test process."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import uvicorn

from jaxmoe.serve.launch import app_with_lifespan, make_state

TINY = "checkpoints/jaxmoe-tiny"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        end = time.monotonic() + 30
        while time.monotonic() < end:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.05)
        raise RuntimeError("the test server did not start")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
