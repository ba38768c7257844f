"""Issue 16's GPU measurements in one run: every part prints one JSON line and appends it to
OUT/results.jsonl; a final `summary` line sets every criterion beside its target and anchor.

    python3 launch/gpu_check.py --out=$OUT [--anchors=../shared/bench/gpu_anchors.py]
        [--budget_s=450] [--parts=rollout,fla_h64,...] [--tiny]
    python3 launch/gpu_check.py --summarize=run1/results.jsonl,run2/results.jsonl   # no GPU

Order: the two open criteria first ((a) the PEFT train step at the 1.5B shape, LoRA then DoRA,
through `launch/bench.py train`; (b) WKV7 forward and forward+backward at B 8, T 4096, H 32, K 64
and the launch-parameter sweep), then the anchors (`gpu_anchors.py`: bf16 matmul TFLOP/s, fla's
chunk_rwkv7, transformers + peft training, transformers `generate`), then the moonshots (WKV7 and
fla at H 64, rollout, memory without remat, train-step MFU). Each part runs in its own process
group under its own timeout, capped by what is left of --budget_s, so a failure or a hang loses
that part only; parts the budget cut are listed at the end with the --parts= line that reruns them.
This process never imports JAX (the parts need the whole GPU). XLA autotuning is off (compile time).
`--tiny`: every part at toy sizes, a CPU check of this script.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from typing import Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 2 ** 30
ANCHOR_PARTS = ('env', 'jax', 'fla', 'train', 'gen')
# Targets of issue 16 (the H100 figures the issue quotes are fallbacks where no anchor ran).
LORA_TOKENS_PER_S_MIN = 40_000
LORA_PEAK_GIB_MAX = 35.0
DORA_OVER_LORA_MAX = 1.15
FLA_FWD_BWD_MS_H100 = 14.72
WKV7_H64_OVER_FLA_MAX = 0.3
ROLLOUT_OVER_HF_MIN = 15.0
MFU_MIN = 0.55
TRAIN_OVER_HF_MIN = 1.9

# Worker snippets, run as `python -c SNIPPET ARGS_JSON` so that this process stays free of JAX
# and of the code the lead is moving; each prints `RESULT {json}` (the sweep also `ROW {json}`).
WKV7_SNIPPET = '''
import json, sys
from rwkv_jax.kernels.wkv7 import benchmark
a = json.loads(sys.argv[1])
impl = benchmark.default_impl()
res = benchmark.run(a['B'], a['T'], a['H'], a['K'], impl=impl, iters=a['iters'], compare=False)
res |= {'impl': impl} | {key: res.get(f'{impl}_{key}') for key in ('fwd_ms', 'fwd_bwd_ms')}
print('RESULT ' + json.dumps(res), flush=True)
'''
SWEEP_SNIPPET = '''
import json, sys
from rwkv_jax.kernels.wkv7 import benchmark
a = json.loads(sys.argv[1])
settings = [benchmark.SWEEP[i] for i in a['settings'] or range(len(benchmark.SWEEP))]
rows = benchmark.sweep(a['B'], a['T'], a['H'], a['K'], iters=a['iters'], settings=settings,
                       impl=a['impl'], interpret=a['interpret'],
                       on_result=lambda row: print('ROW ' + json.dumps(row), flush=True))
print('RESULT ' + json.dumps({'best': rows[0] if rows else None}), flush=True)
'''
PARAMS_SNIPPET = '''
import json, sys
from jaxrl_peft.models import transformer as tfm
cfg = tfm.preset(json.loads(sys.argv[1])['model'])
print('RESULT ' + json.dumps({'params': cfg.num_params, 'layers': cfg.num_layers,
                              'width': cfg.hidden_size}), flush=True)
'''
# fla's chunk_rwkv7 at any shape, inputs as gpu_anchors.py makes them (it times H 32 only).
FLA_SNIPPET = '''
import json, sys, time
import torch
a = json.loads(sys.argv[1])
if not torch.cuda.is_available():
    print('RESULT ' + json.dumps({'skipped': 'needs CUDA'})); sys.exit()
try:
    from fla.ops.rwkv7 import chunk_rwkv7
except ImportError as e:
    print('RESULT ' + json.dumps({'skipped': f'fla missing: {e}'})); sys.exit()
B, T, H, K, n = a['B'], a['T'], a['H'], a['K'], a['iters']
torch.manual_seed(0)
dt = torch.bfloat16
shape = (B, T, H, K)
norm = torch.nn.functional.normalize
r, v = (torch.randn(shape, device='cuda', dtype=dt) for _ in range(2))
k = norm(torch.randn(shape, device='cuda'), dim=-1).to(dt)
w = -torch.exp(-0.5 - torch.rand(shape, device='cuda')).to(dt)
kk = norm(torch.randn(shape, device='cuda'), dim=-1)
iclr = torch.sigmoid(torch.randn(shape, device='cuda'))
xs = [x.requires_grad_() for x in (r, w, k, v, (-kk).to(dt), (kk * iclr).to(dt))]
fwd = lambda: chunk_rwkv7(*xs, scale=1.0, output_final_state=True)[0]
def timed(fn):
    for _ in range(3):
        fn()
    torch.cuda.synchronize(); t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e3
fwd_ms = timed(fwd)
g = torch.randn_like(fwd())
fwd_bwd_ms = timed(lambda: fwd().backward(g))
print('RESULT ' + json.dumps({'fwd_ms': fwd_ms, 'fwd_bwd_ms': fwd_bwd_ms,
                              'gpu': torch.cuda.get_device_name(0)}), flush=True)
'''


@dataclasses.dataclass
class Context:
    """What the parts share: flags, the records so far (by part), the log file, the deadline."""

    args: argparse.Namespace
    records: dict
    log_path: str
    deadline: float

    @property
    def tiny(self) -> bool:
        return self.args.tiny


@dataclasses.dataclass
class CmdResult:
    rc: int | None  # None: killed at its timeout
    output: str
    seconds: float


class Skip(Exception):
    """A part that cannot run here (no CUDA, a missing package, an earlier part it needs)."""


def child_env(tiny: bool) -> dict:
    """Environment of every part: the repo importable, output unbuffered, XLA autotuning off."""
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    env['PYTHONPATH'] = os.pathsep.join([REPO] + [p for p in [env.get('PYTHONPATH')] if p])
    if not tiny:
        env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') + ' --xla_gpu_autotune_level=0').strip()
    return env


def run_cmd(ctx: Context, cmd: list[str], timeout_s: float, env_extra: dict | None = None
            ) -> CmdResult:
    """Runs cmd in its own process group; on timeout kills that group and keeps the output."""
    env = child_env(ctx.tiny) | (env_extra or {})
    start = time.perf_counter()
    with tempfile.TemporaryFile('w+') as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, text=True)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
        out.seek(0)
        output = out.read()
    with open(ctx.log_path, 'a') as log:
        log.write(f'$ {" ".join(cmd[:3])} ... (rc {rc})\n{output}\n')
    return CmdResult(rc, output, time.perf_counter() - start)


def json_lines(text: str, prefix: str = '') -> list[dict]:
    """The JSON objects printed one per line (after `prefix`) in a command's output."""
    found = []
    for line in text.splitlines():
        if not line.startswith(prefix):
            continue
        try:
            obj = json.loads(line[len(prefix):])
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            found.append(obj)
    return found


