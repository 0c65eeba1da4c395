"""A Lightning script whose batch size and accumulation come from autofit's plan through a callback, instead of
Lightning's trial-and-error BatchSizeFinder. The lines marked `# autofit` are all it changes.

    python examples/lightning_callback.py --model distilgpt2 --data notes.txt --gpu rtx3060
    python examples/lightning_callback.py --smoke     # a tiny random model on the CPU, a few steps
"""

import argparse
import json

import lightning as L
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from autofit import data, plan  # autofit
from autofit.integrations.lightning import AutofitCallback, trainer_kwargs  # autofit


class CausalLM(L.LightningModule):
    def __init__(self, model, items, pad_id, batch_size=1):
        super().__init__()
        self.model, self.items, self.pad_id, self.batch_size = model, items, pad_id, batch_size
        self.seen_batches = []

    def train_dataloader(self):
        return torch.utils.data.DataLoader(self.items, batch_size=self.batch_size, shuffle=True,
                                           collate_fn=lambda rows: data.collate(rows, self.pad_id))

    def training_step(self, batch, batch_idx):
        self.seen_batches.append(batch["input_ids"].shape[0])
        return self.model(**batch).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-4)


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="distilgpt2")
    parser.add_argument("--data", default=None)
    parser.add_argument("--gpu", default=None, help="card to plan for (default: the detected one)")
    parser.add_argument("--out", default=None, help="write the run's record here as JSON")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)

    if args.smoke:
        from transformers import LlamaConfig

        texts = [f"note {i}: a short line about fitting a training step to a small card." for i in range(64)]
        tokenizer = data.build_tokenizer(texts, vocab_size=300)
        config = LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                             vocab_size=len(tokenizer), max_position_embeddings=128)
        model = AutoModelForCausalLM.from_config(config)
        gpu, steps, effective = "cpu", 2, 8
    else:
        texts = data.load_samples(args.data)
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model)
        gpu, steps, effective = args.gpu, -1, None

    p = plan(model, gpu, dataset=texts, tokenizer=tokenizer, method="full", effective_batch=effective)  # autofit
    print(p.summary())
    module = CausalLM(model, data.tokenize(texts, tokenizer, seq_len=p.seq_len, packing=True), tokenizer.pad_token_id)
    trainer = L.Trainer(max_steps=steps, callbacks=[AutofitCallback(p)], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, accelerator="cpu" if gpu == "cpu" else "auto",
                        **trainer_kwargs(p))  # autofit
    trainer.fit(module)
    record = dict(global_step=trainer.global_step, batch_size=module.batch_size,
                  accumulate_grad_batches=trainer.accumulate_grad_batches, seen_batches=module.seen_batches,
                  plan=dict(batch_size=p.batch_size, grad_accum=p.grad_accum, effective_batch=p.effective_batch))
    print(json.dumps(record))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(record, fh)
    return record


if __name__ == "__main__":
    main()
