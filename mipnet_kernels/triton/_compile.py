"""Ahead-of-time compilation of the Triton kernels for a GPU that is not here.

Used by the compile gate (``tests/test_triton_compile.py``) and ``benchmarks/gpu_resources.py``:

1. run the launchers on CPU tensors inside :func:`._launch.record_launches` (nothing runs);
2. :func:`specialise` each recorded launch the way Triton's JIT binder would on a GPU:
   per argument its type, ``1``-valued ints as constexprs, 16-divisible ints / 16-byte
   aligned pointers as ``tt.divisibility`` attributes, annotated params (``x: tl.float64``)
   as annotated; launch options (``num_warps``, ``enable_fp_fusion``...) as given;
3. :func:`compile_spec`: ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``
   -- the full pipeline down to a cubin through the ``ptxas`` shipped in the wheel, no
   device or driver needed;
4. :func:`ptxas_resources`: registers, spill bytes and stack of the PTX, from ``ptxas -v``
   with the flags Triton uses (Triton discards that log).

Only API present in Triton 3.6 (the GPU machines) and 3.9 (CI): ``ASTSource``,
``triton.compile``, ``GPUTarget``, ``native_specialize_impl``, ``JITFunction.params``.
Must run WITHOUT ``TRITON_INTERPRET`` (the kernels must be ``JITFunction`` objects).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Any, Iterable

import torch

from ._launch import Launch

#: Launch keyword arguments that are compile options, not kernel arguments.
_OPTION_DEFAULTS = {"num_warps": 4, "num_stages": 3, "enable_fp_fusion": True}


@dataclass(frozen=True)
class Spec:
    """One compiled specialisation of a kernel (hashable: dedupes launches)."""

    kernel: Any  # the JITFunction
    signature: tuple  # ((name, type), ...) in parameter order; constexprs typed "constexpr"
    constexprs: tuple  # ((name, value), ...)
    attrs: tuple  # ((param index, "D"), ...): 16-divisible / 16-byte aligned
    options: tuple  # ((name, value), ...)

    @property
    def name(self) -> str:
        return self.kernel.__name__

    def label(self) -> str:
        """A short human-readable id: kernel, pointer dtypes, constexprs, warps, attrs."""
        ptrs = sorted({t[1:] for _, t in self.signature if t.startswith("*")} - {"i64", "i32", "u64", "i1", "u1"})
        cx = ",".join(f"{k}={_short(v)}" for k, v in self.constexprs)
        opts = dict(self.options)
        d = "".join(str(i) for i, _ in self.attrs)
        return f"{self.name}[{'/'.join(ptrs)}|{cx}|w{opts.get('num_warps')}" + (
            "" if opts.get("enable_fp_fusion", True) else "|nofma") + f"|D:{d}]"


def _short(v) -> str:
    if isinstance(v, bool):
        return "T" if v else "F"
    return str(v)


def specialise(launch: Launch) -> Spec:
    """The specialisation Triton's JIT would compile for ``launch`` on a GPU."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    kernel = launch.kernel
    names = list(kernel.arg_names)
    values = dict(zip(names, launch.args))
    options = dict(_OPTION_DEFAULTS)
    for k, v in launch.kwargs.items():
        if k in names:
            values[k] = v
        else:
            options[k] = v
    signature, constexprs, attrs = [], [], []
    for i, p in enumerate(kernel.params):
        v = values[p.name]
        if p.is_constexpr:
            kind, hint = "constexpr", v
        elif p.annotation_type and (p.annotation_type[:2] in ("fp", "bf") or p.annotation_type == "u1"):
            kind, hint = p.annotation_type, None  # annotated floats / bools: never specialised
        else:
            kind, hint = native_specialize_impl(BaseBackend, v, p.is_const, not p.do_not_specialize,
                                                not p.do_not_specialize_on_alignment)
            if p.annotation_type and kind != "constexpr":
                kind = p.annotation_type
        if isinstance(hint, torch.dtype):  # not expected; constexprs are python scalars
            raise TypeError(f"{kernel.__name__}: constexpr {p.name} is a torch dtype")
        if kind == "constexpr":
            constexprs.append((p.name, hint))
        elif hint == "D":
            attrs.append((i, "D"))
        signature.append((p.name, kind))
    return Spec(kernel, tuple(signature), tuple(constexprs), tuple(attrs), tuple(sorted(options.items())))


