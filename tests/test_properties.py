"""Property tests: random small graphs and random PEFT adapters, every generation against numpy.

Each example builds a base graph with ``onnx.helper`` (a chain of 1-4 linear layers, each a MatMul
with W (in, out), a MatMul through ``Transpose(W)`` with W (out, in), or a Gemm with ``transB=1``
and an optional bias; Tanh between layers), writes 1-3 PEFT folders (own rank, ``lora_alpha``,
``use_rslora``, ``rank_pattern``/``alpha_pattern``, list or regex ``target_modules``, F32 or F16)
with the real ``safetensors`` package, compiles v1/v2/v3 bundles and runs them through
``run_use_case`` and through ``Runtime`` (switch + run). The expected values come from
:func:`reference_forward`, PEFT's math restated in float64 numpy; nothing here asks lora_runtime
for a rank, a scaling or a weight.

Examples are derandomized (fixed seed): CI sees the same 25 examples on every run.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from safetensors.numpy import save_file

from lora_runtime import Runtime, UseCaseSpec, compile_bundle, run_use_case

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
KINDS_2D = ("matmul", "matmul_t", "gemm")  # Gemm needs a 2-D input
KINDS_3D = ("matmul", "matmul_t")


# ---- the random problem ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layer:
    kind: str  # "matmul": MatMul(h, W) W (in, out); "matmul_t": MatMul(h, Transpose(W)) and "gemm": W (out, in)
    d_in: int
    d_out: int
    bias: bool  # Gemm only


@dataclass(frozen=True)
class AdapterSpec:
    name: str
    layers: tuple[int, ...]  # indices of the layers it attaches to
    r: int
    lora_alpha: float
    use_rslora: bool
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    regex_targets: bool  # target_modules as one regex instead of a list of names
    dtype: str  # "float32" or "float16" in the safetensors file


@dataclass(frozen=True)
class Case:
    x_rank: int  # 2: x is (T, d0); 3: x is (1, T, d0)
    tokens: int
    layers: tuple[Layer, ...]
    adapters: tuple[AdapterSpec, ...]
    strengths: tuple[float, ...]  # one per adapter, |s| >= 0.1 so every adapter visibly changes the output
    seed: int


def module(i: int) -> str:
    return f"layers.{i}.proj"


# finite, 0.1 <= |s| <= 2: a strength that visibly changes the output (strength 0 has its own test)
strength = st.builds(lambda m, negative: -m if negative else m, st.floats(0.1, 2.0), st.booleans())


@st.composite
def cases(draw: st.DrawFn, max_layers: int = 4) -> Case:
    n = draw(st.integers(1, max_layers))
    x_rank = draw(st.sampled_from([2, 3]))
    dims = draw(st.lists(st.integers(2, 12), min_size=n + 1, max_size=n + 1))
    layers = []
    for i in range(n):
        kind = draw(st.sampled_from(KINDS_2D if x_rank == 2 else KINDS_3D))
        layers.append(Layer(kind, dims[i], dims[i + 1], kind == "gemm" and draw(st.booleans())))
    adapters = []
    for a in range(draw(st.integers(1, 3))):
        on = tuple(sorted(draw(st.sets(st.integers(0, n - 1), min_size=1, max_size=n))))
        rank_pattern: dict[str, int] = {}
        alpha_pattern: dict[str, float] = {}
        if draw(st.booleans()):
            rank_pattern[module(draw(st.sampled_from(on)))] = draw(st.integers(1, 5))
        if draw(st.booleans()):
            alpha_pattern[module(draw(st.sampled_from(on)))] = float(draw(st.integers(1, 32)))
        adapters.append(AdapterSpec(
            name=f"a{a}", layers=on, r=draw(st.integers(1, 5)), lora_alpha=float(draw(st.integers(1, 32))),
            use_rslora=draw(st.booleans()), rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
            regex_targets=draw(st.booleans()), dtype=draw(st.sampled_from(["float32", "float16"]))))
    strengths = tuple(draw(strength) for _ in adapters)
    return Case(x_rank, draw(st.integers(1, 4)), tuple(layers), tuple(adapters), strengths,
                draw(st.integers(0, 2**32 - 1)))


# ---- PEFT's rules and the forward pass, restated in numpy (float64) ----------------------------------


def peft_rank_and_scaling(spec: AdapterSpec, mod: str) -> tuple[int, float]:
    """PEFT: pattern keys match a whole dotted suffix, first match wins; rsLoRA divides by sqrt(r)."""
    def pick(pattern: dict, default: float) -> float:
        return next((v for k, v in pattern.items() if re.match(rf"(.*\.)?({k})$", mod)), default)

    r = int(pick(spec.rank_pattern, spec.r))
    alpha = pick(spec.alpha_pattern, spec.lora_alpha)
    return r, alpha / math.sqrt(r) if spec.use_rslora else alpha / r


@dataclass
class Weights:
    base: list[np.ndarray]  # per layer, as stored in the graph
    bias: list[np.ndarray | None]
    lora: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]  # adapter -> module -> (A (r, in), B (out, r))
    x: np.ndarray


def make_weights(case: Case) -> Weights:
    rng = np.random.default_rng(case.seed)
    base, bias = [], []
    for layer in case.layers:
        shape = (layer.d_in, layer.d_out) if layer.kind == "matmul" else (layer.d_out, layer.d_in)
        base.append((rng.standard_normal(shape) / np.sqrt(layer.d_in)).astype(np.float32))
        bias.append(rng.standard_normal(layer.d_out).astype(np.float32) * 0.3 if layer.bias else None)
    lora: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    for spec in case.adapters:
        lora[spec.name] = {}
        for i in spec.layers:
            layer = case.layers[i]
            r, _ = peft_rank_and_scaling(spec, module(i))
            a = (rng.standard_normal((r, layer.d_in)) / np.sqrt(layer.d_in)).astype(spec.dtype)
            b = (rng.standard_normal((layer.d_out, r)) * 0.5).astype(spec.dtype)
            lora[spec.name][module(i)] = (a, b)
    shape = (case.tokens, case.layers[0].d_in) if case.x_rank == 2 else (1, case.tokens, case.layers[0].d_in)
    return Weights(base, bias, lora, rng.standard_normal(shape).astype(np.float32))


def reference_forward(case: Case, w: Weights, strengths: dict[str, float]) -> np.ndarray:
    """h_{i+1} = act(h_i W_i + b_i + sum_a s_a * scaling_a(i) * (h_i A_a^T) B_a^T), Tanh between layers."""
    h = w.x.astype(np.float64)
    for i, layer in enumerate(case.layers):
        wi = w.base[i].astype(np.float64)
        y = h @ (wi if layer.kind == "matmul" else wi.T)
        if w.bias[i] is not None:
            y = y + w.bias[i].astype(np.float64)
        for spec in case.adapters:
            s = strengths.get(spec.name, 0.0)
            pair = w.lora[spec.name].get(module(i))
            if pair is None or s == 0.0:
                continue
            a, b = (t.astype(np.float64) for t in pair)
            _, scaling = peft_rank_and_scaling(spec, module(i))
            y = y + s * scaling * ((h @ a.T) @ b.T)
        h = np.tanh(y) if i < len(case.layers) - 1 else y
    return h


# ---- writing the files a user would have ------------------------------------------------------------


def write_base(case: Case, w: Weights, path: Path) -> None:
    x_shape = [case.tokens, case.layers[0].d_in] if case.x_rank == 2 else [1, case.tokens, case.layers[0].d_in]
    nodes, inits, h = [], [], "x"
    for i, layer in enumerate(case.layers):
        wname = f"{module(i)}.weight"
        inits.append(numpy_helper.from_array(w.base[i], wname))
        out = "y" if i == len(case.layers) - 1 else f"pre_{i}"
        if layer.kind == "matmul":
            nodes.append(helper.make_node("MatMul", [h, wname], [out], name=f"mm_{i}"))
        elif layer.kind == "matmul_t":
            nodes.append(helper.make_node("Transpose", [wname], [f"wt_{i}"], name=f"t_{i}", perm=[1, 0]))
            nodes.append(helper.make_node("MatMul", [h, f"wt_{i}"], [out], name=f"mm_{i}"))
        else:
            ins = [h, wname]
            if layer.bias:
                inits.append(numpy_helper.from_array(w.bias[i], f"{module(i)}.bias"))
                ins.append(f"{module(i)}.bias")
            nodes.append(helper.make_node("Gemm", ins, [out], name=f"gemm_{i}", transB=1))
        if i < len(case.layers) - 1:
            nodes.append(helper.make_node("Tanh", [out], [f"h_{i + 1}"], name=f"tanh_{i}"))
            h = f"h_{i + 1}"
    y_shape = x_shape[:-1] + [case.layers[-1].d_out]
    graph = helper.make_graph(nodes, "random_chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def write_peft(spec: AdapterSpec, w: Weights, folder: Path) -> None:
    """A PEFT LoRA folder as ``save_pretrained`` writes it."""
    modules = [module(i) for i in spec.layers]
    targets: list[str] | str = modules
    if spec.regex_targets:
        targets = r"layers\.(" + "|".join(str(i) for i in spec.layers) + r")\.proj"
    config = {"peft_type": "LORA", "task_type": None, "r": spec.r, "lora_alpha": spec.lora_alpha,
              "target_modules": targets, "use_rslora": spec.use_rslora, "rank_pattern": spec.rank_pattern,
              "alpha_pattern": spec.alpha_pattern, "fan_in_fan_out": False, "lora_dropout": 0.0, "bias": "none",
              "use_dora": False, "modules_to_save": None, "inference_mode": True}
    tensors = {}
    for mod, (a, b) in w.lora[spec.name].items():
        tensors[f"base_model.model.{mod}.lora_A.weight"] = a
        tensors[f"base_model.model.{mod}.lora_B.weight"] = b
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})


def write_problem(case: Case, root: Path) -> tuple[Weights, Path, dict[str, Path]]:
    w = make_weights(case)
    base = root / "base.onnx"
    write_base(case, w, base)
    adapters = {}
    for spec in case.adapters:
        adapters[spec.name] = root / "peft" / spec.name
        write_peft(spec, w, adapters[spec.name])
    return w, base, adapters


def ort_base(base: Path, x: np.ndarray) -> np.ndarray:
    """The untouched base model in plain ONNX Runtime."""
    sess = ort.InferenceSession(str(base), providers=["CPUExecutionProvider"])
    return sess.run(["y"], {"x": x})[0]


def tolerance(want: np.ndarray) -> float:
    return 1e-4 * max(1.0, float(np.abs(want).max()))


# ---- the properties ---------------------------------------------------------------------------------


def use_cases_for(case: Case, generation: str) -> list[UseCaseSpec]:
    """v3: the full mix, each adapter alone, all at 0, the base. v1/v2: each adapter alone, one at 0, the base."""
    singles = [UseCaseSpec(f"only_{a.name}", ((a.name, s),)) for a, s in zip(case.adapters, case.strengths)]
    base = UseCaseSpec("base", ())
    if generation == "v3":
        mix = UseCaseSpec("mix", tuple((a.name, s) for a, s in zip(case.adapters, case.strengths)))
        zero = UseCaseSpec("zero", tuple((a.name, 0.0) for a in case.adapters))
        return [mix, *singles, zero, base]
    return [*singles, UseCaseSpec("zero", ((case.adapters[-1].name, 0.0),)), base]


@SETTINGS
@given(case=cases())
def test_every_generation_matches_numpy_reference(case: Case) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        w, base, adapters = write_problem(case, root)
        want_base = reference_forward(case, w, {})
        for a, s in zip(case.adapters, case.strengths):  # every adapter must show, or the comparison is vacuous
            assume(np.abs(reference_forward(case, w, {a.name: s}) - want_base).max() > 10 * tolerance(want_base))
        for generation in ("v1", "v2", "v3"):
            specs = use_cases_for(case, generation)
            bundle = compile_bundle(base, adapters, root / generation, generation=generation, use_cases=specs)
            assert bundle.manifest.generation == generation
            wants = {u.name: reference_forward(case, w, dict(u.strengths)) for u in specs}
            for u in specs:
                got = run_use_case(bundle, u.name, {"x": w.x})["y"]
                np.testing.assert_allclose(got, wants[u.name], rtol=0, atol=tolerance(wants[u.name]),
                                           err_msg=f"{generation} run_use_case {u.name}")
            rt = Runtime.open(bundle.path)
            order = [u.name for u in specs] + [u.name for u in reversed(specs)]  # cold and hot switches, both ways
            for name in order:
                report = rt.switch(name)
                assert rt.current == name
                if generation == "v3":  # strengths only: the group is resident
                    assert (report.kind, report.bytes_moved) == ("hot", 0), name
                got = rt.run({"x": w.x})["y"]
                np.testing.assert_allclose(got, wants[name], rtol=0, atol=tolerance(wants[name]),
                                           err_msg=f"{generation} Runtime {name}")


@SETTINGS
@given(case=cases())
def test_zero_strength_is_the_base_model(case: Case) -> None:
    """All strengths 0 (and the base-alone use-case) give the untouched base graph's output, in ORT."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        w, base, adapters = write_problem(case, root)
        plain = ort_base(base, w.x)
        np.testing.assert_allclose(plain, reference_forward(case, w, {}), rtol=0, atol=tolerance(plain))
        for generation in ("v1", "v2", "v3"):
            specs = [u for u in use_cases_for(case, generation) if u.name in ("zero", "base")]
            bundle = compile_bundle(base, adapters, root / generation, generation=generation, use_cases=specs)
            rt = Runtime.open(bundle.path)
            for u in specs:
                rt.switch(u.name)
                for how, got in (("run_use_case", run_use_case(bundle, u.name, {"x": w.x})["y"]),
                                 ("Runtime", rt.run({"x": w.x})["y"])):
                    np.testing.assert_allclose(got, plain, rtol=0, atol=1e-6 * max(1.0, float(np.abs(plain).max())),
                                               err_msg=f"{generation} {how} {u.name}")


