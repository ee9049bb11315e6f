"""One rank of an N-way FSDP2 run, traced without module hooks: peak_live.py's tracker under fsdp_fake.py's setup.

fsdp_fake.py accounts with FSDPMemTracker, a MemTracker, whose hooks keep tensors of checkpointed steps alive; this
replays the same run (every block and the root fully_shard-ed over a fake process group, bf16 param dtype, fp32
reduce dtype, no autocast, AdamW(foreach=False)) under FakeTensorMode with peak_live.py's dispatch-level tracker,
which also follows UntypedStorage.resize_ (FSDP2 frees and re-allocates unsharded parameters that way, outside the
dispatcher). It prints each step's peak and, for step 3, the live storages at the peak by creating op.

T5-base with adapters of 64, batch 16, 512 + 128 tokens, checkpointing, 8 ranks: steps 2 and 3 peak at 1,022,614,980 B,
the leak-corrected FSDPMemTracker figure of validation/fsdp.jsonl.

Copy it beside ../shared/gt/measure.py, cases.py, fsdp_fake.py and peak_live.py (it imports them):
  python3 fsdp_peak_live.py '{"model": "t5-base", "method": "adapter", "batch": 16, "seq": [512, 128],
                              "grad_ckpt": true, "split": "dev", "attn": "sdpa", "adapter_dim": 64}' 8
  python3 fsdp_peak_live.py --record fsdp.jsonl 'bart-large|full|...|fsdp|w2' --json   (a record's run, config and
                              world size; prints {"peak_plain_bytes": ..., "peak_plain_by_step": [...]})
"""
import argparse, json, sys
sys.path.insert(0, '.')
import torch, torch.distributed as dist
import measure as M
import peak_live as PL
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.testing._internal.distributed.fake_pg import FakeStore
import fsdp_fake as F

ap = argparse.ArgumentParser()
ap.add_argument("run", help="one of measure.py's run dicts, as JSON (with --record: the record's name)")
ap.add_argument("world", nargs="?", type=int, help="ranks (with --record: the record's world_size)")
ap.add_argument("--record", help="a .jsonl file holding the named record")
ap.add_argument("--json", action="store_true")
a = ap.parse_args()
if a.record:
    stored = PL.read_record(a.record, a.run)
    run, world = PL.from_record(a.record, a.run, stored), stored["world_size"]
else:
    run, world = json.loads(a.run), a.world
dev = torch.device('cpu'); rec = {'run': run, 'notes': []}
dist.init_process_group("fake", rank=0, world_size=world, store=FakeStore())
mesh = init_device_mesh('cpu', (world,))
batch, seq, wdtype, _ = M.settings(run, False, rec)
M.mirror_cuda_autocast_fp32_ops()  # as fsdp_fake.py's main
PL.mirror_cuda_strided_mask_rule()
PL.mirror_cuda_dropout()
with M.fake_mode(), M.unpacked_batches():
    torch.manual_seed(0)
    model, cfg = M.build(run, dev, False, wdtype, rec)
    PL.never_drop(model)  # as the fsdp.jsonl replays
    model, params = M.prepare(model, run, dev, rec)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for b in F.blocks(model):
        fully_shard(b, mesh=mesh, mp_policy=mp, reshard_after_forward=not run.get("grad_op"))
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=not run.get("grad_op"))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, foreach=False)
    data = M.make_batch(run, batch, seq, cfg.vocab_size, dev)
    peaks = []
    for step in range(3):
        states = [s for st in opt.state.values() for s in st.values() if isinstance(s, torch.Tensor)]
        live = PL.Live([p for p in model.parameters()] + list(model.buffers()) + list(data.values()) + states)
        with live:
            loss = model(**data).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        del loss
        peaks.append(live.peak)
        if a.json:
            continue
        print('step', step + 1, 'peak', live.peak, flush=True)
        if step == 2:
            PL.print_live(live.at[1], 30)
if a.json:
    print(json.dumps({"peak_plain_bytes": max(peaks), "peak_plain_by_step": peaks}))
