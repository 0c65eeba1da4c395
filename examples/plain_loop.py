"""A hand-written PyTorch loop seeded by autofit's plan: micro-batch and accumulation from the estimate, and an
out-of-memory error mid-run answered by running the same step again in smaller micro-batches (the effective batch
and every optimizer step kept). The lines marked `# autofit` are all it adds to a plain loop.

    python examples/plain_loop.py --model distilgpt2 --data notes.txt --gpu rtx3060
    python examples/plain_loop.py --smoke     # a tiny random model on the CPU, a few steps, one simulated OOM
"""

import argparse
import itertools
import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from autofit import data, plan  # autofit
from autofit.loops import AccumulatingStep  # autofit


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="distilgpt2")
    parser.add_argument("--data", default=None)
    parser.add_argument("--gpu", default=None, help="card to plan for (default: the detected one)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--out", default=None, help="write the steps' record here as JSON")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)

    if args.smoke:
        from transformers import LlamaConfig

        texts = [f"note {i}: a short line about fitting a training step to a small card." for i in range(64)]
        tokenizer = data.build_tokenizer(texts, vocab_size=300)
        config = LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                             vocab_size=len(tokenizer), max_position_embeddings=128)
        model = AutoModelForCausalLM.from_config(config)
        gpu, steps, effective = "cpu", 3, 8
    else:
        texts = data.load_samples(args.data)
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model)
        gpu, steps, effective = args.gpu, args.steps, None

    p = plan(model, gpu, dataset=texts, tokenizer=tokenizer, method="full", effective_batch=effective)  # autofit
    print(p.summary())
    items = data.tokenize(texts, tokenizer, seq_len=p.seq_len, packing=False)
    device = "cuda" if torch.cuda.is_available() and gpu != "cpu" else "cpu"
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    step = AccumulatingStep.from_plan(  # autofit: micro-batch x accumulation = the plan's effective batch
        p, collate=lambda rows: {k: v.to(device) for k, v in data.collate(rows, tokenizer.pad_token_id).items()})

    def loss_fn(model, batch):
        return model(**batch).loss

    if args.smoke:  # show the recovery on the CPU: the first micro-batch above 2 samples "runs out of memory" once
        real_loss, failed = loss_fn, []

        def loss_fn(model, batch):
            if batch["input_ids"].shape[0] > 2 and not failed:
                failed.append(batch["input_ids"].shape[0])
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return real_loss(model, batch)

    samples = itertools.cycle(range(len(items)))
    losses = []
    for _ in range(steps):
        window = [items[next(samples)] for _ in range(p.effective_batch)]
        losses.append(step(model, optimizer, window, loss_fn))  # autofit: one optimizer step, never lost
    record = dict(steps=step.steps, effective_batch=p.effective_batch, micro_batches=step.tried,
                  shrinks=[(s.micro_batch_before, s.micro_batch_after) for s in step.shrinks], losses=losses)
    print(json.dumps(record))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(record, fh)
    return record


if __name__ == "__main__":
    main()
