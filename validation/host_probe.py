"""The host's share of a step, taken apart: measure.py's runs at a toy shape, where the GPU idles.

At batch 1 and 16 tokens (encoder-decoder: 16 source + 16 target) every kernel takes a few microseconds, so a
synchronized step's wall time is the host's: Python, dispatch and launch, one op after another. Each run of
cases.py (llama2-7b left out: TinyLlama has its block) is measured three ways:
  * measure.py's own record at the toy shape (`measure()` with STEPS steps), so `ftplan validate --file`
    compares its step time with the estimate's host time at that shape;
  * phases: forward, backward and optimizer step each synchronized, median over the timed steps;
  * counts in one profiled step: nn.Module calls (a global forward pre-hook), top-level aten ops and CUDA
    kernel launches per phase.
With --full NAME,... the named runs are also measured at their own shape again (measure.py's record).

Copy it beside ../shared/gt/measure.py, cases.py and step_profile.py (it imports measure and
step_profile's launch names and top-level test), then:
OUT=DIR python3 host_probe.py [--steps 12] [--full bart-large|adapter,...] [--no-toy]   (CPU: --cpu-smoke)
Writes DIR/host.jsonl, one line per run.
"""
import argparse, contextlib, json, os, statistics, sys, time, traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

import measure as M
from step_profile import LAUNCH, top_level_aten

PHASES = ("forward", "backward", "optimizer")


def toy(run):
    r = dict(run, batch=1, seq=(16, 16) if run["model"] in M.ENC_DEC else 16)
    r.pop("split", None)
    return r


def phases(run, dev, steps, smoke):
    """Per-phase wall times (synchronized) and one profiled step's counts."""
    batch, seq, wdtype, use_autocast = M.settings(run, smoke, {})
    torch.manual_seed(0)
    rec = {"notes": []}
    model, cfg = M.build(run, dev, smoke, wdtype, rec)
    model, params = M.prepare(model, run, dev, rec)
    opt, _ = M.make_optimizer(run, params, dev)
    data = M.make_batch(run, batch, seq, cfg.vocab_size, dev)

    def one(mark=False):
        t = [time.perf_counter()]
        with record_function("forward") if mark else contextlib.nullcontext():
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_autocast):
                loss = model(**data).loss
            M.sync(dev)
        t.append(time.perf_counter())
        with record_function("backward") if mark else contextlib.nullcontext():
            loss.backward()
            M.sync(dev)
        t.append(time.perf_counter())
        with record_function("optimizer") if mark else contextlib.nullcontext():
            opt.step()
            opt.zero_grad(set_to_none=True)
            M.sync(dev)
        t.append(time.perf_counter())
        return [b - a for a, b in zip(t, t[1:])]

    for _ in range(2):
        one()
    times = [one() for _ in range(steps)]
    out = {f"{p}_s": statistics.median(t[i] for t in times) for i, p in enumerate(PHASES)}

    calls = [0]
    handle = torch.nn.modules.module.register_module_forward_pre_hook(lambda m, a: calls.__setitem__(0, calls[0] + 1))
    try:
        one()
    finally:
        handle.remove()
    out["module_calls"] = calls[0]

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        one(mark=True)
    spans = {e.name: (e.time_range.start, e.time_range.end) for e in prof.events()
             if e.device_type == DeviceType.CPU and e.name in PHASES}

    def phase(e):
        s = e.time_range.start
        return next((p for p, (a, b) in spans.items() if a <= s <= b), "other")

    launches, aten = {}, {}
    for e in prof.events():
        if e.device_type != DeviceType.CPU:
            continue
        if e.name in LAUNCH:
            launches[phase(e)] = launches.get(phase(e), 0) + 1
        elif e.name.startswith("aten::") and top_level_aten(e):
            aten[phase(e)] = aten.get(phase(e), 0) + 1
    out.update(launches=launches, aten_top=aten)
    del model, opt, params, data
    M.cleanup(dev)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cpu-smoke", action="store_true")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--full", default="")
    ap.add_argument("--no-toy", action="store_true", help="only the --full runs")
    ap.add_argument("--only", default="", help="toy runs whose names start with one of these (comma list)")
    args, _ = ap.parse_known_args()
    dev = torch.device("cpu") if args.cpu_smoke else torch.device("cuda", 0)
    out_dir = os.environ.get("OUT", "out")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "host.jsonl")
    M.STEPS = args.steps
    seen, runs = set(), []
    for r in M.RUNS:
        if r["model"] == "llama2-7b":
            continue
        t = toy(r)
        only = [k for k in args.only.split(",") if k]
        if only and not any(M.run_name(r).startswith(k) for k in only):
            continue
        if not args.no_toy and M.run_name(t) not in seen:
            seen.add(M.run_name(t))
            runs.append(("toy", t))
    full = [k for k in args.full.split(",") if k]
    runs += [("full", r) for r in M.RUNS if any(M.run_name(r).startswith(k) for k in full)]
    for kind, run in runs:
        if args.cpu_smoke and run["model"] not in ("gpt2", "bart-large"):
            continue
        rec = {"name": M.run_name(run) + ("|toy" if kind == "toy" else ""), "run": run, "probe": kind,
               "device": str(dev), "notes": []}
        t0 = time.time()
        try:
            M.measure(run, dev, args.cpu_smoke, rec)
            M.cleanup(dev)
            if kind == "toy":
                rec["phases"] = phases(run, dev, args.steps, args.cpu_smoke)
        except Exception as e:  # keep going: one broken run must not lose the others
            rec["error"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
            M.cleanup(dev)
        rec["probe_wall_s"] = time.time() - t0
        with open(path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        ph = rec.get("phases", {})
        print(f"{rec['name']}: step {rec.get('step_time_s', 0) * 1e3:.2f} ms "
              f"fwd/bwd/opt {ph.get('forward_s', 0) * 1e3:.2f}/{ph.get('backward_s', 0) * 1e3:.2f}/"
              f"{ph.get('optimizer_s', 0) * 1e3:.2f} modules {ph.get('module_calls')} "
              f"launches {ph.get('launches')} aten {ph.get('aten_top')} ({rec['probe_wall_s']:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
