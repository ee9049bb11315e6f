"""Profile one training step of measure.py's runs: kernel time per kernel name, GPU busy time, launches, host ops.

Copy it beside ../shared/gt/measure.py and cases.py (it imports measure), then:
OUT=DIR python3 step_profile.py [--cases=cases_bnb] [--order FILE] [--budget-s S]   (CPU: --cpu-smoke)
Writes DIR/prof.jsonl, one line per run (profile-h200.jsonl keeps each run's top 40 kernels of it). Reuses
measure.py's build/prepare/optimizer/step, so the step is the one measured.jsonl timed.
"""
import argparse, json, os, statistics, sys, time, traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

import measure as M

LAUNCH = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC", "cudaLaunchCooperativeKernel")
COPY = ("cudaMemcpyAsync", "cudaMemsetAsync", "cudaMemcpy")


def union_us(intervals):
    total, end = 0.0, None
    start = None
    for s, e in sorted(intervals):
        if end is None or s > end:
            if end is not None:
                total += end - start
            start, end = s, e
        else:
            end = max(end, e)
    return total + (end - start if end is not None else 0.0)


def top_level_aten(e):
    """An aten op not nested in another aten op (what a Python-level call dispatches)."""
    p = e.cpu_parent
    while p is not None:
        if p.name.startswith("aten::"):
            return False
        p = p.cpu_parent
    return True


def analyse(prof, steps):
    evs = prof.events()
    kern, cpu_launch, copies, aten_top, aten_all = {}, 0, 0, {}, 0
    by_top, by_bwd, marks = {}, {}, {}  # name -> [count, device us, cpu us]
    dev_t = lambda e: getattr(e, "device_time_total", None) if hasattr(e, "device_time_total") else e.cuda_time_total
    busy, gpu_total = [], 0.0
    for e in evs:
        if e.device_type == DeviceType.CUDA:
            d = e.time_range.end - e.time_range.start
            k = kern.setdefault(e.name, [0, 0.0])
            k[0] += 1
            k[1] += d
            gpu_total += d
            busy.append((e.time_range.start, e.time_range.end))
        elif e.device_type == DeviceType.CPU:
            if e.name in LAUNCH:
                cpu_launch += 1
            elif e.name in COPY:
                copies += 1
            elif e.name.startswith("aten::"):
                aten_all += 1
                if top_level_aten(e):
                    aten_top[e.name] = aten_top.get(e.name, 0) + 1
                    a = by_top.setdefault(e.name, [0, 0.0, 0.0])
                    a[0] += 1
                    a[1] += dev_t(e)
                    a[2] += e.cpu_time_total
            else:
                table = by_bwd if e.name.startswith("autograd::engine::evaluate_function") else \
                    marks if ("Optimizer" in e.name or e.name.startswith("ProfilerStep")) else None
                if table is not None:
                    a = table.setdefault(e.name, [0, 0.0, 0.0])
                    a[0] += 1
                    a[1] += dev_t(e)
                    a[2] += e.cpu_time_total
    kernels = sorted(([n, c / steps, t / steps] for n, (c, t) in kern.items()), key=lambda x: -x[2])
    return dict(gpu_kernel_us=gpu_total / steps, gpu_busy_us=union_us(busy) / steps,
                kernel_launches=cpu_launch / steps, copy_calls=copies / steps,
                aten_ops_all=aten_all / steps, aten_ops_top=sum(aten_top.values()) / steps,
                aten_top={k: v / steps for k, v in sorted(aten_top.items(), key=lambda kv: -kv[1])},
                kernels=kernels[:200], kernel_names=len(kernels),
                by_top_op={k: [c / steps, d / steps, t / steps] for k, (c, d, t) in by_top.items()},
                by_backward_node={k: [c / steps, d / steps, t / steps] for k, (c, d, t) in by_bwd.items()},
                marks={k: [c / steps, d / steps, t / steps] for k, (c, d, t) in marks.items()})


def one(run, dev, smoke, rec):
    batch, seq, wdtype, use_autocast = M.settings(run, smoke, rec)
    torch.manual_seed(0)
    model, cfg = M.build(run, dev, smoke, wdtype, rec)
    model, params = M.prepare(model, run, dev, rec)
    opt, rec["optimizer"] = M.make_optimizer(run, params, dev)
    data = M.make_batch(run, batch, seq, cfg.vocab_size, dev)
    times = []
    for step in range(6):
        M.sync(dev)
        t = time.perf_counter()
        loss, _ = M.train_step(model, data, opt, params, dev.type, use_autocast)
        loss.item()
        M.sync(dev)
        times.append(time.perf_counter() - t)
    rec["step_times_s"] = times
    rec["step_time_s"] = statistics.median(times[2:])
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    steps = 2
    M.sync(dev)
    t = time.perf_counter()
    with profile(activities=acts) as prof:
        for _ in range(steps):
            loss, _ = M.train_step(model, data, opt, params, dev.type, use_autocast)
            loss.item()
            M.sync(dev)
    rec["profiled_step_s"] = (time.perf_counter() - t) / steps
    rec.update(analyse(prof, steps))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cpu-smoke", action="store_true")
    ap.add_argument("--cases", default=None, help="read by measure.py at import")
    ap.add_argument("--budget-s", type=float, default=200)
    ap.add_argument("--order", default=None, help="file: run names, one per line, profiled first in this order")
    args = ap.parse_args()
    dev = torch.device("cpu") if args.cpu_smoke else torch.device("cuda", 0)
    out_dir = os.environ.get("OUT") or "./out"
    os.makedirs(out_dir, exist_ok=True)
    import transformers
    transformers.logging.set_verbosity_error()
    named = {M.run_name(r): r for r in M.RUNS}
    first = [l.strip() for l in open(args.order)] if args.order else []
    order = [n for n in first if n in named] + [n for n in named if n not in first]
    t0 = time.time()
    with open(os.path.join(out_dir, "prof.jsonl"), "a") as out:
        for i, name in enumerate(order):
            if time.time() - t0 > args.budget_s:
                print(f"budget: skipped {name}", flush=True)
                continue
            rec, t = dict(name=name, notes=[]), time.time()
            try:
                one(named[name], dev, args.cpu_smoke, rec)
            except Exception as e:
                rec["error"] = f"{type(e).__name__}: {str(e)[:400]}"
                rec["traceback_tail"] = traceback.format_exc().strip().splitlines()[-8:]
            M.cleanup(dev)
            rec["wall_s"] = time.time() - t
            out.write(json.dumps(rec, default=str) + "\n")
            out.flush()
            print(f"[{i + 1}/{len(order)} {time.time() - t0:4.0f}s] {name}: step {rec.get('step_time_s', 0) * 1e3:.1f} ms "
                  f"busy {rec.get('gpu_busy_us', 0) / 1e3:.1f} ms launches {rec.get('kernel_launches', 0):.0f} "
                  f"aten {rec.get('aten_ops_top', 0):.0f} {rec.get('error', '')}", flush=True)


if __name__ == "__main__":
    main()
