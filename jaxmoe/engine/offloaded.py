"""Offloaded generation: dense weights and KV cache on the device, routed experts in
pinned host memory, a byte-budgeted device expert cache in between.

The prefill either streams every layer's experts in a fixed, overlapped order
(engine/stream_prefill.py: long prompts, where nearly every expert is routed) or,
for short prompts, runs like decode. Decode and the routed prefill run each MoE layer as:
  attend_route program -> one host read of the routing ids -> the schedule plans
  the pass(es) -> the cache issues `device_put` for the misses -> expert program
The copies are issued before the expert program that needs them is dispatched: a
copy issued after a dispatched computation waits for it (the ordering rule,
docs/PREFILL.md). When a pass has demand copies the host waits for them before
dispatching: the device has nothing else queued at that point, so the wait costs
one dispatch latency, and it is what `stall_ms` measures. The model code is the
same as the resident engine's; only where the experts come from differs, so the
tokens are the same.

Shapes: B batch, T tokens per call (prompt bucket or 1), S cache length, D hidden,
K experts per token.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmoe.config import MoEConfig
from jaxmoe.engine.buckets import DEFAULT_PREFILL_CHUNK, cache_bucket, check_chunk, chunk_starts, prompt_bucket
from jaxmoe.engine.metrics import device_peak_bytes, tree_bytes
from jaxmoe.engine.outputs import TokenCollector, timing_metrics
from jaxmoe.engine.phases import PhaseClock
from jaxmoe.engine.programs import Programs
from jaxmoe.engine.resident import GenerationResult, pad_prompts
from jaxmoe.engine.sampling import SamplingParams, sample
from jaxmoe.engine.stream_prefill import StreamStats, compile_stream, run_stream
from jaxmoe.model import ExpertWeights, MoEDecoder, combine, expert_rows, init_kv_cache, moe_ffn, num_unique_experts
from jaxmoe.model.decoder import head_logits
from jaxmoe.offload.cache import DeviceExpertCache, plan_geometry, write_slots
from jaxmoe.offload.host_store import HostExpertStore
from jaxmoe.offload.prefetch import NextLayerScorer, load_scorer, next_moe_layers
from jaxmoe.offload.policy import make_policy
from jaxmoe.offload.prefill_plan import INJIT, MODES, ROUTED, PrefillPlan, choose_mode, plan_stream
from jaxmoe.offload.schedule import PassPlan


class _Ends(nnx.Module):
    """Embedding, final norm and LM head: the model minus its layers (shared, not copied)."""

    def __init__(self, model: MoEDecoder):
        self.embed_tokens = model.embed_tokens
        self.norm = model.norm
        self.lm_head = model.lm_head


class _Piece:
    """A module split for per-call speed: graphdef, and its weights as a flat tuple of arrays."""

    def __init__(self, module: nnx.Module):
        self.graphdef, state = nnx.split(module)
        self.leaves, self.treedef = jax.tree.flatten(state)
        self.leaves = tuple(self.leaves)

    def merge(self, leaves) -> nnx.Module:
        return nnx.merge(self.graphdef, jax.tree.unflatten(self.treedef, leaves))


# -- the jitted pieces: the same module methods the resident forward calls -------
def _embed(ends, tokens):
    return ends.embed_tokens(tokens)


def _head(ends, x, index, root, step, sampling):
    h = ends.norm(x)
    last = h[jnp.arange(x.shape[0]), index]  # [B, D]
    logits = head_logits(ends.embed_tokens, ends.lm_head, last)
    return sample(logits, jax.random.fold_in(root, step), sampling)


def _dense_layer(layer, x, positions, kv):
    x, kv, _ = layer(x, positions, kv, None, moe_ffn)
    return x, kv


def _attend_route(layer, x, positions, kv):
    x, kv, h, routing = layer.attend_and_route(x, positions, kv)
    return x, kv, h, routing.ids, routing.weights


def _attend_route_predict(layer, x, positions, kv, scorer_leaves, layer_index, scorer, top):
    """attend_route plus the scorer's `top` picks per row for the next MoE layer."""
    x, kv, h, ids, weights = _attend_route(layer, x, positions, kv)
    logits = scorer.score(scorer_leaves, h, layer_index).astype(jnp.float32)
    probs, picks = jax.lax.top_k(jax.nn.softmax(logits, axis=-1), top)
    return x, kv, h, ids, weights, picks, probs


