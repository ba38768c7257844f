"""avg@k / pass@k on math benchmarks: prints a markdown table, writes per-problem results as JSON.

  python launch/eval.py --config=configs/eval_math.py:tiny --checkpoint=assets/tiny-r1
  python launch/eval.py --config=configs/eval_math.py --checkpoint=PATH --workdir=runs/eval_base
  python launch/eval.py --config=configs/eval_math.py --checkpoint=BASE --adapter=ADAPTER_DIR --config.limit=50

Every host of a pod (or every process of a cluster) runs the same command with --multihost: each samples its
share of every batch on a mesh over all devices, and the first process prints the table and writes the JSON.

  python launch/eval.py --config=configs/eval_math.py --checkpoint=PATH --multihost      # on every host
  python launch/eval.py ... --multihost --coordinator=HOST0:1234 --num_processes=2 --process_id=0   # by hand

--checkpoint is an HF directory (a base or merged model); --adapter an HF PEFT adapter directory.
Results go to WORKDIR/eval_results.json (default workdir: runs/eval); nothing is written to the
current directory. --output=FILE names the JSON file instead ('' : none).

A ModRWKV model on a multimodal benchmark (rwkv_jax/mm_eval.py: the prompts, the answers, the scores of
jaxrl_peft/eval/mm_scorers.py; prints the table, writes per-item JSON; one process):

  python launch/eval.py --modrwkv=DIR --benchmark=vqav2 --questions=v2_OpenEnded_mscoco_val2014_questions.json \
      --annotations=v2_mscoco_val2014_annotations.json --images=val2014 --workdir=runs/eval_vqav2
  python launch/eval.py --modrwkv=DIR --benchmark=gqa --questions=testdev_balanced_questions.json --images=gqa/images
  python launch/eval.py --modrwkv=DIR --benchmark=textvqa --questions=TextVQA_0.5.1_val.json --images=train_images
  python launch/eval.py --modrwkv=DIR --benchmark=pope --questions=coco_pope_random.jsonl --images=val2014
  python launch/eval.py --modrwkv=DIR --benchmark=scienceqa --questions=problems.json --images=scienceqa/images/test
  python launch/eval.py --modrwkv=DIR --benchmark=librispeech --transcripts=LibriSpeech/test-clean

DIR is a directory written by rwkv_jax.modrwkv.save, or a reference checkpoint file with --encoder=HF_DIR.
Options: --limit=N (the first N questions), --batch_size=16, --max_new_tokens (128; librispeech 256),
--dtype=bfloat16, --split (ScienceQA, default test), --audio=DIR (LibriSpeech audio root, default beside
each transcript file), --instruction=TEXT (an ASR user turn, for models trained with one). A missing file
or flag prints `error: ...` and exits with status 2.
"""

import os
import sys

import jax
from absl import app, flags
from etils import epath
from ml_collections import config_flags

from jaxrl_peft.eval import math_eval
from rwkv_jax import mm_eval

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/eval_math.py[:tiny]", lock_config=True)
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "HF checkpoint directory (default: config.checkpoint)")
_ADAPTER = flags.DEFINE_string("adapter", None, "HF PEFT adapter directory (default: config.adapter)")
_WORKDIR = flags.DEFINE_string("workdir", "runs/eval", "directory for eval_results.json and the resolved config")
_OUTPUT = flags.DEFINE_string("output", None, "JSON file for the per-problem results (default: "
                              "WORKDIR/eval_results.json; '' : none)")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "call jax.distributed.initialize() (every host runs this command)")
