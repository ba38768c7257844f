"""Multi-turn chat with a ModRWKV model about an image or an audio clip, tokens streamed as they decode.

  python launch/chat.py --checkpoint=DIR --image=photo.png                 # interactive: one line per turn
  python launch/chat.py --checkpoint=DIR --audio=clip.wav --prompt=""      # ASR: the audio, then the answer
  python launch/chat.py --checkpoint=DIR --image=a.png --prompt="What is it?" --prompt="Which colour?"

DIR is a directory written by `rwkv_jax.modrwkv.save` (or a reference checkpoint file with
`--encoder=HF_ENCODER_DIR`). The image or clip is encoded once, in the first turn; later turns feed only
their own tokens on the RNN state the last turn left. Interactive commands: `/image PATH` or `/audio PATH`
attaches an item to the next turn, `/quit` (or an empty line at the start, or end of input) leaves.
"""

import argparse
import sys
import time

import jax.numpy as jnp


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="ModRWKV directory, or a reference checkpoint file")
    parser.add_argument("--encoder", default=None, help="HF encoder directory (with a reference checkpoint file)")
    parser.add_argument("--image", default=None, help="image for the first turn")
    parser.add_argument("--audio", default=None, help="audio clip for the first turn (any rate; resampled to 16 kHz)")
    parser.add_argument("--prompt", action="append", default=None,
                        help="a user turn; repeat for several turns (default: read turns from stdin)")
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy, as the reference evaluates")
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from jaxrl_peft.models.safetensors_io import CheckpointError
    from jaxrl_peft.rl import rollout
    from rwkv_jax import modrwkv

    try:
        if args.encoder:
            family, params = modrwkv.from_reference(args.checkpoint, args.encoder, dtype=jnp.dtype(args.dtype))
        else:
            family, params = modrwkv.load(args.checkpoint, dtype=jnp.dtype(args.dtype))
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.image and args.audio:
        print("error: give --image or --audio, not both (one modality per model)", file=sys.stderr)
        return 2
    item = args.image or args.audio
    wanted = "vision" if args.image else "audio" if args.audio else family.config.modality
    if wanted != family.config.modality:
        print(f"error: this model takes {family.config.modality} input, not {wanted}", file=sys.stderr)
        return 2
    sampling = rollout.SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                      top_p=args.top_p)
    chat = modrwkv.Chat(family, {"params": params}, sampling, seed=args.seed)
    pending = [item] if item else []
    turns = iter(args.prompt) if args.prompt is not None else None
    while True:
        if turns is not None:
            text = next(turns, None)
        else:
            try:
                text = input("user> ")
            except EOFError:
                text = None
        if text is None or text.strip() == "/quit" or (turns is None and not text and not pending and chat.history):
            break
        if text.startswith(("/image ", "/audio ")):
            pending.append(text.split(" ", 1)[1].strip())
            continue
        print("assistant> ", end="", flush=True)
        t0 = time.perf_counter()
        try:
            chat.ask(text, pending, on_text=lambda piece: print(piece, end="", flush=True))
        except (FileNotFoundError, ValueError, OSError) as e:
            print(f"\nerror: {e}", file=sys.stderr)
            return 2
        pending = []
        print(f"\n[{sum(chat.generated)} tokens generated so far; turn took {time.perf_counter() - t0:.1f} s]",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
