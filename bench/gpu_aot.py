"""What XLA would run on a CUDA GPU for a program, compiled on a machine without one.

Deviceless AOT: JAX's CUDA plugin (jax-cuda13-plugin, Python 3.12) makes a compile-only
device from a target config (the device's published facts: gpu_targets/h100.txtpb,
h200.txtpb), and the real XLA GPU compiler runs every pass, code generation and ptxas
(from /usr/local/cuda). Its thunk sequence (`xla_dump_to`) is what the GPU runtime would
execute: kernels, copies, command buffers (CUDA graphs), conditionals and loops.

Memory kinds must survive: a compile-only device has none and would silently turn a
`pinned_host` argument into device memory (a host fetch would look free). So arguments
are placed on the local CPU device (which has `pinned_host`), the program is lowered with
the CUDA lowering rules, and the module is compiled by the CUDA compile-only client.

Counts per execution: a conditional outside a command buffer costs the host a blocking
read of its predicate (XLA's ConditionalThunk); inside one it is a CUDA graph conditional
node. A loop with a known trip count costs no read. No autotuning happens here: gemms get
default tiles.
"""

from __future__ import annotations

import collections
import glob
import os
import re
import shutil
import tempfile
from pathlib import Path

TARGETS = {name: Path(__file__).with_name("gpu_targets") / f"{name}.txtpb" for name in ("h100", "h200")}
_THUNK = re.compile(r"^(\s*)(\d+): (k\w+)\s+\[[^\]]*\]\s*(.*)$")
_LABEL = re.compile(r"^(\s*)(condition|body|true_branch|false_branch|branch_?\d+|branch \d+):\s*$")
_LAUNCH = {"kKernel", "kCustomKernel", "kGemm", "kCublasLtMatmul", "kCuDnn", "kCustomCall", "kFft", "kConvolution",
           "kTriangularSolve", "kCholesky", "kNorm", "kCuDnnFmha"}  # fmt: skip
_MEMOPS = {"kCopy", "kMemset32BitValue", "kMemzero", "kDeviceToDevice"}
_D2H = {"kDeviceToHost", "kHostRecv", "kHostRecvDone", "kOutfeed"}


def available() -> str | None:
    """None if programs can be compiled for a GPU here, else why not."""
    try:
        from importlib.metadata import version

        version("jax-cuda13-plugin")
    except Exception:  # noqa: BLE001 - any failure means the same thing to the caller
        return "the CUDA plugin (jax-cuda13-plugin, Python 3.12) is not installed"
    if not Path("/usr/local/cuda/bin/ptxas").exists() and not shutil.which("ptxas"):
        return "ptxas (CUDA toolkit) not found"
    return None


def cuda_device(target: str):
    from jax.experimental import topologies

    topo = topologies.get_topology_desc(platform="cuda", target_config=TARGETS[target].read_text(),
                                        topology="1x1x1")  # fmt: skip
    return topo.devices[0]


def compile_counts(name: str, fn, args: tuple, *, target: str = "h100", static: dict | None = None,
                   donate: tuple = (), options: dict | None = None, keep: str | Path | None = None) -> dict:  # fmt: skip
    """Compile `fn(*args, **static)` as program `name` for `target`; `args` are ShapeDtypeStructs
    (or arrays) whose shardings are on the CPU device (memory kinds kept). Returns the counts
    (see `count`)."""
    import jax
    from jax._src import compiler
    from jax._src.lib import xla_client as xc

    from jaxmoe.runtime.programs import named

    jitted = jax.jit(named(fn, name), static_argnames=tuple(static or {}), donate_argnums=donate)
    lowered = jitted.trace(*args, **(static or {})).lower(lowering_platforms=("cuda",))
    device = cuda_device(target)
    dump = tempfile.mkdtemp(prefix="jaxmoe_gpu_aot_")
    try:
        opts = {"xla_dump_to": dump, **(options or {})}
        copts = compiler.get_compile_options(num_replicas=1, num_partitions=1, device_assignment=[device],
                                             env_options_overrides=opts, backend=device.client)  # fmt: skip
        exe = device.client.compile(lowered.compiler_ir(), executable_devices=xc.DeviceList((device,)),
                                    compile_options=copts)  # fmt: skip
        text = exe.hlo_modules()[0].to_string()
        module = re.match(r"HloModule (\S+?),", text).group(1)
        seq = _dump(dump, module, "thunk_sequence_after_thunk_passes.txt") or _dump(dump, module, "thunk_sequence.txt")
        meta = _dump(dump, module, "thunk_metadata.txt")
        counts = count(text, Path(seq).read_text(), Path(meta).read_text() if meta else "")
        counts["arguments"] = len(jax.tree.leaves(args))
        # Device memory the program allocates for itself while it runs (XLA's buffer assignment)
        counts["temp_bytes"] = int(exe.get_compiled_memory_stats().temp_size_in_bytes)
        if keep:
            Path(keep).mkdir(parents=True, exist_ok=True)
            Path(keep, f"{module}.optimized_hlo.txt").write_text(text)
            shutil.copy(seq, keep)
        return counts
    finally:
        shutil.rmtree(dump, ignore_errors=True)