_COORDINATOR = flags.DEFINE_string("coordinator", None, "with --multihost: HOST:PORT of process 0 (default: "
                                   "detected, as on TPU pods and SLURM)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "with --multihost: number of processes (default: detected)")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "with --multihost: this process's index (default: detected)")

_MODRWKV = flags.DEFINE_string("modrwkv", None, "ModRWKV directory (or a reference checkpoint file with --encoder): "
                               "evaluate it on --benchmark instead of the math evaluation")
_ENCODER = flags.DEFINE_string("encoder", None, "with --modrwkv=FILE: the HF directory of its encoder")
_BENCHMARK = flags.DEFINE_string("benchmark", None, f"with --modrwkv: one of {', '.join(mm_eval.BENCHMARKS)}")
_SOURCES = {
    "questions": flags.DEFINE_string("questions", None, "VQAv2 questions, TextVQA or GQA questions JSON, POPE JSONL, "
                                     "ScienceQA problems.json"),
    "annotations": flags.DEFINE_string("annotations", None, "VQAv2 annotations JSON"),
    "images": flags.DEFINE_string("images", None, "the benchmark's image folder"),
    "transcripts": flags.DEFINE_string("transcripts", None, "LibriSpeech *.trans.txt file or a folder of them"),
    "audio": flags.DEFINE_string("audio", None, "LibriSpeech audio root (default: beside each transcript file)"),
    "split": flags.DEFINE_string("split", None, "ScienceQA split (default: test)"),
    "instruction": flags.DEFINE_string("instruction", None, "LibriSpeech: the user turn the model was trained with "
                                       "(default: none in the paper layout, as the reference)"),
}
_LIMIT = flags.DEFINE_integer("limit", 0, "with --modrwkv: evaluate the first N questions (0: all)")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "with --modrwkv: questions per generation batch")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", None, "with --modrwkv: answer length limit "
                                       "(default: 128; librispeech 256)")
_DTYPE = flags.DEFINE_string("dtype", "float32", "with --modrwkv: parameter and compute dtype")
MODRWKV_FLAGS = ("encoder", "benchmark", *_SOURCES, "limit", "batch_size", "max_new_tokens", "dtype")
MATH_FLAGS = ("config", "checkpoint", "adapter", "multihost", "coordinator", "num_processes", "process_id")


def _output() -> str:
    """--output, or WORKDIR/eval_results.json."""
    if _OUTPUT.value is not None:
        return _OUTPUT.value
    return os.fspath(epath.Path(_WORKDIR.value) / "eval_results.json")


def benchmark_main() -> int:
    """--modrwkv: one ModRWKV model on one multimodal benchmark; `error: ...` and 2 for bad input."""
    try:
        math_only = [name for name in MATH_FLAGS if flags.FLAGS[name].present]
        if math_only:
            raise mm_eval.InputError(f"--{math_only[0]} belongs to the math evaluation, not to --modrwkv")
        if not _BENCHMARK.value:
            raise mm_eval.InputError(f"--modrwkv needs --benchmark (one of {', '.join(mm_eval.BENCHMARKS)})")
        sources = mm_eval.Sources(**{name: flag.value for name, flag in _SOURCES.items()})
        output = _output()
        results = mm_eval.run(_MODRWKV.value, _BENCHMARK.value, sources, output, encoder=_ENCODER.value,
                              limit=_LIMIT.value, batch_size=_BATCH_SIZE.value,
                              max_new_tokens=_MAX_NEW_TOKENS.value, dtype=_DTYPE.value)
    except mm_eval.InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(results.table())
    if output:
        print(f"\nper-item results: {output}  ({len(results.items)} questions in {results.seconds:.0f} s)")
    return 0


def main(argv) -> None:
    del argv
    if _MODRWKV.value is not None:
        sys.exit(benchmark_main())
    modrwkv_only = [name for name in MODRWKV_FLAGS if flags.FLAGS[name].present]
    if modrwkv_only:
        raise app.UsageError(f"--{modrwkv_only[0]} needs --modrwkv (a multimodal benchmark evaluation)")
    c = _CONFIG.value
    if c is None:
        raise app.UsageError("--config=configs/eval_math.py[:tiny] is required")
    if _MULTIHOST.value:
        if os.environ.get("JAX_PLATFORMS") == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes gather over gloo
        jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    elif _COORDINATOR.value or _NUM_PROCESSES.value or _PROCESS_ID.value is not None:
        raise app.UsageError("--coordinator, --num_processes and --process_id need --multihost")

    output = _output()
    try:
        results = math_eval.run(c, _CHECKPOINT.value, _ADAPTER.value, output)
    except math_eval.InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if jax.process_index() != 0:  # every process holds the same results; the first one reports them
        return
    print(results.table())
    if output:
        print(f"\nper-problem results: {output}  ({results.generated_tokens:,} tokens generated in "
              f"{results.seconds:.0f} s)")


if __name__ == "__main__":
    app.run(main)