def run_snippet(ctx: Context, snippet: str, args: dict, timeout_s: float) -> tuple[dict, CmdResult]:
    """A worker snippet's RESULT record (raises with the output's tail where none came)."""
    res = run_cmd(ctx, [sys.executable, '-c', snippet, json.dumps(args)], timeout_s)
    results = json_lines(res.output, 'RESULT ')
    if not results:
        raise RuntimeError(failure(res))
    if 'skipped' in results[-1]:
        raise Skip(results[-1]['skipped'])
    return results[-1], res


def failure(res: CmdResult) -> str:
    how = 'timed out' if res.rc is None else f'exit code {res.rc}'
    return f'{how} after {res.seconds:.0f} s: ' + ' | '.join(res.output.strip().splitlines()[-6:])


def _number(text: str) -> float:
    return float(text.replace(',', ''))


def parse_train(text: str, batch: int, seq: int) -> dict:
    """tokens/s, step ms, peak GiB and compile seconds from `launch/bench.py train` output."""
    rec = {}
    for obj in json_lines(text):  # a JSON line, if the benchmark prints one, wins
        rec.update(obj)
    if 'tokens_per_s' not in rec:
        m = re.search(r'([\d,]+(?:\.\d+)?) tokens/s', text)
        if not m:
            raise ValueError('no "N tokens/s" in the train benchmark output')
        rec['tokens_per_s'] = _number(m.group(1))
    m = re.search(r'compiled in ([\d.]+) s', text)
    if m and 'compile_s' not in rec:
        rec['compile_s'] = float(m.group(1))
    m = re.search(r'peak memory ([\d.]+) (GiB|GB)', text)
    if m and 'peak_gib' not in rec:
        rec['peak_gib'] = float(m.group(1)) * (1 if m.group(2) == 'GiB' else 1e9 / GIB)
    elif 'peak_gib' not in rec and rec.get('peak_memory_gb') is not None:
        rec['peak_gib'] = rec['peak_memory_gb'] * 1e9 / GIB
    m = re.search(r' on (\S[^\n]*?): [\d,.]+ tokens/s', text)
    if m:
        rec.setdefault('device', m.group(1))
    rec['step_ms'] = 1e3 * batch * seq / rec['tokens_per_s']
    return rec


