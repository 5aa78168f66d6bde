"""A bundle appears whole or not at all: compiles killed or failing at every step, forced replaces.

The compiles that get killed run in a child process (``sys.executable -c``) and die by SIGKILL:
at random moments of a loop of compiles, and at chosen points, through two public seams: the
``report`` callback of :func:`compile_bundle` (called at each step) and a CPython audit hook
(``sys.addaudithook``), which sees ``os.rename``, ``shutil.rmtree`` and ``lora_runtime.publish`` (the
staging directory taking its name) just before they act. Nothing of lora_runtime is patched.

After every kill: the output path holds nothing, or a bundle :func:`open_bundle` accepts whose
manifest equals the one of a complete compile of the same inputs; leftovers are only
``.<name>.*.partial`` siblings, and whatever of them ``open_bundle`` accepts is complete too.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from lora_runtime import AdapterError, BundleError, compile_bundle, open_bundle
from lora_runtime.models.default import DefaultModel, build_default, recipe

ROOT = Path(__file__).resolve().parents[1]
GENERATIONS = ("v1", "v2", "v3")
STEPS = 7  # how many times compile_bundle calls ``report`` (the ``staged`` fixture checks it)
KILLS = 6  # random kills per test; each costs one child start (~0.3 s)
DEADLINE = 12.0  # seconds per random-kill test, whatever the count

# The child: compile one bundle per spec in ``jobs`` (in a loop when ``loop``), dying by SIGKILL at the
# ``kill_at`` = [event, n]-th event ("report", "os.rename", "shutil.rmtree" or "lora_runtime.publish", the
# directory's appearance, under ``work``).
CHILD = r"""
import json, os, signal, sys
args = json.loads(sys.argv[1])
from lora_runtime import compile_bundle
seen = {"n": 0}
event, nth = args["kill_at"] or (None, 0)

def hit(name, path=None):
    if name == event and (path is None or str(path).startswith(args["work"])):
        seen["n"] += 1
        if seen["n"] == nth:
            os.kill(os.getpid(), signal.SIGKILL)

sys.addaudithook(lambda name, a: hit(name, a[0]) if name in ("os.rename", "shutil.rmtree", "lora_runtime.publish")
                 else None)
print("ready", flush=True)
i = 0
while True:
    job = args["jobs"][i % len(args["jobs"])]
    out = job["out"].format(i=i)
    compile_bundle(args["base"], args["adapters"], out, generation=job["generation"], force=job["force"],
                   report=lambda msg: hit("report"))
    print("done", i, flush=True)
    i += 1
    if not args["loop"] and i == len(args["jobs"]):
        break
"""


# ---- helpers ----------------------------------------------------------------------------------------


def child(model: DefaultModel, work: Path, jobs: list[dict], *, loop: bool = False,
          kill_at: tuple[str, int] | None = None) -> subprocess.Popen:
    args = {"base": str(model.base), "adapters": {k: str(v) for k, v in model.adapters.items()}, "jobs": jobs,
            "loop": loop, "kill_at": kill_at, "work": str(work)}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, text=True)


def wait_ready(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "the child did not start in time"
    line = proc.stdout.readline()
    assert line.strip() == "ready", (line, proc.stderr.read() if proc.poll() is not None else "")


def run_to_death(proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """Wait for a child that kills itself; it must die by SIGKILL, not finish or fail."""
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    assert proc.returncode == -signal.SIGKILL, f"the child was not killed (exit {proc.returncode}): {err}"


def snapshot(root: Path) -> dict[str, tuple[int, str]]:
    """rel path -> (size, sha256) of every file under ``root``; directories as (-1, "")."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = (-1, "") if p.is_dir() else (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def complete(path: Path) -> dict:
    """The manifest of a bundle open_bundle accepts (all hashes checked, base data included)."""
    return open_bundle(path, verify_base=True).manifest.to_json()


def check_partial(p: Path, refs: list[dict]) -> bool:
    """A leftover staging directory: open_bundle rejects it (False), or it is a complete bundle (True)."""
    assert p.is_dir(), p
    try:
        manifest = complete(p)
    except BundleError:
        return False
    assert manifest in refs, f"{p.name} loads as a bundle that matches no complete compile"
    return True


