"""QLoRA fine-tuning of TinyLlama-1.1B: a 4-bit base (bitsandbytes) with LoRA adapters, planned for your card.

    python examples/qlora_tinyllama.py --data chats.jsonl --gpu rtx4060-laptop
    python examples/qlora_tinyllama.py --smoke     # a tiny Llama shape on the CPU, a few steps

QLoRA needs bitsandbytes and a CUDA card (pip install 'autofit[quant]'). Where either is missing the example says so
and trains LoRA on a 16-bit base instead, so its smoke run covers the rest of the path on any machine.
"""

import argparse
import tempfile
from pathlib import Path

import autofit
from autofit.sim import kbit


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default=None)
    parser.add_argument("--gpu", default=None)
    parser.add_argument("--out", default="qlora-tinyllama")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--random-init", action="store_true")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    model, data = "TinyLlama/TinyLlama-1.1B-Chat-v1.0", args.data
    if args.smoke:
        from transformers import LlamaConfig

        model = LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=256, max_position_embeddings=128)
        data = str(Path(tempfile.mkdtemp()) / "chats.jsonl")
        Path(data).write_text("\n".join(
            '{"messages": [{"role": "user", "content": "What is QLoRA?"}, '
            '{"role": "assistant", "content": "LoRA adapters trained on a 4-bit base model."}]}'
            for _ in range(64)))
        args.gpu, args.steps, args.random_init = "cpu", 6, True
    import torch

    method = "qlora"
    if not (kbit.bitsandbytes_available() and torch.cuda.is_available()):
        print("bitsandbytes or a CUDA card is missing here: training LoRA on a 16-bit base instead of QLoRA")
        method = "lora"
    result = autofit.train(model, data, output_dir=args.out, gpu=args.gpu, steps=args.steps, method=method,
                           random_init=args.random_init, learning_rate=1e-3 if args.smoke else None)
    print(result.report())
    return result


if __name__ == "__main__":
    main()