def train_part(method: str, remat: bool) -> Callable[[Context, float], dict]:
    """A part running `launch/bench.py train` (the CLI: the lead moves the code behind it)."""
    def part(ctx: Context, timeout_s: float) -> dict:
        if ctx.tiny:
            shape = {'model': 'tiny', 'batch': 2, 'seq': 32, 'r': 4, 'iters': 1}
        else:
            shape = {'model': 'r1-distill-qwen-1.5b', 'batch': 4, 'seq': 2048, 'r': 32, 'iters': 3}
        cmd = [sys.executable, 'launch/bench.py', 'train', f'--method={method}',
               f"--model={shape['model']}", f"--batch={shape['batch']}", f"--seq={shape['seq']}",
               f"--r={shape['r']}", '--alpha=64', '--dtype=bfloat16', f'--remat={int(remat)}',
               f"--iters={shape['iters']}"]
        res = run_cmd(ctx, cmd, timeout_s)
        if res.rc != 0:
            raise RuntimeError(failure(res))
        rec = shape | {'method': method, 'remat': remat}
        return rec | parse_train(res.output, shape['batch'], shape['seq'])
    return part


def part_env(ctx: Context, timeout_s: float) -> dict:
    """The card (nvidia-smi), the interpreter and the flags the parts run with."""
    rec = {'python': sys.version.split()[0], 'xla_flags': child_env(ctx.tiny).get('XLA_FLAGS')}
    try:
        smi = subprocess.run(['nvidia-smi', '--query-gpu=name,memory.total,driver_version',
                              '--format=csv,noheader'], capture_output=True, text=True,
                             timeout=timeout_s)
        rec['gpu'] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        rec['gpu'] = f'no nvidia-smi: {type(e).__name__}'
    return rec


def wkv7_shape(ctx: Context, heads: int) -> dict:
    return ({'B': 1, 'T': 32, 'H': 2, 'K': 16, 'iters': 2} if ctx.tiny
            else {'B': 8, 'T': 4096, 'H': heads, 'K': 64, 'iters': 10})


def wkv7_part(heads: int) -> Callable[[Context, float], dict]:
    """Our WKV7 (the backend's default implementation) forward and forward+backward."""
    def part(ctx: Context, timeout_s: float) -> dict:
        shape = wkv7_shape(ctx, heads)
        rec, _ = run_snippet(ctx, WKV7_SNIPPET, shape, timeout_s)
        return shape | rec
    return part


def fla_part(heads: int) -> Callable[[Context, float], dict]:
    """fla's chunk_rwkv7 forward and forward+backward at our shape (CUDA and fla only)."""
    def part(ctx: Context, timeout_s: float) -> dict:
        shape = wkv7_shape(ctx, heads)
        rec, _ = run_snippet(ctx, FLA_SNIPPET, shape, timeout_s)
        return shape | rec
    return part


def part_wkv7_sweep(ctx: Context, timeout_s: float) -> dict:
    """pallas_gpu over `benchmark.SWEEP` (tiny: one setting of each backward design, interpret
    mode); the rows measured before a timeout are kept."""
    shape = wkv7_shape(ctx, 32) | {'iters': 2 if ctx.tiny else 5}
    args = shape | {'impl': 'pallas_gpu', 'interpret': ctx.tiny,
                    'settings': [0, 4] if ctx.tiny else None}
    res = run_cmd(ctx, [sys.executable, '-c', SWEEP_SNIPPET, json.dumps(args)], timeout_s)
    rows = json_lines(res.output, 'ROW ')
    if not rows:
        raise RuntimeError(failure(res))
    good = sorted((r for r in rows if 'error' not in r), key=lambda r: r['fwd_bwd_ms'])
    return shape | {'rows': rows, 'best': good[0] if good else None,
                    'complete': res.rc == 0}


