"""Explanation speed and memory, as ratios against references measured in one run on this machine.

1. Grad-CAM, resnet18 (1000 classes), 224x224, layer stage4, target = predicted class, batch 1 and 8:
   ``handlens.explain`` vs a minimal hand-written Grad-CAM (forward hook + ``torch.autograd.grad`` to the
   activation) and vs pytorch-grad-cam's ``GradCAM``. One plain forward + full backward to the input is
   timed as the cost unit. Targets: handlens <= 1.1x the minimal reference; >= 2.5x faster than
   pytorch-grad-cam.
2. All-class maps, resnet18, batch 1: ``target="all"`` (1000 maps, (1, 1000, 224, 224) float32 = 200 MB,
   included in the time) vs one single-class Grad-CAM. Target <= 3x. Closed-form ``cam`` shown beside it.
3. Integrated Gradients, 50 steps, resnet50, batch 1: handlens (internal batch from its memory budget) vs
   Captum directly (``internal_batch_size=25``). Each side runs in a fresh subprocess (started before this
   process grows: a child inherits its parent's ``ru_maxrss`` across exec); peak extra memory is the growth
   of ``ru_maxrss`` over the first call (after model load and a warm-up forward), cross-checked with VmHWM
   reset just before the call. Targets: time <= 1.1x Captum's; peak extra memory <= 600 MB.
4. Leak check, in a fresh subprocess: consecutive handlens Grad-CAM explanations (resnet18, batch 1,
   224x224); VmRSS after the first 10 vs after all of them. Target growth < 50 MB; no hook left behind.

Random weights throughout (``weights="none"``): speed does not depend on them.

    python benchmarks/explain_speed.py              # the full run (a few minutes on 2 cores)
    python benchmarks/explain_speed.py --quick      # fewer repeats, 100 explanations for the leak check
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
DEFAULT_OUT = ROOT / "results" / "explain_speed.json"
THREADS = 2
CLASSES = [f"class_{i}" for i in range(1000)]

TARGETS = {
    "gradcam_vs_minimal_max": 1.1,
    "gradcam_speedup_vs_pytorch_grad_cam_min": 2.5,
    "all_classes_vs_single_max": 3.0,
    "ig_time_vs_captum_max": 1.1,
    "ig_peak_extra_mb_max": 600.0,
    "leak_growth_mb_max": 50.0,
}


def setup() -> None:
    import torch

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)


def make_model(name: str) -> Any:
    from handlens.models.classifier import create_classifier

    model = create_classifier(name, 1000, weights="none")
    model.eval()
    return model


def inputs(batch: int, size: int = 224) -> Any:
    import torch

    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))


def proc_status_mb(field: str) -> float:
    """A field of /proc/self/status (VmRSS: resident now; VmHWM: resident high-water mark) in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def vm_rss_mb() -> float:
    return proc_status_mb("VmRSS")


def reset_high_water_mark() -> bool:
    """Reset VmHWM (Linux >= 4.0). ``ru_maxrss`` cannot be reset, and a child started from a big parent
    inherits the parent's peak in it across exec, so VmHWM is the more reliable of the two."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def busy_cpu_s() -> float:
    """CPU seconds all processes on the machine have spent busy (user, nice, system, irq, softirq, steal)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    busy = sum(fields[:3]) + sum(fields[5:8])
    return busy / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


