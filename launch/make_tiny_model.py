"""Trains the embedded default models (assets/tiny-r1, assets/tiny-rwkv7) by supervised fine-tuning on
synthetic problems.

  python launch/make_tiny_model.py --out=assets/tiny-r1
  python launch/make_tiny_model.py --family=rwkv7 --out=assets/tiny-rwkv7

`--family=rwkv7` trains a tiny RWKV-7 instead, on the same teacher and with the same tokenizer, one
example per row (its state cannot reset at a packed example's boundary), and writes it as official
safetensors + config.json ("architecture": "rwkv7-x070") beside tiny-r1's tokenizer files.
assets/tiny-rwkv7 was made with `--family=rwkv7 --train_problems=40000 --steps=1400 --batch_size=32
--seq_len=192` (2 CPU cores shared with other jobs, load 5-13: 88 min in all): 0.56M parameters (2 layers,
hidden 128, 4 heads x 32, ffn 384), held-out loss 6.72 -> 0.092. On the 256 held-out problems, 'boxed':
avg@1 0.260, pass@8 0.734, greedy 0.297; 60% of samples guess (accuracy 0.129), worked samples are right
45.7% of the time. 'dapo': avg@1 0.262, pass@8 0.746, greedy 0.289. (The first asset, 600 steps over
20,000 problems, worked only 21% of its samples right, which capped what GRPO could reach.)

Builds a byte-level BPE with the R1-Distill special tokens and chat template on the rendered training
conversations, trains a small Qwen2 decoder on R1-style solutions (`<think>` steps, then `\\boxed{}`)
with the prompts of both the 'dapo' and 'boxed' templates, saves it in HF format, reloads the saved
files and measures held-out accuracy with the real sampler at temperature 1 and math_reward (avg@1 =
mean over 8 samples per problem, pass@8). Deterministic for a given seed on a given machine.

The teacher is imperfect on purpose, as distilled reasoning data is: 60% of its demonstrations skip
the reasoning with a quick guess ("<think>\\nQuick guess: 12.\\n</think>..."), right only 20% of the time
(otherwise a nearby wrong value). Whether to guess does not depend on the problem, so the fine-tuned
model guesses on about 60% of its samples. That leaves room that reinforcement learning with a
verifiable reward can find (stop guessing, work the problem, sharpen the worked answers), which is
what the embedded GRPO default shows on CPU in minutes.

Measured (2 CPU cores shared with another job; 13.8 min in all, 655 s of it training): 0.59M
parameters (2 layers, hidden 128, vocab 768), 1,200 steps over 40,000 problems (1.22 epochs). On 256
held-out problems (seed 1; many of their texts also occur among the training problems, whose easy
levels have only a few hundred distinct problems), 'boxed' template: avg@1 0.225, pass@8 0.695,
greedy 0.211; 60% of samples guess (accuracy 0.099), worked samples are right 41.1% of the time.
'dapo' template: avg@1 0.216, pass@8 0.695, greedy 0.180.
"""

from __future__ import annotations

import argparse
import collections
import functools
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from configs import sft as sft_configs
from jaxrl_peft.data import prompts, synthetic
from jaxrl_peft.eval import math_eval
from jaxrl_peft.infra import mesh as mesh_lib
from jaxrl_peft.models import family, hf, tiny
from jaxrl_peft.models import transformer as tfm
from jaxrl_peft.peft import registry
from jaxrl_peft.rl import rollout
from jaxrl_peft.train import loop, sft
from rwkv_jax import model as rwkv_model

THINK = "<think>\n"
# Kinds and levels of the problem mix, and the seeds of the disjoint training and held-out streams.
KINDS = ("percent", "quadratic", "modular", "linear")
LEVELS = (1, 2)
TRAIN_SEED, HELDOUT_SEED = 0, 1
TEMPLATES = ("dapo", "boxed")  # the model learns both; the GRPO configs use 'dapo'


def demonstrations(problems: list[synthetic.SyntheticProblem], guess_fraction: float, guess_accuracy: float,
                   seed: int) -> list[str]:
    """The teacher's completions: worked R1-style solutions, except that a `guess_fraction` of them
    skip the reasoning and guess, right with probability `guess_accuracy` (otherwise a nearby wrong
    value). The choice does not depend on the problem, so the model learns to guess at that rate."""
    rng = random.Random(f"demonstrations:{seed}")
    out = []
    for p in problems:
        if rng.random() >= guess_fraction:
            out.append(p.r1_solution())
        else:
            out.append(p.r1_guess(p.answer if rng.random() < guess_accuracy else synthetic.wrong_answer(p.answer, rng)))
    return out


def render(problems: list[synthetic.SyntheticProblem], solutions: list[str], tok: hf.Tokenizer,
           templates: tuple[str, ...] = TEMPLATES) -> list[tuple[str, str]]:
    """(prompt, completion) texts, templates in turn; the prompt ends with the chat template's `<think>\\n`."""
    out = []
    for i, (p, solution) in enumerate(zip(problems, solutions)):
        prompt = prompts.build_prompt(p.problem, tok, templates[i % len(templates)])
        if not (prompt.endswith(THINK) and solution.startswith(THINK)):
            raise ValueError("the chat template's generation prompt must end with '<think>\\n'")
        out.append((prompt, solution[len(THINK):]))
    return out


