"""`expert_format.json`: how a checkpoint stores its routed experts. Absent: dense, in
the config's dtype (`experts.<layer>.w_gate_up` / `w_down`); present: quantized, one
packed byte row per expert (`experts.<layer>.packed` [E, bytes], see jaxmoe/quant).

  {"format": "int4", "group_size": 64, "refine": 0, "source": "..."}
"""

from __future__ import annotations

import json
from pathlib import Path

from jaxmoe.checkpoint.assemble import CheckpointError
from jaxmoe.config import MoEConfig
from jaxmoe.quant import DENSE, FORMATS, ExpertFormat

FILE = "expert_format.json"


def read_format(path: str | Path, cfg: MoEConfig | None = None) -> ExpertFormat:
    """The checkpoint's expert format (dense when it has no expert_format.json); a malformed
    file, or a format the model's shapes cannot take, is refused naming the file."""
    file = Path(path) / FILE
    if not file.is_file():
        return DENSE
    try:
        meta = json.loads(file.read_text())
        kind = meta["format"]
        if kind not in FORMATS or kind == "dense":
            raise ValueError(f"format must be one of {', '.join(f for f in FORMATS if f != 'dense')}, got {kind!r}")
        fmt = ExpertFormat(kind, int(meta.get("group_size", 64)))
        if cfg is not None:
            fmt.check(cfg)
    except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{file}: not a valid expert format ({e})") from e
    return fmt


def write_format(path: str | Path, fmt: ExpertFormat, **extra) -> None:
    """Record a quantized format (a dense checkpoint has no file)."""
    if fmt.kind == "dense":
        return
    meta = {"format": fmt.kind, **({"group_size": fmt.group_size} if fmt.kind == "int4" else {}), **extra}
    (Path(path) / FILE).write_text(json.dumps(meta, indent=2) + "\n")