def time_round_robin(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 2) -> dict[str, dict[str, Any]]:
    """Median seconds of each function, timed in turn within every repeat (so drift hits all alike)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            started = time.perf_counter()
            result = fn()
            samples[name].append(time.perf_counter() - started)
            del result
    return {name: {"median_s": statistics.median(s), "min_s": min(s), "samples_s": [round(v, 5) for v in s]}
            for name, s in samples.items()}


# --------------------------------------------------------------------------------------------- references


def minimal_gradcam(model: Any, x: Any) -> Any:
    """The least a Grad-CAM can do: hook the activation, one forward, gradient to the activation only."""
    import torch
    from torch.nn import functional as F

    store: dict[str, Any] = {}
    handle = model.backbone.layer4.register_forward_hook(lambda _m, _i, out: store.__setitem__("a", out))
    try:
        logits = model(x)
    finally:
        handle.remove()
    activation = store["a"]
    pred = logits.argmax(1)
    (grad,) = torch.autograd.grad(logits[torch.arange(x.shape[0]), pred].sum(), activation)
    weights = grad.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * activation).sum(1, keepdim=True))
    return F.interpolate(cam.detach(), size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]


def forward_backward(model: Any, x: Any) -> None:
    """The cost unit: one forward and a full backward to the input (parameters included)."""
    import torch

    model.zero_grad(set_to_none=True)
    xi = x.detach().requires_grad_(True)
    logits = model(xi)
    logits[torch.arange(x.shape[0]), logits.argmax(1)].sum().backward()


# ------------------------------------------------------------------------------------------------ sections


def bench_gradcam(batch: int, repeats: int) -> dict[str, Any]:
    import torch
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from handlens.explain import explain

    model = make_model("resnet18")
    gc_model = copy.deepcopy(model)  # pytorch-grad-cam's hooks stay on its own copy (same weights, same cost)
    x = inputs(batch)
    cam = GradCAM(model=gc_model, target_layers=[gc_model.backbone.layer4])

    def pgc() -> Any:  # as the issue specifies: targets built from the predicted classes, known up front
        return cam(input_tensor=x, targets=[ClassifierOutputTarget(c) for c in pred_fixed])

    def pgc_pred() -> Any:  # targets=None: pytorch-grad-cam takes the argmax itself, as handlens does
        return cam(input_tensor=x, targets=None)

    with torch.no_grad():
        pred_fixed = model(x).argmax(1).tolist()
    # the outputs agree (sanity): handlens vs the minimal reference
    ours = explain(model, x, CLASSES, "gradcam").maps
    ref = minimal_gradcam(model, x).numpy()
    max_abs_diff = float(abs(ours - ref).max())
    fns = {
        "handlens": lambda: explain(model, x, CLASSES, "gradcam"),
        "minimal": lambda: minimal_gradcam(model, x),
        "pytorch_grad_cam": pgc,
        "pytorch_grad_cam_targets_none": pgc_pred,
        "forward_backward": lambda: forward_backward(model, x),
    }
    times = time_round_robin(fns, repeats)
    cam.activations_and_grads.release()
    med = {k: v["median_s"] for k, v in times.items()}
    return {
        "batch": batch, "repeats": repeats, "times": times,
        "handlens_vs_minimal": med["handlens"] / med["minimal"],
        "speedup_vs_pytorch_grad_cam": med["pytorch_grad_cam"] / med["handlens"],
        "speedup_vs_pytorch_grad_cam_targets_none": med["pytorch_grad_cam_targets_none"] / med["handlens"],
        "handlens_in_cost_units": med["handlens"] / med["forward_backward"],
        "max_abs_diff_vs_minimal": max_abs_diff,
    }


def bench_all_classes(repeats: int) -> dict[str, Any]:
    from handlens.explain import explain

    model = make_model("resnet18")
    x = inputs(1)
    fns = {
        "gradcam_single": lambda: explain(model, x, CLASSES, "gradcam"),
        "gradcam_all": lambda: explain(model, x, CLASSES, "gradcam", target="all"),
        "cam_all": lambda: explain(model, x, CLASSES, "cam", target="all"),
    }
    times = time_round_robin(fns, repeats)
    phases = explain(model, x, CLASSES, "gradcam", target="all").timings
    med = {k: v["median_s"] for k, v in times.items()}
    return {"times": times, "gradcam_all_phases_s": phases,
            "gradcam_all_vs_single": med["gradcam_all"] / med["gradcam_single"],
            "cam_all_vs_gradcam_single": med["cam_all"] / med["gradcam_single"]}


def ig_worker(side: str, repeats: int, steps: int) -> dict[str, Any]:
    """In a fresh process: peak extra memory of the first IG call, then its median time over ``repeats``."""
    setup()
    import captum.attr  # noqa: F401  (imported before the memory baseline, as handlens imports it lazily)
    import torch

    from handlens.explain import explain

    model = make_model("resnet50")
    x = inputs(1)
    with torch.no_grad():
        model(x)  # warm-up forward

    def run() -> Any:
        if side == "handlens":
            return explain(model, x, CLASSES, "integrated_gradients", steps=steps)
        from captum.attr import IntegratedGradients

        with torch.no_grad():
            pred = model(x).argmax(1).tolist()  # the target, as handlens finds it
        return IntegratedGradients(model).attribute(x, baselines=torch.zeros_like(x), target=pred, n_steps=steps,
                                                    internal_batch_size=25)

    hwm_ok = reset_high_water_mark()
    before = max_rss_mb()
    rss_before = vm_rss_mb()
    hwm_before = proc_status_mb("VmHWM")
    started = time.perf_counter()
    result = run()
    seconds = [time.perf_counter() - started]
    after = max_rss_mb()
    hwm_after = proc_status_mb("VmHWM")
    out: dict[str, Any] = {"side": side, "rss_before_mb": rss_before, "maxrss_before_mb": before,
                           "maxrss_after_mb": after, "peak_extra_maxrss_mb": after - before,
                           "hwm_reset": hwm_ok, "vmhwm_before_mb": hwm_before, "vmhwm_after_mb": hwm_after,
                           "peak_extra_vmhwm_mb": hwm_after - hwm_before}
    # ru_maxrss is the measure asked for; it is only valid if nothing earlier raised the mark above the baseline
    valid = before - rss_before < 16
    out["peak_extra_source"] = "ru_maxrss" if valid or not hwm_ok else "VmHWM"
    out["peak_extra_mb"] = out["peak_extra_maxrss_mb"] if valid or not hwm_ok else out["peak_extra_vmhwm_mb"]
    if side == "handlens":
        out["internal_batch_size"] = result.params["internal_batch_size"]
    else:
        out["internal_batch_size"] = 25
    del result
    for _ in range(repeats - 1):
        started = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - started)
    out["samples_s"] = [round(s, 4) for s in seconds]
    out["median_s"] = statistics.median(seconds)
    return out


def leak_worker(count: int, size: int) -> dict[str, Any]:
    setup()
    from handlens.explain import explain

    model = make_model("resnet18")
    x = inputs(1, size)
    started = time.perf_counter()
    rss_10 = 0.0
    for i in range(count):
        explain(model, x, CLASSES, "gradcam")
        if i == 9:
            rss_10 = vm_rss_mb()
    seconds = time.perf_counter() - started
    rss_end = vm_rss_mb()
    return {"count": count, "size": size, "model": "resnet18", "seconds": seconds, "rss_after_10_mb": rss_10,
            "rss_after_all_mb": rss_end, "growth_mb": rss_end - rss_10,
            "hooks_left_on_layer4": len(model.backbone.layer4._forward_hooks),
            "backward_hooks_left_on_layer4": len(model.backbone.layer4._backward_hooks)}


def in_subprocess(mode: str, *args: str) -> dict[str, Any]:
    """Run this script with ``--worker mode`` in a fresh interpreter; its last stdout line is JSON."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", mode, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {mode} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------- report


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def summarise(res: dict[str, Any]) -> tuple[list[str], dict[str, bool]]:
    lines: list[str] = []
    checks: dict[str, bool] = {}
    m = res["machine"]
    lines.append(f"explain_speed  ({m['cpu_count']} CPUs, {m['threads']} threads, torch {m['torch']}, "
                 f"captum {m['captum']}, grad-cam {m['pytorch_grad_cam']}, mode={res['mode']})")
    lines.append("")
    lines.append("1. Grad-CAM resnet18 224x224 stage4, target=pred (median ms)")
    for r in res["gradcam"]:
        t = {k: v["median_s"] * 1000 for k, v in r["times"].items()}
        b = r["batch"]
        lines.append(f"   batch {b}: handlens {t['handlens']:.1f} | minimal {t['minimal']:.1f} | pytorch-grad-cam "
                     f"{t['pytorch_grad_cam']:.1f} (targets=None: {t['pytorch_grad_cam_targets_none']:.1f}) | "
                     f"fwd+bwd {t['forward_backward']:.1f}  [max |diff| vs minimal {r['max_abs_diff_vs_minimal']:.1e}]")
        ok = r["handlens_vs_minimal"] <= TARGETS["gradcam_vs_minimal_max"]
        checks[f"gradcam_b{b}_vs_minimal"] = ok
        lines.append(f"     handlens / minimal          = {r['handlens_vs_minimal']:.2f}x  (target <= 1.1x)  "
                     f"{verdict(ok)}")
        ok = r["speedup_vs_pytorch_grad_cam"] >= TARGETS["gradcam_speedup_vs_pytorch_grad_cam_min"]
        checks[f"gradcam_b{b}_vs_pytorch_grad_cam"] = ok
        lines.append(f"     pytorch-grad-cam / handlens = {r['speedup_vs_pytorch_grad_cam']:.2f}x faster "
                     f"(targets=None {r['speedup_vs_pytorch_grad_cam_targets_none']:.2f}x)  (target >= 2.5x)  "
                     f"{verdict(ok)}")
        lines.append(f"     handlens in fwd+bwd units   = {r['handlens_in_cost_units']:.2f}")
    a = res["all_classes"]
    t = {k: v["median_s"] * 1000 for k, v in a["times"].items()}
    ok = a["gradcam_all_vs_single"] <= TARGETS["all_classes_vs_single_max"]
    checks["all_classes_vs_single"] = ok
    phases = ", ".join(f"{k} {v * 1000:.0f}" for k, v in a["gradcam_all_phases_s"].items())
    lines.append("")
    lines.append("2. All-class maps resnet18 batch 1, (1, 1000, 224, 224) float32 (median ms)")
    lines.append(f"   gradcam single {t['gradcam_single']:.1f} | gradcam all {t['gradcam_all']:.1f} "
                 f"(phases ms: {phases}) | cam all {t['cam_all']:.1f}")
    lines.append(f"     gradcam all / single = {a['gradcam_all_vs_single']:.2f}x  (target <= 3x)  {verdict(ok)}")
    lines.append(f"     cam all / gradcam single = {a['cam_all_vs_gradcam_single']:.2f}x  (for comparison)")
    ig = res["integrated_gradients"]
    h, c = ig["handlens"], ig["captum"]
    lines.append("")
    lines.append(f"3. Integrated Gradients resnet50 batch 1, {ig['steps']} steps (fresh process each)")
    lines.append(f"   handlens {h['median_s']:.2f} s (internal batch {h['internal_batch_size']}, peak extra "
                 f"{h['peak_extra_mb']:.0f} MB) | captum {c['median_s']:.2f} s (internal batch 25, peak extra "
                 f"{c['peak_extra_mb']:.0f} MB)  [peak from {h['peak_extra_source']}; ru_maxrss/VmHWM: handlens "
                 f"{h['peak_extra_maxrss_mb']:.0f}/{h['peak_extra_vmhwm_mb']:.0f}, captum "
                 f"{c['peak_extra_maxrss_mb']:.0f}/{c['peak_extra_vmhwm_mb']:.0f} MB]")
    ok = ig["time_vs_captum"] <= TARGETS["ig_time_vs_captum_max"]
    checks["ig_time_vs_captum"] = ok
    lines.append(f"     handlens / captum time = {ig['time_vs_captum']:.2f}x  (target <= 1.1x)  {verdict(ok)}")
    ok = h["peak_extra_mb"] <= TARGETS["ig_peak_extra_mb_max"]
    checks["ig_peak_extra_mb"] = ok
    lines.append(f"     handlens peak extra    = {h['peak_extra_mb']:.0f} MB  (target <= 600 MB)  {verdict(ok)}")
    lk = res["leak"]
    ok = lk["growth_mb"] < TARGETS["leak_growth_mb_max"] and lk["hooks_left_on_layer4"] == 0
    checks["leak"] = ok
    lines.append("")
    lines.append(f"4. Leak check: {lk['count']} Grad-CAMs, {lk['model']} {lk['size']}x{lk['size']} batch 1 "
                 f"({lk['seconds']:.1f} s)")
    lines.append(f"   VmRSS after 10 {lk['rss_after_10_mb']:.1f} MB -> after {lk['count']} "
                 f"{lk['rss_after_all_mb']:.1f} MB"
                 f" = {lk['growth_mb']:+.1f} MB; forward hooks left on layer4: {lk['hooks_left_on_layer4']}  "
                 f"(target < 50 MB, 0 hooks)  {verdict(ok)}")
    lines.append("")
    lines.append(f"targets met: {sum(checks.values())}/{len(checks)}")
    return lines, checks


