"""What a function costs on a GPU or TPU, measured on a machine that has neither ("deviceless" AOT compilation).

XLA's GPU and TPU compilers run on the host: given a description of the target device, ``jax.jit(f).trace(...)
.lower(lowering_platforms=(platform,)).compile()`` produces the same optimized HLO, kernel partition and buffer
assignment as on the device. This module compiles a function that way and reads off what it costs in memory
traffic, which is what a normalization's speed is made of (it does a few flops per byte):

* a **kernel** is one instruction of the optimized entry computation that launches work: a fusion, a
  custom-call, a non-fused reduce or copy, a collective (the ``-start`` half of an asynchronous pair). Bitcasts,
  tuples, tuple elements, parameters and constants move nothing. Calls (e.g. GPU command buffers) are looked into.
* a kernel **moves** the bytes of its operands plus the bytes of its outputs: each fusion reads its inputs from
  and writes its outputs to device memory once, except an operand it only slices, of which it reads the slice.
  Sizes are logical (elements times element size); TPU tiled layouts may pad small arrays, which
  ``cost_analysis()["bytes accessed"]`` (TPU only) accounts for. On TPU, XLA may prefetch an array that fits into
  on-chip VMEM (an asynchronous ``copy-start``) and let later kernels read it from there: ``hbm_bytes`` counts only
  the traffic to and from device memory (HBM).
* the **temporaries** are ``compiled.memory_analysis().temp_size_in_bytes``: device memory the executable
  allocates besides its arguments and outputs.

Requirements: ``jax-cuda12-plugin`` and ``jax-cuda12-pjrt`` (GPU compiler) and ``jax[tpu]`` (libtpu, TPU compiler)
at the installed jax's version, and ``JAX_PLATFORMS=cpu`` (no device is needed or used)::

    >>> import jax, jax.numpy as jnp
    >>> cost = compile_cost(lambda x: x * 2, jax.ShapeDtypeStruct((1024, 1024), jnp.float32), platform="cuda")
    >>> cost.num_kernels, cost.bytes_moved == 2 * 1024 * 1024 * 4
    (1, True)
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import topologies

GPU_SPECS = Path(__file__).resolve().parent / "gpu_specs"
PLATFORMS = ("cuda", "tpu")

# Entry instructions that launch no kernel of their own.
_FREE_OPCODES = frozenset(
    {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "opt-barrier", "after-all", "partition-id"}
    | {"replica-id", "add-dependency"}
)
_SLICES = frozenset({"slice", "dynamic-slice"})
_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all", "ragged-all-to-all")
_ELEMENT_BYTES = {
    "pred": 1,
    "s2": 0.25,
    "u2": 0.25,
    "s4": 0.5,
    "u4": 0.5,
    "s8": 1,
    "u8": 1,
    "f8e4m3fn": 1,
    "f8e5m2": 1,
    "f8e4m3": 1,
    "f8e3m4": 1,
    "f8e4m3fnuz": 1,
    "f8e5m2fnuz": 1,
    "f8e4m3b11fnuz": 1,
    "f8e8m0fnu": 1,
    "f4e2m1fn": 0.5,
    "s16": 2,
    "u16": 2,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
    "c64": 8,
    "c128": 16,
    "token": 0,
}
_ARRAY_TYPE = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\](\{[^}]*\})?")
_MEMORY_SPACE = re.compile(r"S\((\d+)\)")
_INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One kernel of the optimized entry computation.

    Attributes:
      name: the HLO instruction's name (e.g. ``loop_multiply_fusion``).
      opcode: its opcode (``fusion``, ``custom-call``, ``reduce``, ``copy-start``, ``all-reduce-start``, ...).
      kind: the fusion kind (``kLoop``, ``kInput``, ``kOutput``, ``kCustom``) or the custom-call target, else "".
      operand_bytes: bytes of its operands (what it reads).
      output_bytes: bytes of its outputs (what it writes; for an asynchronous ``-start``, its ``-done``'s result).
      hbm_operand_bytes: the part of ``operand_bytes`` in device memory (TPU: not in on-chip VMEM/SMEM).
      hbm_output_bytes: the part of ``output_bytes`` in device memory.
    """

    name: str
    opcode: str
    kind: str
    operand_bytes: int
    output_bytes: int
    hbm_operand_bytes: int
    hbm_output_bytes: int

    @property
    def bytes_moved(self) -> int:
        return self.operand_bytes + self.output_bytes

    @property
    def hbm_bytes(self) -> int:
        return self.hbm_operand_bytes + self.hbm_output_bytes

    @property
    def is_collective(self) -> bool:
        return self.opcode.removesuffix("-start") in _COLLECTIVES


