"""LoRA fine-tuning of distilgpt2 with the plan autofit makes for your card.

    python examples/lora_distilgpt2.py --data notes.txt --gpu rtx3060      # weights from a local dir or HF cache
    python examples/lora_distilgpt2.py --data notes.txt --random-init      # no download: random weights
    python examples/lora_distilgpt2.py --smoke                             # a tiny shape on the CPU, a few steps
"""

import argparse
import tempfile
from pathlib import Path

import autofit


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default=None)
    parser.add_argument("--gpu", default=None)
    parser.add_argument("--out", default="lora-distilgpt2")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--random-init", action="store_true")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    model, data = "distilgpt2", args.data
    if args.smoke:
        from transformers import GPT2Config

        model = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=256, n_positions=128)
        data = str(Path(tempfile.mkdtemp()) / "notes.txt")
        Path(data).write_text("\n\n".join(["a note about low-rank adapters on a small card."] * 64))
        args.gpu, args.steps, args.random_init = "cpu", 6, True
    result = autofit.train(model, data, output_dir=args.out, gpu=args.gpu, steps=args.steps, method="lora",
                           random_init=args.random_init, learning_rate=1e-3 if args.smoke else None)
    print(result.report())
    return result


if __name__ == "__main__":
    main()
