"""Generate text with a jaxmoe checkpoint.

  python scripts/generate.py --prompt "Once upon a time" --max-new-tokens 32
  python scripts/generate.py --model checkpoints/NAME --prompt-ids "1 2 3" --json

Without --model the shipped default model (checkpoints/jaxmoe-tiny) is used; in a
checkout without it, a randomly initialised checkpoint is created, whose text is noise.
With --expert-budget-gb the experts live in pinned host memory and a device cache
of that many bytes (10^9 per GB) holds what the current step needs.
--skip-below W (with a budget) makes the decode approximate, never by default: a missed
expert whose routing weight is below W is not loaded or computed; the metrics then say
"approximate": true and give "skipped_experts_per_token".
With --json exactly one JSON object goes to stdout; logs and progress go to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# This checkout's jaxmoe, before any installed one (a venv's editable install may point at another checkout).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tqdm import tqdm

from jaxmoe.checkpoint import CheckpointError, load, open_checkpoint
from jaxmoe.checkpoint.random_model import make_random_checkpoint
from jaxmoe.config import ConfigError, load_hf_config
from jaxmoe.engine import ContextError, ResidentEngine, SamplingParams
from jaxmoe.engine.offloaded import OffloadedEngine
from jaxmoe.engine.inputs import check_fits
from jaxmoe.offload.cache import BudgetError
from jaxmoe.offload.host_store import HostMemoryError, total_expert_bytes
from jaxmoe.offload.device_cache import skip_weight
from jaxmoe.offload.driver import Amortize
from jaxmoe.offload.expert_maps import MapsMismatch
from jaxmoe.offload.policies import POLICY_NAMES, policy_class
from jaxmoe.runtime.buckets import DEFAULT_PREFILL_CHUNK, check_chunk
from jaxmoe.runtime.metrics import tree_bytes
from jaxmoe.runtime.programs import CACHE_ENV, DEFAULT_CACHE_DIR, enable_compilation_cache
from jaxmoe.offload.prefill_plan import MODES
from jaxmoe.tokenizer import eos_ids, load_tokenizer

CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"
TRAINED_DEFAULT = CHECKPOINTS / "jaxmoe-tiny"
RANDOM_DEFAULT = CHECKPOINTS / "jaxmoe-tiny-random"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="jaxmoe checkpoint directory (default: the shipped model)")
    # Both flags append to one list so outputs keep the order prompts were given in.
    p.add_argument("--prompt", dest="prompts", action="append", type=lambda s: ("text", s), default=[],
                   help="text prompt; repeat for a batch")  # fmt: skip
    p.add_argument("--prompt-ids", dest="prompts", action="append", type=lambda s: ("ids", s),
                   help='token ids, e.g. "1 2 3"; repeatable')  # fmt: skip
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 keeps every token")
    p.add_argument("--top-p", type=float, default=1.0, help="1.0 keeps every token")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--expert-budget-gb", type=float,
                   help="device expert cache budget in 10^9 bytes; experts live in pinned host memory "
                   "(default: every expert resident on the device)")  # fmt: skip
    p.add_argument("--expert-budget-frac", type=float,
                   help="the same budget as a fraction of all the model's expert bytes, e.g. 0.5")  # fmt: skip
    p.add_argument("--policy", choices=POLICY_NAMES,
                   help="expert cache policy (with a budget); default: predictor when the model has a matching "
                   "trained predictor (MODEL/predictor), else lru")  # fmt: skip
    p.add_argument("--predictor", help="predictor directory, or 'gate-ahead' (the next layer's router, untrained); "
                   "predictor, reuse and maps use MODEL/predictor when it matches")  # fmt: skip
    p.add_argument("--maps", type=Path, help="expert maps for --policy maps (default: MODEL/expert_maps.npz if "
                   "present, else they start empty and learn as they run)")  # fmt: skip
    p.add_argument("--predict-every", type=int, default=1,
                   help="amortised prediction: the step program runs the predictor on every K-th token only")
    p.add_argument("--predict-below", type=float,
                   help="amortised prediction: ... and only while the recent hit rate is below this")
    add_skip_below(p)
    p.add_argument("--prefill", choices=MODES, default="auto",
                   help="offloaded prefill: stream every expert layer by layer, overlapped with compute; load only "
                   "the routed experts; or auto (routed for short prompts)")  # fmt: skip
    p.add_argument("--no-prefill-overlap", action="store_true",
                   help="stream a layer, then compute it (the baseline the overlap is measured against)")
    p.add_argument("--prefill-chunk", type=int, default=DEFAULT_PREFILL_CHUNK,
                   help="tokens per prefill chunk, a power of two: bounds activation memory for long prompts")
    p.add_argument("--compilation-cache", metavar="DIR",
                   help=f"keep compiled programs here for the next start ('off' disables; default ${CACHE_ENV} "
                   f"or {DEFAULT_CACHE_DIR})")  # fmt: skip
    p.add_argument("--plan", action="store_true", help="include the executed transfer plans in the JSON")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    args = p.parse_args(argv)
    check_engine_flags(p, args)
    if not args.prompts:
        p.error("give at least one --prompt or --prompt-ids")
    return args


def add_skip_below(p: argparse.ArgumentParser) -> None:
    """--skip-below (scripts/serve.py takes it too)."""
    p.add_argument("--skip-below", type=float, default=0.0, metavar="W",
                   help="approximate decode (off by default): with a budget and a device policy (every one but "
                   "maps), a missed expert whose routing weight is below W is not loaded or computed")  # fmt: skip


def check_engine_flags(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The prefill chunk and expert budget flags (scripts/serve.py takes the same)."""
    try:
        check_chunk(args.prefill_chunk)
    except ValueError as e:
        p.error(f"--prefill-chunk: {e}")
    if args.expert_budget_gb is not None and args.expert_budget_frac is not None:
        p.error("give --expert-budget-gb or --expert-budget-frac, not both")
    for flag in ("expert_budget_gb", "expert_budget_frac"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            p.error(f"--{flag.replace('_', '-')} must be positive, got {value}")
    # Amortised prediction and expert maps are generate.py's flags (serve.py has neither).
    try:
        args.amortize = Amortize(getattr(args, "predict_every", 1), getattr(args, "predict_below", None))
    except ValueError as e:
        p.error(f"--predict-every/--predict-below: {e}")
    args.maps = getattr(args, "maps", None)
    args.skip_below = getattr(args, "skip_below", 0.0)
    try:
        skip_weight(args.skip_below)
    except ValueError as e:
        p.error(f"--skip-below: {e}")
    if args.skip_below > 0 and args.expert_budget_gb is None and args.expert_budget_frac is None:
        p.error("--skip-below needs --expert-budget-gb or --expert-budget-frac: only missed experts are skipped")


def default_model() -> Path:
    if TRAINED_DEFAULT.is_dir():
        return TRAINED_DEFAULT
    if not RANDOM_DEFAULT.is_dir():
        print(f"creating a random demo checkpoint at {RANDOM_DEFAULT}", file=sys.stderr)
        make_random_checkpoint(RANDOM_DEFAULT)
    print("note: the default model has random weights; its text is noise", file=sys.stderr)
    return RANDOM_DEFAULT


def parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"--prompt-ids {text!r}: expected integers separated by spaces") from None


