"""The naming contract: every tensor, node and file name that two modules must agree on is made here.

Graph names are PEFT's where PEFT has one (``<module>.lora_A.weight``), so a PEFT safetensors file
loads into a slot without remapping and QAIRT tools recognise the LoRA tensors. The names of a
branch's intermediate tensors appear in encodings files (``<module>.lora/scaled``), so they are part
of the bundle format. A module that needs a name asks this one; nothing rebuilds a name from pieces,
and no pass finds a node by parsing its name: passes return the names they created.
"""

from __future__ import annotations

from dataclasses import dataclass

# --- graph inputs every generation shares -----------------------------------------------------------------------

STRENGTH = "lora_alpha"  # the run-time strength: a scalar (v1/v2) or one entry per adapter (v3)
SCALING = "lora_scaling"  # v1/v2: the current adapter's PEFT scaling per point, (P,)
GAIN = "lora_gain"  # v1/v2: lora_alpha * lora_scaling
GAIN_NODE = "lora/gain"


@dataclass(frozen=True)
class GainNames:
    """v3: the gain ``Gather(lora_alpha, index) * scaling`` of the ``k``-th column layout, computed once at the
    graph's start for every point whose concatenated rank has that layout (the same adapters, ranks and
    scalings: typically every point an adapter set targets)."""

    k: int

    @property
    def strength_index(self) -> str:  # constant: column -> adapter index map
        return f"lora_strength_index.{self.k}"

    @property
    def column_scaling(self) -> str:  # constant: PEFT scaling of every column
        return f"lora_column_scaling.{self.k}"

    @property
    def strength(self) -> str:
        return f"{GAIN_NODE}.{self.k}/strength"

    @property
    def gain(self) -> str:
        return f"{GAIN_NODE}.{self.k}"

    @property
    def gather(self) -> str:  # node names
        return f"{GAIN_NODE}.{self.k}/Gather"

    @property
    def mul(self) -> str:
        return f"{GAIN_NODE}.{self.k}/Mul"


@dataclass(frozen=True)
class BasePathNames:
    """v3 on the CPU: the ``If`` that runs the graph's base path when every strength is 0
    (``compiler.passes.base_path``), and the prefixes that keep its two subgraphs' values apart."""

    any_active: str = "lora/base_path/any"  # bool scalar: some strength is not 0
    zero: str = "lora/base_path/zero"  # constant 0.0
    node: str = "lora/base_path/If"
    branched: str = "lora/branched/"  # the then-branch: the graph with its LoRA branches
    base: str = "lora/base/"  # the else-branch: the base path

    def step(self, what: str) -> str:
        """The tensor (and node) of one step computing ``any_active``: ``abs``, ``max``."""
        return f"lora/base_path/{what}"


BASE_PATH = BasePathNames()


def lora_a(module: str) -> str:
    """PEFT's name of the A (r, in) weight at ``module``."""
    return f"{module}.lora_A.weight"


def lora_b(module: str) -> str:
    """PEFT's name of the B (out, r) weight at ``module``."""
    return f"{module}.lora_B.weight"


def saved_weight(module: str) -> str:
    """The slot holding the weight of a module an adapter saves whole (PEFT's ``modules_to_save``), stored (out, in)
    as PEFT stores it. PEFT keeps its copy as ``<module>.modules_to_save.<adapter>``; the base's own initializer keeps
    its name, so the two never collide."""
    return f"{module}.modules_to_save.weight"


def saved_bias(module: str) -> str:
    """The slot holding a saved module's bias (out,)."""
    return f"{module}.modules_to_save.bias"


def saved_name(module: str, what: str) -> str:
    """A node or tensor the saved-module pass adds at ``module``: the ``Transpose`` node and its output ``weight_t``
    (a MatMul reads the weight (in, out)), the ``Add`` node (the bias of an op that had none)."""
    return f"{module}.modules_to_save/{what}"


def base_output(y: str) -> str:
    """The base op's own output once a branch is added to it (the Add writes ``y``)."""
    return f"{y}.base"


@dataclass(frozen=True)
class BranchNames:
    """Every name the branch at ``module`` uses: its tensors and its nodes (see ``compiler.passes.branch``)."""

    module: str

    @property
    def prefix(self) -> str:
        return f"{self.module}.lora"

    # constants
    @property
    def point_index(self) -> str:  # v1/v2: the point's index into lora_gain
        return f"{self.module}.lora_point_index"

    @property
    def legacy_constants(self) -> tuple[str, str]:
        """v3 bundles compiled before gains were shared (same format version): the point's own index map and
        column scaling, which ``export`` still drops."""
        return f"{self.module}.lora_strength_index", f"{self.module}.lora_column_scaling"

    # tensors
    def tensor(self, what: str) -> str:
        """``strength``, ``gain``, ``A_f32``, ``B_f32``, ``A_t``, ``u``, ``scaled``, ``B_t``, ``delta``."""
        return f"{self.prefix}/{what}"

    @property
    def u(self) -> str:
        return self.tensor("u")

    @property
    def gain(self) -> str:
        return self.tensor("gain")

    @property
    def scaled(self) -> str:  # the input of the second MatMul: it gets an activation encoding of its own
        return self.tensor("scaled")

    @property
    def delta(self) -> str:
        return self.tensor("delta")

    # nodes
    def node(self, what: str) -> str:
        """One of ``BRANCH_NODES``."""
        return f"{self.prefix}/{what}"

    @property
    def nodes(self) -> tuple[str, ...]:
        """Every node a branch may have (only v1/v2 have a ``Gather``: v3's gain is shared, ``GainNames``, except in
        v3 bundles compiled before that, whose points have a ``Gather`` and a ``Gain`` each; only float16 slots
        have CastA/CastB, only points on float16 base ops CastX/CastBase/CastOut)."""
        return tuple(self.node(w) for w in BRANCH_NODES)


