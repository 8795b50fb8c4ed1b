"""Backend selection: context manager, setter, env var, automatic choice, reasons, and the
package working (with one warning) when the compiled extension is missing or disabled."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

import mipnet_kernels as mk
from mipnet_kernels import _backends, _extension
from mipnet_kernels.ops.decode import decode_heatmaps_reference, flip_merge_reference

ENV = _backends.ENV_VAR
PKG_DIR = Path(mk.__file__).resolve().parent
REPO = PKG_DIR.parent


@pytest.fixture(autouse=True)
def _no_forced_backend(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    mk.set_backend(None)
    yield
    mk.set_backend(None)


def _decode_args(device="cpu"):
    hm = torch.rand(2, 3, 9, 8, generator=torch.Generator().manual_seed(0)).to(device)
    return (hm, "dark", None, 11)


# --------------------------------------------------------------------------- structure
def test_backend_names():
    assert mk.BACKENDS == ("cuda", "triton", "cpu", "reference")


def test_available_backends_structure():
    info = mk.available_backends()
    assert list(info) == list(mk.BACKENDS)
    for name, entry in info.items():
        assert set(entry) == {"available", "reason"}, name
        assert isinstance(entry["available"], bool)
        if entry["available"]:
            assert entry["reason"] is None, name
        else:
            assert isinstance(entry["reason"], str) and entry["reason"].strip(), name
    assert info["reference"] == {"available": True, "reason": None}
    if not torch.cuda.is_available():
        assert not info["cuda"]["available"] and "CUDA" in info["cuda"]["reason"]


def test_cpu_backend_state_matches_extension():
    ok, why = _extension.cpu_extension()
    info = mk.available_backends()["cpu"]
    assert info["available"] == ok
    if ok:
        assert hasattr(torch.ops.mipnet_cpu, "decode_heatmaps") and hasattr(torch.ops.mipnet_cpu, "flip_merge")
    else:
        assert why in info["reason"] and _extension.BUILD_COMMAND in info["reason"]


# --------------------------------------------------------------------------- selection API
def test_use_backend_nests_and_restores():
    assert mk.get_backend() is None
    with mk.use_backend("reference"):
        assert mk.get_backend() == "reference"
        with mk.use_backend("cpu"):
            assert mk.get_backend() == "cpu"
            with mk.use_backend("triton"):
                assert mk.get_backend() == "triton"
            assert mk.get_backend() == "cpu"
        assert mk.get_backend() == "reference"
    assert mk.get_backend() is None


def test_use_backend_restores_on_exception():
    with pytest.raises(KeyError):
        with mk.use_backend("reference"):
            with mk.use_backend("cuda"):
                raise KeyError("boom")
    assert mk.get_backend() is None
    with mk.use_backend("reference"):
        with pytest.raises(ZeroDivisionError):
            with mk.use_backend("cpu"):
                1 / 0
        assert mk.get_backend() == "reference"


def test_set_backend_and_auto():
    mk.set_backend("reference")
    assert mk.get_backend() == "reference"
    mk.set_backend("auto")
    assert mk.get_backend() is None
    mk.set_backend("cpu")
    mk.set_backend(None)
    assert mk.get_backend() is None


def test_env_var(monkeypatch):
    monkeypatch.setenv(ENV, "reference")
    assert mk.get_backend() == "reference"
    monkeypatch.setenv(ENV, "auto")
    assert mk.get_backend() is None
    monkeypatch.setenv(ENV, "")
    assert mk.get_backend() is None
    monkeypatch.setenv(ENV, "gpu")
    with pytest.raises(ValueError, match=rf"{ENV}.*'gpu'"):
        mk.get_backend()
    with pytest.raises(ValueError, match=ENV):
        mk.decode_heatmaps(torch.rand(1, 1, 4, 4))


def test_precedence_context_over_setter_over_env(monkeypatch):
    monkeypatch.setenv(ENV, "cuda")
    assert mk.get_backend() == "cuda"
    mk.set_backend("triton")
    assert mk.get_backend() == "triton"
    with mk.use_backend("reference"):
        assert mk.get_backend() == "reference"
    assert mk.get_backend() == "triton"
    mk.set_backend(None)
    assert mk.get_backend() == "cuda"
    monkeypatch.delenv(ENV)
    assert mk.get_backend() is None


@pytest.mark.parametrize("bad", ["gpu", "CPU", "Reference", " cpu", "", 3, ("cpu",)])
def test_invalid_names(bad):
    with pytest.raises(ValueError, match=r"backend must be one of"):
        mk.set_backend(bad)
    with pytest.raises(ValueError, match=r"backend must be one of"):
        with mk.use_backend(bad):
            pass  # pragma: no cover
    assert mk.get_backend() is None  # a failed call changes nothing


def test_context_is_per_thread():
    seen = []
    with mk.use_backend("reference"):
        t = threading.Thread(target=lambda: seen.append(mk.get_backend()))
        t.start()
        t.join()
    inherits = bool(getattr(sys.flags, "thread_inherit_context", 0))
    assert seen == (["reference"] if inherits else [None])


# --------------------------------------------------------------------------- forcing / reasons
@pytest.mark.parametrize("name", mk.BACKENDS)
@pytest.mark.parametrize("how", ["context", "setter", "env"])
def test_forced_backend_runs_or_raises_with_reasons(name, how, monkeypatch):
    args = _decode_args("cpu")
    reasons = _backends.not_supported_reasons("decode_heatmaps", name, torch.device("cpu"), *args)
    if how == "setter":
        mk.set_backend(name)
    elif how == "env":
        monkeypatch.setenv(ENV, name)
    ctx = mk.use_backend(name) if how == "context" else mk.use_backend(None)
    with ctx:
        assert mk.get_backend() == name
        if reasons:  # never a silent fallback
            with pytest.raises(RuntimeError, match=rf"backend '{name}' was requested but cannot run decode_heatmaps") as exc:
                mk.decode_heatmaps(*args)
            for why in reasons:
                assert why in str(exc.value)
            with pytest.raises(RuntimeError, match=rf"backend '{name}' was requested but cannot run flip_merge"):
                mk.flip_merge(args[0], args[0], mk.CROWDPOSE_FLIP_PAIRS[:1])
        else:
            coords, scores = mk.decode_heatmaps(*args)
            ref_c, ref_s = decode_heatmaps_reference(*args)
            assert torch.equal(scores, ref_s)
            assert (coords - ref_c).abs().max() <= 1e-4


def test_cuda_forced_on_cpu_tensors_names_the_reason():
    """Whatever the machine, CUDA cannot run CPU tensors, and the error says why."""
    args = _decode_args("cpu")
    with mk.use_backend("cuda"):
        with pytest.raises(RuntimeError) as exc:
            mk.decode_heatmaps(*args)
    msg = str(exc.value)
    assert "'cuda'" in msg
    if torch.cuda.is_available():
        assert "the cuda backend runs CUDA tensors, got cpu tensors" in msg
    else:
        assert mk.available_backends()["cuda"]["reason"] in msg


def test_unavailable_backend_reason_reaches_user():
    unavailable = {k: v["reason"] for k, v in mk.available_backends().items() if not v["available"]}
    if not unavailable:
        pytest.skip("every backend is available here")
    for name, why in unavailable.items():
        with mk.use_backend(name), pytest.raises(RuntimeError) as exc:
            mk.decode_heatmaps(*_decode_args())
        assert why in str(exc.value), name


def test_select_reports_skipped_reasons():
    args = _decode_args("cpu")
    name, skipped = mk.select("decode_heatmaps", torch.device("cpu"), *args)
    cpu_ok = mk.available_backends()["cpu"]["available"]
    assert name == ("cpu" if cpu_ok else "reference")
    if cpu_ok:
        assert skipped == {}
    else:
        assert list(skipped) == ["cpu"]
        assert skipped["cpu"] == _backends.not_supported_reasons("decode_heatmaps", "cpu", torch.device("cpu"), *args)
        assert mk.available_backends()["cpu"]["reason"] in skipped["cpu"][0]
    with mk.use_backend("reference"):
        assert mk.select("decode_heatmaps", torch.device("cpu"), *args) == ("reference", {})


@pytest.mark.cuda
def test_select_on_cuda_tensors():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device (torch.cuda.is_available() is False)")
    args = _decode_args("cuda")
    name, skipped = mk.select("decode_heatmaps", torch.device("cuda"), *args)
    order = ("cuda", "triton", "reference")
    assert name in order
    assert list(skipped) == list(order[: order.index(name)])  # the faster ones, each with reasons
    assert all(skipped.values())


def test_automatic_default_on_cpu_runs():
    args = _decode_args("cpu")
    coords, scores = mk.decode_heatmaps(*args)
    ref_c, ref_s = decode_heatmaps_reference(*args)
    assert torch.equal(scores, ref_s) and (coords - ref_c).abs().max() <= 1e-4
    hm = args[0]
    merged = mk.flip_merge(hm, hm.flip(0), [(0, 1)])
    assert torch.equal(merged, flip_merge_reference(hm, hm.flip(0), [1, 0, 2], True))


# --------------------------------------------------------------------------- subprocesses
_PROBE = textwrap.dedent(
    """
    import json, sys, warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import mipnet_kernels as mk
    import torch
    from mipnet_kernels.ops.decode import decode_heatmaps_reference, flip_merge_reference
    hm = torch.rand(2, 17, 16, 12, generator=torch.Generator().manual_seed(0))
    ok = {}
    for mode in ("argmax", "quarter", "dark", "udp"):
        c, s = mk.decode_heatmaps(hm, mode)
        rc, rs = decode_heatmaps_reference(hm, mode, None, 11)
        ok[mode] = bool(torch.equal(s, rs)) and float((c - rc).abs().max()) <= 1e-4
    idx = [0, 2, 1] + list(range(3, 17))
    ok["flip_merge"] = bool(torch.equal(mk.flip_merge(hm, hm, [(1, 2)]), flip_merge_reference(hm, hm, idx, True)))
    print(json.dumps({
        "file": mk.__file__,
        "warnings": [
            {"category": w.category.__name__, "message": str(w.message)}
            for w in caught if "mipnet_kernels" in str(w.message)
        ],
        "backends": mk.available_backends(),
        "selected": mk.select("decode_heatmaps", torch.device("cpu"), hm, "dark", None, 11)[0],
        "ok": ok,
    }))
    """
)


def _run_probe(env_extra: dict, cwd: Path, pythonpath: Path | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in (ENV, "MIPNET_KERNELS_NO_EXTENSIONS", "PYTHONPATH")}
    env.update(env_extra)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE], cwd=cwd, env=env, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # a fresh interpreter importing torch
def test_no_extensions_env_disables_them_quietly(tmp_path):
    out = _run_probe({"MIPNET_KERNELS_NO_EXTENSIONS": "1"}, cwd=REPO)
    cpu = out["backends"]["cpu"]
    assert not cpu["available"] and "disabled by MIPNET_KERNELS_NO_EXTENSIONS" in cpu["reason"]
    assert out["warnings"] == []  # disabled on purpose: nothing to warn about
    assert out["selected"] == "reference"
    assert all(out["ok"].values()), out["ok"]


@pytest.mark.slow  # a fresh interpreter importing torch
def test_missing_extension_warns_once(tmp_path):
    """A copy of the package without the compiled objects imports, works, and says in one
    line what is missing and how to build it."""
    shutil.copytree(PKG_DIR, tmp_path / "mipnet_kernels", ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__"))
    out = _run_probe({}, cwd=tmp_path, pythonpath=tmp_path)
    if not out["file"].startswith(str(tmp_path)):
        pytest.skip(f"could not shadow the installed package (imported {out['file']})")
    assert not out["backends"]["cpu"]["available"]
    assert len(out["warnings"]) == 1, out["warnings"]
    w = out["warnings"][0]
    assert w["category"] == "RuntimeWarning"
    assert "\n" not in w["message"]
    assert w["message"].startswith("mipnet_kernels: ")
    assert "C++ CPU extension" in w["message"] and "not built" in w["message"]
    assert f"not built; build with: {_extension.BUILD_COMMAND}" in w["message"]
    assert out["selected"] == "reference"
    assert all(out["ok"].values()), out["ok"]


@pytest.mark.slow  # a fresh interpreter importing torch
def test_warning_printed_once_on_stderr(tmp_path):
    shutil.copytree(PKG_DIR, tmp_path / "mipnet_kernels", ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__"))
    env = {k: v for k, v in os.environ.items() if k not in (ENV, "MIPNET_KERNELS_NO_EXTENSIONS")}
    env["PYTHONPATH"] = str(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-W", "always", "-c", "import mipnet_kernels, mipnet_kernels.ops; print(mipnet_kernels.__file__)"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr
    if not proc.stdout.strip().startswith(str(tmp_path)):
        pytest.skip("could not shadow the installed package")
    lines = [ln for ln in proc.stderr.splitlines() if "mipnet_kernels:" in ln]
    assert len(lines) == 1, proc.stderr
    assert "RuntimeWarning" in lines[0] and _extension.BUILD_COMMAND in lines[0]


@pytest.mark.slow  # a fresh interpreter importing torch
def test_info_module_runs():
    if importlib.util.find_spec("mipnet_kernels.info") is None:
        pytest.skip("mipnet_kernels.info does not exist yet")
    env = {k: v for k, v in os.environ.items() if k != ENV}
    proc = subprocess.run(
        [sys.executable, "-m", "mipnet_kernels.info"], cwd=REPO, env=env, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in mk.BACKENDS:
        assert name in proc.stdout
    assert "decode_heatmaps" in proc.stdout and "flip_merge" in proc.stdout
    proc = subprocess.run(
        [sys.executable, "-m", "mipnet_kernels.info", "--json"], cwd=REPO, env=env, capture_output=True, text=True, timeout=240
    )
    if proc.returncode == 0 and proc.stdout.lstrip().startswith("{"):
        info = json.loads(proc.stdout)
        assert set(info["backends"]) == set(mk.BACKENDS)


# --------------------------------------------------------------------------- declarations and kernel tables
def test_declarations_are_the_backends_in_automatic_order():
    assert tuple(b.name for b in _backends.DECLARATIONS) == mk.BACKENDS
    assert _backends.auto_order("cpu") == ("cpu", "reference")
    assert _backends.auto_order("cuda") == ("cuda", "triton", "reference")
    assert _backends.auto_order("mps") == ("reference",)
    for b in _backends.DECLARATIONS:
        assert b.summary and (b.devices is None or set(b.auto) <= set(b.devices)), b.name


def test_backends_for_agrees_with_select():
    args = _decode_args("cpu")
    per_backend = mk.backends_for("decode_heatmaps", torch.device("cpu"), *args)
    assert list(per_backend) == list(mk.BACKENDS)
    chosen, skipped = mk.select("decode_heatmaps", torch.device("cpu"), *args)
    assert per_backend[chosen] == [] and per_backend["reference"] == []
    for name, reasons in skipped.items():
        assert per_backend[name] == reasons and reasons
    assert per_backend["cuda"]  # CPU tensors: never the cuda backend
    with pytest.raises(ValueError, match="unknown op 'no_such_op'"):
        mk.backends_for("no_such_op", torch.device("cpu"))


def _toy_table(**columns):
    """A kernel table that is not registered (nothing else sees it)."""
    t = _backends.KernelTable("toy", ("x", "xs", "k"), ("x", "xs"))
    for name, k in columns.items():
        t.kernel(name, k)
    return t


def test_reasons_are_derived_from_the_declarations_in_order():
    cpu = torch.device("cpu")
    if mk.available_backends()["cpu"]["available"] is False:
        pytest.skip("needs the cpu backend available")
    x32, x64 = torch.zeros(2), torch.zeros(2, dtype=torch.float64)
    calls = []
    t = _toy_table(
        reference=lambda x, xs, k: "ref",
        cpu=_backends.Kernel(fn=lambda x, xs, k: calls.append(k) or "cpu",
                             reasons=lambda x, xs, k: [] if k < 3 else [f"k = {k} is too large for the toy"]),
    )
    # 1-2: availability, then the device type (both from the declarations)
    cuda = mk.available_backends()["cuda"]
    assert t.reasons("cuda", cpu, x32, [x32], 1) == (
        ["the cuda backend runs CUDA tensors, got cpu tensors"] if cuda["available"] else [cuda["reason"]])
    # 3: no kernel in the column (once the backend runs CPU tensors)
    if not _backends.backends_for("decode_heatmaps", cpu)["triton"]:
        assert t.reasons("triton", cpu, x32, [x32], 1) == ["toy has no triton implementation"]
    # 4: dtypes, per named tensor argument and per branch of a list, naming who takes it
    want = ("is torch.float64; the cpu kernels take float32, float16, bfloat16 "
            "(float64 runs on the triton and reference backends)")
    assert t.reasons("cpu", cpu, x64, [x32, x64], 1) == [f"x {want}", f"branch 1: xs {want}"]
    assert t.reasons("reference", cpu, x64, [x64], 9) == []  # the reference takes any dtype
    # 5: op-specific reasons, only once nothing derived applies
    assert t.reasons("cpu", cpu, x32, [x32], 9) == ["k = 9 is too large for the toy"]
    assert t.reasons("cpu", cpu, x32, [x32], 1) == []
    assert t.callable("cpu")[0](x32, [x32], 2) == "cpu" and calls == [2]


def test_dispatch_remembers_the_automatic_choice_per_dtypes(monkeypatch):
    """dispatch's remembered choice (_backends._choose) answers as select does: per device
    type and dtypes, never past a faster backend's input-dependent reason, re-checking the
    chosen kernel's own, never when a backend is forced, and forgotten when a column changes."""
    cpu = torch.device("cpu")
    if not mk.available_backends()["cpu"]["available"]:
        pytest.skip("needs the cpu backend available")
    ran = []
    t = _toy_table(
        reference=lambda x, xs, k: ran.append("reference") or "reference",
        cpu=_backends.Kernel(fn=lambda x, xs, k: ran.append("cpu") or "cpu",
                             reasons=lambda x, xs, k: [] if k < 3 else [f"k = {k} is too large for the toy"]),
    )
    t.name = "toy_auto"
    monkeypatch.setitem(_backends._TABLES, "toy_auto", t)
    x32, x64 = torch.zeros(2), torch.zeros(2, dtype=torch.float64)

    def run(*args):
        name, out = _backends.dispatch_named("toy_auto", cpu, *args)
        assert name == out == mk.select("toy_auto", cpu, *args)[0]
        return name

    # a faster backend ruled out by an input-dependent reason: the choice is not remembered
    assert run(x32, [x32], 9) == "reference" and t._auto == {}
    assert run(x32, [x32], 1) == "cpu"
    key32 = ("cpu", (torch.float32, (torch.float32,)))
    assert t._auto == {key32: "cpu"}
    # a remembered choice still asks the chosen kernel's own reasons
    assert run(x32, [x32], 9) == "reference" and t._auto == {key32: "cpu"}
    # the dtypes are part of the key (rule 4 ruled cpu out: remembered)
    assert run(x32, [x64], 1) == "reference"
    assert t._auto[("cpu", (torch.float32, (torch.float64,)))] == "reference"
    assert run(x32, [x32], 2) == "cpu"
    # a forced backend is never answered from memory
    with mk.use_backend("reference"):
        assert _backends.dispatch_named("toy_auto", cpu, x32, [x32], 1)[0] == "reference"
    monkeypatch.setenv(ENV, "reference")
    assert _backends.dispatch_named("toy_auto", cpu, x32, [x32], 1)[0] == "reference"
    monkeypatch.delenv(ENV)
    # any change to a column or a resolved kernel forgets the table's choices (the undo of
    # a test's monkeypatch included)
    t.kernel("cpu", t.kernels["cpu"])
    assert t._auto == {}
    assert run(x32, [x32], 1) == "cpu" and t._auto == {key32: "cpu"}
    with monkeypatch.context() as m:
        m.setitem(t.kernels, "cpu", _backends.Kernel(symbol="no_such_kernel"))
        m.delitem(t._resolved, "cpu")
        assert t._auto == {}
        assert run(x32, [x32], 1) == "reference" and t._auto == {key32: "reference"}
    assert t._auto == {}
    assert run(x32, [x32], 1) == "cpu"
    assert ran == ["reference", "cpu", "reference", "reference", "cpu", "reference", "reference",
                   "cpu", "reference", "cpu"]


