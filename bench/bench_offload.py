"""Peak memory of an exact pullback metric with half the upper blocks offloaded
to disk (accelerate device_map) vs the same model held in memory.

Each contender runs in a fresh process: a random-init Llama (d = 1024, 8
blocks, split at layer 0 so every block is upper) is loaded, its in-memory
weights are copied into anonymous memory (safetensors loads are lazy mmaps,
which would hide the weights from the resident set), the peak resident set is
reset (/proc/self/clear_refs) and the exact metric computed. Reported: the
resident set before the metric and its peak during it, in MB (Linux only).

    python bench/bench_offload.py [--quick]
"""
from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile

RESULTS = pathlib.Path(__file__).resolve().parent / "results"

_WORKER = r"""
import json, sys, torch, transformers as tf
from fisherfast.split import SplitModel
from fisherfast.metric import pullback_fisher

def status(key):
    return int([l for l in open("/proc/self/status") if l.startswith(key)][0].split()[1]) / 1024

path, placement, layers = sys.argv[1], sys.argv[2], int(sys.argv[3])
options = dict(dtype=torch.float32, attn_implementation="eager")
if placement == "offload":
    dm = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    dm.update({f"model.layers.{i}": "cpu" if i < layers // 2 else "disk" for i in range(layers)})
    options.update(device_map=dm, offload_folder=path + "/offload")
model = tf.AutoModelForCausalLM.from_pretrained(path, **options).eval().requires_grad_(False)
for p in model.parameters():
    if p.device.type != "meta":
        p.data = p.data.clone()
split = SplitModel(model, 0)
open("/proc/self/clear_refs", "w").write("5")
before = status("VmRSS")
G = pullback_fisher(split, split.context(torch.arange(8)), progress=False).dense()
print(json.dumps({"placement": placement, "rss_before_mb": before, "peak_mb": status("VmHWM"),
                  "trace": float(G.trace())}))
"""


def measure(d: int = 1024, layers: int = 8) -> list[dict]:
    import torch
    import transformers as tf

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        config = tf.LlamaConfig(vocab_size=512, hidden_size=d, intermediate_size=4 * d, num_hidden_layers=layers,
                                num_attention_heads=8, num_key_value_heads=4)
        tf.LlamaForCausalLM(config).save_pretrained(tmp)
        rows = []
        for placement in ("memory", "offload"):
            out = subprocess.run([sys.executable, "-c", _WORKER, tmp, placement, str(layers)], check=True,
                                 capture_output=True, text=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="d = 512 instead of 1024")
    args = parser.parse_args()
    d = 512 if args.quick else 1024
    rows = measure(d=d)
    print(f"| placement (d = {d}, 8 blocks, half on disk) | RSS before metric (MB) | peak during metric (MB) |")
    print("|---|---|---|")
    for row in rows:
        print(f"| {row['placement']} | {row['rss_before_mb']:.0f} | {row['peak_mb']:.0f} |")
    print(f"\npeak offload / peak in memory: {rows[1]['peak_mb'] / rows[0]['peak_mb']:.2f}; "
          f"traces equal to {abs(rows[0]['trace'] - rows[1]['trace']) / abs(rows[0]['trace']):.1e} relative")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "offload.json").write_text(json.dumps({"d": d, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
