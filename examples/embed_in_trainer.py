"""An existing transformers Trainer script that takes its batch, accumulation, precision and checkpointing from
autofit. The lines marked `# autofit` are all it changes.

    python examples/embed_in_trainer.py --model distilgpt2 --data notes.txt --gpu rtx3060
    python examples/embed_in_trainer.py --smoke          # a tiny random model on the CPU, a few steps
"""

import argparse

from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer

from autofit import data, plan  # autofit


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="distilgpt2")
    parser.add_argument("--data", default=None)
    parser.add_argument("--gpu", default=None, help="card to plan for (default: the detected one)")
    parser.add_argument("--out", default="embed-out")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)

    if args.smoke:  # everything made here: a tiny architecture, a tokenizer trained on the text, the CPU
        from transformers import LlamaConfig

        texts = ["a short note about fitting training to a small card."] * 64
        tokenizer = data.build_tokenizer(texts, vocab_size=300)
        config = LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                             vocab_size=len(tokenizer), max_position_embeddings=128)
        model = AutoModelForCausalLM.from_config(config)
        gpu, steps = "cpu", 4
    else:
        texts = data.load_samples(args.data)
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model)
        gpu, steps = args.gpu, -1

    p = plan(model, gpu, dataset=texts, tokenizer=tokenizer, method="full")  # autofit
    print(p.summary())  # autofit
    training_args = p.training_arguments(args.out, max_steps=steps, report_to=[])  # autofit: was TrainingArguments(...)

    dataset = data.tokenize(texts, tokenizer, seq_len=p.seq_len, packing=True)
    trainer = Trainer(model=model, args=training_args, train_dataset=dataset,
                      data_collator=lambda batch: data.collate(batch, tokenizer.pad_token_id))
    from autofit.guard import guard  # autofit: survive an out-of-memory error mid-run

    guard(trainer)  # autofit
    return trainer.train()


if __name__ == "__main__":
    main()
