"""Offloaded generation: dense weights and KV cache on the device, routed experts in
pinned host memory, a byte-budgeted device expert cache in between.

The prefill either streams every layer's experts in a fixed, overlapped order
(engine/stream_prefill.py: long prompts, where nearly every expert is routed) or, for
short prompts, loads only the routed experts layer by layer (engine/routed.py). Decode
runs one program per token while its experts are cached, resuming from the layer that
missed after loading what it needs (engine/offloaded_decode.py, engine/step.py). Copies
are always issued before the program that needs them is dispatched: a copy issued after
a dispatched computation waits for it (the ordering rule, docs/PREFILL.md). The model
code is the resident engine's; decode runs the very program the resident engine runs,
with the cache's pool and table in place of the layer stacks, so the tokens are the same.

Shapes: B batch, P prompt bucket, S cache length, D hidden.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxmoe.config import MoEConfig
from jaxmoe.runtime.buckets import DEFAULT_PREFILL_CHUNK, cache_bucket, check_chunk, chunk_starts, prompt_bucket
from jaxmoe.engine.executor import Ends, Executor, Piece, pack_module
from jaxmoe.runtime.metrics import tree_bytes
from jaxmoe.engine.device_decode import DeviceDecoder
from jaxmoe.engine.offloaded_decode import OffloadedDecoder
from jaxmoe.engine.outputs import GenerationResult, TokenCollector, generate_metrics
from jaxmoe.runtime.phases import PhaseClock
from jaxmoe.engine.inputs import prepare
from jaxmoe.engine.routed import compile_routed, embed, routed_chunk
from jaxmoe.engine.sampling import SamplingParams, sample
from jaxmoe.engine.stream_prefill import StreamStats, compile_stream, run_stream
from jaxmoe.model import MoEDecoder, check_model_dtype, num_unique_experts
from jaxmoe.model.decoder import head_logits
from jaxmoe.model.window import mark_padding
from jaxmoe.offload.cache import BudgetError, DeviceExpertCache, plan_geometry, workspace_experts
from jaxmoe.offload.costs import CostModel
from jaxmoe.offload.device_cache import DEVICE_POLICIES, skip_weight
from jaxmoe.offload.driver import Amortize, DecodeDriver, DriverConfig
from jaxmoe.offload.expert_maps import MAPS_FILE, ExpertMaps, normalise
from jaxmoe.offload.host_store import HostExpertStore
from jaxmoe.offload.prefetch import NextLayerScorer
from jaxmoe.offload.policy import PolicyShape
from jaxmoe.offload.policies import make_policy, policy_class
from jaxmoe.offload.prefill_plan import INJIT, MODES, ROUTED, PrefillPlan, choose_mode, plan_stream
from jaxmoe.offload.schedule import PassPlan

if TYPE_CHECKING:
    from jaxmoe.checkpoint import Checkpoint


def first_token(ends, x, index, root, step, sampling):
    """The prompt's next token from x [B, P, D] at each row's last position `index` [B]."""
    h = ends.norm(x)
    last = h[jnp.arange(x.shape[0]), index]  # [B, D]
    logits = head_logits(ends.embed_tokens, ends.lm_head, last)
    return sample(logits, jax.random.fold_in(root, step), sampling)


def check_skip_below(skip_below: float, policy: str) -> float:
    """The approximate decode's weight threshold (0: exact); refused for the policies whose
    decode is planned on the host (maps): only the device's step program skips."""
    skip_below = skip_weight(skip_below)
    if skip_below > 0 and policy not in DEVICE_POLICIES:
        raise ValueError(f"--skip-below (skip_below) needs a policy the device runs ({', '.join(DEVICE_POLICIES)}); "
                         f"policy {policy!r} plans its loads on the host and decodes exactly")  # fmt: skip
    return skip_below


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
        maps: ExpertMaps | None = None,
        amortize: Amortize = Amortize(),
        costs: CostModel = CostModel(),
        skip_below: float = 0.0,
        own_model: bool = False,
    ):
        """`prefill`: "stream" (every expert, layer by layer, overlapped), "routed" (only the
        routed experts, like decode), "auto" (routed for short prompts) or "injit" (stream
        with the copies made inside the programs); `prefill_overlap`
        False streams a layer, then computes it (the baseline the overlap is measured
        against); `prefill_chunk`: tokens per prefill chunk (a power of two). `maps`: the
        expert maps a "maps" policy starts from (empty if None; they learn as it runs);
        `amortize`: when the step program runs the predictor (eMoE); `costs`: the cost
        model a gated prefetch weighs (jaxmoe/offload/costs.py). `skip_below` W > 0: approximate
        decode (opt-in): a missed expert whose routing weight is below W is not fetched and not
        computed (device_cache.DevicePolicy; the policies the device runs only), and the
        metrics say `approximate`. `own_model`: the engine owns `model`, whose arrays are freed
        once packed (engine/weights.py; the caller must not use it afterwards); otherwise the
        packed weights are a second copy."""
        if prefill not in MODES:
            raise ValueError(f"prefill must be one of {', '.join(MODES)}, got {prefill!r}")
        if prefill == INJIT and not prefill_overlap:
            raise ValueError("prefill 'injit' always overlaps: it cannot run with prefill_overlap=False")
        self.prefill_mode, self.prefill_overlap = prefill, bool(prefill_overlap)
        self.prefill_chunk = check_chunk(prefill_chunk)
        check_model_dtype(config, model)
        self.config, self.store = config, store
        self.expert_budget_bytes, self.policy_name = int(expert_budget_bytes), policy
        kind = policy_class(policy)  # fails now on a bad name
        if kind.scorer == "required" and predictor is None:
            raise ValueError(f"policy {policy!r} needs a predictor (a trained predictor's directory or 'gate-ahead')")
        if kind.scorer == "none" and predictor is not None:
            raise ValueError(f"policy {policy!r} uses no predictor; a predictor needs policy 'predictor', 'reuse' or 'maps'")
        if maps is not None and not kind.maps:
            raise ValueError(f"policy {policy!r} uses no expert maps; they need policy 'maps'")
        self.predictor, self.amortize, self.costs = predictor, amortize, costs
        self.skip_below = check_skip_below(skip_below, policy)
        self.maps = maps if maps is not None or not kind.maps else ExpertMaps(
            len(config.moe_layer_ids), config.num_experts, config.top_k)  # fmt: skip
        # Room for prefetched copies only where something predicts.
        self.prefetches = kind.prefetches(predictor is not None)
        self.check_budget = check_budget
        self.check_batch(1)  # refuse now a budget too small even for one sequence; larger batches per call
        # Every program takes the same few buffers of dense weights (engine/weights.py).
        pack = pack_module(model, consume=own_model)
        self.ends = Piece(Ends(model), pack)
        self.layers = [Piece(layer, pack) for layer in model.layers]
        self.model_piece = Piece(model, pack)  # the decode step's program takes the whole model
        self.dense_bytes = tree_bytes(pack.arguments)
        self.executor = Executor()
        self.programs = self.executor.programs
        self._zeros: dict[tuple, jax.Array] = {}
        self.cache: DeviceExpertCache | None = None
        self.plan: list[PassPlan] = []  # what the last generate executed
        self.prefill_plan: PrefillPlan | None = None  # the last generate's prefill

    def check_batch(self, batch: int) -> None:
        """BudgetError (naming the minimum) unless the budget holds the experts `batch` rows can
        need at one layer, and any gather of them (`workspace_experts`)."""
        cfg = self.config
        unique = num_unique_experts(cfg.num_experts, batch, cfg.top_k)
        plan_geometry(self.expert_budget_bytes, self.store.expert_bytes, len(self.store.keys()), unique,
                      workspace_experts(batch, self.store.format, cfg))  # fmt: skip

    def largest_batch(self, limit: int) -> int:
        """The largest batch up to `limit` that the budget holds (`check_batch`); at least 1."""
        for batch in range(limit, 1, -1):
            try:
                self.check_batch(batch)
                return batch
            except BudgetError:
                continue
        return 1

    @property
    def clock(self) -> PhaseClock:
        """Where the engine's time goes (off unless a script turns it on); the cache shares it."""
        return self.executor.clock

    @clock.setter
    def clock(self, clock: PhaseClock) -> None:
        self.executor.clock = clock
        if self.cache is not None:
            self.cache.clock = clock

    @classmethod
    def from_checkpoint(
        cls, path: str | Path | Checkpoint, expert_budget_bytes: int, policy: str = "lru", predictor=None, **kw
    ) -> "OffloadedEngine":
        """`path`: a checkpoint directory, or one `checkpoint.open_checkpoint` opened. Dense
        weights to the device; experts read a layer at a time into host numpy and copied from
        there into pinned host memory (never through the device, never two copies of the
        experts). `predictor`: None, "gate-ahead" (the next layer's router,
        no training), the directory of a trained predictor, or a scorer. A "maps" policy
        starts from `maps` (an ExpertMaps or its file), else from MODEL/expert_maps.npz if
        there is one."""
        from jaxmoe.checkpoint import load, open_checkpoint
        from jaxmoe.offload.host_store import ensure_host_memory, total_expert_bytes

        ckpt = open_checkpoint(path)  # the config and the expert format, read once for all below
        path = ckpt.path
        cfg = ckpt.config
        ensure_host_memory(total_expert_bytes(cfg, ckpt.expert_format))  # before anything is allocated
        loaded = load(ckpt, experts=False)
        store = HostExpertStore.from_checkpoint(ckpt)
        if predictor is not None:
            from jaxmoe.predictor.store import load_scorer  # the predictor package: on demand

            predictor = load_scorer(predictor, loaded.model)
        maps = kw.pop("maps", None)
        if maps is None and policy_class(policy).maps and (Path(path) / MAPS_FILE).is_file():
            maps = Path(path) / MAPS_FILE  # shipped next to the model
        if maps is not None and not isinstance(maps, ExpertMaps):
            from jaxmoe.predictor.fingerprint import model_summary

            maps = ExpertMaps.load(maps, model_summary(cfg))
        engine = cls(cfg, loaded.model, store, expert_budget_bytes, policy, predictor=predictor, maps=maps,
                     own_model=True, **kw)  # fmt: skip
        engine.generation_config, engine.tokenizer_path = loaded.generation_config, loaded.tokenizer_path
        return engine

    def prepare(self, batch: int, prompt_tokens: int, max_new_tokens: int, sampling=SamplingParams()) -> PrefillPlan:
        """Compile ahead of time every program a generate of this shape bucket runs (the
        prefill in the mode it would take for full-length prompts, the first token, the
        decode step, the cache's own programs), so the first prompt of that size compiles
        nothing (with the compilation cache, neither does the next process); returns the
        prefill plan such a prompt would execute with the cache as it is now."""
        cfg, spec = self.config, jax.ShapeDtypeStruct
        p_len = prompt_bucket(prompt_tokens)
        cache_len = cache_bucket(p_len, max_new_tokens)
        size, starts = chunk_starts(p_len, self.prefill_chunk)
        self.ensure_cache(batch)
        self.cache.prepare_fetch()
        mode = choose_mode(self.prefill_mode, cfg.num_experts, batch * prompt_tokens * cfg.top_k, len(starts),
                           self.cache.staging == 0)  # fmt: skip
        if mode == ROUTED:
            x = compile_routed(self, batch, size, cache_len)
            x = spec((batch, p_len, cfg.hidden_size), x.dtype)
            plan = PrefillPlan(ROUTED, size, len(starts), 0)
        else:
            self.executor.compile("embed", embed, {}, (), self.ends, spec((batch, p_len), jnp.int32))
            x = compile_stream(self, batch, p_len, size, cache_len, in_jit=mode == INJIT)
            moe = [m for m in range(cfg.num_layers) if cfg.moe_layers[m]]
            plan = self._stream_plan(size, len(starts), in_jit=mode == INJIT)
            sent = [len(s.sent) for s in plan.steps if s.op == "copy" and not s.in_jit]
            self.cache.prepare_stream(max(self.cache.schedule.retain_quotas(moe).values(), default=0), sent)
        root = jax.eval_shape(lambda: jax.random.key(0))
        index, step = spec((batch,), jnp.int32), spec((), jnp.int32)
        self.executor.compile("first_token", first_token, {"sampling": sampling}, (), self.ends, x, index, root, step)
        if max_new_tokens > 1:
            self._decoder(sampling).compile(batch, cache_len)
        return plan

    def _decoder(self, sampling):
        """The device's decode (misses fetched in the program) where the policy runs there;
        the host-planned one (a resume per missed layer) for the policies that plan on the host."""
        return (DeviceDecoder if self.policy_name in DEVICE_POLICIES else OffloadedDecoder)(self, sampling)

    def reset_cache(self) -> None:
        """Drop every cached expert: the next generate starts cold."""
        self.cache = None

    def zeros(self, shape: tuple) -> jax.Array:
        """A zero array in the model's dtype, made once per shape."""
        if shape not in self._zeros:
            self._zeros[shape] = jnp.zeros(shape, self.config.dtype)
        return self._zeros[shape]

    def scalar(self, value: int) -> jax.Array:
        """An int32 scalar on the device, made once per value (a step's start layer)."""
        if value not in self._zeros:
            self._zeros[value] = jnp.int32(value)
        return self._zeros[value]

    def ensure_cache(self, batch: int) -> None:
        """A device expert cache (and its decode driver) for batches of `batch` rows; the
        one there is kept while a batch needs as many experts per layer at once."""
        cfg = self.config
        unique_max = num_unique_experts(cfg.num_experts, batch, cfg.top_k)
        workspace = workspace_experts(batch, self.store.format, cfg)
        if self.cache is None or (self.cache.unique_max, self.cache.workspace) != (unique_max, workspace):
            shape = PolicyShape(tuple(cfg.moe_layer_ids), cfg.num_experts, cfg.top_k)
            policy = make_policy(self.policy_name, shape, **({"maps": self.maps} if self.maps is not None else {}))
            self.cache = DeviceExpertCache(
                self.store, self.expert_budget_bytes, policy, unique_max, workspace,
                prefetch_max=unique_max if self.prefetches else 0, check_budget=self.check_budget,
                programs=self.programs,
            )  # fmt: skip
            schedule = self.cache.schedule
            config = DriverConfig(prefetch_max=schedule.prefetch_staging, costs=self.costs,
                                  expert_bytes=self.store.expert_bytes, amortize=self.amortize)  # fmt: skip
            # Lives with the cache: what it learns (pick calibration, hit rate) outlasts a generate.
            self.driver = DecodeDriver(schedule, cfg.moe_layer_ids, cfg.num_layers, config)
        self.cache.clock = self.executor.clock

    def prefill(self, tokens: np.ndarray, lengths: np.ndarray, kv: list) -> tuple[jax.Array, StreamStats | None]:
        """Hidden states [B, P, D] after the last layer, chunk by chunk, streamed or routed."""
        cfg = self.config
        b, p_len = tokens.shape
        positions = np.broadcast_to(np.arange(p_len, dtype=np.int32), (b, p_len))
        valid = positions < lengths[:, None]
        positions = mark_padding(positions, valid)  # padding writes no keys (model/window.py)
        size, starts = chunk_starts(p_len, self.prefill_chunk)
        routed_slots = int(valid.sum()) * cfg.top_k
        mode = choose_mode(self.prefill_mode, cfg.num_experts, routed_slots, len(starts), self.cache.staging == 0)
        if mode == ROUTED:  # chunk by chunk through every layer, as the resident engine does
            self.prefill_plan = PrefillPlan(ROUTED, size, len(starts), 0)
            parts = [
                routed_chunk(self, jnp.asarray(tokens[:, s : s + size]), positions[:, s : s + size],
                             valid[:, s : s + size], kv)
                for s in starts
            ]  # fmt: skip
            return (parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)), None
        self.prefill_plan = self._stream_plan(size, len(starts), in_jit=mode == INJIT)
        x = self.executor.run("embed", embed, {}, (), self.ends, jnp.asarray(tokens))
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
        inputs = prepare(self.config, prompts, max_new_tokens, seed)
        lengths, tokens, root = inputs.lengths, inputs.tokens, inputs.root
        b, p_len = tokens.shape
        self.ensure_cache(b)
        cache = self.cache
        cache.begin()
        self.driver.begin_request(self._semantic_vector(tokens, lengths) if self.maps is not None else None)
        predicted_before = self.driver.counts()
        kv = list(inputs.kv)
        kv_bytes = tree_bytes(kv)
        out = TokenCollector(b, eos_ids, on_token)

        # Programs compile on first use inside the timed regions; their compile time is
        # measured on its own (compile_ms) and taken out of ttft and tpot.
        compiled = self.programs.compile_seconds
        start = time.perf_counter()
        x, stream = self.prefill(tokens, lengths, kv)
        tok = self.executor.run("first_token", first_token, {"sampling": sampling}, (), self.ends, x,
                                jnp.asarray(lengths - 1), root, jnp.int32(0))  # fmt: skip
        first_host = np.asarray(tok)
        out.add(first_host)
        ttft = time.perf_counter() - start - (self.programs.compile_seconds - compiled)
        prefill_h2d, prefill_stall = cache.counters.h2d_bytes, cache.counters.stall_s
        prefill_counts = (cache.counters.expert_hits, cache.counters.expert_misses + cache.counters.prefetch_issued)

        decoder = self._decoder(sampling)
        decoder.start(lengths, max_new_tokens, first_host)
        compiled = self.programs.compile_seconds
        decode_start, steps, row_tokens = time.perf_counter(), 0, 0
        for step in range(1, max_new_tokens):
            if out.all_done:
                break
            row_tokens += int(np.sum(~out.done))
            tok, tok_host = decoder.token(step, tok, ~out.done, kv, root)
            out.add(tok_host)
            steps += 1
        decode_seconds = time.perf_counter() - decode_start - (self.programs.compile_seconds - compiled)
        predicted = decoder.finish()
        self.driver.end_request()

        self.plan = list(cache.schedule.executed)
        c, d = cache.counters, decoder.counters
        plan = self.prefill_plan
        streamed_bytes = plan.max_streamed_layers * self.config.num_experts * self.store.expert_bytes
        metrics = {
            **generate_metrics(out, ttft, decode_seconds, steps, self.programs, b, p_len,
                               self.dense_bytes + kv_bytes + c.peak_bytes + streamed_bytes, self.store.format,
                               self.store.expert_bytes),  # fmt: skip
            "policy": self.policy_name,
            "expert_budget_bytes": self.expert_budget_bytes,
            "cache_slots": cache.num_slots,
            "expert_hits": c.expert_hits,
            "expert_misses": c.expert_misses,
            "hit_rate": c.hit_rate,
            "h2d_bytes": c.h2d_bytes,
            "prefetch_issued": c.prefetch_issued,
            "prefetch_used": c.prefetch_used,
            "decode_steps": steps,
            "decode_expert_hits": c.expert_hits - prefill_counts[0],
            "decode_expert_loads": c.expert_misses + c.prefetch_issued - prefill_counts[1],  # demand and prefetch
            "stall_ms": 1e3 * (c.stall_s + d.stall_s),
            "decode_stall_ms": 1e3 * d.stall_s,
            # The prefill's token is read once; each decode token once per program run.
            "host_syncs_per_token": d.runs / d.tokens if d.tokens else None,
            "resumes_per_token": d.resumes / d.tokens if d.tokens else None,
            # Opt-in skipping of missed low-weight experts: tokens no longer the resident ones.
            "approximate": self.skip_below > 0,
            "skip_below": self.skip_below,
            "skipped_experts": decoder.skipped_experts,  # (row, k) not computed, over the decode
            "skipped_experts_per_token": decoder.skipped_experts / row_tokens if row_tokens else 0.0,
            # Amortised prediction (eMoE): runs that ran the scorer, tokens that skipped it.
            **(predicted if predicted is not None else
               {k: v - predicted_before[k] for k, v in self.driver.counts().items()}),
            **self._prefill_metrics(prefill_h2d, prefill_stall, stream),
        }
        return GenerationResult(out.token_ids, metrics)

    def _semantic_vector(self, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """The prompts' mean input embedding (a request's key in the expert maps); the rows
        are gathered at the padded shape, so a prompt bucket compiles one gather."""
        rows = np.asarray(self.executor.run("embed", embed, {}, (), self.ends, jnp.asarray(tokens)), np.float32)
        mask = np.arange(tokens.shape[1])[None, :] < lengths[:, None]
        return normalise(rows[mask].mean(0))

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