def heldout_accuracy(path: Path, problems: list[synthetic.SyntheticProblem], template: str, samples: int,
                     temperature: float, max_new_tokens: int, seed: int, rows: int = 128) -> dict:
    """Samples `samples` completions per problem from the HF directory `path` and grades them, through the
    one held-out evaluator (`math_eval.evaluate_with`), whichever the model's family."""
    fam, params = family.load(path, dtype=jnp.float32)
    tok = fam.tokenizer()
    records = [{"problem": p.problem, "answer": p.answer} for p in problems]
    sampler = rollout.Sampler(fam, rollout.SamplingConfig(max_new_tokens, temperature), pad_id=tok.pad_id,
                              stop_tokens=fam.stop_ids(tok))
    results = math_eval.evaluate_with(sampler, {"params": params}, tok, {"heldout": records}, {"heldout": samples},
                                      rows, template=template, max_prompt_tokens=4096, prompt_bucket=16, seed=seed,
                                      save_completions=True, log=None)
    bench = results.benchmarks["heldout"]
    texts = [t for p in bench.problems for t in p.completions]
    rewards = np.array([c for p in bench.problems for c in p.correct], float)
    lengths = np.array([n for p in bench.problems for n in p.lengths], float)
    guesses = np.array([t.lstrip().startswith(synthetic.GUESS_OPENING) for t in texts])
    per_problem = rewards.reshape(len(problems), samples)
    by_kind = collections.defaultdict(list)
    for p, acc in zip(problems, per_problem.mean(1)):
        by_kind[f"{p.kind}/{p.level}"].append(acc)
    return {"avg@1": float(per_problem.mean()), f"pass@{samples}": float(per_problem.max(1).mean()),
            "mean_length": float(lengths.mean()), "guess_rate": float(guesses.mean()),
            "guess_accuracy": float(rewards[guesses].mean()) if guesses.any() else 0.0,
            "worked_accuracy": float(rewards[~guesses].mean()) if not guesses.all() else 0.0,
            "seconds": results.seconds, "sample_text": texts[0],
            "by_kind": {k: float(np.mean(v)) for k, v in sorted(by_kind.items())}}


