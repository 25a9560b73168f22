"""Static shapes for jitted programs: lengths round up to powers of two, so a new
prompt length recompiles only when it crosses into a new bucket."""

MIN_PROMPT_BUCKET = 16
MIN_CACHE_BUCKET = 64


def bucket(n: int, minimum: int) -> int:
    size = minimum
    while size < n:
        size *= 2
    return size


def prompt_bucket(longest_prompt: int) -> int:
    return bucket(longest_prompt, MIN_PROMPT_BUCKET)


def cache_bucket(prompt_bucket_len: int, max_new_tokens: int) -> int:
    return bucket(prompt_bucket_len + max_new_tokens, MIN_CACHE_BUCKET)
