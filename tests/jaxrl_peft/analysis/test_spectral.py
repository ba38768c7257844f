"""Spectral analysis against matrices with known answers, and the run-level analysis of a tiny model + adapter.

Matrices are built as w0 = U diag(S) Vᵀ from chosen orthonormal U, V, with ΔK confined to chosen singular
directions, so every share, rank, angle and drift is known in closed form.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxrl_peft.analysis import report, spectral
from jaxrl_peft.models import hf, transformer as tfm
from jaxrl_peft.models import hf_peft
from jaxrl_peft.peft import registry

ROOT = Path(__file__).resolve().parents[3]


def orthonormal(rng: np.random.Generator, n: int, m: int) -> np.ndarray:
    """[n, m] with orthonormal columns."""
    return np.linalg.qr(rng.standard_normal((n, m)))[0]


def factors(d_in: int, d_out: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """U [in, in], V [out, out] full orthogonal bases; w0 uses their first r columns; S descending."""
    rng = np.random.default_rng(seed)
    r = min(d_in, d_out)
    s = np.sort(rng.uniform(1.0, 10.0, r))[::-1]
    return orthonormal(rng, d_in, d_in), orthonormal(rng, d_out, d_out), s, rng.standard_normal(4)


def compose(u: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    r = len(s)
    return (u[:, :r] * s) @ v[:, :r].T


def test_deciles_of_a_rank_that_is_not_a_multiple_of_ten():
    assert spectral.decile_of(25).tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 4, 4, 4, 5, 5, 6, 6, 6, 7, 7, 8, 8, 8,
                                              9, 9]
    assert spectral.decile_of(10).tolist() == list(range(10))
    assert spectral.decile_of(4).tolist() == [0, 2, 5, 7]  # fewer than 10 indices: some deciles empty


def test_energy_placed_in_chosen_deciles_with_rest_outside_the_output_span():
    # in=20 < out=30: r=20, decile d = indices {2d, 2d+1}; U spans the input space, V leaves 10 output dims.
    u, v, s, _ = factors(20, 30)
    w0 = compose(u, s, v)
    # ΔK = sum_j c_j u_{i_j} y_jᵀ: input energy in deciles of i_j; output on v_3 (decile 1), v_16 (8), v_25 (rest).
    delta = (3.0 * np.outer(u[:, 0], v[:, 3]) + 2.0 * np.outer(u[:, 9], v[:, 16])
             + 1.0 * np.outer(u[:, 9], v[:, 25]))
    out = spectral.analyze(w0, w0 + delta, k=4)
    total = 9.0 + 4.0 + 1.0
    want_in = np.zeros(10)
    want_in[0], want_in[4] = 9.0 / total, 5.0 / total
    want_out = np.zeros(10)
    want_out[1], want_out[8] = 9.0 / total, 4.0 / total
    np.testing.assert_allclose(out["bins_input"], want_in, atol=1e-12)
    np.testing.assert_allclose(out["bins_output"], want_out, atol=1e-12)
    assert out["bins_input_rest"] == 0.0
    np.testing.assert_allclose(out["bins_output_rest"], 1.0 / total, atol=1e-12)
    np.testing.assert_allclose(sum(out["bins_input"]) + out["bins_input_rest"], 1.0, atol=1e-12)
    np.testing.assert_allclose(sum(out["bins_output"]) + out["bins_output_rest"], 1.0, atol=1e-12)
    np.testing.assert_allclose(out["bins_w"], (s ** 2).reshape(10, 2).sum(1) / np.sum(s ** 2), atol=1e-12)
    assert out["shape"] == [20, 30] and out["rank"] == 20


def test_rest_on_the_input_side_of_a_tall_kernel():
    # in=30 > out=12: r=12, U leaves 18 input dims; ΔK half in u_0 (decile 0), half outside U's span.
    u, v, s, _ = factors(30, 12, seed=1)
    w0 = compose(u, s, v)
    delta = np.outer(u[:, 0], v[:, 11]) + np.outer(u[:, 20], v[:, 11])
    out = spectral.analyze(w0, w0 + delta, k=3)
    np.testing.assert_allclose(out["bins_input"][0], 0.5, atol=1e-12)
    np.testing.assert_allclose(out["bins_input_rest"], 0.5, atol=1e-12)
    np.testing.assert_allclose(out["bins_output"][9], 1.0, atol=1e-12)  # index 11 of r=12: ⌊110/12⌋ = 9
    assert out["bins_output_rest"] == 0.0
    for side in ("input", "output"):
        np.testing.assert_allclose(sum(out[f"bins_{side}"]) + out[f"bins_{side}_rest"], 1.0, atol=1e-12)


def test_energy_thresholds_and_the_update_share_in_the_top_subspace():
    u, v, _, _ = factors(10, 16, seed=2)
    energies = np.array([0.4, 0.2, 0.15, 0.1, 0.05, 0.04, 0.03, 0.015, 0.01, 0.005])  # cum .4 .6 .75 .85 .9 ...
    w0 = compose(u, np.sqrt(energies) * 7.0, v)
    # 70% of ‖ΔK‖² on u_2 (inside the top-5 = rank_w_90) and v_7 (outside); 30% on u_8 (out) and v_1 (in).
    delta = np.sqrt(0.7) * np.outer(u[:, 2], v[:, 7]) + np.sqrt(0.3) * np.outer(u[:, 8], v[:, 1])
    out = spectral.analyze(w0, w0 + 0.01 * delta)
    assert (out["rank_w_50"], out["rank_w_80"], out["rank_w_90"]) == (2, 4, 5)
    np.testing.assert_allclose(out["dw_in_top_w_90_input"], 0.7, atol=1e-12)
    np.testing.assert_allclose(out["dw_in_top_w_90_output"], 0.3, atol=1e-12)
    np.testing.assert_allclose(out["bins_w"], energies, atol=1e-12)


def test_rank_one_and_rank_two_updates():
    rng = np.random.default_rng(3)
    w0 = rng.standard_normal((24, 40))
    x, y = orthonormal(rng, 24, 2), orthonormal(rng, 40, 2)
    one = spectral.analyze(w0, w0 + 0.5 * np.outer(x[:, 0], y[:, 0]))
    assert one["dw_top1_energy"] == pytest.approx(1.0, abs=1e-12)
    assert one["dw_effective_rank"] == pytest.approx(1.0, abs=1e-9)
    assert one["dw_singular_values"][0] == pytest.approx(0.5, abs=1e-12)
    assert one["dw_rel_norm"] == pytest.approx(0.5 / np.linalg.norm(w0), rel=1e-12)
    assert len(one["dw_singular_values"]) == 24

    two = spectral.analyze(w0, w0 + 3.0 * np.outer(x[:, 0], y[:, 0]) + 1.0 * np.outer(x[:, 1], y[:, 1]))
    assert two["dw_top1_energy"] == pytest.approx(9.0 / 10.0, abs=1e-12)
    p = np.array([0.75, 0.25])  # σ/Σσ = (3, 1)/4
    assert two["dw_effective_rank"] == pytest.approx(np.exp(-np.sum(p * np.log(p))), abs=1e-9)
    equal = spectral.analyze(w0, w0 + np.outer(x[:, 0], y[:, 0]) + np.outer(x[:, 1], y[:, 1]))
    assert equal["dw_effective_rank"] == pytest.approx(2.0, abs=1e-9)
    assert equal["dw_top1_energy"] == pytest.approx(0.5, abs=1e-12)


def test_a_known_rotation_of_the_top_subspace_gives_its_principal_angles():
    # Rotate u_i toward u_{k+i} by θ_i (i < k): w1 keeps S and V, its top-k input subspace turns by θ.
    u, v, s, _ = factors(16, 20, seed=4)
    k = 4
    thetas = np.radians([3.0, 40.0, 0.5, 75.0])
    rotated = u.copy()
    for i, t in enumerate(thetas):
        rotated[:, i] = np.cos(t) * u[:, i] + np.sin(t) * u[:, k + i]
        rotated[:, k + i] = -np.sin(t) * u[:, i] + np.cos(t) * u[:, k + i]
    w0, w1 = compose(u, s, v), compose(rotated, s, v)
    out = spectral.analyze(w0, w1, k=k)
    np.testing.assert_allclose(out["principal_angles_input"], np.sort(np.degrees(thetas)), atol=1e-8)
    np.testing.assert_allclose(out["principal_angles_output"], 0.0, atol=1e-6)
    np.testing.assert_allclose(out["spectral_drift"], 0.0, atol=1e-12)
    # <w0, w1> = Σ_i s_i² u_i·u_i' = Σ_{i<k} (s_i² + s_{k+i}²) cos θ_i + the untouched s_j².
    c = np.ones(len(s))
    c[:k], c[k:2 * k] = np.cos(thetas), np.cos(thetas)
    assert out["cosine"] == pytest.approx(np.sum(s ** 2 * c) / np.sum(s ** 2), abs=1e-12)


def test_spectral_drift_cosine_and_a_zero_update():
    u, v, _, _ = factors(12, 12, seed=5)
    s = np.linspace(10.0, 1.0, 12)  # gaps wide enough that the scaled values keep their order
    w0 = compose(u, s, v)
    scale = 1.0 + np.array([0.1, -0.05, 0.02] + [0.0] * 9)
    out = spectral.analyze(w0, compose(u, s * scale, v), k=3)
    np.testing.assert_allclose(out["spectral_drift"], [0.1, 0.05, 0.02], atol=1e-12)
    energy = np.array([0.01 * s[0] ** 2, 0.0025 * s[1] ** 2, 0.0004 * s[2] ** 2])  # ‖ΔK‖² per direction
    np.testing.assert_allclose(out["bins_input"][0], energy[:2].sum() / energy.sum(), atol=1e-12)  # i=0,1: decile 0
    np.testing.assert_allclose(out["bins_input"][1], energy[2] / energy.sum(), atol=1e-12)  # i=2: ⌊20/12⌋ = 1
    assert spectral.analyze(w0, 2.0 * w0)["cosine"] == pytest.approx(1.0, abs=1e-12)
    assert spectral.analyze(w0, -w0)["cosine"] == pytest.approx(-1.0, abs=1e-12)
    zero = spectral.analyze(w0, w0.copy(), k=3)
    assert zero["dw_rel_norm"] == 0.0 and zero["dw_top1_energy"] == 0.0 and zero["dw_effective_rank"] == 0.0
    assert sum(zero["bins_input"]) == 0.0 and zero["principal_angles_input"] == pytest.approx([0.0] * 3, abs=1e-6)


def test_randomized_agrees_with_full_on_a_low_rank_update():
    rng = np.random.default_rng(6)
    u, v = orthonormal(rng, 60, 60), orthonormal(rng, 80, 80)
    w0 = compose(u, 10.0 * 0.8 ** np.arange(60), v)  # decaying spectrum: top-k well separated
    delta = 0.05 * rng.standard_normal((60, 3)) @ rng.standard_normal((3, 80))
    full = spectral.analyze(w0, w0 + delta, k=4)
    fast = spectral.analyze(w0, w0 + delta, k=4, method="randomized", dw_rank=8, niter=4)
    for key in ("bins_w", "bins_input", "bins_output", "bins_output_rest", "rank_w_90", "dw_in_top_w_90_input",
                "dw_top1_energy", "dw_effective_rank", "dw_rel_norm", "cosine", "spectral_drift"):
        np.testing.assert_allclose(fast[key], full[key], rtol=1e-7, atol=1e-10, err_msg=key)
    np.testing.assert_allclose(fast["dw_singular_values"][:3], full["dw_singular_values"][:3], rtol=1e-9)
    assert len(fast["dw_singular_values"]) == 8
    np.testing.assert_allclose(fast["principal_angles_input"], full["principal_angles_input"], atol=1e-5)
    np.testing.assert_allclose(fast["principal_angles_output"], full["principal_angles_output"], atol=1e-5)


def test_jax_backend_agrees_with_float64_numpy():
    rng = np.random.default_rng(7)
    w0 = rng.standard_normal((32, 48))
    w1 = w0 + 0.1 * rng.standard_normal((32, 2)) @ rng.standard_normal((2, 48))
    ref = spectral.analyze(w0, w1, k=4)
    for method in ("full", "randomized"):
        got = spectral.analyze(w0, w1, k=4, method=method, backend="jax", dw_rank=4)
        for key in ("bins_input", "bins_output", "bins_output_rest", "dw_top1_energy", "dw_rel_norm", "cosine"):
            np.testing.assert_allclose(got[key], ref[key], atol=2e-4, err_msg=f"{method} {key}")


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="one shape"):
        spectral.analyze(np.ones((3, 4)), np.ones((4, 3)))
    with pytest.raises(ValueError, match="method"):
        spectral.analyze(np.eye(3), np.eye(3), method="lanczos")


# --- whole runs -----------------------------------------------------------------------------

def tiny_base(tmp_path: Path) -> tuple[Path, tfm.TransformerConfig, dict]:
    cfg = tfm.preset("tiny", vocab_size=64, num_layers=2, param_dtype="float32", dtype="float32")
    params = tfm.init_params(cfg, jax.random.key(0))
    hf.save(tmp_path / "base", tfm.Transformer(cfg), params)
    return tmp_path / "base", cfg, params


def perturbed(adapter: dict, key_name: str, seed: int, scale: float) -> dict:
    """The adapter with every `key_name` leaf moved by scale * N(0, 1)."""
    flat = jax.tree_util.tree_flatten_with_path(adapter)[0]
    items = []
    for i, (kp, leaf) in enumerate(flat):
        path = tuple(k.key for k in kp)
        if path[-1] == key_name:
            leaf = leaf + scale * jax.random.normal(jax.random.key(seed + i), leaf.shape, leaf.dtype)
        items.append((path, leaf))
    return registry.nest(items)


def test_launch_writes_the_report_for_a_lora_adapter_matching_peft_merge(tmp_path):
    torch = pytest.importorskip("torch")
    peft_lib = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    base_dir, cfg, params = tiny_base(tmp_path)
    lora = registry.get("lora", r=4, alpha=8, target_modules=("q_proj", "v_proj", "down_proj"))
    params2, adapter = registry.init_adapter(lora, jax.random.key(1), params)
    adapter = perturbed(adapter, "lora_b", seed=3, scale=0.05)
    hf_peft.save_adapter(tmp_path / "adapter", lora, params2, adapter)
    out = tmp_path / "analysis"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "analyze.py"), f"--checkpoint={base_dir}",
                           f"--adapter={tmp_path / 'adapter'}", f"--out={out}", "--k=4", "--noplots"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("spectral.json", "summary.md", "per_layer/layer_000.json", "per_layer/layer_001.json"):
        assert (out / name).stat().st_size > 0, name
    assert not list(out.glob("*.png"))
    records = json.loads((out / "spectral.json").read_text())["records"]
    assert sorted(r["name"] for r in records) == sorted(
        f"layers_{i}/{m}" for i in range(2) for m in ("self_attn/q_proj", "self_attn/v_proj", "mlp/down_proj"))
    assert "| self_attn/q_proj (2) |" in (out / "summary.md").read_text()
    layer0 = json.loads((out / "per_layer" / "layer_000.json").read_text())
    assert set(layer0) == {"self_attn/q_proj", "self_attn/v_proj", "mlp/down_proj"}

    # Independent reference: HF PEFT merges the same adapter into the transformers model.
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    originals = {n: p.detach().numpy().copy() for n, p in model.named_parameters()}
    merged = peft_lib.PeftModel.from_pretrained(model, tmp_path / "adapter").merge_and_unload()
    weights = dict(merged.named_parameters())
    for r in records:
        name = hf_peft.module_name(tuple(r["name"].split("/"))) + ".weight"
        w0, w1 = originals[name].T.astype(np.float64), weights[name].detach().numpy().T.astype(np.float64)
        assert r["dw_rel_norm"] == pytest.approx(np.linalg.norm(w1 - w0) / np.linalg.norm(w0), rel=1e-4)
        assert r["dw_effective_rank"] <= 4.0 + 1e-6  # a rank-4 update (float32 merge noise below 1e-5·σ₁)
        np.testing.assert_allclose(r["dw_singular_values"][:4], np.linalg.svd(w1 - w0, compute_uv=False)[:4],
                                   rtol=1e-3)


@pytest.mark.parametrize("name", ["pissa", "milora"])
def test_residual_methods_are_measured_against_the_original_weights(tmp_path, name):
    cfg = tfm.preset("tiny", vocab_size=64, num_layers=1, param_dtype="float32", dtype="float32")
    params = tfm.init_params(cfg, jax.random.key(0))
    method = registry.get(name, r=4, alpha=4, target_modules=("q_proj", "up_proj"))
    residual_params, adapter = registry.init_adapter(method, jax.random.key(1), params)
    fresh = spectral.analyze_run(method, residual_params, adapter, k=4)
    assert len(fresh) == 2
    for r in fresh:
        assert r["dw_rel_norm"] == 0.0 and r["dw_top1_energy"] == 0.0
    # w0 is the original kernel: its spectrum equals that of the untouched params (not the residual's).
    lora = registry.get("lora", r=4, alpha=4, target_modules=("q_proj", "up_proj"))
    plain = spectral.analyze_run(lora, params, registry.init_adapter(lora, jax.random.key(1), params)[1], k=4)
    for a, b in zip(fresh, plain):
        np.testing.assert_allclose(a["bins_w"], b["bins_w"], atol=1e-5)
        assert a["w_norm"] == pytest.approx(b["w_norm"], rel=1e-5)
    # A trained B: ΔK = s A (B + δ) − s A0 B0 = s A0 δ, against the original kernel.
    trained = perturbed(adapter, "lora_b", seed=5, scale=0.02)
    after = spectral.analyze_run(method, residual_params, trained, k=4)
    for r in after:
        path = tuple(r["name"].split("/"))
        module_adapter, module_trained = registry.unstack_layers(adapter), registry.unstack_layers(trained)
        kernel = registry.unstack_layers(params)
        for p in path:
            module_adapter, module_trained, kernel = module_adapter[p], module_trained[p], kernel[p]
        delta = method.scaling * np.asarray(module_adapter["lora_a0"], np.float64) @ (
            np.asarray(module_trained["lora_b"], np.float64) - np.asarray(module_adapter["lora_b0"], np.float64))
        w0 = np.asarray(kernel["kernel"], np.float64)
        assert r["dw_rel_norm"] == pytest.approx(np.linalg.norm(delta) / np.linalg.norm(w0), rel=1e-3)
        expect = spectral.analyze(w0, w0 + delta, k=4)
        np.testing.assert_allclose(r["bins_input"], expect["bins_input"], atol=2e-3)
        np.testing.assert_allclose(r["bins_output"], expect["bins_output"], atol=2e-3)
    if name == "pissa":  # PiSSA trains the top directions: its update lives in the first deciles
        assert all(sum(r["bins_input"][:2]) > 0.99 for r in after)


def test_merged_checkpoint_pairs_and_plots_need_only_records(tmp_path):
    _, cfg, params = tiny_base(tmp_path)
    full = registry.get("full")
    _, adapter = registry.init_adapter(full, jax.random.key(0), params)
    trained = perturbed(adapter, "kernel", seed=9, scale=1e-3)
    merged = registry.merge(full, params, trained)
    include = lambda path: path[-1] in ("o_proj", "gate_proj")  # noqa: E731
    pairs = list(spectral.analyze_pairs(spectral.kernel_pairs(params, merged, include), k=2))
    by_run = spectral.analyze_run(full, params, trained, k=2, include=include)
    assert [r["name"] for r in pairs] == [r["name"] for r in by_run] and len(pairs) == 4
    for a, b in zip(pairs, by_run):
        np.testing.assert_allclose(a["bins_input"], b["bins_input"], atol=1e-9)
        assert a["dw_effective_rank"] > 10  # a dense random update has a high effective rank
    files = report.write_report(pairs, tmp_path / "out", {"run": "test"})
    assert {f.name for f in files} == {"layer_000.json", "layer_001.json", "spectral.json", "summary.md",
                                       "bins_input.png", "bins_output.png", "bins_w.png", "drift_by_layer.png",
                                       "effective_rank_by_layer.png", "rel_norm_by_layer.png"}
    assert all(f.stat().st_size > 0 for f in files)


def test_missing_matplotlib_names_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    record = {**spectral.describe("layers_0/mlp/up_proj"), **spectral.analyze(np.eye(4), 2 * np.eye(4), k=2)}
    with pytest.raises(ImportError, match=r"pip install 'jaxrl-peft\[plots\]'"):
        report.write_report([record], tmp_path)
    assert (tmp_path / "summary.md").exists()  # JSON and markdown need no matplotlib