def check_leftovers(parent: Path, name: str, refs: list[dict]) -> list[Path]:
    """Siblings of ``parent / name`` are only ``.<name>.*.partial`` dirs (and ``.old`` if allowed), each
    rejected by open_bundle or complete. Returns them."""
    pattern = re.compile(rf"\.{re.escape(name)}\..+\.partial")
    leftovers = [p for p in parent.iterdir() if p.name != name]
    for p in leftovers:
        assert pattern.fullmatch(p.name), f"unexpected leftover {p.name!r} next to {name!r}"
        check_partial(p, refs)
    return leftovers


def assert_rejected(p: Path) -> None:
    try:
        open_bundle(p)
    except BundleError:
        return
    raise AssertionError(f"{p.name}: a killed compile left a directory that open_bundle accepts")


@pytest.fixture(scope="module", autouse=True)
def private_cache(tmp_path_factory) -> Iterator[None]:
    """Keep lora_runtime's hash cache of base weights (if any) out of the user's home, here and in children."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def models(tiny, tmp_path_factory) -> dict[str, DefaultModel]:
    """The tiny default model with its weights inline, and the same with external data (hard-linked in bundles)."""
    external = replace(recipe("tiny"), name="tiny-external", external_data=True)
    return {"inline": tiny, "external": build_default(external, tmp_path_factory.mktemp("tiny-external"))}


@pytest.fixture(scope="module")
def refs(models, tmp_path_factory) -> dict[tuple[str, str], dict]:
    """Manifests of complete compiles, per (model, generation): what a good bundle looks like."""
    root = tmp_path_factory.mktemp("refs")
    return {(m, g): complete(compile_bundle(model.base, model.adapters, root / m / g, generation=g).path)
            for m, model in models.items() for g in GENERATIONS}


@pytest.fixture(scope="module")
def staged(tiny, tmp_path_factory) -> list[bool]:
    """Per ``report`` call of a compile: whether the staging directory exists then."""
    parent = tmp_path_factory.mktemp("staged")
    seen: list[bool] = []
    compile_bundle(tiny.base, tiny.adapters, parent / "b", generation="v3",
                   report=lambda _msg: seen.append(any(parent.glob(".b.*.partial"))))
    assert len(seen) == STEPS
    assert not seen[0] and seen[-1], seen  # killing at every step covers before and inside staging
    return seen


# ---- (a) a compile killed at random moments and at every step ---------------------------------------


@pytest.mark.parametrize("model", ["inline", "external"])
def test_compile_killed_at_random_moments(models, refs, tmp_path, model):
    """A loop of compiles (v1, v2, v3 in turn, each to a new path) killed at random moments."""
    base_files = snapshot(models[model].base.parent)
    rng = random.Random(20240611)
    t_end = time.monotonic() + DEADLINE
    for k in range(KILLS):
        if time.monotonic() > t_end:
            break
        work = tmp_path / f"kill{k}"
        work.mkdir()
        jobs = [{"out": str(work / "o{i}"), "generation": g, "force": False} for g in GENERATIONS]
        proc = child(models[model], work, jobs, loop=True)
        wait_ready(proc)
        time.sleep(rng.uniform(0.0, 0.15))  # ~10 ms per compile: lands anywhere in the first few
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
        done = sorted(int(p.name[1:]) for p in work.iterdir() if re.fullmatch(r"o\d+", p.name))
        assert done == list(range(len(done))), f"compiles run one after another: {done}"
        for i in done:  # every output that exists is a complete bundle
            assert complete(work / f"o{i}") == refs[model, GENERATIONS[i % 3]], f"o{i}"
        leftovers = [p for p in work.iterdir() if not re.fullmatch(r"o\d+", p.name)]
        assert len(leftovers) <= 1, [p.name for p in leftovers]  # the compile that was running, if any
        for p in leftovers:
            assert re.fullmatch(rf"\.o{len(done)}\..+\.partial", p.name), p.name
            check_partial(p, [refs[model, GENERATIONS[len(done) % 3]]])
    assert k >= 2, "too few kills in the time allowed"
    assert snapshot(models[model].base.parent) == base_files, "the base model changed"


@pytest.mark.parametrize("step", range(1, STEPS + 1))
def test_compile_killed_at_each_step(tiny, refs, staged, tmp_path, step):
    """Killed at the k-th ``report`` call: nothing at the output; inside staging, a rejected .partial."""
    out = tmp_path / "b"
    proc = child(tiny, tmp_path, [{"out": str(out), "generation": "v3", "force": False}], kill_at=("report", step))
    run_to_death(proc)
    assert not out.exists()
    leftovers = check_leftovers(tmp_path, "b", [refs["inline", "v3"]])
    assert len(leftovers) == staged[step - 1]  # the staging directory, if the step comes after it was made
    for p in leftovers:
        assert_rejected(p)


def test_compile_killed_at_the_final_rename_leaves_no_loadable_partial(tiny, refs, tmp_path):
    out = tmp_path / "b"
    proc = child(tiny, tmp_path, [{"out": str(out), "generation": "v3", "force": False}],
                 kill_at=("lora_runtime.publish", 1))
    run_to_death(proc)
    assert not out.exists()
    (partial,) = check_leftovers(tmp_path, "b", [refs["inline", "v3"]])
    assert_rejected(partial)


# ---- (b) replacing a bundle with force=True --------------------------------------------------------


@pytest.fixture
def old_bundle(tiny, tmp_path) -> Path:
    """A v2 bundle that forced v3 compiles try to replace."""
    return compile_bundle(tiny.base, tiny.adapters, tmp_path / "b", generation="v2").path


def test_forced_replace_with_a_broken_adapter_keeps_the_old_bundle(tiny, old_bundle, tmp_path):
    before = snapshot(old_bundle)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{ not json")
    with pytest.raises(AdapterError):
        compile_bundle(tiny.base, {**tiny.adapters, "broken": broken}, old_bundle, generation="v3", force=True)
    assert snapshot(old_bundle) == before
    open_bundle(old_bundle, verify_base=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "broken"]


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
@pytest.mark.parametrize("step", range(1, STEPS + 1))
def test_forced_replace_failing_at_each_step_keeps_the_old_bundle(tiny, refs, old_bundle, tmp_path, step, error):
    """``report`` raising at step k (a progress bar's Ctrl-C): the old bundle stays, byte for byte."""
    before = snapshot(old_bundle)
    calls = []

    def report(msg: str) -> None:
        calls.append(msg)
        if len(calls) == step:
            raise error(f"stop at {msg}")

    with pytest.raises(error):
        compile_bundle(tiny.base, tiny.adapters, old_bundle, generation="v3", force=True, report=report)
    assert len(calls) == step
    assert snapshot(old_bundle) == before
    assert complete(old_bundle) == refs["inline", "v2"]
    assert [p.name for p in tmp_path.iterdir()] == ["b"], "the staging directory must be removed"


def test_forced_replace_succeeds(tiny, refs, old_bundle, tmp_path):
    """The positive control of the tests above: the same call without a failure replaces the bundle."""
    compile_bundle(tiny.base, tiny.adapters, old_bundle, generation="v3", force=True)
    assert complete(old_bundle) == refs["inline", "v3"]
    assert [p.name for p in tmp_path.iterdir()] == ["b"]


@pytest.mark.parametrize("model", ["inline", "external"])
def test_forced_replace_killed_at_random_moments(models, refs, tmp_path, model):
    """Forced compiles alternating v3 and v2 into one path, killed at random moments: always one whole bundle."""
    base_files = snapshot(models[model].base.parent)
    m = models[model]
    rng = random.Random(7)
    t_end = time.monotonic() + DEADLINE
    for k in range(KILLS):
        if time.monotonic() > t_end:
            break
        work = tmp_path / f"kill{k}"
        out = compile_bundle(m.base, m.adapters, work / "b", generation="v2").path
        jobs = [{"out": str(out), "generation": g, "force": True} for g in ("v3", "v2")]
        proc = child(m, work, jobs, loop=True)
        wait_ready(proc)
        time.sleep(rng.uniform(0.0, 0.15))
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
        assert out.exists(), "a forced replace left no bundle at the path"
        assert complete(out) in (refs[model, "v2"], refs[model, "v3"])
        # A kill while the replaced bundle is removed leaves it in a ".b.*.partial" that open_bundle refuses.
        check_leftovers(work, "b", [refs[model, "v2"], refs[model, "v3"]])
    assert k >= 2, "too few kills in the time allowed"
    assert snapshot(models[model].base.parent) == base_files, "the base model changed"


# A forced replace swaps the new bundle in with one renameat2(RENAME_EXCHANGE), so there is no rename
# to kill between; the replaced bundle then sits in the staging directory until it is removed.
@pytest.mark.parametrize(("kill_at", "survivor"), [
    *((("report", k), "old") for k in range(1, STEPS + 1)),
    pytest.param(("shutil.rmtree", 1), "new", id="rmtree-old"),
])
def test_forced_replace_killed_at_each_point(tiny, refs, old_bundle, tmp_path, kill_at, survivor):
    """Killed at a chosen point of a forced v2 -> v3 replace: the old or the new bundle, whole; no other bundle."""
    before = snapshot(old_bundle)
    proc = child(tiny, tmp_path, [{"out": str(old_bundle), "generation": "v3", "force": True}], kill_at=kill_at)
    run_to_death(proc)
    assert old_bundle.is_dir(), "no bundle at the path"
    if survivor == "old":
        assert snapshot(old_bundle) == before
        assert complete(old_bundle) == refs["inline", "v2"]
    else:
        assert complete(old_bundle) == refs["inline", "v3"]
    for p in check_leftovers(tmp_path, "b", [refs["inline", "v2"], refs["inline", "v3"]]):
        assert_rejected(p)


# ---- (c) force=True never replaces what is not a bundle -------------------------------------------


def _not_a_bundle(kind: str, path: Path) -> None:
    if kind == "file":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("my notes\n")
        return
    path.mkdir(parents=True)
    if kind == "files":
        (path / "notes.txt").write_text("keep me\n")
        (path / "data.bin").write_bytes(os.urandom(1000))
    elif kind == "subdir":
        (path / "sub").mkdir()
        (path / "sub" / "x.txt").write_text("keep me\n")
    elif kind == "foreign-manifest":  # a web app, a Chrome extension...: manifest.json is a common name
        (path / "manifest.json").write_text(json.dumps({"name": "my app", "version": "1.0"}))
        (path / "index.html").write_text("<html></html>\n")


@pytest.mark.parametrize("kind", [
    "files", "subdir",
    "foreign-manifest",  # a web app, say: manifest.json is a common name
    "file",
])
def test_force_refuses_to_replace_what_is_not_a_bundle(tiny, tmp_path, kind):
    out = tmp_path / "target"
    _not_a_bundle(kind, out)
    before = snapshot(out) if out.is_dir() else {"": (out.stat().st_size, out.read_text())}
    with pytest.raises(BundleError, match="not a bundle"):
        compile_bundle(tiny.base, tiny.adapters, out, generation="v3", force=True)
    after = snapshot(out) if out.is_dir() else {"": (out.stat().st_size, out.read_text())}
    assert after == before
    assert [p.name for p in tmp_path.iterdir()] == ["target"]


def test_an_empty_directory_is_taken_and_a_bundle_needs_force(tiny, refs, tmp_path):
    """Positive control: the refusal above is about content. An empty folder made beforehand holds nothing to
    lose and is taken; a bundle there is replaced only with force."""
    out = tmp_path / "target"
    out.mkdir()
    compile_bundle(tiny.base, tiny.adapters, out, generation="v3")
    assert complete(out) == refs["inline", "v3"]
    with pytest.raises(BundleError, match="already exists"):
        compile_bundle(tiny.base, tiny.adapters, out, generation="v3")
    compile_bundle(tiny.base, tiny.adapters, out, generation="v3", force=True)
    assert complete(out) == refs["inline", "v3"]


def test_stale_staging_of_dead_compiles_is_removed(tiny, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".b.{dead.pid}.x1y2.partial"
    stale.mkdir()
    (stale / "manifest.json").write_text("{}")
    alive = tmp_path / f".b.{os.getpid()}.x3y4.partial"  # ours: still running, so kept
    alive.mkdir()
    compile_bundle(tiny.base, tiny.adapters, tmp_path / "b", generation="v3")
    assert not stale.exists() and alive.exists()
