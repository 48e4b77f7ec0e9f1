"""The minimal DeepSeek-V4 runtime (config, blocks, KV cache, prefill/decode). Not built yet."""

__all__: list[str] = []