def build_engine(path: Path, args: argparse.Namespace):
    """(engine, config, generation_config, tokenizer_path): offloaded when a budget is given."""
    if args.expert_budget_gb is None and args.expert_budget_frac is None:
        loaded = load(path)
        engine = ResidentEngine(loaded.config, loaded.model, loaded.experts, prefill_chunk=args.prefill_chunk,
                                own_model=True)  # fmt: skip
        return engine, loaded.config, loaded.generation_config, loaded.tokenizer_path
    ckpt = open_checkpoint(path)  # the engine loads from it: config and format read once
    if args.expert_budget_gb is not None:
        budget = round(args.expert_budget_gb * 1e9)
    else:
        budget = round(args.expert_budget_frac * total_expert_bytes(ckpt.config, ckpt.expert_format))
    policy, predictor = choose_policy(Path(path), args.policy, args.predictor)
    if args.maps is not None and not policy_class(policy).maps:
        raise ValueError(f"--maps needs --policy maps, not --policy {policy}")
    engine = OffloadedEngine.from_checkpoint(
        ckpt, budget, policy, predictor=predictor, prefill=args.prefill,
        prefill_overlap=not args.no_prefill_overlap, prefill_chunk=args.prefill_chunk, maps=args.maps,
        amortize=args.amortize, skip_below=args.skip_below,
    )  # fmt: skip
    return engine, engine.config, engine.generation_config, engine.tokenizer_path


