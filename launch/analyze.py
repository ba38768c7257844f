"""Spectral analysis of a run's weight update: per-layer JSON, summary.md and PNG plots in --out.

  python launch/analyze.py --run=runs/dora [--step=N] [--out=DIR]     (a workdir of launch/train.py)
  python launch/analyze.py --checkpoint=BASE_HF_DIR --adapter=HF_PEFT_ADAPTER_DIR --out=DIR
  python launch/analyze.py --checkpoint=BASE_HF_DIR --merged=MERGED_HF_DIR --out=DIR   (e.g. full fine-tuning)
  python launch/analyze.py ... --svd=randomized --modules=q_proj,v_proj --k=16

The update of every adapted linear is measured against the base checkpoint's (original) weights, one
matrix at a time; PiSSA/MiLoRA adapters are exported relative to the original weights, so they need
nothing special here. With --run, the base checkpoint and the method come from WORKDIR/config.json, the
adapter from the checkpoint of --step (default: the latest) and, for PiSSA/MiLoRA, the residual base
from the run's own adapter initialisation (same seed and key); --out defaults to WORKDIR/spectral-<step>.
--backend=auto runs the SVDs on the accelerator when there is one.
"""

import sys
import time
from pathlib import Path

import jax
from absl import app, flags

from jaxrl_peft.analysis import report, spectral
from jaxrl_peft.models import hf
from jaxrl_peft.models import hf_peft
from jaxrl_peft.peft.base import ALL_LINEAR, PeftMethod
from jaxrl_peft.train import rerun

_RUN = flags.DEFINE_string("run", None, "a training workdir (config.json + ckpt/): analyse its adapter")
_STEP = flags.DEFINE_integer("step", None, "with --run: the checkpoint step (default: the latest)")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "base HF checkpoint directory (the original weights)")
_ADAPTER = flags.DEFINE_string("adapter", None, "HF PEFT adapter directory trained on --checkpoint")
_MERGED = flags.DEFINE_string("merged", None, "HF checkpoint with the trained weights (instead of --adapter)")
_OUT = flags.DEFINE_string("out", None, "output directory")
_K = flags.DEFINE_integer("k", 16, "top-k singular directions for principal angles and spectral drift")
_SVD = flags.DEFINE_enum("svd", "full", ["full", "randomized"], "SVDs of w1 and ΔK: exact or randomized")
_DW_RANK = flags.DEFINE_integer("dw_rank", 256, "singular values of ΔK kept with --svd=randomized")
_BACKEND = flags.DEFINE_enum("backend", "auto", ["auto", "numpy", "jax"],
                             "numpy: float64 on the host; jax: the default device; auto: jax on GPU/TPU")
_MODULES = flags.DEFINE_list("modules", [], "module-name patterns to analyse (default: every adapted linear; "
                             "with --merged the seven decoder projections)")
_DTYPE = flags.DEFINE_string("dtype", "float32", "dtype the checkpoints are loaded in")
_PLOTS = flags.DEFINE_bool("plots", True, "write the PNG plots (needs matplotlib)")


def main(argv) -> None:
    del argv
    if _RUN.value:
        if _ADAPTER.value or _MERGED.value or _CHECKPOINT.value:
            raise app.UsageError("--run takes the checkpoint and the adapter from the run; drop "
                                 "--checkpoint/--adapter/--merged")
    elif not _CHECKPOINT.value or bool(_ADAPTER.value) == bool(_MERGED.value):
        raise app.UsageError("give --run=WORKDIR, or --checkpoint and exactly one of --adapter and --merged")
    if not _RUN.value and not _OUT.value:
        raise app.UsageError("--out is required (with --run it defaults to WORKDIR/spectral-<step>)")
    backend = _BACKEND.value
    if backend == "auto":
        backend = "numpy" if jax.default_backend() == "cpu" else "jax"
    patterns = tuple(_MODULES.value) or (() if _ADAPTER.value or _RUN.value else ALL_LINEAR)
    selector = PeftMethod(target_modules=patterns)
    include = (lambda path: selector.targets(path, "linear")) if patterns else None
    options = dict(k=_K.value, method=_SVD.value, dw_rank=_DW_RANK.value, backend=backend)
    start = time.time()

    def progress(record: dict) -> None:
        print(f"[{time.time() - start:7.1f} s] {record['name']}  ‖ΔK‖/‖W0‖={record['dw_rel_norm']:.3g}  "
              f"eff.rank={record['dw_effective_rank']:.1f}", flush=True)

    out = _OUT.value
    try:
        if _RUN.value:
            method, params, adapter, source = rerun.load_run_adapter(Path(_RUN.value), _STEP.value, _DTYPE.value)
            out = out or str(Path(_RUN.value) / f"spectral-{source['step']}")
            records = spectral.analyze_run(method, params, adapter, include=include, on_record=progress, **options)
        elif _ADAPTER.value:
            model, params = hf.load(_CHECKPOINT.value, dtype=_DTYPE.value)
            method, params, adapter = hf_peft.load_adapter(_ADAPTER.value, model.cfg, params)
            records = spectral.analyze_run(method, params, adapter, include=include, on_record=progress, **options)
            source = {"adapter": _ADAPTER.value, "peft_method": method.name}
        else:
            _, params = hf.load(_CHECKPOINT.value, dtype=_DTYPE.value)
            _, trained = hf.load(_MERGED.value, dtype=_DTYPE.value)
            records = []
            for record in spectral.analyze_pairs(spectral.kernel_pairs(params, trained, include), **options):
                progress(record)
                records.append(record)
            source = {"merged": _MERGED.value}
    except (hf.CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if not records:
        print("error: no adapted linear module matched", file=sys.stderr)
        sys.exit(2)
    meta = {"checkpoint": _CHECKPOINT.value, **source, "k": _K.value, "svd": _SVD.value, "backend": backend,
            "modules": list(patterns) or "all adapted"}
    if _SVD.value == "randomized":
        meta["dw_rank"] = _DW_RANK.value
    try:
        written = report.write_report(records, out, meta, plots=_PLOTS.value)
    except ImportError as e:
        print(f"error: {e} (or pass --noplots)", file=sys.stderr)
        sys.exit(2)
    print(f"{len(records)} matrices in {time.time() - start:.0f} s; wrote {len(written)} files to {out}")


if __name__ == "__main__":
    app.run(main)
