"""Decode hit rate of the random-weight OLMoE-1B-7B shape (LAYERS layers) against sampling temperature
and the scale of its random token embeddings:
usage: python calib.py LAYERS T1,T2,.. F1,F2,.. POLICY1,.. [EMBED_SCALE] (one JSON line per run: a 128-token
random prompt, 128 sampled tokens, seed 0, a cold cache, the offloaded engine at F x the expert bytes)."""
import json, sys, tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository root
import numpy as np
from bench.shapes import SHAPES
from bench import models
from jaxmoe.config import load_hf_config
from jaxmoe.engine.offloaded import OffloadedEngine
from jaxmoe.engine.sampling import SamplingParams
from jaxmoe.offload.host_store import total_expert_bytes
from jaxmoe.quant import DENSE

SCALE = float(sys.argv[5]) if len(sys.argv) > 5 else 1.0
layers, temps, fracs, policies = int(sys.argv[1]), [float(t) for t in sys.argv[2].split(",")], [float(f) for f in sys.argv[3].split(",")], sys.argv[4].split(",")
d = Path(tempfile.mkdtemp())
(d / "config.json").write_text(json.dumps(SHAPES["olmoe-1b-7b"] | {"num_hidden_layers": layers, "torch_dtype": "bfloat16"}))
cfg = load_hf_config(d)
rng = np.random.default_rng(0)
prompt = rng.integers(0, cfg.vocab_size, (1, 128)).tolist()
for policy in policies:
    for f in fracs:
        model, store = models.random_dense(cfg, 0), models.random_host_store(cfg, 0, DENSE)
        model.embed_tokens.embedding[...] = model.embed_tokens.embedding[...] * SCALE
        eng = OffloadedEngine(cfg, model, store, int(f * total_expert_bytes(cfg, DENSE)), policy, own_model=True)
        for t in temps:
            eng.reset_cache()
            r = eng.generate(prompt, 128, sampling=SamplingParams(temperature=t), seed=0)
            m = r.metrics
            print(json.dumps({"embed_scale": SCALE, "layers": layers, "policy": policy, "frac": f, "temperature": t, "hit_rate": round(m["hit_rate"], 3), "decode_hit_rate": round(m["decode_expert_hits"] / max(1, m["decode_expert_hits"] + m["decode_expert_loads"]), 3),
                              "distinct_tokens": len(set(r.token_ids[0]))}), flush=True)
        del eng, store, model
