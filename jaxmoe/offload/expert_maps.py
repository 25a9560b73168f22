"""Expert maps (FineMoE): the routing of earlier requests, to foretell this one's.

All maps count over MoE layer indices j (0..Lm-1, the order of cfg.moe_layer_ids) and
experts e; a prediction is a per-visit use probability [E] (it sums to about K, the
experts a token uses per layer).

  token maps     per input token id, how often each expert served it at each layer.
                 Routing is largely a function of the token (on the shipped model a
                 token's map alone recalls 0.85 of layer 0's experts), and the host knows
                 the token before any layer runs: the finest-grained semantic key.
  trajectories   counts[i, a, j, b]: tokens that used a at layer i and b at layer j. Given
                 the experts this token used so far (what the step program reports), the
                 likely experts of its later layers (FineMoE's trajectory similarity, with
                 the matching maps summed into one table instead of searched one by one).
  request maps   per past request, a semantic vector of its prompt (the normalised mean of
                 its input embeddings) and its per-layer use frequency; a new request
                 starts from the mean map of the most similar ones (FineMoE's semantic map).

Bounded memory: at most `max_tokens` token maps (the least observed are dropped when
full) and `max_requests` request maps (the oldest dropped); the trajectory table is
Lm^2 E^2 counts. `save`/`load` keep them in one .npz (next to a model, if asked; the
request vectors in fp16). The token maps also drive the decode driver's copies at the
token boundary (jaxmoe/offload/driver.py, `end_token`).
"""

from __future__ import annotations

import dataclasses
import json
import zipfile
import zlib
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

FORMAT = 1
MAPS_FILE = "expert_maps.npz"  # its name next to a model
COUNT_MAX = np.iinfo(np.uint16).max


class MapsMismatch(ValueError):
    """Expert maps made for another model; the message names the field."""


@dataclasses.dataclass(frozen=True)
class MapsConfig:
    max_tokens: int = 8192  # token maps kept
    max_requests: int = 256  # request maps kept
    neighbours: int = 4  # request maps averaged for a new request's prior
    token_weight: float = 0.5  # a token map's weight against the trajectory's, when both exist
    shrink: float = 2.0  # pseudo-visits of the layer's overall frequency in every estimate
    layer_decay: float = 0.5  # weight of a known layer in the trajectory, per layer of distance


