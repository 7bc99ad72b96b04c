"""Fine-tune VeRA adapters on every linear layer of a small Llama, from scratch, offline.

    python examples/finetune_tiny_llama.py                 # 300 steps; CPU, or the GPU if present
    python examples/finetune_tiny_llama.py --steps 50 --device cpu

The Llama is built from a config (no download) and stays frozen; the task is
generated locally: each sequence counts upward with its own random stride,
modulo the vocabulary, so the next token follows from the previous two.
Prints the trainable parameter count, the loss curve and the time per step
(and their mean at the end), saves the adapter to a temporary directory and
loads it into a fresh model, and checks that training with gradient
checkpointing gives the same losses and vectors as without. Writes nothing
that outlives the run.
"""

import argparse
import copy
import os
import statistics
import tempfile
import time

import torch
import transformers

import vera_kernels as vk

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_model(vocab: int, device) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )
    return transformers.LlamaForCausalLM(config).to(device)


def batch(gen: torch.Generator, vocab: int, size: int, length: int) -> torch.Tensor:
    start = torch.randint(0, vocab, (size, 1), generator=gen)
    stride = torch.randint(1, 8, (size, 1), generator=gen)
    return (start + stride * torch.arange(length)) % vocab


def train(model, steps: int, args, device, log=None) -> tuple:
    """Losses and times (ms) of ``steps`` AdamW steps on freshly generated batches (the same every call)."""
    gen = torch.Generator().manual_seed(1)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    model.train()
    losses, step_ms = [], []
    for step in range(1, steps + 1):
        tokens = batch(gen, args.vocab, args.batch, args.length).to(device)
        start = time.perf_counter()
        loss = model(input_ids=tokens, labels=tokens).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())  # waits for the GPU, so the step's time is all in
        step_ms.append(1e3 * (time.perf_counter() - start))
        if log and (step == 1 or step % args.log_every == 0 or step == steps):
            log(f"step {step:4d}  loss {losses[-1]:.4f}  {step_ms[-1]:.1f} ms/step")
    return losses, step_ms


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--r", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=64)
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--checkpointing-steps", type=int, default=5,
                        help="steps compared with and without gradient checkpointing")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    device = torch.device(args.device)

    model = vk.apply_vera(build_model(args.vocab, device), TARGETS, r=args.r, seed=1234)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"device {device}; trainable {trainable:,} of {total:,} parameters "
          f"({100 * trainable / total:.3f}%); VeRA layers: {len(list(vk.model.vera_layers(model)))}")

    reference = copy.deepcopy(model)  # before training, for the checkpointing comparison
    losses, step_ms = train(model, args.steps, args, device, log=print)

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "adapter.pt")
        torch.save(vk.vera_state_dict(model), path)
        size = os.path.getsize(path)
        fresh = vk.apply_vera(build_model(args.vocab, device), TARGETS, r=args.r, seed=1234)
        vk.load_vera_state_dict(fresh, torch.load(path, weights_only=True))
    probe = batch(torch.Generator().manual_seed(99), args.vocab, 4, args.length).to(device)
    model.eval()
    fresh.eval()
    with torch.no_grad():
        reload_diff = (fresh(probe).logits - model(probe).logits).abs().max().item()
    print(f"adapter file {size / 1024:.1f} KiB; reloaded model differs by {reload_diff:.2e}")

    plain = copy.deepcopy(reference)
    checkpointed = copy.deepcopy(reference)
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    plain_losses, _ = train(plain, args.checkpointing_steps, args, device)
    ckpt_losses, _ = train(checkpointed, args.checkpointing_steps, args, device)
    vector_diff = max(
        (p - q).abs().max().item()
        for (n, p), (_, q) in zip(plain.named_parameters(), checkpointed.named_parameters())
        if p.requires_grad
    )
    loss_diff = max(abs(a - b) for a, b in zip(plain_losses, ckpt_losses))
    print(f"gradient checkpointing vs not, {args.checkpointing_steps} steps: "
          f"max loss difference {loss_diff:.2e}, max vector difference {vector_diff:.2e}")
    # The first step pays one-time costs (allocation, kernel compilation): left
    # out of the mean when there are others.
    mean_step_ms = statistics.fmean(step_ms[1:] or step_ms)
    print(f"mean time per step: {mean_step_ms:.1f} ms")
    return {"losses": losses, "reload_diff": reload_diff, "checkpointing_loss_diff": loss_diff,
            "checkpointing_vector_diff": vector_diff, "trainable": trainable,
            "mean_step_ms": mean_step_ms}


if __name__ == "__main__":
    main()
