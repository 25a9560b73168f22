"""The engines driven a row at a time for the continuous batch: the interface the batcher
uses (base.py), one driver per engine (resident.py, offloaded.py), each row's numbers as a
batch of one computes them (exact.py), and per-row sampling (sampling.py)."""

from jaxmoe.engine.offloaded import OffloadedEngine
from jaxmoe.engine.resident import ResidentEngine
from jaxmoe.serve.rows.base import RowPrefill, Rows
from jaxmoe.serve.rows.offloaded import OffloadedRows
from jaxmoe.serve.rows.resident import ResidentRows


def rows_for(engine: ResidentEngine | OffloadedEngine, max_rows: int, exact: bool = True) -> Rows:
    """The row driver for `engine`, for batches of up to `max_rows` (the offloaded engine's
    cache is sized for them). `exact` (resident only): each row's decode computed as the
    one-row step (resident.py); the offloaded rows always are."""
    if isinstance(engine, OffloadedEngine):
        return OffloadedRows(engine, max_rows)
    if isinstance(engine, ResidentEngine):
        return ResidentRows(engine, exact)
    raise TypeError(f"no row driver for {type(engine).__name__}")


__all__ = ["OffloadedRows", "ResidentRows", "RowPrefill", "Rows", "rows_for"]