class ExpertMaps:
    def __init__(self, num_layers: int, num_experts: int, top_k: int, config: MapsConfig = MapsConfig(),
                 model: dict | None = None):  # fmt: skip
        """num_layers: MoE layers (Lm); `model`: a summary of the model they belong to
        (jaxmoe.predictor.fingerprint.model_summary), checked on load."""
        self.lm, self.e, self.k, self.config, self.model = num_layers, num_experts, top_k, config, model
        self.layer_counts = np.zeros((num_layers, num_experts), np.float64)
        self.tokens_seen = 0
        self.co = np.zeros((num_layers, num_experts, num_layers, num_experts), np.float32)
        self.token_counts: dict[int, np.ndarray] = {}  # token -> [Lm, E] uint16
        self.token_visits: dict[int, int] = {}
        self.requests: list[tuple[np.ndarray, np.ndarray]] = []  # (vector [D], use frequency [Lm, E])

    # -- learning ---------------------------------------------------------------
    def add_token(self, token: int | None, experts: Sequence[Sequence[int]]) -> None:
        """One token's routing: experts[j] are the experts it used at MoE layer j."""
        if len(experts) != self.lm:
            raise ValueError(f"add_token needs {self.lm} layers of experts, got {len(experts)}")
        layers = np.repeat(np.arange(self.lm), [len(x) for x in experts])
        ids = np.concatenate([np.asarray(x, np.int64).reshape(-1) for x in experts])
        # Each (layer, expert) appears once per token, so fancy-indexed += counts every pair.
        self.co[layers[:, None], ids[:, None], layers[None, :], ids[None, :]] += 1.0
        self.layer_counts[layers, ids] += 1.0
        self.tokens_seen += 1
        if token is None:
            return
        token = int(token)
        row = self.token_counts.get(token)
        if row is None:
            if len(self.token_counts) >= self.config.max_tokens:
                self._drop_tokens()
            row = self.token_counts[token] = np.zeros((self.lm, self.e), np.uint16)
            self.token_visits[token] = 0
        if row[layers, ids].max() >= COUNT_MAX:  # halve rather than overflow
            row //= 2
            self.token_visits[token] //= 2
        row[layers, ids] += 1
        self.token_visits[token] += 1

    def _drop_tokens(self) -> None:
        """Make room: drop the tenth of token maps observed least."""
        order = sorted(self.token_visits, key=lambda t: (self.token_visits[t], t))
        for t in order[: max(1, len(order) // 10)]:
            del self.token_counts[t], self.token_visits[t]

    def add_request(self, vector: np.ndarray, usage: np.ndarray) -> None:
        """A finished request: its semantic vector [D] and per-layer use frequency [Lm, E]."""
        if len(self.requests) >= self.config.max_requests:
            self.requests.pop(0)
        self.requests.append((normalise(vector), np.asarray(usage, np.float32)))

    # -- predicting -------------------------------------------------------------
    def layer_prior(self, j: int) -> np.ndarray:
        """[E] per-visit use frequency of layer j over every token seen (K/E before any)."""
        if not self.tokens_seen:
            return np.full(self.e, self.k / self.e)
        return self.layer_counts[j] / self.tokens_seen

    def predict(self, token: int | None, prefix: Mapping[int, Sequence[int]], targets: Sequence[int]) -> np.ndarray:
        """[len(targets), E]: the chance of each expert being used at each MoE layer index in
        `targets` by a token `token` (None: unknown) whose layers `prefix` (layer index ->
        experts) are known."""
        s, targets = self.config.shrink, np.asarray(targets, np.int64)
        prior = self.layer_counts[targets] / self.tokens_seen if self.tokens_seen else np.full(
            (len(targets), self.e), self.k / self.e)  # fmt: skip
        parts, weights = [], []
        row = self.token_counts.get(int(token)) if token is not None else None
        if row is not None:
            parts.append((row[targets] + s * prior) / (self.token_visits[int(token)] + s))
            weights.append(np.full(len(targets), self.config.token_weight))
        pairs = [(i, int(a)) for i, ids in prefix.items() for a in ids]
        if pairs:
            li, ai = np.array(pairs).T
            # P(b at t | a at i), smoothed towards the prior: [pairs, targets, E].
            cond = (self.co[li, ai][:, targets] + s * prior[None]) / (self.co[li, ai, li, ai] + s)[:, None, None]
            # Known layers weigh less the farther they are from the target; the target itself not at all.
            dist = np.abs(targets[None, :] - li[:, None])  # [pairs, targets]
            w = np.where(dist == 0, 0.0, self.config.layer_decay ** np.maximum(dist - 1, 0))
            total = w.sum(0)  # [targets]
            traj = np.einsum("pt,pte->te", w, cond) / np.maximum(total, 1e-12)[:, None]
            parts.append(traj)
            share = 1.0 - self.config.token_weight if row is not None else 1.0
            weights.append(np.where(total > 0, share, 0.0))
        if not parts:
            return np.clip(prior, 0.0, 1.0)
        weights = np.stack(weights)  # [parts, targets]
        norm = weights.sum(0)
        out = np.einsum("pt,pte->te", weights, np.stack(parts)) / np.maximum(norm, 1e-12)[:, None]
        return np.clip(np.where(norm[:, None] > 0, out, prior), 0.0, 1.0)

    def request_prior(self, vector: np.ndarray) -> np.ndarray | None:
        """[Lm, E] mean use frequency of the stored requests most similar to `vector`, or
        None when none is stored."""
        if not self.requests:
            return None
        v = normalise(vector)
        sims = np.array([float(v @ r) for r, _ in self.requests])
        best = np.argsort(-sims, kind="stable")[: self.config.neighbours]
        return np.mean([self.requests[i][1] for i in best], axis=0)

    # -- files ------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        path = Path(path)
        tokens = sorted(self.token_counts)
        meta = {"format": FORMAT, "num_layers": self.lm, "num_experts": self.e, "top_k": self.k,
                "config": dataclasses.asdict(self.config), "model": self.model, "tokens_seen": self.tokens_seen}  # fmt: skip
        d = max((len(v) for v, _ in self.requests), default=0)
        tmp = path.with_name(f".{path.name}.tmp.npz")
        np.savez_compressed(
            tmp,
            meta=np.frombuffer(json.dumps(meta).encode(), np.uint8),
            layer_counts=self.layer_counts,
            co=self.co,
            token_ids=np.asarray(tokens, np.int64),
            token_counts=np.stack([self.token_counts[t] for t in tokens]) if tokens else np.zeros((0, self.lm, self.e), np.uint16),
            token_visits=np.asarray([self.token_visits[t] for t in tokens], np.int64),
            # fp16 keys: a cosine similarity needs no more, and they are half the file.
            request_vectors=np.stack([v for v, _ in self.requests]).astype(np.float16) if self.requests
            else np.zeros((0, d), np.float16),
            request_maps=np.stack([m for _, m in self.requests]) if self.requests else np.zeros((0, self.lm, self.e), np.float32),
        )  # fmt: skip
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path, model: dict | None = None) -> "ExpertMaps":
        """Read maps saved by `save`; with `model` (a model summary) refuse another model's,
        naming the field."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no expert maps file (build one with scripts/build_expert_maps.py)")
        try:
            return cls._read(path, model)
        except (zipfile.BadZipFile, zlib.error, EOFError, ValueError, KeyError) as e:
            if isinstance(e, MapsMismatch):
                raise
            # An .npz is a zip whose members carry a CRC32 that reading checks.
            raise MapsMismatch(f"{path}: damaged or not an expert maps file ({e}); build it again "
                               "(scripts/build_expert_maps.py)") from e  # fmt: skip

    @classmethod
    def _read(cls, path: Path, model: dict | None) -> "ExpertMaps":
        with np.load(path) as z:
            meta = json.loads(z["meta"].tobytes().decode())
            if meta.get("format") != FORMAT:
                raise MapsMismatch(f"{path}: format={meta.get('format')!r}, expected {FORMAT}")
            if model is not None and meta.get("model") is not None:
                for field in ("num_experts", "moe_layers", "top_k", "model_hash"):
                    if meta["model"].get(field) != model.get(field):
                        raise MapsMismatch(f"{path}: maps were made for {field}={meta['model'].get(field)!r}, "
                                           f"this model has {field}={model.get(field)!r}")  # fmt: skip
            maps = cls(meta["num_layers"], meta["num_experts"], meta["top_k"], MapsConfig(**meta["config"]), meta["model"])
            maps.layer_counts, maps.co, maps.tokens_seen = z["layer_counts"], z["co"], meta["tokens_seen"]
            maps.token_counts = {int(t): c for t, c in zip(z["token_ids"], z["token_counts"])}
            maps.token_visits = {int(t): int(v) for t, v in zip(z["token_ids"], z["token_visits"])}
            maps.requests = list(zip(z["request_vectors"].astype(np.float32), z["request_maps"]))
        return maps


def normalise(vector: np.ndarray) -> np.ndarray:
    v = np.asarray(vector, np.float32).reshape(-1)
    return v / max(float(np.linalg.norm(v)), 1e-12)
