"""Swap-then-finetune (Kasai et al. 2021) on a tiny GPT-2: softmax attention -> T2R linear attention.

1. Build a tiny GPT-2 from a config (random weights, nothing downloaded) and,
   to stand in for a pretrained model, train it briefly with softmax attention
   on a small built-in text (byte-level tokens: vocabulary 256).
2. `pyattn.integrations.transformers.convert_to_linear` swaps every attention
   layer for linear attention with a learned T2R feature map, keeping all the
   trained weights. The loss jumps: the new feature maps are random.
3. Finetune the converted model: the loss falls again.
4. Greedy `generate` with the recurrent state: a fixed-size state per layer,
   the same cost for every new token.

Runs in about 20 seconds on a CPU (the training itself 10-20 s)::

    python examples/finetune_linear_gpt2.py                 # full run
    python examples/finetune_linear_gpt2.py --pretrain-steps 0 --steps 20
"""
from __future__ import annotations

import argparse
import time
from typing import List, Optional

import torch

TEXT = """\
A recurrent network reads a sentence one token at a time and carries what it has
seen in a state of fixed size. A transformer instead looks back at every token
it has seen, and the cost of each new token grows with the length of the text.
Linear attention writes softmax attention as a product of feature maps, so the
sum over the past can be kept as a running state: the transformer becomes a
recurrent network again. Swap the attention of a trained model for its linear
form, keep every other weight, and finetune: the model learns to use the new
feature maps, and generation then costs the same for the first token and the
ten thousandth. The quick brown fox jumps over the lazy dog; the lazy dog
sleeps in the sun, and the fox runs on into the green wood.
"""


def _batches(data: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator):
    while True:
        starts = torch.randint(0, data.numel() - seq_len - 1, (batch_size,), generator=generator)
        yield torch.stack([data[s:s + seq_len] for s in starts.tolist()])


def _train(model, batches, steps: int, lr: float, label: str, log_every: int) -> List[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    losses = []
    for step in range(steps):
        ids = next(batches)
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if step % log_every == 0 or step == steps - 1:
            print(f"{label} step {step:4d}  loss {loss.item():.3f}", flush=True)
    return losses


def main(argv: Optional[List[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrain-steps", type=int, default=150, help="softmax training steps before the swap")
    parser.add_argument("--steps", type=int, default=150, help="finetuning steps after the swap")
    parser.add_argument("--feature-dim", type=int, default=32, help="T2R features per head")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--sample-tokens", type=int, default=48, help="tokens of the greedy sample at the end")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (a model this small runs fastest on one, above all on a busy machine)")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args) -> dict:
    """Pretrain (softmax), convert, finetune (linear), sample; returns the losses and the sample."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from pyattn.integrations.transformers import convert_to_linear

    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    data = torch.tensor(list(TEXT.encode("utf-8")), dtype=torch.long)
    config = GPT2Config(vocab_size=256, n_embd=64, n_head=4, n_layer=2, n_positions=args.seq_len + 64,
                        attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=10, eos_token_id=10)
    model = GPT2LMHeadModel(config)
    model.set_attn_implementation("sdpa")
    batches = _batches(data, args.batch_size, args.seq_len, generator)
    start = time.perf_counter()
    pretrain = _train(model, batches, args.pretrain_steps, args.lr, "softmax ", max(1, args.pretrain_steps // 6))

    convert_to_linear(model, feature_dim=args.feature_dim)
    finetune = _train(model, batches, args.steps, args.lr, "linear  ", max(1, args.steps // 6))
    print(f"trained in {time.perf_counter() - start:.1f} s")

    model.eval()
    prompt = torch.tensor([list(b"The quick brown ")])
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=args.sample_tokens, do_sample=False, pad_token_id=0,
                             return_dict_in_generate=True)
    text = bytes(out.sequences[0].tolist()).decode("utf-8", errors="replace")
    state_bytes = sum(layer.nbytes() for layer in out.past_key_values.layers)
    print(f"greedy sample: {text!r}")
    print(f"recurrent state: {state_bytes} bytes for {out.sequences.shape[1]} tokens "
          f"(fixed; a KV cache would grow with every token)")
    return {"pretrain": pretrain, "finetune": finetune, "sample": text}


if __name__ == "__main__":
    main()