@dataclasses.dataclass(frozen=True)
class Cost:
    """What one compiled function costs on the target.

    Attributes:
      platform: ``"cuda"`` or ``"tpu"``.
      hlo: the optimized HLO module, as text.
      kernels: the kernels of the entry computation, in program order.
      temp_bytes: temporary device memory (``memory_analysis().temp_size_in_bytes``), or None if unavailable.
      bytes_accessed: TPU's own count, ``cost_analysis()["bytes accessed"]``; None on GPU (no cost analysis
        deviceless). It counts every operand and output of every instruction, asynchronous copies' tuples
        included, whatever memory they live in.
    """

    platform: str
    hlo: str
    kernels: tuple[Kernel, ...]
    temp_bytes: int | None
    bytes_accessed: float | None

    @property
    def bytes_moved(self) -> int:
        """Bytes every kernel reads and writes, wherever the buffers live."""
        return sum(k.bytes_moved for k in self.kernels)

    @property
    def hbm_bytes(self) -> int:
        """Bytes every kernel reads from and writes to device memory (equal to ``bytes_moved`` on GPU).

        On TPU, XLA may prefetch an array that fits into on-chip VMEM (an asynchronous ``copy-start``) and let the
        later passes read it from there; those reads are not device-memory traffic.
        """
        return sum(k.hbm_bytes for k in self.kernels)

    @property
    def num_kernels(self) -> int:
        return len(self.kernels)

    @property
    def num_collectives(self) -> int:
        return sum(k.is_collective for k in self.kernels)

    def summary(self) -> str:
        """One line per kernel: opcode, kind, bytes read and written (device-memory part in brackets)."""
        lines = [
            f"{self.platform}: {self.num_kernels} kernels, {self.bytes_moved} bytes ({self.hbm_bytes} device memory),"
            f" temp {self.temp_bytes}"
        ]
        lines += [
            f"  {k.opcode:<18} {k.kind:<20} read {k.operand_bytes:>11} ({k.hbm_operand_bytes:>11})"
            f"  write {k.output_bytes:>11} ({k.hbm_output_bytes:>11})  {k.name}"
            for k in self.kernels
        ]
        return "\n".join(lines)


@functools.cache
def gpu_topology(spec: str = "h100_sxm", topology: str = "1x1x1"):
    """A deviceless GPU topology described by ``gpu_specs/<spec>.txtpb`` (an XLA ``GpuTargetConfigProto``).

    Args:
      spec: file name (without extension) under ``benchmarks/gpu_specs``.
      topology: ``"<slices>x<hosts>x<devices per host>"``.
    """
    target_config = (GPU_SPECS / f"{spec}.txtpb").read_text()
    return topologies.get_topology_desc(
        platform="cuda", topology_name="", target_config=target_config, topology=topology
    )


@functools.cache
def tpu_topology(name: str = "v5e:2x2"):
    """A deviceless TPU topology, e.g. ``"v5e:2x2"`` (four v5e chips)."""
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no metadata server to ask: we are not on a TPU VM
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # no TPU is used, so other processes may load it too
    return topologies.get_topology_desc(name, platform="tpu")


def topology_for(platform: str):
    """The default topology of ``platform`` ("cuda": one H100; "tpu": v5e 2x2)."""
    if platform == "cuda":
        return gpu_topology()
    if platform == "tpu":
        return tpu_topology()
    raise ValueError(f"platform must be one of {PLATFORMS}, got {platform!r}")


def compilers_available() -> str | None:
    """None if both deviceless compilers load, else the reason they do not."""
    try:
        for platform in PLATFORMS:
            topology_for(platform)
    except Exception as error:  # noqa: BLE001 - any failure to load a plugin is a reason to report
        return f"{type(error).__name__}: {error}"
    return None