BRANCH_NODES = ("Gather", "Gain", "CastA", "CastB", "CastX", "TransposeA", "MatMulA", "Scale", "TransposeB", "MatMulB",
                "CastBase", "Add", "CastOut")


# --- quantization ------------------------------------------------------------------------------------------------


def quantized(tensor: str) -> str:
    """The output of the QuantizeLinear of an activation."""
    return f"{tensor}/q"


def dequantized(tensor: str) -> str:
    """The DequantizeLinear output every consumer of a quantized activation reads."""
    return f"{tensor}/dq"


def scale_of(tensor: str) -> str:
    """An encoding's scale: a constant, or a graph input when the encoding is updatable."""
    return f"{tensor}.scale"


def zero_point_of(tensor: str) -> str:
    return f"{tensor}.zero_point"


def integer_weight(weight: str, bits: int) -> str:
    """A base weight's integer codes in a QDQ graph."""
    return f"{weight}.int{bits}"


def packed_weight(weight: str, bits: int) -> str:
    """A base weight's codes packed for MatMulNBits, and its scales: ``<w>.q4`` / ``<w>.scales``."""
    return f"{weight}.q{bits}"


def block_scales(weight: str) -> str:
    return f"{weight}.scales"


PACKED_SLICE = "packed slice"  # a point's op type when it is one module's slice of a packed linear op


def block_zero_points(weight: str) -> str:
    return f"{weight}.zero_points"


BLOCK_OFFSETS = ".block_offsets"  # Q4_1/Q4_K's per-block constants, (blocks, N): the correction's MatMul weight


def block_offsets(weight: str) -> str:
    return weight + BLOCK_OFFSETS


# --- files of a bundle ---------------------------------------------------------------------------------------------

MANIFEST = "manifest.json"
GRAPH = "model.onnx"
DECODE_GRAPH = "model_decode.onnx"  # --decode-shape: the same graph at other static shapes (an LLM's decode step)
PATCHES = "patches"
GROUP_PATCH = "patches/group.safetensors"  # v3: the rank-concatenated A/B of every adapter
# the base's own values of every saved module (modules_to_save); "_" never starts an adapter name (saved_patch)
SAVED_PATCH = "patches/saved/_base.safetensors"
UNION_ENCODINGS = "patches/encodings.union.safetensors"  # ad-hoc strengths: calibrated over every use-case
ENCODINGS_DIR = "encodings"
ALL_ENCODINGS = "encodings/all.encodings"  # non-updatable
BASE_ENCODINGS = "encodings/base.encodings"  # adapter-only: the base's shared set
BASE_WEIGHT_ENCODINGS = "encodings/base_weights.encodings"  # --base-weights int8/int4
QDQ_DATA = "base.qdq.data"  # the QDQ graph's own base tensors
QDQ_DECODE_DATA = "base.qdq.decode.data"  # the decode graph's tensors that differ from the main graph's
LORA_WEIGHT_LIST = "lora_weight_list.txt"  # for qairt-converter --lora_weight_list
LORA_CONFIG_YAML = "lora_config.yaml"  # QAIRT's use-case list
SIDECARS = ("tokenizer.json", "chat.json")  # an imported LLM's tokenizer and chat settings
HTP_CONTEXT = "model_ctx.onnx"  # --htp-context: ONNX Runtime's EPContext wrapper of the compiled QNN graph
HTP_DECODE_CONTEXT = "model_decode_ctx.onnx"  # ... and of the decode graph

# --- model metadata (ONNX metadata_props) ------------------------------------------------------------------------

KV_PAIRS = "lora_runtime.kv_pairs"  # JSON [[past input, present output], ...]: a static KV cache's tensors
CACHE_SLOTS = "lora_runtime.cache_slots"  # a static KV cache's length C


def adapter_patch(adapter: str) -> str:
    """v1/v2: one adapter's slot values."""
    return f"patches/{adapter}.safetensors"


def saved_patch(adapter: str) -> str:
    """An adapter's copies of the modules it saves (``modules_to_save``), the base's values for the other saved
    modules: every saved-module patch has one layout."""
    return f"patches/saved/{adapter}.safetensors"


def encodings_patch(use_case: str) -> str:
    """Updatable encodings: one use-case's scales and zero points."""
    return f"patches/encodings/{use_case}.safetensors"


def use_case_encodings(use_case: str) -> str:
    """Per-use-case encodings files live in a folder of their own: no use-case name (``base``, ``all``) can
    collide with the shared files."""
    return f"encodings/use-cases/{use_case}.encodings"


def weight_only_data(dtype: str) -> str:
    """The data file of a bundle whose base weights were quantized weight-only (``base.int4.data``)."""
    return f"base.{dtype}.data"
