"""The `fisherfast` command.

    fisherfast info                 versions, backends, CPU features
    fisherfast demo                 the main job on the embedded default model
    fisherfast spectrum --layer L   pullback-metric diagnostics + spectrum PNG
    fisherfast sketch ...           FisherSketch signature of a text file
    fisherfast align SIG...         alignment table + heatmap of signatures
"""
from __future__ import annotations

import argparse
import platform
import sys
import time


def _cpu_features() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return "unknown"
    wanted = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_bf16", "amx_tile")
    return " ".join(flag for flag in wanted if flag in flags) or "none of " + ",".join(wanted)


def cmd_info(args) -> int:
    import torch

    import fisherfast

    print(f"fisherfast {fisherfast.__version__}")
    print(f"python {platform.python_version()}  torch {torch.__version__}  threads {torch.get_num_threads()}")
    for name in ("triton", "transformers", "scipy", "numpy"):
        try:
            module = __import__(name)
            print(f"{name} {module.__version__}")
        except ImportError:
            print(f"{name} not installed")
    print(f"cpu {platform.machine()}  features: {_cpu_features()}")
    print("backends:")
    for status in fisherfast.available_backends().values():
        print(f"  {status}")
    return 0


def _demo_model(model, tokenizer, args) -> None:
    prompt = "The capital of France is"
    import torch

    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits[0, -1]
    top = logits.softmax(-1).topk(5)
    print(f"model: {model.config.model_type}, d={model.config.hidden_size}, V={model.config.vocab_size}, "
          f"layers={model.config.num_hidden_layers}")
    words = ", ".join(f"{tokenizer.decode(int(i))!r} {float(p):.3f}" for p, i in zip(top.values, top.indices))
    print(f"next token after {prompt!r}: {words}")


DEMO_SECTIONS = [("model", _demo_model)]


def cmd_demo(args) -> int:
    from fisherfast.models import load_default

    start = time.perf_counter()
    model, tokenizer = load_default()
    print(f"loaded the embedded default model in {time.perf_counter() - start:.1f} s")
    for title, section in DEMO_SECTIONS:
        print(f"\n== {title} ==")
        section(model, tokenizer, args)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fisherfast", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, backends and CPU features").set_defaults(func=cmd_info)
    demo = sub.add_parser("demo", help="the main job on the embedded default model")
    demo.add_argument("--out", default="fisherfast-demo", help="folder for figures and signatures")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