def sft_config(work: Path, args: argparse.Namespace) -> ml_collections.ConfigDict:
    """The supervised run that trains the embedded model: full fine-tuning of every weight from a random
    init (AdamW b2 0.98, weight decay 0.01 on matrices, clip 1.0, warmup then cosine to 0)."""
    c = sft_configs.get_config("tiny")
    c.seed = args.seed
    c.model.update(checkpoint=str(work), remat=False)
    c.peft = ml_collections.ConfigDict(dict(name="full", hparams=ml_collections.ConfigDict()))
    c.mesh.update(data=1, fsdp=1, tensor=1)
    c.sft.update(batch_size=args.batch_size, micro_batch_size=args.batch_size, seq_len=args.seq_len)
    c.optim.update(learning_rate=args.learning_rate, schedule="cosine", warmup_steps=min(50, args.steps // 10),
                   end_learning_rate=0.0, weight_decay=0.01, decay="matrices", b1=0.9, b2=0.98, eps=1e-8,
                   grad_clip=1.0)
    c.data.update(train="", heldout="")
    c.steps, c.eval_every, c.checkpoint_every, c.log_every = args.steps, 0, args.steps, 50
    return c


def build_model(work: Path, args: argparse.Namespace, tok: hf.Tokenizer) -> Callable[[dict], None]:
    """Writes the family's random init to `work`; returns the function that saves trained params there."""
    key = jax.random.key(args.seed)
    if args.family == "rwkv7":
        config = rwkv_model.RWKV7Config(vocab_size=tok.vocab_size, n_embd=args.hidden_size, n_layer=args.num_layers,
                                        head_size=32, dim_ffn=args.intermediate_size, decay_lora=16, iclr_lora=16,
                                        value_lora=8, gate_lora=16)
        params = nn.unbox(rwkv_model.RWKV7(config).init(key, jnp.zeros((1, 1), jnp.int32))["params"])
        print(f"model: RWKV-7, {config.n_layer} layers, hidden {config.n_embd}, ffn {config.dim_ffn}, "
              f"{config.n_head} heads x {config.head_size}, {_count(params) / 1e6:.2f}M parameters")
        save = functools.partial(rwkv_model.save, str(work), config)
    else:
        cfg = tfm.preset("tiny", vocab_size=tok.vocab_size, hidden_size=args.hidden_size,
                         intermediate_size=args.intermediate_size, num_layers=args.num_layers,
                         num_heads=args.hidden_size // 32, num_kv_heads=max(1, args.hidden_size // 64),
                         head_dim=32, max_position_embeddings=4096,
                         bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
        params = tfm.init_params(cfg, key)
        print(f"model: {cfg.num_layers} layers, hidden {cfg.hidden_size}, mlp {cfg.intermediate_size}, "
              f"heads {cfg.num_heads}/{cfg.num_kv_heads}x{cfg.head_dim}, {_count(params) / 1e6:.2f}M parameters")
        save = functools.partial(hf.save, work, tfm.Transformer(cfg))
    save(params)
    return save


def _count(params: dict) -> int:
    return sum(x.size for x in jax.tree.leaves(params))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="decoder", choices=("decoder", "rwkv7"),
                        help="decoder: a Qwen2 decoder (assets/tiny-r1); rwkv7: an RWKV-7 (assets/tiny-rwkv7)")
    parser.add_argument("--out", default=None, help="directory to write (overwritten); default by family")
    parser.add_argument("--seq_len", type=int, default=256, help="tokens per row (rwkv7: one example per row)")
    parser.add_argument("--train_problems", type=int, default=40000)
    parser.add_argument("--heldout_problems", type=int, default=256)
    parser.add_argument("--vocab_size", type=int, default=768)
    parser.add_argument("--hidden_size", type=int, default=128)
    parser.add_argument("--intermediate_size", type=int, default=384)
    parser.add_argument("--num_layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch_size", type=int, default=16, help="packed rows of 256 tokens per step")
    parser.add_argument("--learning_rate", type=float, default=3e-3)
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--levels", default=",".join(map(str, LEVELS)))
    parser.add_argument("--guess_fraction", type=float, default=0.6,
                        help="fraction of demonstrations that guess instead of working the problem")
    parser.add_argument("--guess_accuracy", type=float, default=0.2, help="how often a demonstrated guess is right")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip_eval", action="store_true")
    args = parser.parse_args(argv)
    args.out = args.out or {"decoder": "assets/tiny-r1", "rwkv7": "assets/tiny-rwkv7"}[args.family]

    t0 = time.perf_counter()
    kinds, levels = tuple(args.kinds.split(",")), tuple(int(x) for x in args.levels.split(","))
    train_problems = synthetic.generate(args.train_problems, TRAIN_SEED, kinds, levels)
    heldout = synthetic.generate(args.heldout_problems, HELDOUT_SEED, kinds, levels)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        bootstrap = hf.Tokenizer(tiny.build_r1_tokenizer(work, [tiny.EOS]))  # renders the chat template
        solutions = demonstrations(train_problems, args.guess_fraction, args.guess_accuracy, args.seed)
        pairs = render(train_problems, solutions, bootstrap)
        tiny.build_r1_tokenizer(work, [p + c + tiny.EOS for p, c in pairs], args.vocab_size)
        tok = hf.Tokenizer(work)
        examples = [(tok.encode(p), tok.encode(c) + [tok.eos_id]) for p, c in pairs]
        lengths = [len(p) + len(c) for p, c in examples]
        print(f"{len(examples)} training examples of {kinds} levels {levels}: vocab {tok.vocab_size}, "
              f"tokens mean {np.mean(lengths):.0f} max {max(lengths)}")

        save = build_model(work, args, tok)  # the random init, which the supervised task loads and trains
        c = sft_config(work, args)
        t_train = time.perf_counter()
        held_pairs = render(heldout, [p.r1_solution() for p in heldout], tok)  # worked solutions only
        held = [(tok.encode(p), tok.encode(c) + [tok.eos_id]) for p, c in held_pairs]
        one_device = mesh_lib.make_mesh(1, 1, 1, jax.devices()[:1])  # a 0.6M model: no sharding
        run = loop.train(sft.SFTTask(c, examples, heldout=held), c, work / "run", mesh=one_device)
        t_train = time.perf_counter() - t_train
        save(registry.merge(run.method, run.frozen["base"], run.state.adapter))
        print(f"trained in {t_train:.0f}s")

        results = {}
        if not args.skip_eval:
            for template in TEMPLATES:
                r = heldout_accuracy(work, heldout, template, samples=8, temperature=1.0, max_new_tokens=256,
                                     seed=args.seed)
                g = heldout_accuracy(work, heldout, template, samples=1, temperature=0.0, max_new_tokens=256,
                                     seed=args.seed)
                results[template] = (r, g)
                print(f"[{template}] {len(heldout)} held-out problems, temperature 1: avg@1 {r['avg@1']:.3f} "
                      f"pass@8 {r['pass@8']:.3f} (mean length {r['mean_length']:.0f} tokens, "
                      f"{r['seconds']:.1f}s); greedy {g['avg@1']:.3f}; guesses {r['guess_rate']:.2f} of samples "
                      f"(accuracy {r['guess_accuracy']:.3f}; worked {r['worked_accuracy']:.3f})")
                print("  by kind (avg@1):", " ".join(f"{k} {v:.2f}" for k, v in r["by_kind"].items()))
                print("  sample:", repr(r["sample_text"]))
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):  # both families
            shutil.copy(work / name, out / name)
    print(f"wrote {out} in {time.perf_counter() - t0:.0f}s")
    for template, (r, g) in results.items():
        print(f"heldout[{template}] n={len(heldout)} avg@1={r['avg@1']:.3f} pass@8={r['pass@8']:.3f} "
              f"greedy={g['avg@1']:.3f}")


if __name__ == "__main__":
    main()