@SETTINGS
@given(case=cases(max_layers=1), s2=st.lists(strength, min_size=3, max_size=3),
       c=st.floats(-3.0, 3.0, allow_nan=False))
def test_v3_output_is_linear_in_the_strengths(case: Case, s2: list[float], c: float) -> None:
    """One layer, no activation, so the output is affine in the strength vector s:

    f(s1 + s2) - f(0) = (f(s1) - f(0)) + (f(s2) - f(0))  and  f(c s1) - f(0) = c (f(s1) - f(0)).
    """
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        w, base, adapters = write_problem(case, root)
        bundle = compile_bundle(base, adapters, root / "v3", generation="v3", use_cases=["base="])
        rt = Runtime.open(bundle.path)
        names = [a.name for a in case.adapters]

        def f(s: list[float]) -> np.ndarray:
            report = rt.set_strengths(dict(zip(names, s)))
            assert (report.kind, report.bytes_moved) == ("hot", 0)
            return rt.run({"x": w.x})["y"].astype(np.float64)

        s1 = list(case.strengths)
        s2 = s2[: len(names)]
        f0, f1, f2 = f([0.0] * len(names)), f(s1), f(s2)
        f12, fc = f([a + b for a, b in zip(s1, s2)]), f([c * a for a in s1])
        scale = max(float(np.abs(v).max()) for v in (f0, f1, f2, f12, fc))
        atol = 2e-5 * max(1.0, scale)
        want1 = reference_forward(case, w, dict(zip(names, s1)))
        assume(np.abs(want1 - reference_forward(case, w, {})).max() > 100 * atol)  # else linearity is vacuous
        np.testing.assert_allclose(f12 - f0, (f1 - f0) + (f2 - f0), rtol=0, atol=atol)
        np.testing.assert_allclose(fc - f0, c * (f1 - f0), rtol=0, atol=atol * max(1.0, abs(c)))
        np.testing.assert_allclose(f1, want1, rtol=0, atol=tolerance(want1))
