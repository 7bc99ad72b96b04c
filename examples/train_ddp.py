"""Train VeRA adapters with DistributedDataParallel.

    torchrun --nproc_per_node 2 examples/train_ddp.py            # CPU processes, gloo
    torchrun --nproc_per_node 8 examples/train_ddp.py --steps 200  # one process per GPU, nccl

Every rank builds the same model; only lambda_d and lambda_b require grad, so
they are all DDP synchronizes (A and B are regenerated from the seed on each
rank, never sent). Rank 0 saves the adapter, which loads into a plain model.
"""

import argparse
import io
import os

import torch
import torch.distributed as dist
from torch import nn

import vera_kernels as vk


TARGETS = ["0", "2", "4", "6", "8"]  # the nn.Linear layers of build_model


def build_model(width: int) -> nn.Module:
    torch.manual_seed(0)  # same base weights on every rank
    layers = []
    for _ in range(4):
        layers += [nn.Linear(width, width), nn.GELU()]
    return nn.Sequential(*layers, nn.Linear(width, width))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64, help="tokens per rank and step")
    parser.add_argument("--r", type=int, default=32)
    parser.add_argument("--out", help="where rank 0 saves the adapter (default: not saved, only "
                        "round-tripped in memory)")
    args = parser.parse_args()
    # Checked before training, so that the adapter is not lost at the end of a long run.
    if args.out and not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        parser.error(f"--out {args.out}: its directory does not exist")
    if "RANK" not in os.environ:
        raise SystemExit("train_ddp.py runs one process per rank under torchrun, e.g.\n"
                         "    torchrun --nproc_per_node 2 examples/train_ddp.py")

    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)

    model = vk.apply_vera(build_model(args.width), TARGETS, r=args.r, seed=42).to(device)
    # A teacher: the same network with a random adapter, so there is something to learn.
    teacher = vk.apply_vera(build_model(args.width), TARGETS, r=args.r, seed=42).to(device)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(7)
        for name, p in teacher.named_parameters():
            if "vera_lambda" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if use_cuda else None)
    trainable = [p for p in ddp.parameters() if p.requires_grad]
    opt = torch.optim.Adam(trainable, lr=3e-2)
    if rank == 0:
        print(f"{world} ranks on {device.type}; trainable numbers: {sum(p.numel() for p in trainable)}")

    gen = torch.Generator().manual_seed(1000 + rank)  # each rank its own data
    for step in range(1, args.steps + 1):
        x = torch.randn(args.batch, args.width, generator=gen).to(device)
        with torch.no_grad():
            target = teacher(x)
        loss = nn.functional.mse_loss(ddp(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if rank == 0 and (step % 20 == 0 or step == 1):
            print(f"step {step:4d}  loss {loss.item():.5f}")

    state = vk.vera_state_dict(ddp)
    if rank == 0:
        file = args.out or io.BytesIO()
        torch.save(state, file)
        if not args.out:
            file.seek(0)
        plain = vk.apply_vera(build_model(args.width), TARGETS, r=args.r, seed=42)
        vk.load_vera_state_dict(plain, torch.load(file, weights_only=True))
        probe = torch.randn(4, args.width)
        with torch.no_grad():
            diff = (plain(probe) - model.cpu()(probe)).abs().max().item()
        where = f"saved {args.out}" if args.out else "saved in memory"
        print(f"{where}; reloaded in one process, max output difference {diff:.2e}")
    # Every rank done before any tears gloo down: a rank destroying the group while its
    # peer still has traffic in flight can abort the peer.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
