"""Training a small MoE from scratch on CPU or GPU (scripts/train_moe.py is the CLI).

  corpus.py        registry packages -> one plain-text file per domain
  data.py          held-out split, BPE tokenizer, token streams, deterministic batches
  moe.py           a training MoE function (block-grouped, equal to the reference)
  losses.py        next-token cross-entropy, load-balancing loss, router z-loss
  step.py          trainable params, AdamW + warmup-cosine, jitted train/eval steps
  ckpt.py          resumable Orbax checkpoints of params, optimizer state and position
  run.py / loop.py run settings and directory; the loop with validation and time budget
  ship.py          trained params -> a jaxmoe checkpoint directory
  evaluate.py      held-out perplexity, bigram baseline, routing balance

Submodules are imported directly (nothing here), so `python -m jaxmoe.train.corpus`
does not pay for importing JAX.
"""