def anchor_part(name: str) -> Callable[[Context, float], dict]:
    """One part of gpu_anchors.py; its JSON lines (also in OUT/anchors.jsonl) as `records`."""
    def part(ctx: Context, timeout_s: float) -> dict:
        path = os.path.abspath(ctx.args.anchors)
        if not os.path.exists(path):
            raise Skip(f'no anchor script at {path} (--anchors)')
        env = {'OUT': os.path.abspath(ctx.args.out), 'METHODS': ctx.args.anchor_methods}
        res = run_cmd(ctx, [sys.executable, path, name], timeout_s, env)
        records = json_lines(res.output)
        if not records:
            raise RuntimeError(failure(res))
        errors = [r['error'] for r in records if 'error' in r]
        return {'records': records} | ({'error': errors[0][:500]} if errors else {})
    return part


def part_rollout(ctx: Context, timeout_s: float) -> dict:
    """`launch/bench.py rollout`: generated tokens/s at batch 256, prompt 256, 512 new tokens."""
    shape = ({'model': 'tiny', 'batch': 2, 'prompt_len': 8, 'new_tokens': 4} if ctx.tiny else
             {'model': 'r1-distill-qwen-1.5b', 'batch': 256, 'prompt_len': 256,
              'new_tokens': 512})
    cmd = [sys.executable, 'launch/bench.py', 'rollout', '--iters=1'] + [
        f'--{k}={v}' for k, v in shape.items()]
    res = run_cmd(ctx, cmd, timeout_s)
    m = re.search(r'([\d,]+(?:\.\d+)?) generated tokens/s', res.output)
    if res.rc != 0 or not m:
        raise RuntimeError(failure(res))
    line = res.output[res.output.rfind('\n', 0, m.start()) + 1:m.end()]
    return shape | {'generated_tokens_per_s': _number(m.group(1)), 'line': line}


def part_params(ctx: Context, timeout_s: float) -> dict:
    """Parameter count, layers and width of the train benchmark's model (for the MFU)."""
    model = 'tiny' if ctx.tiny else 'r1-distill-qwen-1.5b'
    rec, _ = run_snippet(ctx, PARAMS_SNIPPET, {'model': model}, timeout_s)
    return {'model': model} | rec


def anchor_record(records: dict, anchor: str, part: str, **match) -> dict | None:
    """The last line of anchor part `anchor` whose 'part' is `part` (and fields equal `match`)."""
    lines = (records.get(f'anchor_{anchor}') or {}).get('records', [])
    found = [r for r in lines if r.get('part') == part and 'error' not in r
             and all(r.get(k) == v for k, v in match.items())]
    return found[-1] if found else None


def _get(records: dict, part: str, key: str):
    rec = records.get(part) or {}
    return None if 'error' in rec or 'skipped' in rec else rec.get(key)


def _ratio(x, y):
    return None if x is None or not y else x / y


def _criterion(ours, target, at_most: bool, **extra) -> dict:
    met = None if ours is None else (ours <= target if at_most else ours >= target)
    return {'ours': ours, ('max' if at_most else 'min'): target, 'met': met} | extra


def part_mfu(ctx: Context, timeout_s: float) -> dict:
    """Train-step model FLOPs utilisation: (6 P + 12 L d s) FLOPs/token x tokens/s over the
    anchor's bf16 matmul TFLOP/s; and our tokens/s over transformers + peft's."""
    del timeout_s
    records = ctx.records
    params = records.get('params') or {}
    if 'params' not in params:
        raise Skip('needs the params part')
    seq = (records.get('train_lora') or {}).get('seq', 32 if ctx.tiny else 2048)
    flops_per_token = 6 * params['params'] + 12 * params['layers'] * params['width'] * seq
    jax_anchor = anchor_record(records, 'jax', 'jax')
    tflops = jax_anchor and jax_anchor.get('bf16_matmul_tflops')
    rec = {'flops_per_token': flops_per_token, 'matmul_tflops': tflops, 'seq': seq}
    for name in ('train_lora', 'train_dora', 'train_lora_noremat'):
        tokens = _get(records, name, 'tokens_per_s')
        rec[f'mfu_{name[6:]}'] = _ratio(None if tokens is None else tokens * flops_per_token,
                                        tflops and tflops * 1e12)
    return rec


