"""Runtime: resident slots, hot and cold switches, atomicity under threads and faults."""

from __future__ import annotations

import random

import numpy as np
import pytest
from conftest import switch_while_running

from lora_runtime import BundleError, InputError, Runtime, UseCaseError, compile_bundle, run_use_case
from lora_runtime.demo import demo_use_cases

GENERATIONS = ["v1", "v2", "v3"]


@pytest.fixture(scope="module", params=GENERATIONS)
def bundle(request, tiny, tmp_path_factory):
    gen = request.param
    return compile_bundle(tiny.base, tiny.adapters, tmp_path_factory.mktemp(gen) / "b", generation=gen,
                          use_cases=demo_use_cases(gen, list(tiny.adapters)))


@pytest.fixture(scope="module")
def references(bundle, tiny):
    """Each use-case's output from a fresh session fed its patch (the reference path, no slots)."""
    feeds = tiny.inputs(seed=7)
    refs = {u: run_use_case(bundle, u, feeds)["logits"] for u in bundle.manifest.use_case_names}
    names = list(refs)
    for i, a in enumerate(names):  # distinct outputs, so a torn or wrong run cannot pass as another
        for b in names[i + 1:]:
            assert np.abs(refs[a] - refs[b]).max() > 1e-3, (a, b)
    return feeds, refs


def test_random_switch_orders_match_fresh_runs(bundle, references):
    feeds, refs = references
    rt = Runtime.open(bundle.path)
    rng = random.Random(0)
    kinds = set()
    for _ in range(300):
        name = rng.choice(rt.use_cases)
        report = rt.switch(name)
        kinds.add(report.kind)
        assert rt.current == name
        np.testing.assert_allclose(rt.run(feeds)["logits"], refs[name], atol=1e-6, rtol=0)
    assert kinds == ({"hot"} if bundle.manifest.generation == "v3" else {"hot", "cold"})


def test_hot_and_cold_are_reported_with_bytes(bundle):
    rt = Runtime.open(bundle.path)
    m = bundle.manifest
    rt.switch("base")
    assert rt.last_switch.kind == "hot" and rt.last_switch.bytes_moved == 0
    if m.generation == "v3":
        for u in rt.use_cases:
            assert rt.switch(u).kind == "hot"
        return
    # two scratch sets: the third distinct adapter needs a copy; switching back to a held one does not
    a, b, c = [u.name for u in m.use_cases if u.strengths][:3]
    rt.switch(a)
    r = rt.switch(b)
    rt.switch(c)
    assert rt.switch(c).kind == "hot"
    r = rt.switch(a)
    assert r.kind == "cold" and r.bytes_moved == rt.layout.nbytes and r.source == "rom"


def test_preload_makes_switches_hot_and_costs_patch_bytes(bundle, references):
    feeds, refs = references
    rt = Runtime.open(bundle.path, preload="all")
    for u in rt.use_cases * 2:
        assert rt.switch(u).kind == "hot"
        np.testing.assert_allclose(rt.run(feeds)["logits"], refs[u], atol=1e-6, rtol=0)
    mem = rt.memory()
    adapters = [a for u in bundle.manifest.use_cases for a in u.strengths]
    if bundle.manifest.generation != "v3":
        assert mem["preloaded_bytes"] == {a: rt.layout.nbytes for a in dict.fromkeys(adapters)}
        rt.evict(rt.use_cases)
        assert mem["resident_bytes"] > rt.memory()["resident_bytes"] == 2 * rt.layout.nbytes


def test_set_strengths_matches_reference(bundle, tiny):
    rt = Runtime.open(bundle.path)
    feeds = tiny.inputs(seed=9)
    names = bundle.manifest.adapter_names
    mix = {names[0]: 0.3, names[2]: -0.5} if bundle.manifest.generation == "v3" else {names[1]: 0.25}
    rt.set_strengths(mix)
    assert rt.current is None and rt.strengths == mix
    want = run_use_case(bundle, None, feeds, strengths=mix)["logits"]
    np.testing.assert_allclose(rt.run(feeds)["logits"], want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("bad", [
    ("switch", "nope", UseCaseError),
    ("set_strengths", {"nope": 1.0}, UseCaseError),
    ("set_strengths", {"summarize": float("nan")}, InputError),
    ("set_strengths", {"summarize": "1"}, InputError),
])
def test_bad_switch_changes_nothing(bundle, references, bad):
    feeds, refs = references
    rt = Runtime.open(bundle.path)
    rt.switch("translate")
    method, arg, exc = bad
    with pytest.raises(exc):
        getattr(rt, method)(arg)
    assert rt.current == "translate"
    np.testing.assert_allclose(rt.run(feeds)["logits"], refs["translate"], atol=1e-6, rtol=0)


def test_v1_v2_reject_mixes_suggesting_v3(bundle):
    if bundle.manifest.generation == "v3":
        pytest.skip("v3 takes mixes")
    rt = Runtime.open(bundle.path)
    with pytest.raises(UseCaseError, match="v3"):
        rt.set_strengths({"summarize": 1.0, "tone": 1.0})


@pytest.mark.parametrize("step", ["read_header", "open", "read", "filled", "publish"])
@pytest.mark.parametrize("error", [OSError, RuntimeError])
def test_fault_at_every_cold_step_keeps_previous_use_case(bundle, references, step, error):
    if bundle.manifest.generation == "v3":
        pytest.skip("v3 switches are hot: no cold step to fail")
    feeds, refs = references
    rt = Runtime.open(bundle.path)
    rt.switch("summarize")
    rt.switch("translate")  # both scratch sets in use: 'tone' must be a cold copy over 'summarize'
    before = rt.run(feeds)["logits"]

    def hook(s: str) -> None:
        if s == step:
            raise error(f"injected at {s}")

    rt.fault_hook = hook
    with pytest.raises((BundleError, error)):
        rt.switch("tone")
    assert rt.current == "translate"
    np.testing.assert_array_equal(rt.run(feeds)["logits"], before)
    rt.fault_hook = None
    for name in ("tone", "summarize", "translate"):  # still usable, and the half-written set is not trusted
        rt.switch(name)
        np.testing.assert_allclose(rt.run(feeds)["logits"], refs[name], atol=1e-6, rtol=0)


def test_threads_never_see_a_torn_use_case(bundle, references):
    feeds, refs = references
    rt = Runtime.open(bundle.path)
    seen = switch_while_running(rt, feeds, refs, threads=4, switches=2000, seed=1)
    assert len(seen) >= 2


def test_inputs_of_different_lengths_in_one_runtime(bundle, tiny):
    """Output shapes follow the input: a runtime must not keep the previous run's output buffers."""
    rt = Runtime.open(bundle.path)
    rt.switch("translate")
    for seq_len in (8, 5, 8, 3):
        feeds = tiny.inputs(seed=seq_len, seq_len=seq_len)
        got = rt.run(feeds)["logits"]
        assert got.shape[1] == seq_len
        np.testing.assert_allclose(got, run_use_case(bundle, "translate", feeds)["logits"], atol=1e-6, rtol=0)
