"""How one routed expert is held as bytes: in pinned host memory, over the link, in the
device cache. Every format packs an expert into one contiguous uint8 buffer (one copy
moves one expert; a cache is one [S, bytes] array that XLA updates in place), made of
parts, for each of the expert's two matrices (gate_up [D, 2I] and down [I, D], input
dimension first):

  dense   the weights in the model dtype
  int8    int8 values [K, N] and per-output-channel scales [1, N] (symmetric)
  int4    values two to a byte along the input dimension [K/2, N] (the low nibble holds
          the even row), with scales and zero points per group of `group_size` input rows
          [K/g, N] (asymmetric)
  mxfp4   e2m1 values two to a byte along the input dimension [K/2, N] with a power-of-two
          (e8m0, uint8) scale per 32 input rows [K/32, N] (jaxmoe/quant/mxfp4.py)

Experts with biases (gpt-oss) carry them as two more parts, in the model dtype, after
the matrices: ("w_gate_up", "bias") [2I] and ("w_down", "bias") [D].

Scales and zero points are kept in the model dtype. A program gathers the rows of the U
experts it computes and unpacks them (`unpack`: bitcasts, and the dequantization for
int8 / int4) into model-dtype weights: only the experts computed are ever dequantized,
never a whole layer or the cache. The resident engine holds its experts in the same
format, so both engines compute with the same numbers.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxmoe.config import MoEConfig
from jaxmoe.model import ExpertWeights, PackedExperts
from jaxmoe.model.experts import expert_activation
from jaxmoe.quant import mxfp4
from jaxmoe.quant.nibbles import unpack_nibbles

FORMATS = ("dense", "int8", "int4", "mxfp4")
ALIGN = 16  # bytes between parts, so a part's bytes can be viewed without a shift


@dataclasses.dataclass(frozen=True)
class Part:
    matrix: str  # "w_gate_up" | "w_down"
    role: str  # "w" (dense) | "q" (quantized values) | "scale" | "zero"
    shape: tuple[int, ...]
    dtype: np.dtype
    offset: int

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize


@dataclasses.dataclass(frozen=True)
class ExpertFormat:
    kind: str = "dense"
    group_size: int = 64  # int4: input rows sharing a scale and zero point

    def __post_init__(self):
        if self.kind not in FORMATS:
            raise ValueError(f"expert format must be one of {', '.join(FORMATS)}, got {self.kind!r}")
        g = self.group_size
        if self.kind == "int4" and (g < 2 or g & (g - 1)):
            raise ValueError(f"int4 group size must be a power of two (32, 64, 128, ...), got {g}")

    @property
    def name(self) -> str:
        return f"int4-g{self.group_size}" if self.kind == "int4" else self.kind

    def matrices(self, cfg: MoEConfig) -> dict[str, tuple[int, int]]:
        d, i = cfg.hidden_size, cfg.expert_intermediate_size
        return {"w_gate_up": (d, 2 * i), "w_down": (i, d)}

    def check(self, cfg: MoEConfig) -> None:
        """Refuse a model whose input dimensions the format cannot group or pack."""
        if self.kind in ("int4", "mxfp4"):
            group = self.group_size if self.kind == "int4" else mxfp4.BLOCK
            for matrix, (k, _) in self.matrices(cfg).items():
                if k % group:
                    raise ValueError(f"{self.kind} group size {group} does not divide {matrix}'s input dim {k}")

    def parts(self, cfg: MoEConfig) -> tuple[Part, ...]:
        dtype, out, offset = np.dtype(jnp.dtype(cfg.dtype)), [], 0
        for matrix, (k, n) in self.matrices(cfg).items():
            if self.kind == "dense":
                roles = [("w", (k, n), dtype)]
            elif self.kind == "mxfp4":
                roles = [("q", (k // 2, n), np.dtype(np.uint8)), ("scale", (k // mxfp4.BLOCK, n), np.dtype(np.uint8))]
            elif self.kind == "int8":
                roles = [("q", (k, n), np.dtype(np.int8)), ("scale", (1, n), dtype)]
            else:
                groups = (k // self.group_size, n)
                roles = [("q", (k // 2, n), np.dtype(np.uint8)), ("scale", groups, dtype), ("zero", groups, dtype)]
            for role, shape, dt in roles:
                part = Part(matrix, role, shape, dt, offset)
                out.append(part)
                offset += -(-part.nbytes // ALIGN) * ALIGN
        if cfg.expert_bias:
            for matrix, (_, n) in self.matrices(cfg).items():
                out.append(Part(matrix, "bias", (n,), dtype, offset))
                offset += -(-out[-1].nbytes // ALIGN) * ALIGN
        return tuple(out)

    def nbytes(self, cfg: MoEConfig) -> int:
        last = self.parts(cfg)[-1]
        return -(-(last.offset + last.nbytes) // ALIGN) * ALIGN

    # -- host side ---------------------------------------------------------------------
    def pack(self, cfg: MoEConfig, tensors: dict[tuple[str, str], np.ndarray]) -> np.ndarray:
        """One expert's parts {(matrix, role): array} as its uint8 buffer."""
        buf = np.zeros(self.nbytes(cfg), np.uint8)
        for part in self.parts(cfg):
            value = np.ascontiguousarray(tensors[part.matrix, part.role])
            if value.shape != part.shape or value.dtype != part.dtype:
                raise ValueError(f"{part.matrix}.{part.role}: expected {part.dtype} {part.shape}, "
                                 f"got {value.dtype} {value.shape}")  # fmt: skip
            buf[part.offset : part.offset + part.nbytes] = value.reshape(-1).view(np.uint8)
        return buf

    def pack_stacks(self, cfg: MoEConfig, parts: dict[tuple[str, str], jax.Array]) -> jax.Array:
        """Stacks of E experts' parts {(matrix, role): [E, *shape]} as rows [E, bytes], with jax
        ops where the stacks already are (e.g. on the device: nothing goes through host numpy).
        The same bytes as `pack` of each expert."""
        e = next(iter(parts.values())).shape[0]
        columns, offset = [], 0
        for part in self.parts(cfg):
            value = parts[part.matrix, part.role]
            if value.shape != (e, *part.shape) or value.dtype != part.dtype:
                raise ValueError(f"{part.matrix}.{part.role}: expected {part.dtype} {(e, *part.shape)}, "
                                 f"got {value.dtype} {value.shape}")  # fmt: skip
            if part.offset > offset:
                columns.append(jnp.zeros((e, part.offset - offset), jnp.uint8))
            columns.append(jax.lax.bitcast_convert_type(value.reshape(e, -1), jnp.uint8).reshape(e, -1))
            offset = part.offset + part.nbytes
        columns.append(jnp.zeros((e, self.nbytes(cfg) - offset), jnp.uint8))
        return jnp.concatenate(columns, axis=1)

    # -- inside a program --------------------------------------------------------------
    def unpack(self, cfg: MoEConfig, rows: jax.Array, index: jax.Array | None = None) -> ExpertWeights:
        """rows [..., bytes] uint8 -> the experts' weights [..., K, N] in the model dtype; with
        `index` [P], only rows `index` of rows [S, bytes] ([P, K, N]).

        Each part is viewed in its dtype over all the rows first (a bitcast of the whole
        buffer, which costs nothing) and indexed after: XLA fuses an index and a slice of
        that view into the kernel that consumes the weights, so an expert computed from a
        pool is read where it lies. Indexed the other way round (bytes first, then
        bitcast), the gathered bytes are a copy."""
        dtype = jnp.dtype(cfg.dtype)
        views: dict[tuple[str, str], jax.Array] = {}
        for part in self.parts(cfg):
            size = part.dtype.itemsize
            whole = rows if size == 1 else rows.reshape(rows.shape[:-1] + (rows.shape[-1] // size, size))
            whole = jax.lax.bitcast_convert_type(whole, part.dtype)  # [..., bytes / size]
            raw = whole[..., part.offset // size : (part.offset + part.nbytes) // size]
            if index is not None:
                raw = raw[index]
            views[part.matrix, part.role] = raw.reshape(raw.shape[:-1] + part.shape)
        matrices = [self._matrix(views, m, dtype) for m in ("w_gate_up", "w_down")]
        if not cfg.expert_bias:
            return ExpertWeights(*matrices)
        return ExpertWeights(*matrices, views["w_gate_up", "bias"], views["w_down", "bias"], expert_activation(cfg))

    def _matrix(self, views, matrix: str, dtype) -> jax.Array:
        if self.kind == "dense":
            return views[matrix, "w"]
        q, scale = views[matrix, "q"], views[matrix, "scale"]
        if self.kind == "mxfp4":
            return mxfp4.dequantize(q, scale, dtype)
        if self.kind == "int8":
            return (q.astype(jnp.float32) * scale.astype(jnp.float32)).astype(dtype)
        values = unpack_nibbles(q)  # [..., K, N] in 0..15
        zero = views[matrix, "zero"]
        groups = values.reshape(values.shape[:-2] + (scale.shape[-2], self.group_size, values.shape[-1]))
        w = (groups.astype(jnp.float32) - zero[..., :, None, :].astype(jnp.float32)) * scale[..., :, None, :].astype(
            jnp.float32
        )
        return w.reshape(values.shape).astype(dtype)


@dataclasses.dataclass(frozen=True)
class RowUnpacker:
    """The static half of PackedExperts over byte rows: hashable, so programs cache on it."""

    fmt: ExpertFormat
    cfg: MoEConfig

    def __call__(self, parts, index: jax.Array | None = None) -> ExpertWeights:
        (rows,) = parts
        return self.fmt.unpack(self.cfg, rows, index)


def packed_experts(rows: jax.Array, fmt: ExpertFormat, cfg: MoEConfig) -> PackedExperts:
    """Experts held as byte rows [S, bytes] (a cache pool, or a layer's quantized stack)."""
    return PackedExperts((rows,), RowUnpacker(fmt, cfg))


DENSE = ExpertFormat("dense")


def parse_format(text: str) -> ExpertFormat:
    """A format's name as `ExpertFormat.name` writes it: dense, int8, int4 (group 64), int4-g32, mxfp4."""
    kind, _, group = text.partition("-g")
    if kind not in FORMATS or (group and kind != "int4"):
        raise ValueError(f"expert format {text!r}: expected dense, int8, int4, int4-gN or mxfp4")
    return ExpertFormat(kind, int(group) if group else 64)


def format_of(experts) -> ExpertFormat:
    """The format a model's per-layer experts are held in (dense stacks, or packed rows)."""
    for w in experts:
        if isinstance(w, PackedExperts) and isinstance(w.unpack, RowUnpacker):
            return w.unpack.fmt
    return DENSE