def _dump(dump: str, module: str, suffix: str) -> str | None:
    files = sorted(glob.glob(os.path.join(dump, f"*.{module}.{suffix}")))
    return files[-1] if files else None


def count(hlo: str, seq: str, meta: str) -> dict:
    """From the optimized HLO and the thunk sequence: per execution, kernels (kernel and library
    launches), memcpy/memset, host predicate reads and device-to-host transfers (a conditional by
    its largest branch), the command buffers, the conditionals outside them, the host-memory
    slices (reads of `S(5)` operands in the HLO) and the bytes of expert weights copied on the
    device (copies of uint8 [.., bytes] rows: a gathered or copied pool)."""
    trips = {m.group(1): int(m.group(2)) for m in
             re.finditer(r'%(\S+) = .*? while\(.*?"known_trip_count":\{"n":"(\d+)"', hlo)}  # fmt: skip
    tree = _thunk_tree(seq)
    names = {int(v): k for k, v in re.findall(r'profile_annotation: "([^"]+)"\s*thunk_id: (\d+)', meta)}
    kinds = collections.Counter(node["kind"] for node in _walk(tree))
    outside = sum(1 for n in _walk(tree) if n["kind"] == "kConditional" and not n["in_cb"])
    return {
        "kernels": _per_execution(tree, lambda n: n["kind"] in _LAUNCH, trips, names),
        "memcpy": _per_execution(tree, lambda n: n["kind"] in _MEMOPS, trips, names),
        "command_buffers": kinds["kCommandBuffer"],
        "host_reads": _per_execution(tree, lambda n: n["kind"] == "kConditional" and not n["in_cb"], trips, names,
                                     unknown_loops=True),  # fmt: skip
        "d2h_transfers": _per_execution(tree, lambda n: n["kind"] in _D2H, trips, names),
        "conditionals": kinds["kConditional"],
        "conditionals_outside_command_buffers": outside,
        "host_slices": _host_slices(hlo),
        "expert_weight_copy_bytes": _copy_bytes(hlo),
    }


def _host_slices(hlo: str) -> int:
    """Dynamic slices (in any computation) whose operand lives in host memory (`S(5)`)."""
    on_host = set(re.findall(r"%(\S+) = [^=]*?S\(5\)\}", hlo))
    return sum(m.group(1) in on_host for m in re.finditer(r"dynamic-slice(?:-start)?\(%([^,)\s]+)", hlo))


def _copy_bytes(hlo: str) -> int:
    """Bytes of uint8 rows [.., B] (expert buffers) that `copy` instructions move on the device."""
    total = 0
    for m in re.finditer(r"= u8\[([\d,]+)\]\{[^}]*\} copy\(", hlo):
        n = 1
        for d in m.group(1).split(","):
            n *= int(d)
        total += n
    return total


def _thunk_tree(seq: str) -> dict:
    root = {"kind": "root", "children": {None: []}, "label": None, "in_cb": False, "id": -1}
    stack = [(-1, root)]
    for line in seq.splitlines():
        label = _LABEL.match(line)
        if label:  # the dump's label indentation is irregular: it belongs to the innermost open while/conditional
            want = "kWhile" if label.group(2) in ("condition", "body") else "kConditional"
            for _, node in reversed(stack):
                if node["kind"] == want:
                    node["label"] = label.group(2)
                    node["children"].setdefault(label.group(2), [])
                    break
            continue
        m = _THUNK.match(line)
        if not m:
            continue
        indent = len(m.group(1))
        while len(stack) > 1 and stack[-1][0] >= indent:
            stack.pop()
        parent = stack[-1][1]
        in_cb = parent["in_cb"] or parent["kind"] == "kCommandBuffer"
        node = {"kind": m.group(3), "id": int(m.group(2)), "children": {None: []}, "label": None, "in_cb": in_cb}
        parent["children"].setdefault(parent["label"], []).append(node)
        stack.append((indent, node))
    return root


def _walk(node):
    for children in node["children"].values():
        for child in children:
            yield child
            yield from _walk(child)


def _per_execution(node, counts, trips: dict, names: dict, unknown_loops: bool = False) -> int:
    """Events of one execution (the largest branch of each conditional; a loop's body by its trip
    count; with `unknown_loops`, one per iteration for a loop of unknown trip count, run once)."""
    own = int(counts(node)) if node["kind"] != "root" else 0
    parts = {label: sum(_per_execution(c, counts, trips, names, unknown_loops) for c in children)
             for label, children in node["children"].items()}  # fmt: skip
    if node["kind"] == "kConditional":
        return own + max((v for k, v in parts.items() if k is not None), default=0)
    if node["kind"] == "kWhile":
        trip = trips.get(names.get(node["id"], ""))
        body, cond = parts.get("body", 0), parts.get("condition", 0)
        if trip is None:
            return own + body + cond + int(unknown_loops and not node["in_cb"])
        return own + trip * body
    return own + sum(parts.values())
