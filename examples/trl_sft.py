"""A TRL SFTTrainer script that takes its batch, accumulation, precision, checkpointing and max length from autofit,
with packing into full rows (the batch the estimate simulated) and the run-time out-of-memory guard. The lines
marked `# autofit` are all it changes.

    python examples/trl_sft.py --model HuggingFaceTB/SmolLM2-135M --data notes.txt --gpu rtx3060
    python examples/trl_sft.py --smoke     # a tiny random model on the CPU, a few steps
"""

import argparse
import json

from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

from autofit import data, plan  # autofit
from autofit.guard import guard  # autofit


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M")
    parser.add_argument("--data", default=None)
    parser.add_argument("--gpu", default=None, help="card to plan for (default: the detected one)")
    parser.add_argument("--out", default="sft-out")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)

    if args.smoke:
        from transformers import LlamaConfig

        texts = [f"note {i}: a short line about fitting a training step to a small card." for i in range(64)]
        tokenizer = data.build_tokenizer(texts, vocab_size=300)
        config = LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                             vocab_size=len(tokenizer), max_position_embeddings=128,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        model = AutoModelForCausalLM.from_config(config)
        gpu, steps, effective = "cpu", 3, 4
    else:
        texts = [data.render(s) for s in data.load_samples(args.data)]
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model)
        gpu, steps, effective = args.gpu, -1, None

    p = plan(model, gpu, dataset=texts, tokenizer=tokenizer, method="full", effective_batch=effective)  # autofit
    print(p.summary())
    sft_args = p.training_arguments(args.out, cls=SFTConfig, max_steps=steps, report_to=[],  # autofit
                                    save_strategy="no", logging_steps=1)
    trainer = SFTTrainer(model=model, args=sft_args, train_dataset=Dataset.from_dict({"text": texts}),
                         processing_class=tokenizer)
    guard(trainer)  # autofit: an out-of-memory error mid-run halves the micro-batch, keeping the effective batch
    result = trainer.train()
    record = dict(global_step=result.global_step, max_length=sft_args.max_length, packing=sft_args.packing,
                  batch_size=sft_args.per_device_train_batch_size,
                  grad_accum=sft_args.gradient_accumulation_steps, seq_len=p.seq_len)
    print(json.dumps(record))
    with open(f"{args.out}/autofit-record.json", "w") as fh:
        json.dump(record, fh)
    return record


if __name__ == "__main__":
    main()