def distinct_specs(launches: Iterable[Launch]) -> list[Spec]:
    """Deduplicated specialisations, in first-seen order."""
    seen: dict[Spec, None] = {}
    for launch in launches:
        seen.setdefault(specialise(launch), None)
    return list(seen)


def compile_spec(spec: Spec, capability: int):
    """``triton.compile`` of ``spec`` for ``sm_<capability>``; returns the CompiledKernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(spec.kernel, dict(spec.signature), dict(spec.constexprs),
                    {(i,): [["tt.divisibility", 16]] for i, _ in spec.attrs})
    return triton.compile(src, target=GPUTarget("cuda", capability, 32), options=dict(spec.options))


def ptxas_path(capability: int) -> str:
    """The ptxas Triton itself uses for ``capability`` (3.9 picks per arch; 3.6 has one)."""
    from triton.backends.nvidia import compiler as nv

    try:
        return nv.get_ptxas(capability).path
    except TypeError:  # Triton 3.6: get_ptxas() takes no architecture
        return nv.get_ptxas().path


_PTXAS_LINE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")


def ptxas_resources(ptx: str, capability: int, enable_fp_fusion: bool) -> dict:
    """``{registers, spill_stores, spill_loads, stack}`` of one kernel's PTX from ``ptxas -v``,
    with Triton's own flags (``--regAllocOptLevel=2``, ``--fmad=false`` without fp fusion)."""
    arch = f"sm_{capability}a" if capability >= 90 else f"sm_{capability}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [ptxas_path(capability), "-v", "-lineinfo", *([] if enable_fp_fusion else ["--fmad=false"]),
               "--regAllocOptLevel=2", f"--gpu-name={arch}", src, "-o", os.path.join(tmp, "k.o")]
        log = subprocess.run(cmd, check=True, capture_output=True, text=True).stderr
    frame = _PTXAS_LINE.search(log)
    regs = _PTXAS_REGS.search(log)
    if frame is None or regs is None:
        raise RuntimeError(f"unexpected ptxas -v output:\n{log}")
    return {"registers": int(regs.group(1)), "stack": int(frame.group(1)),
            "spill_stores": int(frame.group(2)), "spill_loads": int(frame.group(3))}


def param_types(ptx: str) -> list[str]:
    """The PTX types of the kernel's parameters, in order (``u64`` pointers, ``f64``...)."""
    return re.findall(r"\.param \.(\w+) \w+_param_\d+", ptx)


def approximate_math(ptx: str) -> dict[str, int]:
    """Counts of Triton's approximate float32 lowerings in ``ptx``: ``div.full.f32`` (``/``),
    non-``ftz`` ``ex2.approx.f32`` (``tl.exp``) and non-``ftz`` ``lg2.approx.f32``
    (``tl.log``).  libdevice's ``expf`` / ``logf`` use the ``.ftz`` forms on exactly reduced
    arguments: not counted."""
    return {"div.full.f32": len(re.findall(r"\bdiv\.full\.f32\b", ptx)),
            "ex2.approx.f32": len(re.findall(r"\bex2\.approx\.f32\b", ptx)),
            "lg2.approx.f32": len(re.findall(r"\blg2\.approx\.f32\b", ptx))}


#: Constexprs that only size tiles (no code path of their own): the compile gate keeps one
#: specialisation per code path, the one with the largest tiles (most registers).
TILE_CONSTEXPRS = frozenset({"BLOCK", "BLOCK_C", "BLOCK_P", "BLOCK_R", "BLOCK_W", "BLOCK_M", "BLOCK_N", "MLP_C",
                             "CR_PAD", "KC", "CHUNK", "MAPS", "WIN", "FB_BLOCK", "NWB", "NCOL"})


def code_paths(specs: Iterable[Spec]) -> list[Spec]:
    """One spec per code path: kernel, argument types and the non-tile constexprs (modes,
    flags, dtypes, layouts); of each, the spec with the largest tiles."""
    best: dict[tuple, Spec] = {}

    def size(s: Spec) -> int:
        return sum(int(v) for k, v in s.constexprs if k in TILE_CONSTEXPRS) + dict(s.options)["num_warps"]

    for s in specs:
        switches = tuple((k, v) for k, v in s.constexprs
                         if k not in TILE_CONSTEXPRS and any(p.name == k and p.is_constexpr for p in s.kernel.params))
        key = (s.name, tuple(t for _, t in s.signature if t.startswith("*") or t.startswith("fp")), switches,
               dict(s.options).get("enable_fp_fusion"))
        if key not in best or size(s) > size(best[key]):
            best[key] = s
    return list(best.values())