def _experts(layer, x, h, slot_ids, in_pass, weights, y_prev, pool, staged, staged_slots, num_unique):
    """Scatter the staged copies into their slots, compute this pass's rows, finish the layer.

    Rows outside the pass keep y_prev, so after a layer's last pass y holds every row,
    each computed exactly as the resident kernel computes it.
    """
    gate_up, down = write_slots(pool, staged, staged_slots)
    anchor = slot_ids.reshape(-1)[jnp.argmax(in_pass.reshape(-1))]  # any slot of this pass
    ids = jnp.where(in_pass, slot_ids, anchor)
    y_pass = expert_rows(h, ids, ExpertWeights(gate_up, down), num_unique)
    y = jnp.where(in_pass[..., None], y_pass, y_prev)
    x = layer.finish_moe(x, h, combine(y, weights, h.dtype))
    return x, y, (gate_up, down)


class OffloadedEngine:
    def __init__(
        self,
        config: MoEConfig,
        model: MoEDecoder,
        store: HostExpertStore,
        expert_budget_bytes: int,
        policy: str = "lru",
        check_budget: bool = False,
        predictor: NextLayerScorer | None = None,
        prefill: str = "auto",
        prefill_overlap: bool = True,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    ):
        """`prefill`: "stream" (every expert, layer by layer, overlapped), "routed" (only the
        routed experts, like decode), "auto" (routed for short prompts) or "injit" (stream
        with the copies made inside the programs); `prefill_overlap`
        False streams a layer, then computes it (the baseline the overlap is measured
        against); `prefill_chunk`: tokens per prefill chunk (a power of two)."""
        if prefill not in MODES:
            raise ValueError(f"prefill must be one of {', '.join(MODES)}, got {prefill!r}")
        if prefill == INJIT and not prefill_overlap:
            raise ValueError("prefill 'injit' always overlaps: it cannot run with prefill_overlap=False")
        self.prefill_mode, self.prefill_overlap = prefill, bool(prefill_overlap)
        self.prefill_chunk = check_chunk(prefill_chunk)
        self.config, self.store = config, store
        self.expert_budget_bytes, self.policy_name = int(expert_budget_bytes), policy
        make_policy(policy)  # fail now on a bad name
        if (policy == "predictor") != (predictor is not None):
            raise ValueError("policy 'predictor' and a predictor go together: give both or neither")
        self.predictor = predictor
        self.next_moe = next_moe_layers(config)
        # Refuse now a budget too small even for one sequence; larger batches are checked per call.
        one = num_unique_experts(config.num_experts, 1, config.top_k)
        plan_geometry(self.expert_budget_bytes, store.expert_bytes, len(store.keys()), one, one if predictor else 0)
        self.check_budget = check_budget
        self.ends = _Piece(_Ends(model))
        self.layers = [_Piece(layer) for layer in model.layers]
        self.dense_bytes = tree_bytes(nnx.state(model))
        self.programs = Programs()
        self._by_signature: dict[tuple, jax.stages.Compiled] = {}
        self._zeros: dict[tuple, jax.Array] = {}
        self.cache: DeviceExpertCache | None = None
        self.plan: list[PassPlan] = []  # what the last generate executed
        self.prefill_plan: PrefillPlan | None = None  # the last generate's prefill
        self.clock = PhaseClock()  # off; scripts turn it on to see where a step's time goes

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, expert_budget_bytes: int, policy: str = "lru", predictor=None, **kw
    ) -> "OffloadedEngine":
        """Dense weights to the device; experts read a layer at a time into host numpy and
        copied from there into pinned host memory (never through the device, never two
        copies of the experts). `predictor`: None, "gate-ahead" (the next layer's router,
        no training), the directory of a trained predictor, or a scorer."""
        from jaxmoe.checkpoint import load
        from jaxmoe.offload.host_store import ensure_host_memory, total_expert_bytes
        from jaxmoe.config import load_hf_config

        cfg = load_hf_config(path)
        ensure_host_memory(total_expert_bytes(cfg))  # before anything is allocated
        loaded = load(path, experts=False)
        store = HostExpertStore.from_checkpoint(path, cfg)
        if predictor is not None:
            predictor = load_scorer(predictor, loaded.model)
        engine = cls(cfg, loaded.model, store, expert_budget_bytes, policy, predictor=predictor, **kw)
        engine.generation_config, engine.tokenizer_path = loaded.generation_config, loaded.tokenizer_path
        return engine

    # -- programs ---------------------------------------------------------------
    def _run(self, name: str, fn: Callable, static: dict, donate: tuple[int, ...], piece: "_Piece", *args, options=None):
        """Call `fn(module, *args, **static)` compiled for these shapes; `donate` are positions
        in `args` whose buffers the outputs reuse (the KV cache, the expert pool). The module's
        weights go in as a flat tuple of arrays, so a call costs little host time (it is paid
        per layer)."""
        program = self._program(name, fn, static, donate, piece, *args, options=options)
        with self.clock.phase("dispatch"):
            out = program(piece.leaves, *args)
        self.clock.device("compute", out)
        return out

    def _program(self, name: str, fn: Callable, static: dict, donate: tuple[int, ...], piece: "_Piece", *args,
                 options=None):  # fmt: skip
        """The compiled program `_run` calls; `args` may be jax.ShapeDtypeStructs (compile only)."""
        signature = (name, id(piece.graphdef), tuple(static.items()))
        signature += tuple((a.shape, a.dtype) for a in jax.tree.leaves(args))
        program = self._by_signature.get(signature)
        if program is None:
            def bound(leaves, *a, **kw):  # Programs.get names the program after `name`
                return fn(piece.merge(leaves), *a, **kw)

            # Layers of one kind have equal graphdefs and share one compiled program.
            donate = tuple(i + 1 for i in donate)  # after the leaves
            program = self.programs.get(
                (name, piece.graphdef), bound, static, donate, piece.leaves, *args, options=options
            )
            self._by_signature[signature] = program
        return program

    def prepare(self, batch: int, prompt_tokens: int, max_new_tokens: int, sampling=SamplingParams()) -> PrefillPlan:
        """Compile ahead of time every program a generate of this shape bucket runs (the
        prefill in the mode it would take for full-length prompts, the first token, the
        decode step's layer programs and head, the cache's own take and write programs),
        so the first prompt of that size compiles nothing (with the compilation cache,
        neither does the next process); returns the prefill plan such a prompt would
        execute with the cache as it is now."""
        cfg, spec = self.config, jax.ShapeDtypeStruct
        p_len = prompt_bucket(prompt_tokens)
        cache_len = cache_bucket(p_len, max_new_tokens)
        size, starts = chunk_starts(p_len, self.prefill_chunk)
        self._ensure_cache(batch)
        mode = choose_mode(self.prefill_mode, cfg.num_experts, batch * prompt_tokens * cfg.top_k, len(starts),
                           self.cache.staging == 0)  # fmt: skip
        root = jax.eval_shape(lambda: jax.random.key(0))
        index, step = spec((batch,), jnp.int32), spec((), jnp.int32)
        head = {"sampling": sampling}
        if mode == ROUTED:
            x = self._compile_forward(batch, size, cache_len, decode=False)
            x = spec((batch, p_len, cfg.hidden_size), x.dtype)
            plan = PrefillPlan(ROUTED, size, len(starts), 0)
        else:
            self._program("embed", _embed, {}, (), self.ends, spec((batch, p_len), jnp.int32))
            x = compile_stream(self, batch, p_len, size, cache_len, in_jit=mode == INJIT)
            moe = [m for m in range(cfg.num_layers) if cfg.moe_layers[m]]
            self.cache.prepare_stream(max(self.cache.schedule.retain_quotas(moe).values(), default=0))
            plan = self._stream_plan(size, len(starts), in_jit=mode == INJIT)
        self._program("head", _head, head, (), self.ends, x, index, root, step)
        if max_new_tokens > 1:
            x = self._compile_forward(batch, 1, cache_len, decode=True)
            self._program("head", _head, head, (), self.ends, x, index, root, step)
        return plan

    def _compile_forward(self, batch: int, tokens: int, cache_len: int, decode: bool) -> jax.ShapeDtypeStruct:
        """Compile from shapes the programs `_forward` runs on [batch, tokens] (a decode step,
        or a routed prefill chunk); returns the spec of the x it ends with."""
        cfg, spec = self.config, jax.ShapeDtypeStruct
        plain = lambda tree: jax.tree.map(lambda o: spec(o.shape, o.dtype), tree)  # noqa: E731
        x = plain(self._program("embed", _embed, {}, (), self.ends, spec((batch, tokens), jnp.int32)).out_info)
        positions = spec((batch, tokens), jnp.int32)
        kv = jax.eval_shape(lambda: init_kv_cache(cfg, batch, cache_len)[0])
        pool, staged = plain(self.cache.pool), plain((self.cache.filler,) * self.cache.staging)
        for layer, piece in enumerate(self.layers):
            if not cfg.moe_layers[layer]:
                self._program("dense", _dense_layer, {}, (2,), piece, x, positions, kv)
                continue
            if decode and self.predictor is not None and self.cache.prefetch_max > 0:
                static = {"scorer": self.predictor, "top": cfg.top_k}
                args = (x, positions, kv, self.predictor.leaves, spec((), jnp.int32))
                out = self._program("attend_route_predict", _attend_route_predict, static, (2,), piece, *args)
            else:
                out = self._program("attend_route", _attend_route, {}, (2,), piece, x, positions, kv)
            x_in, _, h, ids, weights = plain(out.out_info[:5])
            n, k = ids.shape
            unique = min(num_unique_experts(cfg.num_experts, n, k), self.cache.num_slots)
            args = (x_in, h, spec((n, k), jnp.int32), spec((n, k), jnp.bool_), weights,
                    spec((n, k, cfg.hidden_size), x.dtype), pool, staged, spec((self.cache.staging,), jnp.int32))  # fmt: skip
            x = plain(self._program("experts", _experts, {"num_unique": unique}, (6,), piece, *args).out_info[0])
        return x

    def reset_cache(self) -> None:
        """Drop every cached expert: the next generate starts cold."""
        self.cache = None

    def _zero_rows(self, n: int, k: int, dtype) -> jax.Array:
        key = (n, k, jnp.dtype(dtype))
        if key not in self._zeros:
            self._zeros[key] = jnp.zeros((n, k, self.config.hidden_size), dtype)
        return self._zeros[key]

    def _ensure_cache(self, batch: int) -> None:
        unique_max = num_unique_experts(self.config.num_experts, batch, self.config.top_k)
        if self.cache is None or self.cache.unique_max != unique_max:
            self.cache = DeviceExpertCache(
                self.store, self.expert_budget_bytes, make_policy(self.policy_name), unique_max,
                prefetch_max=unique_max if self.predictor else 0, check_budget=self.check_budget,
                programs=self.programs,
            )  # fmt: skip
        self.cache.clock = self.clock

    # -- one forward over the layers --------------------------------------------
    def _forward(self, tokens, positions: np.ndarray, valid: np.ndarray, step: int, kv: list):
        """tokens/positions/valid [B, T]; rows not `valid` (padding, finished rows) load no experts."""
        x = self._run("embed", _embed, {}, (), self.ends, tokens)
        positions = jnp.asarray(positions)
        for layer, piece in enumerate(self.layers):
            if not self.config.moe_layers[layer]:
                x, kv[layer] = self._run("dense", _dense_layer, {}, (2,), piece, x, positions, kv[layer])
                continue
            predict = self.predictor is not None and step > 0 and self.cache.prefetch_max > 0
            if predict:
                x_in, kv[layer], h, ids, weights, picks, probs = self._run(
                    "attend_route_predict", _attend_route_predict,
                    {"scorer": self.predictor, "top": self.config.top_k}, (2,), piece, x, positions, kv[layer],
                    self.predictor.leaves, jnp.int32(layer),
                )  # fmt: skip
                with self.clock.phase("host_read"):  # the one host sync of this layer
                    ids_host, picks, probs = jax.device_get((ids, picks, probs))
            else:
                x_in, kv[layer], h, ids, weights = self._run(
                    "attend_route", _attend_route, {}, (2,), piece, x, positions, kv[layer]
                )
                with self.clock.phase("host_read"):  # the one host sync of this layer
                    ids_host, picks, probs = np.asarray(ids), None, None
            prefetch = (picks, probs) if predict and self.next_moe[layer] is not None else None
            x = self._experts_passes(step, layer, piece, x_in, h, ids_host, weights, valid.reshape(-1), prefetch)
        return x

    def _predicted(self, layer: int, picks: np.ndarray, probs: np.ndarray, valid_rows) -> list[int]:
        """The next MoE layer's most probable experts (the union over live rows, best first,
        at most prefetch_max), shown to the policy before this layer's demand is planned."""
        best: dict[int, float] = {}
        for e, p in zip(picks[valid_rows].ravel(), probs[valid_rows].ravel()):
            best[int(e)] = max(best.get(int(e), 0.0), float(p))
        ranked = sorted(best, key=lambda e: (-best[e], e))[: self.cache.prefetch_max]
        self.cache.schedule.policy.observe(self.next_moe[layer], {e: best[e] for e in ranked})
        return ranked

    def _experts_passes(self, step, layer, piece, x, h, ids_host, weights, valid_rows, prefetch=None):
        n, k = ids_host.shape
        # A pass computes at most its own experts (each as one member of the batched
        # contraction, so the count does not change the values): no workspace beyond the cache.
        unique = min(num_unique_experts(self.config.num_experts, n, k), self.cache.num_slots)
        y = self._zero_rows(n, k, x.dtype)
        out = x
        predicted, nxt = [], self.next_moe[layer]
        with self.clock.phase("schedule"):
            needed = np.unique(ids_host[valid_rows])
            if prefetch is not None:
                predicted = self._predicted(layer, *prefetch, valid_rows)
            protect = [(nxt, e) for e in predicted]
            plans = self.cache.schedule.plan_layer(step, layer, needed, protect)
        for plan in plans:
            staged, staged_slots, copies = self.cache.issue(plan)
            self.cache.wait(copies)
            if predicted:  # decode has one pass per layer; the copies go out before its expert program
                with self.clock.phase("schedule"):
                    prefetch_plan = self.cache.schedule.plan_prefetch(step, nxt, predicted)
                self.cache.prefetch(prefetch_plan)
            with self.clock.phase("schedule"):
                table = np.full(self.config.num_experts, -1, np.int32)
                table[list(plan.experts)] = plan.slots
                slot_ids = table[ids_host]
                in_pass = (slot_ids >= 0) & valid_rows[:, None]
            out, y, self.cache.pool = self._run(
                "experts", _experts, {"num_unique": unique}, (6,), piece, x, h,
                jnp.asarray(np.maximum(slot_ids, 0)), jnp.asarray(in_pass), weights, y,
                self.cache.pool, staged, jnp.asarray(staged_slots),
            )  # fmt: skip
        return out

    def _prefill(self, tokens: np.ndarray, lengths: np.ndarray, kv: list) -> tuple[jax.Array, StreamStats | None]:
        """Hidden states [B, P, D] after the last layer, chunk by chunk, streamed or routed."""
        cfg = self.config
        b, p_len = tokens.shape
        positions = np.broadcast_to(np.arange(p_len, dtype=np.int32), (b, p_len))
        valid = positions < lengths[:, None]
        size, starts = chunk_starts(p_len, self.prefill_chunk)
        routed_slots = int(valid.sum()) * cfg.top_k
        mode = choose_mode(self.prefill_mode, cfg.num_experts, routed_slots, len(starts), self.cache.staging == 0)
        if mode == ROUTED:  # chunk by chunk through every layer, as the resident engine does
            self.prefill_plan = PrefillPlan(ROUTED, size, len(starts), 0)
            parts = [
                self._forward(jnp.asarray(tokens[:, s : s + size]), positions[:, s : s + size],
                              valid[:, s : s + size], 0, kv)
                for s in starts
            ]  # fmt: skip
            return (parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)), None
        self.prefill_plan = self._stream_plan(size, len(starts), in_jit=mode == INJIT)
        x = self._run("embed", _embed, {}, (), self.ends, jnp.asarray(tokens))
        return run_stream(self, self.prefill_plan, x, positions, valid, kv)

    def _stream_plan(self, chunk: int, chunks: int, in_jit: bool = False) -> PrefillPlan:
        cfg = self.config
        cached: dict[int, set[int]] = {}
        for layer, e in self.cache.schedule.slot_of:
            cached.setdefault(layer, set()).add(e)
        lookahead = 1 if self.prefill_overlap else 0
        return plan_stream(
            range(cfg.num_layers), cfg.moe_layers, cfg.num_experts, cached, chunk, chunks, lookahead, in_jit
        )

    # -- generation ------------------------------------------------------------
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        sampling: SamplingParams = SamplingParams(),
        seed: int = 0,
        eos_ids: Sequence[int] = (),
        on_token: Callable[[int], None] | None = None,
    ) -> GenerationResult:
        """Same contract and tokens as ResidentEngine.generate; metrics add the cache counters."""
        lengths, tokens, cache_len = pad_prompts(self.config, prompts, max_new_tokens)
        b, p_len = tokens.shape
        self._ensure_cache(b)
        cache = self.cache
        cache.counters = type(cache.counters)()
        cache.schedule.executed = []
        kv = list(init_kv_cache(self.config, b, cache_len))
        kv_bytes = tree_bytes(kv)
        root = jax.random.key(seed)
        out = TokenCollector(b, eos_ids, on_token)

        # Programs compile on first use inside the timed regions; their compile time is
        # measured on its own (compile_ms) and taken out of ttft and tpot.
        compiled = self.programs.compile_seconds
        start = time.perf_counter()
        x, stream = self._prefill(tokens, lengths, kv)
        head_static = {"sampling": sampling}
        tok = self._run("head", _head, head_static, (), self.ends, x, jnp.asarray(lengths - 1), root, jnp.int32(0))
        out.add(np.asarray(tok))
        ttft = time.perf_counter() - start - (self.programs.compile_seconds - compiled)
        prefill_h2d, prefill_stall = cache.counters.h2d_bytes, cache.counters.stall_s

        pos = lengths.copy()
        zeros = jnp.zeros((b,), jnp.int32)
        compiled = self.programs.compile_seconds
        decode_start, steps = time.perf_counter(), 0
        for step in range(1, max_new_tokens):
            if out.all_done:
                break
            x = self._forward(tok[:, None], pos[:, None], ~out.done[:, None], step, kv)
            tok = self._run("head", _head, head_static, (), self.ends, x, zeros, root, jnp.int32(step))
            with self.clock.phase("host_read"):
                tok_host = np.asarray(tok)
            out.add(tok_host)
            pos += 1
            steps += 1
        decode_seconds = time.perf_counter() - decode_start - (self.programs.compile_seconds - compiled)

        self.plan = list(cache.schedule.executed)
        c = cache.counters
        plan = self.prefill_plan
        streamed_bytes = plan.max_streamed_layers * self.config.num_experts * self.store.expert_bytes
        metrics = {
            **timing_metrics(out, ttft, decode_seconds, steps),
            "peak_device_bytes": device_peak_bytes() or self.dense_bytes + kv_bytes + c.peak_bytes + streamed_bytes,
            "compile_ms": 1e3 * self.programs.compile_seconds,
            "compile_cache_hits": self.programs.cache_hits,
            "batch": b,
            "prompt_bucket": p_len,
            "policy": self.policy_name,
            "expert_budget_bytes": self.expert_budget_bytes,
            "cache_slots": cache.num_slots,
            "expert_hits": c.expert_hits,
            "expert_misses": c.expert_misses,
            "hit_rate": c.hit_rate,
            "h2d_bytes": c.h2d_bytes,
            "prefetch_issued": c.prefetch_issued,
            "prefetch_used": c.prefetch_used,
            "stall_ms": 1e3 * c.stall_s,
            **self._prefill_metrics(prefill_h2d, prefill_stall, stream),
        }
        return GenerationResult(out.token_ids, metrics)

    def _prefill_metrics(self, h2d_bytes: int, stall_s: float, stream: StreamStats | None) -> dict:
        """The routed prefill waits for every copy with nothing to compute: its transfer
        time is its stall and nothing overlaps. The injit variant's copies happen inside
        programs, so the host cannot time them."""
        transfer_s = stream.transfer_s if stream else stall_s
        stall_s = stream.stall_s if stream else stall_s
        in_jit = self.prefill_plan.mode == INJIT  # the programs' own copies are not visible to the host
        return {
            "prefill_mode": self.prefill_plan.mode,
            "prefill_chunks": self.prefill_plan.chunks,
            "prefill_h2d_bytes": h2d_bytes,
            "prefill_stall_ms": 1e3 * stall_s,
            "prefill_transfer_ms": None if in_jit else 1e3 * transfer_s,
            "prefill_overlap": 1.0 - stall_s / transfer_s if transfer_s > 0 and not in_jit else None,
            "prefill_max_streamed_layers": self.prefill_plan.max_streamed_layers,
        }
