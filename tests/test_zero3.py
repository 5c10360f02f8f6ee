"""The loss with a DeepSpeed ZeRO-3 partitioned LM head: 2 CPU processes over gloo.

Outside an engine's forward the loss must gather the partitioned head itself; inside the engine's
forward the head is already gathered. Both must give the loss and gradients of an unpartitioned
computation.
"""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from mtbi_fast import imitation_loss

deepspeed = pytest.importorskip("deepspeed")

H, V, N = 24, 101, 13


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(N, H, generator=g), torch.randn(N, H, generator=g), torch.randint(0, V, (N,), generator=g)


class _Student(torch.nn.Module):
    """A trainable adapter in front of a frozen head, the shape of an SLLM step."""

    def __init__(self):
        super().__init__()
        self.adapter = torch.nn.Linear(H, H)
        self.head = torch.nn.Linear(H, V)
        self.head.requires_grad_(False)

    def forward(self, x, teacher_hidden, target):
        return imitation_loss(self.adapter(x), teacher_hidden, self.head.weight, target,
                              self.head.bias, ce_weight=0.5, temperature=1.5)


def _worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    import deepspeed

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # else a ~65 s JIT build
    deepspeed.init_distributed(dist_backend="gloo")
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": 3},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
    }
    torch.manual_seed(0)
    with deepspeed.zero.Init(config_dict_or_path=config):
        model = _Student()
    result = {"local_numel": model.head.weight.ds_tensor.numel(),
              "data_numel": model.head.weight.data.numel()}

    # 1. outside any engine: the loss gathers the partitioned head for the call
    hs, ht, target = _inputs()
    hs.requires_grad_()
    loss = imitation_loss(hs, ht, model.head.weight, target, model.head.bias, ce_weight=0.5,
                          temperature=1.5)
    loss.backward()
    result.update(outside_loss=loss.detach(), outside_grad=hs.grad.clone(),
                  data_numel_after=model.head.weight.data.numel())
    hs.grad = None
    loss = imitation_loss(hs, ht, model.head.weight, target, model.head.bias, ce_weight=0.5,
                          temperature=1.5, backend="eager")
    loss.backward()
    result.update(eager_loss=loss.detach(), eager_grad=hs.grad.clone())

    # 2. inside the engine's forward: the head is gathered by DeepSpeed, the adapter trains
    engine, *_ = deepspeed.initialize(model=model, config=config,
                                      model_parameters=[p for p in model.parameters() if p.requires_grad])
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        result["state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    loss = engine(hs.detach(), ht, target)
    engine.backward(loss)
    from deepspeed.utils import safe_get_full_grad  # gathers a ZeRO-3 partitioned gradient

    result.update(engine_loss=loss.detach(),
                  adapter_grad=safe_get_full_grad(model.adapter.weight).clone())
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    os._exit(0)  # skip interpreter teardown, where gloo threads can abort the process


def test_partitioned_head_matches_unpartitioned(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))

    # the head really was partitioned: each rank held half of it and gathered it only for the call
    assert r0["data_numel"] == 0 and r0["data_numel_after"] == 0
    assert r0["local_numel"] == r1["local_numel"] == V * H // 2 + (V * H) % 2

    state = r0["state"]
    hs, ht, target = _inputs()
    hs.requires_grad_()
    expected = imitation_loss(hs, ht, state["head.weight"], target, state["head.bias"],
                              ce_weight=0.5, temperature=1.5, backend="eager")
    expected.backward()
    for r in (r0, r1):
        for backend in ("outside", "eager"):
            torch.testing.assert_close(r[f"{backend}_loss"], expected.detach(), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(r[f"{backend}_grad"], hs.grad, rtol=1e-5, atol=1e-6)

    # inside the engine: same loss and adapter gradient as the unpartitioned model (both ranks saw
    # the same batch, so DeepSpeed's average over ranks is the single-process gradient)
    model = _Student()
    model.load_state_dict(state)
    loss = model(hs.detach(), ht, target)
    loss.backward()
    for r in (r0, r1):
        torch.testing.assert_close(r["engine_loss"], loss.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r["adapter_grad"], model.adapter.weight.grad, rtol=1e-4,
                                   atol=1e-6)
