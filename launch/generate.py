"""Chat-formatted generation from a checkpoint of either family (HF decoder directory, RWKV-7 directory).

  python launch/generate.py --checkpoint=assets/tiny-r1 --prompt="What is 2 + 3?" --num_samples=4
  python launch/generate.py --checkpoint=assets/tiny-rwkv7 --prompt="What is 2 + 3?" --stream
"""

import argparse
import time

import jax
import jax.numpy as jnp


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True,
                        help="model directory (config.json, safetensors, tokenizer files) or hub id")
    parser.add_argument("--prompt", action="append", required=True, help="user message; repeat for a batch")
    parser.add_argument("--system", default=None, help="optional system message")
    parser.add_argument("--num_samples", type=int, default=1, help="completions per prompt")
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--top_p", type=float, default=0.95)
    parser.add_argument("--top_k", type=int, default=0)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stream", action="store_true", help="print sample 0's text as it is decoded")
    args = parser.parse_args(argv)

    from jaxrl_peft.models import family, hub
    from jaxrl_peft.rl import rollout

    path = hub.resolve_model(args.checkpoint).path
    model, params = family.load(path, dtype=jnp.dtype(args.dtype))
    tok = model.tokenizer()
    messages = [([{"role": "system", "content": args.system}] if args.system else [])
                + [{"role": "user", "content": p}] for p in args.prompt]
    prompts = [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=True)
               for m in messages for _ in range(args.num_samples)]
    tokens, mask = rollout.left_pad(prompts, tok.pad_id)
    sampling = rollout.SamplingConfig(args.max_new_tokens, args.temperature, args.top_p, args.top_k)
    sampler = rollout.Sampler(model, sampling, pad_id=tok.pad_id, stop_tokens=model.stop_ids(tok))
    t0 = time.perf_counter()
    key = jax.random.key(args.seed)
    if args.stream:
        shown = []

        def show(step: rollout.Step) -> None:
            if step.active[0]:
                shown.append(int(step.tokens[0]))
                print(tok.decode(shown[-1:], skip_special_tokens=True), end="", flush=True)

        out, _ = sampler.stream({"params": params}, tokens, mask, key, show)
        print()
        out = jax.device_get(out)
    else:
        out = jax.device_get(sampler({"params": params}, tokens, mask, key))
    seconds = time.perf_counter() - t0
    for i, row in enumerate(out.tokens):
        text = tok.decode(row[: out.lengths[i]], skip_special_tokens=True)
        status = "stop" if out.finished[i] else "length"
        print(f"--- prompt {i // args.num_samples} sample {i % args.num_samples} "
              f"({out.lengths[i]} tokens, {status})\n{args.prompt[i // args.num_samples]}\n>>> {text}")
    print(f"generated {int(out.lengths.sum())} tokens in {seconds:.2f} s (compilation included)")


if __name__ == "__main__":
    main()
