"""Does PyTorch's MemTracker keep tensors alive across checkpointed steps?  (It does; PyTorch alone does not.)

The CPU replays in validation/ (measure.py --fake: `MemTracker`; fsdp_fake.py: `FSDPMemTracker`) of runs with
gradient checkpointing report a peak that grows with every step, and tensors left after the last step, where
the H200's checkpointed runs have equal peaks in every step and nothing left but weights and optimizer
states.  This runs the same steps with real (not fake) CPU tensors twice:
  * under measure.py's `Tracker` (a `MemTracker`), printing each step's peak and the bytes of activations and
    temporaries the tracker still counts live after it;
  * under a dispatch-level tracker with no module hooks (peak_live.py's `Live`, a `TorchDispatchMode` holding weak
    references to the storages it sees created), printing the bytes still alive after each step.
T5-base's structure at --cpu-smoke widths, LoRA r16 on q/v, batch 2, 64 + 32 tokens, checkpointing (seen on
torch 2.15, transformers 5.17, peft 0.21): the MemTracker's live activations and temporaries grow by 32 KiB a
step (the position biases of the recomputed blocks, each counted once as an activation and once as a
temporary), the plain tracker's live bytes are the same after every step.

Copy it beside ../shared/gt/measure.py, cases.py and peak_live.py (it imports them) and run it with a Python that has
torch, transformers and peft:  python3 tracker_leak.py [--steps 3]
"""
import argparse, os, sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch

import measure as M
from peak_live import Live

RUN = {"model": "t5-base", "method": "lora", "batch": 2, "seq": [64, 32], "grad_ckpt": True, "split": "dev",
       "attn": "sdpa", "lora_r": 16, "lora_targets": "qv"}


def setup():
    rec = {"run": RUN, "notes": []}
    dev = torch.device("cpu")
    batch, seq, wdtype, use_autocast = M.settings(RUN, True, rec)
    M.mirror_cuda_autocast_fp32_ops()
    torch.manual_seed(0)
    model, cfg = M.build(RUN, dev, True, wdtype, rec)
    model, params = M.prepare(model, RUN, dev, rec)
    opt, _ = M.make_optimizer(RUN, params, dev)
    data = M.make_batch(RUN, batch, seq, cfg.vocab_size, dev)
    return model, params, opt, data, dev, use_autocast


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    steps = ap.parse_args().steps

    model, params, opt, data, dev, use_autocast = setup()
    mt = M.Tracker(dev)
    mt.track_external(model, opt, data)
    with mt:
        for step in range(1, steps + 1):
            loss, _ = M.train_step(model, data, opt, params, dev.type, use_autocast)
            del loss
            mt.reset_mod_stats()
            peak = mt.segment()["Total"]
            now = mt.breakdown()
            left = now.get("Activation", 0) + now.get("Temp", 0)
            print(f"MemTracker step {step}: peak {peak} B, activations and temporaries left {left} B", flush=True)

    model, params, opt, data, dev, use_autocast = setup()
    plain = Live()
    for step in range(1, steps + 1):
        with plain:
            loss, _ = M.train_step(model, data, opt, params, dev.type, use_autocast)
        del loss
        print(f"plain tracker step {step}: storages alive {plain.now} B", flush=True)


if __name__ == "__main__":
    main()
