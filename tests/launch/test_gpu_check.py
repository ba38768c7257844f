"""launch/gpu_check.py: parsing of the benchmark output, the budget, the summary of several runs,
and (slow) a whole run at toy sizes on CPU with a stand-in anchor script."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from jaxrl_peft.models import transformer as tfm

ROOT = Path(__file__).resolve().parents[2]
TRAIN_OUTPUT = """train bench: model and adapter ready after 31 s; compiling the step
train bench: step compiled in 74 s
train lora r=32 r1-distill-qwen-1.5b bfloat16 batch=4x2048 remat=True attention=auto on gpu:NVIDIA H200: \
40,960 tokens/s (200 ms/step), peak memory 37.6 GB, trainable 18,464,768
"""
# Stand-in for ../shared/bench/gpu_anchors.py: its parts and line formats, fixed numbers.
STUB_ANCHORS = '''
import json, os, sys
LINES = {
    "env": [{"part": "env", "gpu": "stub"}],
    "jax": [{"part": "jax", "bf16_matmul_tflops": 2}],
    "fla": [{"part": "fla_chunk_rwkv7", "fwd_ms": 2.0, "fwd_bwd_ms": 10.0}],
    "train": [{"part": "hf_peft_train_step", "method": "lora", "tokens_per_s": 1000, "mem_gb": 1.5}],
    "gen": [{"part": "hf_generate", "batch": 64, "gen_tokens_per_s": 10},
            {"part": "hf_generate", "batch": 256, "gen_tokens_per_s": 100}],
}
for part in sys.argv[1:]:
    for rec in LINES[part]:
        print(json.dumps(rec))
        with open(os.path.join(os.environ["OUT"], "anchors.jsonl"), "a") as f:
            f.write(json.dumps(rec) + "\\n")
'''


def _script():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "launch" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _lines(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_parse_train_reads_the_benchmark_line():
    rec = _script().parse_train(TRAIN_OUTPUT, batch=4, seq=2048)
    assert rec['tokens_per_s'] == 40960
    assert rec['step_ms'] == pytest.approx(200.0)
    assert rec['compile_s'] == 74
    assert rec['peak_gib'] == pytest.approx(37.6e9 / 2**30)  # the benchmark prints 1e9-byte GB
    assert rec['device'] == 'gpu:NVIDIA H200'
    with pytest.raises(ValueError, match='tokens/s'):
        _script().parse_train('train bench: step compiled in 74 s', batch=4, seq=2048)


def test_no_budget_skips_every_measurement_and_names_the_rerun(tmp_path, capsys):
    gpu_check = _script()
    gpu_check.main([f'--out={tmp_path}', '--budget_s=0', '--anchors=/nonexistent'])
    records = {r['part']: r for r in _lines(tmp_path / 'results.jsonl')}
    assert list(records) == [name for name, _, _ in gpu_check.PARTS]
    measured = [name for name, timeout_s, _ in gpu_check.PARTS if timeout_s is not None]
    for name in measured:
        assert records[name]['skipped'].startswith('budget'), name
    assert records['mfu']['skipped'] == 'needs the params part'
    assert records['summary']['lora_tokens_per_s'] == {'ours': None, 'min': 40000, 'met': None}
    assert f"--parts={','.join(measured)}" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        gpu_check.main([f'--out={tmp_path}', '--parts=train_lora,nope'])


def test_summary_joins_two_runs(tmp_path, capsys):
    run1 = [{'part': 'env', 'gpu': 'NVIDIA H200, 143771 MiB'},
            {'part': 'train_lora', 'tokens_per_s': 45000.0, 'step_ms': 182.0, 'peak_gib': 30.0},
            {'part': 'train_dora', 'tokens_per_s': 37500.0, 'step_ms': 218.4, 'peak_gib': 33.0},
            {'part': 'wkv7', 'fwd_ms': 3.0, 'fwd_bwd_ms': 12.0},
            {'part': 'anchor_fla', 'records': [{'part': 'fla_chunk_rwkv7', 'fwd_bwd_ms': 13.0}]},
            {'part': 'rollout', 'skipped': 'budget: 3 s left of --budget_s'}]
    run2 = [{'part': 'rollout', 'generated_tokens_per_s': 1500.0},
            {'part': 'anchor_gen', 'records': [
                {'part': 'hf_generate', 'batch': 64, 'gen_tokens_per_s': 50},
                {'part': 'hf_generate', 'batch': 256, 'gen_tokens_per_s': 100}]},
            {'part': 'wkv7_h64', 'fwd_bwd_ms': 30.0}, {'part': 'fla_h64', 'fwd_bwd_ms': 60.0}]
    paths = []
    for i, run in enumerate((run1, run2)):
        paths.append(tmp_path / f'run{i}.jsonl')
        paths[-1].write_text(''.join(json.dumps(r) + '\n' for r in run))
    _script().main([f'--summarize={paths[0]},{paths[1]}'])
    summary = json.loads(capsys.readouterr().out)
    assert summary['gpu'] == 'NVIDIA H200, 143771 MiB'
    assert summary['lora_tokens_per_s']['met'] is True
    assert summary['lora_peak_gib']['met'] is True
    assert summary['dora_over_lora_step']['ours'] == pytest.approx(1.2)
    assert summary['dora_over_lora_step']['met'] is False
    wkv7 = summary['wkv7_fwd_bwd_ms']
    assert (wkv7['ours'], wkv7['max'], wkv7['met'], wkv7['fwd_ms']) == (12.0, 13.0, True, 3.0)
    assert wkv7['anchor'] == 'fla same card'
    assert summary['wkv7_h64_over_fla']['ours'] == pytest.approx(0.5)
    assert summary['wkv7_h64_over_fla']['met'] is False
    assert summary['rollout_over_hf_generate']['ours'] == pytest.approx(15.0)  # batch 256's line
    assert summary['rollout_over_hf_generate']['met'] is True
    assert summary['train_mfu']['met'] is None  # no matmul anchor, no parameter count


@pytest.mark.slow
def test_tiny_run_writes_every_part(tmp_path):
    anchors = tmp_path / 'gpu_anchors.py'
    anchors.write_text(STUB_ANCHORS)
    out = tmp_path / 'out'
    gpu_check = _script()
    gpu_check.main(['--tiny', f'--out={out}', f'--anchors={anchors}'])
    records = {r['part']: r for r in _lines(out / 'results.jsonl')}
    assert list(records) == [name for name, _, _ in gpu_check.PARTS]
    for name, rec in records.items():
        assert 'error' not in rec, (name, rec['error'])
        assert 'skipped' not in rec or name == 'fla_h64', (name, rec['skipped'])
    assert [r['part'] for r in _lines(out / 'anchors.jsonl')] == [
        'env', 'jax', 'fla_chunk_rwkv7', 'hf_peft_train_step', 'hf_generate', 'hf_generate']
    for name in ('train_lora', 'train_dora', 'train_lora_noremat'):
        assert records[name]['tokens_per_s'] > 0 and records[name]['compile_s'] >= 0
    assert records['wkv7']['fwd_bwd_ms'] > 0
    assert {r['backward'] for r in records['wkv7_sweep']['rows']} == {'split', 'fused'}
    assert records['rollout']['generated_tokens_per_s'] > 0

    # MFU against a parameter count of the initialised tiny model, not the config's formula.
    net = tfm.Transformer(tfm.preset('tiny'))
    shapes = jax.eval_shape(lambda key: net.init(key, jnp.zeros((1, 1), jnp.int32)),
                            jax.random.key(0))
    params = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes['params']))
    cfg = tfm.preset('tiny')
    flops = 6 * params + 12 * cfg.num_layers * cfg.hidden_size * records['train_lora']['seq']
    assert records['mfu']['mfu_lora'] == pytest.approx(
        records['train_lora']['tokens_per_s'] * flops / 2e12)
    summary = records['summary']
    assert summary['wkv7_fwd_bwd_ms']['max'] == 10.0  # fla on the same card, from the anchors
    assert summary['rollout_over_hf_generate']['hf_tokens_per_s'] == 100
    assert summary['train_over_hf_peft']['ours'] == pytest.approx(
        records['train_lora']['tokens_per_s'] / 1000)
