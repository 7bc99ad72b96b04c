"""Worker side of the 2-process tests: train a small VeRA model under DDP, FSDP1, FSDP2 or
DeepSpeed ZeRO-3 (gloo, CPU); a mode ending in "+dora" trains DVoRA layers."""

import datetime
import os

import torch
import torch.distributed as dist
from torch import nn

import vera_kernels as vk

WORLD = 2
STEPS = 5
TARGETS = ["0", "2"]


def build_model(use_dora: bool = False) -> nn.Module:
    """The same model and adapter init on every rank and in the single-process run."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 6))
    vk.apply_vera(model, TARGETS, r=4, seed=2**33 + 1, use_dora=use_dora)
    with torch.no_grad():  # b = 0 would leave d without gradient on the first step
        for name, p in model.named_parameters():
            if "vera_lambda_b" in name:
                p.fill_(0.05)
    return model


def batches():
    """(inputs, targets) of the whole batch, and an evaluation input."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8 * WORLD, 10, generator=gen)
    return x, torch.randn(8 * WORLD, 6, generator=gen), torch.randn(5, 10, generator=gen)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(STEPS):
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def train_zero3(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """``train`` under DeepSpeed ZeRO-3 (every parameter partitioned, none kept whole); the
    engine."""
    import deepspeed

    os.environ["LOCAL_RANK"] = str(dist.get_rank())  # what its launcher would set
    deepspeed.init_distributed(dist_backend="gloo")  # takes the process group run() made
    config = {"train_micro_batch_size_per_gpu": x.shape[0], "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    params = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=config,
                                      optimizer=torch.optim.Adam(params, lr=1e-2))
    for _ in range(STEPS):
        engine.backward(nn.functional.mse_loss(engine(x), y))
        engine.step()
    return engine


def run(rank: int, mode: str, out_dir: str) -> None:
    # Rendezvous through a file (no port to race for); gloo's traffic stays on loopback.
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group(
        "gloo", init_method=f"file://{os.path.join(out_dir, 'rendezvous')}", rank=rank,
        world_size=WORLD, timeout=datetime.timedelta(seconds=60),
    )
    mode, _, variant = mode.partition("+")
    try:
        model = build_model(use_dora=variant == "dora")
        if mode == "ddp_second_adapter":
            # Only the active adapter requires grad: DDP's default
            # find_unused_parameters=False must work with a second one.
            vk.add_adapter(model, "fr")
            vk.set_adapter(model, "fr")
        if mode == "zero3":
            wrapped = model  # train_zero3 wraps it
        elif mode.startswith("ddp"):
            wrapped = nn.parallel.DistributedDataParallel(model)
        elif mode == "fsdp1":
            from torch.distributed.fsdp import FullyShardedDataParallel
            from torch.distributed.fsdp.wrap import ModuleWrapPolicy

            # Each VeRA layer its own FSDP unit: its vectors are sharded across the ranks.
            wrapped = FullyShardedDataParallel(model, use_orig_params=True,
                                               auto_wrap_policy=ModuleWrapPolicy({vk.VeRALinear}),
                                               device_id=torch.device("cpu"))
        else:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (WORLD,))
            for name in TARGETS:
                fully_shard(model.get_submodule(name), mesh=mesh)
            wrapped = fully_shard(model, mesh=mesh)
        x, y, x_eval = batches()
        shard = slice(rank * 8, (rank + 1) * 8)
        if mode == "zero3":
            wrapped = train_zero3(wrapped, x[shard], y[shard])
        else:
            train(wrapped, x[shard], y[shard])
        # A collective under FSDP2: every rank calls it.
        state = vk.vera_state_dict(wrapped, adapter=vk.adapters.active_adapter(wrapped))
        with torch.no_grad():
            out = wrapped(x_eval)
        vk.save_adapter(wrapped, os.path.join(out_dir, "adapter"))  # every rank; rank 0 writes
        vk.save_lora_adapter(wrapped, os.path.join(out_dir, "lora"))
        vk.load_vera_state_dict(wrapped, state)  # gathers, checks, shards again
        if mode == "fsdp1":  # merging and a disabled block on sharded base weights
            with torch.no_grad():
                before = wrapped(x_eval)
                vk.merge_vera(wrapped)
                with vk.disable_vera(wrapped):
                    wrapped(x_eval)
                vk.unmerge_vera(wrapped)
                torch.testing.assert_close(wrapped(x_eval), before, rtol=1e-5, atol=1e-6)
        if mode == "zero3":  # merging reads (and writes) the partitioned base weights
            vk.merge_and_unload(wrapped)
            with torch.no_grad():
                out = wrapped(x_eval)
        torch.save({"state": state, "out": out}, os.path.join(out_dir, f"rank{rank}.pt"))
        # Both ranks done before either tears gloo down: a rank destroying the group while
        # its peer still has traffic in flight aborted the peer now and then.
        dist.barrier()
    finally:
        dist.destroy_process_group()