def choose_policy(model: Path, policy: str | None, predictor: str | None) -> tuple[str, str | None]:
    """An explicit --policy wins; otherwise the predictor when one is given or shipped and
    matches. A policy that can use a predictor (predictor, reuse, maps) takes the given
    or shipped one; one that needs it (predictor) is refused without."""
    wants = "required" if policy is None else policy_class(policy).scorer
    if wants == "none":
        if predictor is not None:
            raise ValueError(f"--predictor needs --policy predictor, reuse or maps, not --policy {policy}")
        return policy, None
    if predictor is None:
        shipped = model / "predictor"
        if shipped.is_dir() and matches(shipped, load_hf_config(model)):
            predictor = str(shipped)
        elif policy == "predictor":
            raise ValueError(f"--policy predictor needs --predictor DIR or 'gate-ahead' ({shipped} not usable)")
        elif policy is None:
            return "lru", None
    return policy or "predictor", predictor


def matches(predictor: Path, config) -> bool:
    from jaxmoe.predictor.store import PredictorMismatch, check_compatible, read_meta

    try:
        check_compatible(read_meta(predictor), config, str(predictor))
        return True
    except (PredictorMismatch, FileNotFoundError) as e:
        print(f"note: not using {predictor}: {e}", file=sys.stderr)
        return False


def resident_metrics(engine: ResidentEngine) -> dict:
    return {
        "policy": "resident",
        "expert_budget_bytes": tree_bytes(engine.experts),  # every expert is on the device
        # A resident run moves no expert bytes and keeps no cache to hit or miss.
        "expert_hits": None,
        "expert_misses": 0,
        "hit_rate": None,
        "h2d_bytes": 0,
        "prefetch_issued": 0,
        "prefetch_used": 0,
        "stall_ms": 0.0,
        "approximate": False,
        "skip_below": 0.0,
        "skipped_experts": 0,
        "skipped_experts_per_token": 0.0,
        "prefill_mode": "resident",
        "prefill_h2d_bytes": 0,
        "prefill_stall_ms": 0.0,
        "prefill_transfer_ms": 0.0,
        "prefill_overlap": None,
    }


def run(args: argparse.Namespace) -> dict:
    enable_compilation_cache(args.compilation_cache)
    engine, config, generation_config, tokenizer_path = build_engine(args.model or default_model(), args)
    tokenizer = load_tokenizer(tokenizer_path) if tokenizer_path else None
    if tokenizer is None and any(kind == "text" for kind, _ in args.prompts):
        raise ValueError(f"{args.model} has no tokenizer.json: use --prompt-ids")
    prompts = [tokenizer.encode(v).ids if kind == "text" else parse_ids(v) for kind, v in args.prompts]
    check_fits(config, prompts, args.max_new_tokens)

    sampling = SamplingParams(args.temperature, args.top_k, args.top_p)
    with tqdm(total=args.max_new_tokens, desc="tokens", unit="tok", file=sys.stderr, leave=False) as bar:
        result = engine.generate(prompts, args.max_new_tokens, sampling, args.seed, eos_ids(generation_config), bar.update)

    outputs = [
        {"text": tokenizer.decode(ids) if tokenizer else None, "token_ids": ids} for ids in result.token_ids
    ]
    metrics = dict(result.metrics)
    if isinstance(engine, ResidentEngine):
        metrics.update(resident_metrics(engine))
    report = {"outputs": outputs, "metrics": metrics}
    if args.plan:
        report["plan"] = [p.to_dict() for p in getattr(engine, "plan", [])]
        prefill = getattr(engine, "prefill_plan", None)
        report["prefill_plan"] = prefill.to_dict() if prefill else None
    return report


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        report = run(args)
    except (CheckpointError, ConfigError, ContextError, BudgetError, HostMemoryError, MapsMismatch, ValueError,
            FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report))
    else:
        for (kind, prompt), out in zip(args.prompts, report["outputs"]):
            if out["text"] is None:
                print(" ".join(map(str, out["token_ids"])))
            else:  # the prompt, then its continuation (the JSON has the continuation alone)
                print((prompt if kind == "text" else "") + out["text"])
        m = report["metrics"]
        tps = f"{m['decode_tokens_per_s']:.1f}" if m["decode_tokens_per_s"] else "n/a"
        cache = ""
        if m["hit_rate"] is not None and m["policy"] != "resident":
            cache = f", {m['policy']} hit rate {m['hit_rate']:.2f}, {m['h2d_bytes'] / 1e6:.1f} MB moved"
        prefill = ""
        if m["policy"] != "resident":
            prefill = f" ({m['prefill_mode']} prefill, {m['prefill_h2d_bytes'] / 1e6:.1f} MB)"
        approx = ""
        if m["approximate"]:
            approx = f", APPROXIMATE: skip below {m['skip_below']}, {m['skipped_experts_per_token']:.2f} skipped/token"
        print(f"[ttft {m['ttft_ms']:.1f} ms{prefill}, decode {tps} tok/s, {m['expert_format']} experts{cache}{approx}]",
              file=sys.stderr)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
