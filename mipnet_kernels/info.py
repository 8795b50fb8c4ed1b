"""``python -m mipnet_kernels.info``: versions, devices, built extensions, and per op the
backend that would run it on each device (with the reasons the others were skipped)."""

from __future__ import annotations

import argparse
import json
import platform
import sys

import torch


def _cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo; else platform.processor())."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def collect() -> dict:
    import mipnet_kernels as mk
    from mipnet_kernels import _backends, _extension

    info: dict = {
        "mipnet_kernels": mk.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "platform": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
        "cpu": _cpu_model(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:  # noqa: BLE001 - only reporting
        info["triton"] = None
    devices = ["cpu"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            info.setdefault("gpus", []).append(
                {"index": i, "name": p.name, "capability": f"{p.major}.{p.minor}",
                 "memory_gib": round(p.total_memory / 2**30, 1), "sms": p.multi_processor_count}
            )
        devices.append("cuda")
    info["extensions"] = {}
    for name, probe in (("_C (cpu)", _extension.cpu_extension), ("_C_cuda (cuda)", _extension.cuda_extension)):
        ok, why = probe()
        path = _extension.extension_path(name.split()[0])
        info["extensions"][name] = {"loaded": ok, "reason": why, "path": str(path) if path else None}
    info["cpu_isa"] = _extension.get_cpu_isa()
    info["cpu_isas"] = _extension.cpu_isas()
    info["backends"] = _backends.available_backends()
    for b in _backends.DECLARATIONS:
        info["backends"][b.name]["declaration"] = {
            "summary": b.summary,
            "devices": None if b.devices is None else sorted(b.devices),
            "auto": list(b.auto),
            "dtypes": None if b.dtypes is None else [str(d).removeprefix("torch.") for d in b.dtypes],
            "limits": dict(b.limits),
        }
    info["forced_backend"] = _backends.get_backend()
    info["ops"] = {}
    for op_name, op in sorted(_backends.tables().items()):
        per_device = {}
        for dev in devices:
            if op.example_inputs is None:
                continue
            args = op.example_inputs(torch.device(dev))
            try:
                chosen, skipped = _backends.select(op_name, torch.device(dev), *args)
                per_device[dev] = {"backend": chosen, "skipped": skipped}
            except RuntimeError as exc:
                per_device[dev] = {"backend": None, "error": str(exc)}
        info["ops"][op_name] = per_device
    return info


def _print_human(info: dict) -> None:
    print(f"mipnet_kernels {info['mipnet_kernels']}  (python {info['python']}, {info['platform']})")
    print(f"torch {info['torch']} (CUDA {info['torch_cuda']}), triton {info['triton']}, "
          f"{info['cpu_threads']} CPU threads")
    isa = info["cpu_isa"] or "- (C++ CPU extension not loaded)"
    print(f"cpu: {info['cpu']}")
    print(f"cpu isa: {isa}" + (f"  (available: {', '.join(info['cpu_isas'])}; "
                               f"MIPNET_KERNELS_CPU_ISA or mipnet_kernels.set_cpu_isa() choose)"
                               if info["cpu_isas"] else ""))
    for g in info.get("gpus", []):
        print(f"GPU {g['index']}: {g['name']} (sm_{g['capability'].replace('.', '')}, "
              f"{g['memory_gib']} GiB, {g['sms']} SMs)")
    if "gpus" not in info:
        print("GPU: none")
    print("\nextensions:")
    for name, e in info["extensions"].items():
        state = f"loaded from {e['path']}" if e["loaded"] else f"not loaded: {e['reason']}"
        print(f"  {name:16s} {state}")
    print("\nbackends (declared in mipnet_kernels/_backends.py):")
    for name, b in info["backends"].items():
        print(f"  {name:10s} {'yes' if b['available'] else 'no':4s} {b['reason'] or ''}")
        d = b.get("declaration")
        if d:
            devices = ", ".join(d["devices"]) if d["devices"] else "any"
            dtypes = ", ".join(d["dtypes"]) if d["dtypes"] else "any"
            limits = "".join(f"; {k} <= {v}" for k, v in d["limits"].items())
            print(f"  {'':10s}      {d['summary']}; devices {devices}; dtypes {dtypes}{limits}")
    if info["forced_backend"]:
        print(f"\nforced backend: {info['forced_backend']}")
    print("\nops (backend chosen for example inputs; why the others were skipped):")
    for op, per_device in info["ops"].items():
        for dev, choice in per_device.items():
            if choice.get("backend") is None:
                print(f"  {op:24s} {dev:5s} -> ERROR {choice['error']}")
                continue
            print(f"  {op:24s} {dev:5s} -> {choice['backend']}")
            for skipped, reasons in choice["skipped"].items():
                print(f"  {'':24s} {'':5s}    skipped {skipped}: {'; '.join(reasons)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mipnet_kernels.info", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = parser.parse_args(argv)
    info = collect()
    if args.json:
        json.dump(info, sys.stdout, indent=2)
        print()
    else:
        _print_human(info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
