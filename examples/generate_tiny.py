"""Generate with a random ``tiny`` DeepSeek-V4 on the CPU reference path.

    python examples/generate_tiny.py [--new-tokens 16] [--temperature 0.8 --seed 1]

Writes a random checkpoint in the released V4 format to a temporary directory, loads it, generates from two
prompts of different lengths as one ragged batch, and prints the tokens, the throughput and the KV-cache
bytes per token (production layout) of the tiny model, and of V4-Flash at 1M tokens next to V3.2.
"""

import argparse
import tempfile
import time

import torch

from tilev4.model import V32_BYTES_PER_TOKEN_PER_LAYER, Config, Model, kv_footprint, write_random_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description="generate with a random tiny DeepSeek-V4 on the CPU")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--seed", type=int, default=None, help="seeds the sampling")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 is fastest for tiny)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    config = Config.tiny()
    with tempfile.TemporaryDirectory() as directory:
        t0 = time.perf_counter()
        write_random_checkpoint(config, directory, seed=0)
        model = Model.from_checkpoint(directory, device="cpu")
        print(f"wrote and loaded {model} in {time.perf_counter() - t0:.2f} s")

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, config.vocab_size, (n,), generator=g).tolist() for n in (64, 23)]
    model.generate([[1]], max_new_tokens=2)  # warm-up: dequantises the weights once

    t0 = time.perf_counter()
    out = model.generate(prompts, args.new_tokens, temperature=args.temperature, seed=args.seed)
    elapsed = time.perf_counter() - t0
    for i, (p, o) in enumerate(zip(prompts, out)):
        print(f"prompt {i} ({len(p)} tokens) -> {o}")
    generated = sum(map(len, out))
    print(
        f"{sum(map(len, prompts))} prompt tokens + {generated} generated in {elapsed:.2f} s "
        f"({generated / elapsed:.1f} generated tokens/s, prefill included)"
    )

    for i, (p, o) in enumerate(zip(prompts, out)):
        fp = kv_footprint(config, len(p) + len(o))
        print(
            f"KV cache of sequence {i} at {fp.context_len} tokens: {fp.bytes_per_token:.0f} B/token "
            f"({fp.total_bytes} B in the production layout; the 128-entry window rings dominate this short)"
        )
    flash = kv_footprint(Config.flash(), 2**20)
    print(
        f"V4-Flash at 1M tokens: {flash.bytes_per_token:.1f} B/token over {flash.n_layers} layers = "
        f"{flash.bytes_per_token_per_layer:.1f} B/token/layer vs V3.2's {V32_BYTES_PER_TOKEN_PER_LAYER} "
        f"({flash.fraction_of_v32_per_layer:.1%}; {flash.fraction_of_v32:.1%} of V3.2's 61-layer cache)"
    )


if __name__ == "__main__":
    main()
