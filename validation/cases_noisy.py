"""The host-bound runs whose step times moved most between two H200 machines, measured again."""
from cases import MODELS, ENC_DEC, RUNS as ALL

KEEP = ["bart-large|adapter", "bart-large|full", "bart-large-dropout|full", "t5-base-dropout|full", "t5-base|full",
        "tinyllama-1.1b|full|b4|s512|gc0|sdpa"]
RUNS = [r for r in ALL if any(f"{r['model']}|{r['method']}|b{r['batch']}|s{r['seq']}|gc{int(r['grad_ckpt'])}|{r['attn']}".startswith(k) for k in KEEP)]
