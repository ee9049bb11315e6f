"""ftplan's device time against the GPU time profiled in the same steps (`profile-h200.jsonl`).

Each profiled run records `gpu_busy_us`, the union of its kernels' intervals in one step, which the
host's speed does not change. That union also holds the `Optimizer.step` annotation's span, which is
mostly idle where the optimizer waits on the host (bitsandbytes' per-parameter syncs, Adafactor's
`.item()` reads), so the busy time compared here is the union less that span plus the kernel time
inside it (the run's `marks`). ftplan's device time is the forward, backward and optimizer seconds of
`ftplan validate --format json` for the same run (`measured.jsonl`, `bnb-h200.jsonl`).

Run from the repository root after `cargo build --release`:
  python3 validation/device_time.py [--runs]
"""
import json
import subprocess
import sys

FTPLAN = "target/release/ftplan"
RECORDS = ["validation/measured.jsonl", "validation/bnb-h200.jsonl"]


def estimates():
    rows = {}
    for path in RECORDS:
        out = subprocess.run([FTPLAN, "validate", "--file", path, "--format", "json"],
                             capture_output=True, text=True, check=True).stdout
        for row in json.loads(out)["rows"]:
            rows[row["name"]] = row
    return rows


def busy_seconds(profile):
    span = sum(k[2] for k in profile["kernels"] if k[0].startswith("Optimizer.") and ".step" in k[0])
    inside = sum(v[1] for k, v in profile["marks"].items()
                 if k.startswith("Optimizer.") and k.endswith(".step"))
    return (profile["gpu_busy_us"] - max(0.0, span - inside)) / 1e6


def main():
    rows = estimates()
    gaps = []
    for line in open("validation/profile-h200.jsonl"):
        profile = json.loads(line)
        row = rows[profile["name"]]
        t = row["estimated_time"]
        device = t["forward_seconds"] + t["backward_seconds"] + t["optimizer_seconds"]
        busy = busy_seconds(profile)
        gap = device / busy - 1
        gaps.append(abs(gap))
        if "--runs" in sys.argv:
            print(f"{profile['name'][:52]:52s} profiled {busy * 1e3:7.1f} ms  ftplan {device * 1e3:7.1f} ms  {gap * 100:+6.1f} %")
    gaps.sort()
    print(f"{len(gaps)} runs: median {gaps[len(gaps) // 2] * 100:.1f} %, mean {sum(gaps) / len(gaps) * 100:.1f} %, "
          f"worst {gaps[-1] * 100:.1f} %")


if __name__ == "__main__":
    main()