def part_summary(ctx: Context, timeout_s: float) -> dict:
    """Every criterion of issue 16: ours, the target, the anchor where there is one, met."""
    del timeout_s
    return summarize(ctx.records)


def summarize(records: dict) -> dict:
    """The criteria from the records of one or more runs (latest record of each part wins)."""
    lora_tok = _get(records, 'train_lora', 'tokens_per_s')
    lora_ms = _get(records, 'train_lora', 'step_ms')
    dora_ms = _get(records, 'train_dora', 'step_ms')
    fla = anchor_record(records, 'fla', 'fla_chunk_rwkv7')
    fla_ms = fla['fwd_bwd_ms'] if fla else None
    wkv7_ms = _get(records, 'wkv7', 'fwd_bwd_ms')
    best = (records.get('wkv7_sweep') or {}).get('best') or {}
    h64_ms = _get(records, 'wkv7_h64', 'fwd_bwd_ms')
    fla64_ms = _get(records, 'fla_h64', 'fwd_bwd_ms')
    hf_gen = anchor_record(records, 'gen', 'hf_generate', batch=256)
    hf_train = anchor_record(records, 'train', 'hf_peft_train_step', method='lora')
    gen_tok = _get(records, 'rollout', 'generated_tokens_per_s')
    env = records.get('env') or {}
    hf_tok = hf_train and hf_train.get('tokens_per_s')
    return {
        'gpu': env.get('gpu'),
        'lora_tokens_per_s': _criterion(lora_tok, LORA_TOKENS_PER_S_MIN, False),
        'lora_peak_gib': _criterion(_get(records, 'train_lora', 'peak_gib'), LORA_PEAK_GIB_MAX,
                                    True),
        'dora_over_lora_step': _criterion(_ratio(dora_ms, lora_ms), DORA_OVER_LORA_MAX, True,
                                          dora_step_ms=dora_ms, lora_step_ms=lora_ms),
        'wkv7_fwd_bwd_ms': _criterion(wkv7_ms, fla_ms or FLA_FWD_BWD_MS_H100, True,
                                      fwd_ms=_get(records, 'wkv7', 'fwd_ms'),
                                      impl=_get(records, 'wkv7', 'impl'),
                                      anchor='fla same card' if fla_ms else 'fla H100 (issue)',
                                      best_sweep_fwd_bwd_ms=best.get('fwd_bwd_ms'),
                                      best_sweep_setting={k: v for k, v in best.items()
                                                          if not k.endswith(('_ms', '_s'))}),
        'wkv7_h64_over_fla': _criterion(_ratio(h64_ms, fla64_ms), WKV7_H64_OVER_FLA_MAX, True,
                                        ours_ms=h64_ms, fla_ms=fla64_ms),
        'rollout_over_hf_generate': _criterion(
            _ratio(gen_tok, hf_gen and hf_gen.get('gen_tokens_per_s')), ROLLOUT_OVER_HF_MIN,
            False, ours_tokens_per_s=gen_tok,
            hf_tokens_per_s=hf_gen and hf_gen.get('gen_tokens_per_s')),
        'train_mfu': _criterion(_get(records, 'mfu', 'mfu_lora'), MFU_MIN, False,
                                matmul_tflops=_get(records, 'mfu', 'matmul_tflops')),
        'train_over_hf_peft': _criterion(_ratio(lora_tok, hf_tok), TRAIN_OVER_HF_MIN, False,
                                         hf_tokens_per_s=hf_tok),
        'memory_gib': {'lora_remat': _get(records, 'train_lora', 'peak_gib'),
                       'lora_no_remat': _get(records, 'train_lora_noremat', 'peak_gib'),
                       'hf_peft_no_checkpointing': hf_train and hf_train.get('mem_gb')},
    }


