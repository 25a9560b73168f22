"""Static shapes for jitted programs: lengths round up to buckets, so a new prompt
length recompiles only when it crosses into a new bucket.

Prompts round up to powers of two. A prompt longer than the prefill chunk is
computed chunk by chunk (activation memory is bounded by the chunk, not the
prompt); chunks are powers of two too, so a long prompt bucket is a whole number
of chunks. KV caches round up to powers of two while small and to multiples of
LONG_CACHE_STEP beyond it, so an 8192-token prompt does not pay for a 16384-slot
cache.
"""

MIN_PROMPT_BUCKET = 16
MIN_CACHE_BUCKET = 64
LONG_CACHE_STEP = 2048
DEFAULT_PREFILL_CHUNK = 512


def bucket(n: int, minimum: int) -> int:
    size = minimum
    while size < n:
        size *= 2
    return size


def prompt_bucket(longest_prompt: int) -> int:
    return bucket(longest_prompt, MIN_PROMPT_BUCKET)


def cache_bucket(prompt_bucket_len: int, max_new_tokens: int) -> int:
    need = prompt_bucket_len + max_new_tokens
    if need > LONG_CACHE_STEP:
        return -(-need // LONG_CACHE_STEP) * LONG_CACHE_STEP
    return bucket(need, MIN_CACHE_BUCKET)


def check_chunk(chunk: int) -> int:
    """A prefill chunk: a power of two of at least MIN_PROMPT_BUCKET tokens."""
    if chunk < MIN_PROMPT_BUCKET or chunk & (chunk - 1):
        raise ValueError(f"prefill chunk must be a power of two >= {MIN_PROMPT_BUCKET} tokens, got {chunk}")
    return chunk


def chunk_starts(prompt_bucket_len: int, chunk: int) -> tuple[int, list[int]]:
    """(tokens per chunk, start of each chunk) of a prompt bucket: one chunk of the
    whole bucket when it fits in one."""
    size = min(prompt_bucket_len, chunk)
    return size, list(range(0, prompt_bucket_len, size))
