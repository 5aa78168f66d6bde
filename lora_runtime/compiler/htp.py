"""The HTP stage of a compile: run the bundle on the HTP, record where it ran and how accurate it is, and
(``--htp-context``) keep the compiled QNN context in the bundle.

With ``onnxruntime-qnn`` installed (the HTP simulator on x86), the stage opens the bundle's graph on the HTP
with CPU fallback disabled (a node QNN refuses is an error naming it), reads QNN's own graph for the op types
and dtypes it compiled to, and compares every use-case's output on the HTP with the same bundle on ONNX
Runtime's CPU provider (which should agree to about one quantization step) and with the FP32 graph.

Ahead of time: ONNX Runtime's EP context (``ep.context_enable``) writes ``model_ctx.onnx``, a wrapper whose
``EPContext`` node names a QNN context binary; loading it skips QNN's graph compilation. The wrapper loses
the graph inputs that are also initializers (the v2/v3 slots), so they are declared again.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from lora_runtime.bundle import Bundle
from lora_runtime.compiler.options import HtpOptions
from lora_runtime.errors import TargetError
from lora_runtime.eval.accuracy import logits_agreement, logits_sqnr, synthesize_inputs
from lora_runtime.llm.cache import PAST_BIAS, next_step
from lora_runtime.manifest import Accuracy, Target
from lora_runtime.names import HTP_CONTEXT, HTP_DECODE_CONTEXT
from lora_runtime.runtime import htp
from lora_runtime.runtime.session import make_session, run_use_case


@dataclass(frozen=True)
class HtpResult:
    target: Target
    accuracy: tuple[Accuracy, ...]
    files: tuple[str, ...]  # the context model and binary (bundle-relative), when compiled ahead of time


def htp_stage(bundle: Bundle, options: HtpOptions, samples: Sequence[Mapping[str, np.ndarray]] | None,
              fp32: Mapping[str, Sequence[Mapping[str, np.ndarray]]] | None, say) -> HtpResult:  # noqa: ANN001
    """Check ``bundle`` (being compiled) on the HTP. ``samples``: inputs to compare on (held-out calibration
    samples, or the user's sample inputs; None: synthesized); ``fp32``: the FP32 graph's outputs on them.
    A decode graph is compiled (and kept) too, and compared on the step after each sample."""
    m = bundle.manifest
    reason = htp.missing()
    if reason is not None:
        if options.context:
            raise TargetError(f"--htp-context compiles on the HTP: {reason}")
        return HtpResult(replace(m.target, placement=f"not checked: {reason}"), (), ())
    say("compiling on the HTP" + (" (and keeping the context)" if options.context else ""))
    s, placement, ops, files = _compile(bundle, m.graph, HTP_CONTEXT, options)
    target = replace(m.target, placement=placement, qnn_ops=ops, context=HTP_CONTEXT if files else None)
    cpu = make_session(bundle)
    feeds = list(samples) if samples else [synthesize_inputs(cpu, {sl.name for sl in m.slots})]
    say(f"running {len(m.use_cases)} use-cases on the HTP simulator")
    on_htp = {u: [run_use_case(bundle, u, f, session=s) for f in feeds] for u in m.use_case_names}
    on_cpu = {u: [run_use_case(bundle, u, f, session=cpu) for f in feeds] for u in m.use_case_names}
    inputs = f"{len(feeds)} held-out calibration samples" if samples else "synthesized inputs"
    measured = [_versus("htp_vs_cpu", "the same bundle on ONNX Runtime's CPU provider", inputs, on_cpu, on_htp)]
    if fp32 is not None:
        measured.append(_versus("htp_vs_fp32", "its FP32 graph", inputs, fp32, on_htp))
    if m.target.decode is not None:
        d = m.target.decode
        say("compiling the decode graph on the HTP")
        ds, placement, ops, more = _compile(bundle, d.graph, HTP_DECODE_CONTEXT, options)
        files += more
        target = replace(target, decode=replace(d, placement=placement, qnn_ops=ops,
                                                context=HTP_DECODE_CONTEXT if more else None))
        dcpu = make_session(bundle, graph="decode")
        first = m.use_case_names[0]
        steps = [next_step(f, o) for f, o in zip(feeds, on_cpu[first])] if PAST_BIAS in feeds[0] else \
            [synthesize_inputs(dcpu, {sl.name for sl in m.slots})]
        say(f"running {len(m.use_cases)} use-cases on the HTP simulator's decode graph")
        on_htp = {u: [run_use_case(bundle, u, f, session=ds) for f in steps] for u in m.use_case_names}
        on_cpu = {u: [run_use_case(bundle, u, f, session=dcpu) for f in steps] for u in m.use_case_names}
        what = f"the decode step after each of {len(steps)} held-out samples" if PAST_BIAS in feeds[0] \
            else "synthesized inputs"
        measured.append(_versus("htp_vs_cpu_decode", "the same decode graph on ONNX Runtime's CPU provider", what,
                                on_cpu, on_htp, test_name="the decode graph on the HTP (QNN simulator)"))
    return HtpResult(target, tuple(measured), tuple(files))


def _compile(bundle: Bundle, graph: str, context: str, options: HtpOptions
             ) -> tuple[ort.InferenceSession, str, dict[str, int], list[str]]:
    """A strict HTP session on one graph of the bundle: the session, where its nodes went, the QNN ops, and the
    EPContext files it wrote (``options.context``)."""
    config = {"session.record_ep_graph_assignment_info": "1"}
    if options.context:
        config |= {"ep.context_enable": "1", "ep.context_embed_mode": "0",
                   "ep.context_file_path": str(bundle.path / context)}
    with tempfile.TemporaryDirectory(prefix=".lora_runtime-qnn-") as dump:
        s = htp.session(bundle.file(graph), options.soc_model, options.htp_arch, dump_dir=Path(dump), config=config)
        placement, ops = htp.placement(s), htp.qnn_ops(Path(dump))
    files = [f.relative_to(bundle.path).as_posix() for f in _fix_context(bundle.path / context)] \
        if options.context else []
    return s, placement, ops, files


def _versus(key: str, reference: str, inputs: str, ref: Mapping[str, Sequence[Mapping[str, np.ndarray]]],
            test: Mapping[str, Sequence[Mapping[str, np.ndarray]]], *,
            test_name: str = "the HTP (QNN simulator)") -> Accuracy:
    return Accuracy(key, test_name, reference, inputs, {u: logits_sqnr(ref[u], test[u]) for u in test},
                    {u: logits_agreement(ref[u], test[u]) for u in test})


def _fix_context(ctx: Path) -> list[Path]:
    """Declare the wrapper's initializer-inputs (v2/v3 slots) as graph inputs again; return its files."""
    model = onnx.load(str(ctx), load_external_data=False)
    declared = {v.name for v in model.graph.input}
    types = {t.name: t for t in model.graph.initializer}
    used = {i for n in model.graph.node for i in n.input}
    for name in sorted(used & set(types) - declared):
        t = types[name]
        model.graph.input.append(onnx.helper.make_tensor_value_info(name, t.data_type, list(t.dims)))
    ctx.write_bytes(model.SerializeToString())
    binaries = [ctx.parent / onnx.helper.get_attribute_value(a).decode() for n in model.graph.node
                if n.op_type == "EPContext" for a in n.attribute if a.name == "ep_cache_context"]
    missing = [b for b in binaries if not b.is_file()]
    if missing:
        raise TargetError(f"{ctx}: the QNN context binary {missing[0].name} was not written")
    return [ctx, *binaries]
