"""Speed benchmarks: `python launch/bench.py {rollout,train,compile,wkv7,reward} [--flags]`.

  rollout: python launch/bench.py rollout --model=r1-distill-qwen-1.5b --batch=256 --prompt_len=256 --new_tokens=512
  train:   python launch/bench.py train --method=dora --batch=4 --seq=2048 --r=32
  compile: python launch/bench.py compile --model=r1-distill-qwen-1.5b --layers=28 --method=lora
           python launch/bench.py compile --model=rwkv7-1.5b --layers=24 --method=lora   # RWKV-7 (rwkv_jax PRESETS)
  wkv7:    python launch/bench.py wkv7 --B=8 --T=4096 --H=32 --K=64
  reward:  python launch/bench.py reward
"""

import argparse


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    r = sub.add_parser("rollout", help="sampler generated tokens/s on random weights")
    r.add_argument("--model", default="r1-distill-qwen-1.5b")
    r.add_argument("--batch", type=int, default=256)
    r.add_argument("--prompt_len", type=int, default=256)
    r.add_argument("--new_tokens", type=int, default=512)
    r.add_argument("--dtype", default="bfloat16")
    r.add_argument("--iters", type=int, default=2)
    r.add_argument("--temperature", type=float, default=1.0)
    r.add_argument("--top_p", type=float, default=1.0)
    r.add_argument("--top_k", type=int, default=0)
    t = sub.add_parser("train", help="PEFT training-step tokens/s and peak memory")
    t.add_argument("--method", default="lora")
    t.add_argument("--model", default="r1-distill-qwen-1.5b")
    t.add_argument("--batch", type=int, default=4)
    t.add_argument("--seq", type=int, default=2048)
    t.add_argument("--r", type=int, default=32)
    t.add_argument("--alpha", type=float, default=64)
    t.add_argument("--dtype", default="bfloat16")
    t.add_argument("--remat", type=int, default=1)
    t.add_argument("--iters", type=int, default=5)
    t.add_argument("--attention", default=None, help="xla | cudnn (default: cudnn on GPU)")
    c = sub.add_parser("compile", help="seconds to lower and compile one train step (abstract shapes, no weights)")
    c.add_argument("--model", default="r1-distill-qwen-1.5b", help="a decoder preset, or an RWKV-7 one (rwkv7-*)")
    c.add_argument("--layers", type=int, default=None, help="default: the model's depth")
    c.add_argument("--method", default="lora")
    c.add_argument("--batch", type=int, default=4)
    c.add_argument("--seq", type=int, default=2048)
    c.add_argument("--r", type=int, default=32)
    c.add_argument("--alpha", type=float, default=64)
    c.add_argument("--dtype", default="bfloat16")
    c.add_argument("--remat", type=int, default=1)
    c.add_argument("--scan", type=int, default=1, help="0 unrolls the layers (for comparison)")
    w = sub.add_parser("wkv7", help="WKV7 kernel forward and forward+backward ms")
    for name, default in (("B", 8), ("T", 4096), ("H", 32), ("K", 64)):
        w.add_argument(f"--{name}", type=int, default=default)
    w.add_argument("--dtype", default="bfloat16")
    w.add_argument("--impl", default=None)
    rw = sub.add_parser("reward", help="math verifications/s")
    rw.add_argument("--n", type=int, default=2000)
    rw.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)

    if args.what == "rollout":
        from jaxrl_peft.rl import bench
        bench.rollout(args.model, args.batch, args.prompt_len, args.new_tokens, args.dtype, args.iters,
                      temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    elif args.what == "train":
        from jaxrl_peft.train import bench
        bench.train(args.method, args.model, args.batch, args.seq, args.r, args.alpha, args.dtype,
                    bool(args.remat), args.iters, attention=args.attention)
    elif args.what == "compile":
        from jaxrl_peft.train import bench
        from rwkv_jax import model as rwkv_model
        rwkv = (rwkv_model.preset_family(args.model, args.layers, args.dtype, bool(args.remat), bool(args.scan))
                if args.model.startswith("rwkv7") else None)
        bench.compile_benchmark(args.model, args.layers, args.method, args.batch, args.seq, args.r, args.alpha,
                                args.dtype, bool(args.remat), bool(args.scan), model_family=rwkv,
                                targets=rwkv_model.LINEAR_MODULES if rwkv else None)
    elif args.what == "wkv7":
        from rwkv_jax.kernels.wkv7 import benchmark
        benchmark.run(args.B, args.T, args.H, args.K, dtype=args.dtype, impl=args.impl)
    elif args.what == "reward":
        from jaxrl_peft.rewards import benchmark
        benchmark.run(n=args.n, workers=args.workers)


if __name__ == "__main__":
    main()