def test_symbol_kernels_resolve_through_the_backend():
    cpu = torch.device("cpu")
    if not mk.available_backends()["cpu"]["available"]:
        pytest.skip("needs the cpu backend available")
    t = _toy_table(cpu=_backends.Kernel(symbol="no_such_kernel"))
    (why,) = t.reasons("cpu", cpu)
    assert why.startswith("torch.ops.mipnet_cpu.no_such_kernel is not built") and _extension.BUILD_COMMAND in why
    # adapt turns the op's arguments into the symbol's, finish its result into the op's
    t = _toy_table(cpu=_backends.Kernel(symbol="flip_merge", adapt=lambda x, xs, k: (x, x, xs, k),
                                         finish=lambda out: ("merged", out.shape)))
    hm = torch.rand(1, 2, 3, 4)
    fn, why = t.callable("cpu")
    assert why is None
    assert fn(hm, torch.tensor([1, 0]), False) == ("merged", hm.shape)


def test_kernel_tables_refuse_unknown_names():
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        _toy_table(gpu=lambda *a: None)
    with pytest.raises(ValueError, match=r"tensor_args \['y'\] are not among args"):
        _backends.KernelTable("toy", ("x",), ("y",))
    with pytest.raises(ValueError, match="already has a kernel table"):
        _backends.define_kernels("decode_heatmaps", ("heatmaps",))


