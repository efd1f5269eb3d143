"""Several processes: gradients averaged by hand (the network is not wrapped in DDP) and a final
check that every rank holds the same weights."""
from __future__ import annotations

import logging

import torch

logger = logging.getLogger("train_network")


def average_gradients(net) -> None:
    """All-reduce (mean) the gradients of the trainable parameters in one flat buffer."""
    import torch.distributed as dist

    grads = [p.grad for p in net.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset:offset + n].view_as(g))
        offset += n


def check_ranks_in_sync(accelerator, net) -> None:
    """Compare per-tensor checksums of the trained parameters across processes."""
    with torch.no_grad():
        sums = torch.stack([t for p in net.parameters() for t in (p.float().sum(), p.float().abs().sum())])
        rows = accelerator.gather(sums.to(accelerator.device).unsqueeze(0))
    if accelerator.is_main_process:
        if bool((rows == rows[0]).all()):
            logger.info("parameters identical on all %d ranks", rows.shape[0])
        else:
            logger.error("parameters differ between ranks (max checksum gap %.3g)", float((rows - rows[0]).abs().max()))