def compile_cost(
    fn: Callable[..., Any],
    *arg_specs: Any,
    platform: str = "cuda",
    topology: Any = None,
    in_shardings: Any = None,
) -> Cost:
    """Compiles ``fn`` for ``platform`` without a device and measures its kernels and bytes.

    Args:
      fn: the function to compile (it is wrapped in ``jax.jit``).
      *arg_specs: pytrees of ``jax.ShapeDtypeStruct`` (or arrays); shapes and dtypes only.
      platform: ``"cuda"`` or ``"tpu"``.
      topology: a topology from :func:`gpu_topology` / :func:`tpu_topology`; default :func:`topology_for`.
      in_shardings: pytree of shardings matching ``arg_specs`` (e.g. over a mesh of the topology's devices);
        default: every argument on the topology's first device.

    Returns:
      The :class:`Cost` of the compiled executable.
    """
    topology = topology_for(platform) if topology is None else topology
    if in_shardings is None:
        device_sharding = jax.sharding.SingleDeviceSharding(topology.devices[0])
        in_shardings = jax.tree.map(lambda _: device_sharding, arg_specs)
    specs = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(np.shape(a), a.dtype, sharding=s), tuple(arg_specs), tuple(in_shardings)
    )
    compiled = jax.jit(fn).trace(*specs).lower(lowering_platforms=(platform,)).compile()
    hlo = compiled.as_text()
    memory = compiled.memory_analysis()
    costs = compiled.cost_analysis() if platform == "tpu" else None
    if isinstance(costs, list):  # older jax: one dict per computation
        costs = costs[0]
    return Cost(
        platform=platform,
        hlo=hlo,
        kernels=tuple(entry_kernels(hlo)),
        temp_bytes=None if memory is None else int(memory.temp_size_in_bytes),
        bytes_accessed=None if not costs else float(costs["bytes accessed"]),
    )


def collective_bytes(hlo_text: str, kind: str = "all-reduce") -> tuple[int, int]:
    """(number of ``kind`` ops, e.g. ``all-reduce`` or ``all-gather``, and their result bytes per device) in HLO."""
    ops, total = 0, 0
    for match in re.finditer(rf"=\s*(.+?)\s+{kind}(?:-start)?\(", hlo_text):
        ops += 1
        for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", match.group(1)):
            total += _ELEMENT_BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",") if d], dtype=np.int64))
    return ops, int(total)


def type_bytes(hlo_type: str, device_memory_only: bool = False) -> int:
    """Bytes of an HLO type: an array ``f32[8,128]{1,0}`` or a tuple of them.

    Args:
      hlo_type: the type as printed in HLO text, layout included.
      device_memory_only: count only arrays in the default memory space (no ``S(n)``, n > 0, in the layout).
    """
    total = 0.0
    for element, dims, layout in _ARRAY_TYPE.findall(hlo_type):
        space = _MEMORY_SPACE.search(layout)
        if device_memory_only and space and int(space.group(1)) != 0:
            continue
        total += _ELEMENT_BYTES[element] * int(np.prod([int(d) for d in dims.split(",") if d], dtype=np.int64))
    return int(total)


def _balanced(text: str, start: int) -> int:
    """Index just past the bracket group opening at ``text[start]``."""
    depth = 0
    for i in range(start, len(text)):
        depth += text[i] in "({["
        depth -= text[i] in ")}]"
        if depth == 0:
            return i + 1
    raise ValueError(f"unbalanced brackets in HLO: {text[start:]!r}")


def _parse_instruction(rest: str):
    """(type, opcode, operand names, attributes) of the right-hand side of an HLO instruction."""
    end = _balanced(rest, 0) if rest.startswith("(") else rest.index(" ")
    hlo_type, rest = rest[:end], rest[end:].lstrip()
    open_paren = rest.index("(")
    close = _balanced(rest, open_paren)
    operands = re.findall(r"%([\w.\-]+)", rest[open_paren:close])
    return hlo_type, rest[:open_paren], operands, rest[close:]


def _computations(hlo: str) -> tuple[dict[str, list[str]], str]:
    """Instruction lines of every computation of an HLO module, and the entry computation's name."""
    computations: dict[str, list[str]] = {}
    entry, current = "", None
    for line in hlo.splitlines():
        if current is None:
            match = _COMPUTATION.match(line)
            if match and not line[0].isspace():  # headers start at column 0, instructions are indented
                current = match.group(2)
                computations[current] = []
                entry = current if match.group(1) else entry
        elif line.strip() == "}":
            current = None
        elif line.strip():
            computations[current].append(line)
    return computations, entry


