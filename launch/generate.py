"""Chat-formatted generation from an HF checkpoint directory.

  python launch/generate.py --checkpoint=assets/tiny-r1 --prompt="What is 2 + 3?" --num_samples=4
"""

import argparse
import time

import jax
import jax.numpy as jnp


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="HF directory (config.json, safetensors, tokenizer) or hub id")
    parser.add_argument("--prompt", action="append", required=True, help="user message; repeat for a batch")
    parser.add_argument("--system", default=None, help="optional system message")
    parser.add_argument("--num_samples", type=int, default=1, help="completions per prompt")
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--top_p", type=float, default=0.95)
    parser.add_argument("--top_k", type=int, default=0)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from jaxrl_peft.models import hf, hub
    from jaxrl_peft.rl import rollout

    path = hub.resolve_model(args.checkpoint).path
    model, params = hf.load(path, dtype=jnp.dtype(args.dtype))
    tok = hf.Tokenizer(path)
    messages = [([{"role": "system", "content": args.system}] if args.system else [])
                + [{"role": "user", "content": p}] for p in args.prompt]
    prompts = [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=True)
               for m in messages for _ in range(args.num_samples)]
    tokens, mask = rollout.left_pad(prompts, tok.pad_id)
    sampling = rollout.SamplingConfig(args.max_new_tokens, args.temperature, args.top_p, args.top_k)
    sampler = rollout.Sampler(model, sampling, pad_id=tok.pad_id, stop_tokens=[tok.eos_id])
    t0 = time.perf_counter()
    out = jax.device_get(sampler({"params": params}, tokens, mask, jax.random.key(args.seed)))
    seconds = time.perf_counter() - t0
    for i, row in enumerate(out.tokens):
        text = tok.decode(row[: out.lengths[i]], skip_special_tokens=True)
        status = "stop" if out.finished[i] else "length"
        print(f"--- prompt {i // args.num_samples} sample {i % args.num_samples} "
              f"({out.lengths[i]} tokens, {status})\n{args.prompt[i // args.num_samples]}\n>>> {text}")
    print(f"generated {int(out.lengths.sum())} tokens in {seconds:.2f} s (compilation included)")


if __name__ == "__main__":
    main()