def test_inference_ops_are_library_ops_that_do_not_differentiate():
    """decode / flip_merge are torch.library ops (pt2-compliant) whose outputs never require
    grad, whatever backend runs them (the op falls through autograd; no silent gradient)."""
    op = torch.ops.mipnet.decode_heatmaps.default
    assert torch.Tag.pt2_compliant_tag in op.tags
    hm = torch.rand(1, 2, 6, 5, requires_grad=True)
    for name in ("reference", "cpu"):
        if not mk.available_backends()[name]["available"]:
            continue
        with mk.use_backend(name):
            coords, scores = mk.decode_heatmaps(hm, "dark")
            merged = mk.flip_merge(hm, hm, [(0, 1)])
        assert not coords.requires_grad and not scores.requires_grad and not merged.requires_grad, name


def test_profiler_names_the_backend_that_ran():
    hm = torch.rand(1, 2, 6, 5)
    name, _ = mk.select("decode_heatmaps", hm.device, hm, "quarter", None, 11)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        mk.decode_heatmaps(hm)
    assert f"mipnet::decode_heatmaps[{name}]" in {e.name for e in prof.events()}


def test_backend_layer_uses_no_private_torch_c():
    for rel in ("_backends.py", "ops/_registry.py", "ops/decode.py", "ops/nms.py"):
        path = PKG_DIR / rel
        if path.exists():
            assert "torch._C" not in path.read_text(), rel


# ------------------------------------------------------------------------------ docs/ops.md
def test_the_op_map_in_the_docs_matches_the_tree():
    """docs/ops.md is the map of where each op lives: every repository path it names exists,
    and every kernel table the package declares is on it."""
    import re

    root = Path(__file__).resolve().parents[1]
    text = (root / "docs" / "ops.md").read_text()
    named = set(re.findall(r"`((?:mipnet_kernels|csrc|tests|benchmarks|python|docs)/[^`\s]*)`", text))
    assert len(named) > 20, "the map names the files of every layer"
    missing = [p for p in sorted(named)
               if "<" not in p and "*" not in p and not (root / p.split("::")[0]).exists()]
    assert not missing, f"docs/ops.md names paths that do not exist: {missing}"
    unmapped = [op for op in _backends.ops() if op not in text]
    assert not unmapped, f"kernel tables missing from docs/ops.md: {unmapped}"