def machine_info() -> dict[str, Any]:
    from importlib.metadata import version

    import captum
    import torch

    return {"cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "captum": captum.__version__, "pytorch_grad_cam": version("grad-cam"), "timm": version("timm"),
            "python": platform.python_version(), "platform": platform.platform(), "processor": platform.processor()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats; 100 explanations for the leak check")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write the JSON results")
    parser.add_argument("--worker", choices=["ig-handlens", "ig-captum", "leak"], help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=1000, help=argparse.SUPPRESS)
    args = parser.parse_args()
    steps = 50
    if args.worker:
        if args.worker == "leak":
            out = leak_worker(args.count, 224)
        else:
            out = ig_worker(args.worker.removeprefix("ig-"), args.repeats, steps)
        print(json.dumps(out))
        return

    setup()
    started = time.perf_counter()
    r1, r8, r_all, r_ig, n_leak = (3, 3, 3, 1, 100) if args.quick else (15, 7, 9, 5, 1000)
    res: dict[str, Any] = {"mode": "quick" if args.quick else "full", "machine": machine_info(), "targets": TARGETS,
                           "loadavg_start": os.getloadavg()}
    busy0, own0 = busy_cpu_s(), own_cpu_s()
    # IG first, while this process is small: a child inherits its parent's ru_maxrss across exec
    print("3. integrated gradients (subprocesses) ...", flush=True)
    ig = {"steps": steps, "captum": in_subprocess("ig-captum", "--repeats", str(r_ig)),
          "handlens": in_subprocess("ig-handlens", "--repeats", str(r_ig))}
    ig["time_vs_captum"] = ig["handlens"]["median_s"] / ig["captum"]["median_s"]
    ig["peak_extra_vs_captum"] = ig["handlens"]["peak_extra_mb"] / max(ig["captum"]["peak_extra_mb"], 1e-9)
    res["integrated_gradients"] = ig
    print("1. Grad-CAM ...", flush=True)
    res["gradcam"] = [bench_gradcam(1, r1), bench_gradcam(8, r8)]
    print("2. all classes ...", flush=True)
    res["all_classes"] = bench_all_classes(r_all)
    print("4. leak check (subprocess) ...", flush=True)
    res["leak"] = in_subprocess("leak", "--count", str(n_leak))
    res["wall_s"] = time.perf_counter() - started
    res["loadavg_end"] = os.getloadavg()
    foreign = max(0.0, (busy_cpu_s() - busy0) - (own_cpu_s() - own0))
    res["other_processes_cpu_s"] = foreign
    res["other_processes_cpu_share"] = foreign / (res["wall_s"] * (os.cpu_count() or 1))
    lines, checks = summarise(res)
    res["checks"] = checks
    print()
    print("\n".join(lines))
    print(f"\n(wall {res['wall_s']:.0f} s; load average 1/5 min at start {res['loadavg_start'][0]:.2f}/"
          f"{res['loadavg_start'][1]:.2f}, at end {res['loadavg_end'][0]:.2f}/{res['loadavg_end'][1]:.2f}; "
          f"other processes used {res['other_processes_cpu_share']:.0%} of the CPUs during the run)")
    if res["other_processes_cpu_share"] > 0.05:
        print("warning: other processes competed for the CPUs; the timings are not trustworthy, run again")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2, default=float) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
