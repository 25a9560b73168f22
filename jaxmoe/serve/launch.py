"""Putting a server together: an engine's rows, the batcher, the app, uvicorn."""

from __future__ import annotations

import contextlib
from pathlib import Path

from jaxmoe.serve.app import ServerState, create_app
from jaxmoe.serve.batcher import Batcher
from jaxmoe.serve.chat import ChatTemplate
from jaxmoe.serve.metrics import ServerMetrics
from jaxmoe.serve.request import SLO
from jaxmoe.serve.rows import rows_for
from jaxmoe.tokenizer import eos_ids, load_tokenizer


def make_state(engine, generation_config: dict, tokenizer_path, model_path: str | Path, *, max_batch: int = 8,
               max_queue: int = 64, api_key: str | None = None, slo_ttft_ms: float = 2000.0,
               slo_tpot_ms: float = 200.0, static: bool = False, model_id: str | None = None,
               exact_rows: bool = True, schedule: str = "edf") -> ServerState:  # fmt: skip
    metrics = ServerMetrics()
    batcher = Batcher(rows_for(engine, max_batch, exact_rows), max_batch, max_queue, metrics, static=static,
                      schedule=schedule)  # fmt: skip
    cfg = engine.config
    return ServerState(
        batcher=batcher,
        metrics=metrics,
        model_id=model_id or Path(model_path).name,
        context=cfg.max_position_embeddings,
        vocab_size=cfg.vocab_size,
        tokenizer=load_tokenizer(tokenizer_path) if tokenizer_path else None,
        eos_ids=frozenset(eos_ids(generation_config)),
        chat_template=ChatTemplate.for_checkpoint(model_path),
        slo=SLO(slo_ttft_ms / 1e3, slo_tpot_ms / 1e3),
        api_key=api_key,
        skip_below=engine.skip_below,
    )


def app_with_lifespan(state: ServerState, grace_s: float = 1.0):
    """The app, its batcher started with it and stopped (after `grace_s` for what still runs) with it."""

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        state.batcher.start()
        yield
        state.batcher.stop(grace_s)

    app = create_app(state)
    app.router.lifespan_context = lifespan
    return app