# (name, timeout seconds on the GPU or None for a part that only computes, part), in run order.
PARTS = (
    ('env', 20, part_env),
    ('train_lora', 170, train_part('lora', remat=True)),
    ('train_dora', 170, train_part('dora', remat=True)),
    ('wkv7', 90, wkv7_part(32)),
    ('wkv7_sweep', 150, part_wkv7_sweep),
    ('anchor_env', 40, anchor_part('env')),
    ('anchor_jax', 60, anchor_part('jax')),
    ('anchor_fla', 90, anchor_part('fla')),
    ('anchor_train', 120, anchor_part('train')),
    ('anchor_gen', 150, anchor_part('gen')),
    ('wkv7_h64', 60, wkv7_part(64)),
    ('fla_h64', 60, fla_part(64)),
    ('rollout', 150, part_rollout),
    ('train_lora_noremat', 170, train_part('lora', remat=False)),
    ('params', 40, part_params),
    ('mfu', None, part_mfu),
    ('summary', None, part_summary),
)
TINY_TIMEOUT_S = 240  # per part, on a busy CPU
MIN_PART_S = 10  # a part that would get less than this is skipped, not started


def emit(ctx: Context, rec: dict) -> None:
    """One JSON line on stdout and in OUT/results.jsonl."""
    line = json.dumps(rec, default=str)
    print(line, flush=True)
    with open(os.path.join(ctx.args.out, 'results.jsonl'), 'a') as f:
        f.write(line + '\n')


def run_parts(ctx: Context, names: list[str]) -> list[str]:
    """Runs the named parts in PARTS order; returns the names the budget cut or that failed."""
    left = []
    for name, timeout_s, part in PARTS:
        if name not in names:
            continue
        budget_left = ctx.deadline - time.monotonic()
        limit = min(TINY_TIMEOUT_S if ctx.tiny else timeout_s or 0, budget_left)
        start = time.perf_counter()
        if timeout_s is not None and limit < MIN_PART_S:
            rec = {'skipped': f'budget: {budget_left:.0f} s left of --budget_s'}
        else:
            try:
                rec = part(ctx, limit)
            except Skip as e:
                rec = {'skipped': str(e)}
            except Exception as e:  # noqa: BLE001 - one part's failure must not lose the rest
                rec = {'error': f'{type(e).__name__}: {str(e)[:1500]}'}
        rec = {'part': name, 'seconds': round(time.perf_counter() - start, 1)} | rec
        ctx.records[name] = rec
        if 'error' in rec or str(rec.get('skipped', '')).startswith('budget'):
            left.append(name)
        emit(ctx, rec)
    return left


def load_records(paths: list[str]) -> dict:
    """Records by part from results.jsonl files, later lines winning."""
    records = {}
    for path in paths:
        for rec in json_lines(open(path).read()):
            if 'part' in rec and 'skipped' not in rec:
                records[rec['part']] = rec
    return records


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', default=os.environ.get('OUT', '.'),
                        help='folder for results.jsonl, anchors.jsonl, gpu_check.log')
    parser.add_argument('--anchors', default=os.path.join('..', 'shared', 'bench',
                                                          'gpu_anchors.py'),
                        help='path of gpu_anchors.py (relative to the current directory)')
    parser.add_argument('--anchor_methods', default='lora',
                        help='METHODS for the anchor train part: lora, or lora,dora')
    parser.add_argument('--budget_s', type=float, default=450,
                        help='wall-clock budget of the whole run; parts past it are skipped')
    parser.add_argument('--parts', default='', help='comma-separated subset of the parts, in '
                        'their fixed order; default all: ' + ','.join(n for n, _, _ in PARTS))
    parser.add_argument('--tiny', action='store_true', help='toy sizes: a CPU check')
    parser.add_argument('--summarize', default='',
                        help='comma-separated results.jsonl files: print their summary and stop')
    args = parser.parse_args(argv)
    if args.summarize:
        print(json.dumps(summarize(load_records(args.summarize.split(','))), default=str))
        return
    known = [n for n, _, _ in PARTS]
    names = [n for n in args.parts.split(',') if n] or known
    unknown = sorted(set(names) - set(known))
    if unknown:
        parser.error(f'--parts: unknown {unknown}; known: {",".join(known)}')
    os.makedirs(args.out, exist_ok=True)
    ctx = Context(args, {}, os.path.join(args.out, 'gpu_check.log'),
                  time.monotonic() + args.budget_s)
    left = run_parts(ctx, names)
    if left:
        print(f'# not measured (budget or error): rerun with --parts={",".join(left)}', flush=True)


if __name__ == '__main__':
    main()