@dataclasses.dataclass(frozen=True)
class _Instruction:
    name: str
    opcode: str
    operands: tuple[str, ...]
    attributes: str
    bytes: int
    hbm_bytes: int
    parameter: int | None  # the parameter number, for a parameter


def _instructions(lines: list[str]) -> list[_Instruction]:
    instructions = []
    for line in lines:
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        hlo_type, opcode, operands, attributes = _parse_instruction(match.group(3))
        number = re.search(r"parameter\((\d+)\)", match.group(3)) if opcode == "parameter" else None
        instructions.append(
            _Instruction(
                name=match.group(2),
                opcode=opcode,
                operands=tuple(operands),
                attributes=attributes,
                bytes=type_bytes(hlo_type),
                hbm_bytes=type_bytes(hlo_type, device_memory_only=True),
                parameter=int(number.group(1)) if number else None,
            )
        )
    return instructions


def _read_fractions(fused: list[_Instruction]) -> dict[int, float]:
    """The fraction of each parameter a fused computation reads: all of it, unless it is only ever sliced."""
    users: dict[str, list[_Instruction]] = {}
    for instruction in fused:
        for operand in instruction.operands:
            users.setdefault(operand, []).append(instruction)

    def sliced_bytes(name: str) -> int | None:  # bytes read of `name` if only slices (through bitcasts) read it
        total = 0
        for user in users.get(name, []):
            if user.opcode == "bitcast":
                part = sliced_bytes(user.name)
                if part is None:
                    return None
                total += part
            elif user.opcode in _SLICES and user.operands[0] == name:
                total += user.bytes
            else:
                return None
        return total

    fractions = {}
    for instruction in fused:
        if instruction.parameter is not None and instruction.bytes:
            part = sliced_bytes(instruction.name)
            fractions[instruction.parameter] = 1.0 if part is None else min(1.0, part / instruction.bytes)
    return fractions


def entry_kernels(hlo: str) -> list[Kernel]:
    """The kernels of an optimized HLO module's entry computation (see the module's docstring)."""
    computations, entry = _computations(hlo)

    def kernels_of(computation: str) -> list[Kernel]:
        sizes: dict[str, tuple[int, int]] = {}  # name -> (bytes, device-memory bytes)
        kernels: dict[str, Kernel] = {}
        for instruction in _instructions(computations[computation]):
            name, opcode, operands = instruction.name, instruction.opcode, instruction.operands
            sizes[name] = (instruction.bytes, instruction.hbm_bytes)
            if opcode.endswith("-done"):
                # A -start's tuple holds its operand's buffer too; what it writes is the -done's result.
                start = kernels.get(operands[0])
                if start is not None:
                    kernels[start.name] = dataclasses.replace(
                        start, output_bytes=instruction.bytes, hbm_output_bytes=instruction.hbm_bytes
                    )
                continue
            if opcode in _FREE_OPCODES:
                continue
            callee = re.search(r"(?:to_apply|calls)=%?([\w.\-]+)", instruction.attributes)
            if opcode == "call" and callee:
                kernels.update((k.name, k) for k in kernels_of(callee.group(1)))
                continue
            # What is read of each operand: a slice reads only what it keeps.
            if opcode in _SLICES:
                fractions = {0: instruction.bytes / max(sizes[operands[0]][0], 1)}
            elif opcode == "fusion" and callee:
                fractions = _read_fractions(_instructions(computations[callee.group(1)]))
            else:
                fractions = {}
            attributes = instruction.attributes
            kind = re.search(r"kind=(\w+)", attributes) or re.search(r'custom_call_target="([^"]+)"', attributes)
            kernels[name] = Kernel(
                name=name,
                opcode=opcode,
                kind=kind.group(1) if kind else "",
                operand_bytes=round(sum(sizes[o][0] * fractions.get(i, 1.0) for i, o in enumerate(operands))),
                output_bytes=instruction.bytes,
                hbm_operand_bytes=round(sum(sizes[o][1] * fractions.get(i, 1.0) for i, o in enumerate(operands))),
                hbm_output_bytes=instruction.hbm_bytes,
            )
        return list(kernels.values())

    return kernels_of(entry)
