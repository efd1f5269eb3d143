"""The four fully local tasks of the quality benchmark.

Each task has a one-time ``setup()`` (pretraining, data) and ``new_run(seed)``, which returns a
:class:`Run`: the LoRA parameters as kohya-style param groups (with ``named``), a training loss
for each step and a held-out evaluation. The seed fixes the LoRA initialisation and the data
order (and, for the LoRA-teacher task, the task itself); everything held out is fixed.

1. ``lora_teacher``: ``library.toy_tasks.LoRATeacher``: a frozen random MLP plus hidden rank-4
   deltas that rank-4 LoRA adapters have to learn (known optimum: loss 0). Fresh batches every
   step; held-out: 512 fixed inputs, MSE to the teacher.
2. ``digits``: an MLP pretrained on a random half of scikit-learn's bundled digits data set,
   then LoRA-fine-tuned on the other half shown mirrored (a new "style"); held-out: a fixed 30%
   of that half (cross-entropy).
3. ``char_lm``: a byte-level 2-layer transformer pretrained on Python standard-library source
   files, then LoRA-fine-tuned on English prose (the help topics in ``pydoc_data.topics``);
   held-out: fixed windows of held-out topics (cross-entropy, nats per byte).
4. ``tiny_sd_long``: the embedded tiny SD model (``library.tiny_sd``), a run as long as a real
   LoRA training (1500 steps, batch 1, rank 8): its U-Net (random initialisation) is first
   trained in full on generated images with plain backgrounds, then a kohya LoRA
   (``networks.lora``, U-Net only, as ``--network_train_unet_only``) is trained on a held-out
   style (striped backgrounds). The loss is the trainer's own (``library.trainer.DiffusionLoss``:
   VAE latents, DDPM noise and timesteps, epsilon MSE), with cached latents; held-out: other
   striped images, with fixed noise and timesteps.

``TASK_SPECS`` is the task list: name, class, full and ``--quick`` sizes. Measured cost of one
run at full size on one torch thread: lora_teacher and digits ~0.5 s, char_lm ~1.6 s,
tiny_sd_long ~42 s with torch AdamW (``protocol.py`` has the cost model of the whole run).

The pretrained weights of the tiny SD and char-LM tasks are cached under
``.cache/bench_quality/`` (keyed by everything that determines them); the first run trains them.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import sysconfig
import time
import types
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from library.toy_tasks import LoRALinear, LoRATeacher

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CACHE_DIR = os.environ.get("HINA_CACHE_DIR", os.path.join(ROOT, ".cache"))
BENCH_CACHE = os.path.join(CACHE_DIR, "bench_quality")



def _load_or_pretrain(module, file, pretrain, info: dict) -> None:
    """Load the cached pretrained weights, or pretrain (``pretrain()`` returns info) and cache
    them atomically; then freeze the module for LoRA fine-tuning."""
    if os.path.isfile(file):
        module.load_state_dict(torch.load(file, weights_only=True))
        info["pretrain_cached"] = True
    else:
        info.update(pretrain())
        info["pretrain_cached"] = False
        os.makedirs(BENCH_CACHE, exist_ok=True)
        torch.save(module.state_dict(), file + ".tmp")
        os.replace(file + ".tmp", file)
    module.requires_grad_(False)
    module.eval()

class Run:
    """One training run's model: trainable LoRA tensors, a loss per step, a held-out score."""

    def __init__(self, groups, named, loss_fn, eval_fn, close_fn=None, train_mode=None, eval_mode=None):
        self.groups = groups
        self.named = named
        self._loss = loss_fn
        self._eval = eval_fn
        self._close = close_fn
        self._train_mode = train_mode
        self._eval_mode = eval_mode

    def loss(self, step: int) -> torch.Tensor:
        return self._loss(step)

    @torch.no_grad()
    def evaluate(self) -> float:
        if self._eval_mode:
            self._eval_mode()
        try:
            return float(self._eval())
        finally:
            if self._train_mode:
                self._train_mode()

    def close(self) -> None:
        if self._close:
            self._close()


def _groups(named):
    return [{"params": [p for _, p in named], "named": [n for n, _ in named]}]


def _key(d: dict) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _wrap_linears(module: nn.Module, rank: int, names=None) -> None:
    """Replace every nn.Linear child (optionally only those named in `names`) by a LoRALinear."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear) and (names is None or name in names):
            setattr(module, name, LoRALinear(child, rank))
        elif not isinstance(child, LoRALinear):
            _wrap_linears(child, rank, names)


# ----------------------------------------------------------------------------- 1. LoRA teacher
class LoRATeacherTask:
    name = "lora_teacher"
    title = "LoRA-teacher (frozen random MLP + hidden rank-4 deltas)"

    def __init__(self, steps: int = 300, evals: int = 20, batch: int = 64, dims=(64, 128, 128, 64), rank: int = 4):
        self.steps, self.evals, self.batch, self.dims, self.rank = steps, evals, batch, tuple(dims), rank

    def describe(self) -> dict:
        return {"model": f"LoRATeacher dims={list(self.dims)}, LoRA rank {self.rank}, teacher rank 4",
                "batch": self.batch, "loss": "MSE to the teacher; held-out: 512 fixed inputs",
                "note": "the seed also draws the base weights and the hidden deltas (a new task instance per seed)"}

    def setup(self, log=print) -> dict:
        return {}

    def new_run(self, seed: int) -> Run:
        torch.manual_seed(seed)
        model = LoRATeacher(dims=self.dims, rank=self.rank, teacher_rank=4, seed=seed)
        named = model.named_trainable()
        gen = torch.Generator().manual_seed(10_000 + seed)
        x_eval = torch.randn(512, self.dims[0], generator=gen)
        y_eval = model.teacher(x_eval)

        def loss(step):
            x, y = model.batch(self.batch)
            return F.mse_loss(model(x), y)

        return Run(_groups(named), named, loss, lambda: F.mse_loss(model(x_eval), y_eval))


# ----------------------------------------------------------------------------- 2. tiny diffusion
class TinyDiffusionTask:
    name = "tiny_sd_long"
    title = "Tiny SD U-Net LoRA on a held-out style (striped backgrounds)"

    def __init__(self, steps: int = 80, evals: int = 10, batch: int = 4, rank: int = 4, pretrain_steps: int = 400,
                 pretrain_batch: int = 16, n_pretrain: int = 96, n_train: int = 32, n_eval: int = 16, eval_repeats: int = 2):
        self.steps, self.evals, self.batch, self.rank = steps, evals, batch, rank
        self.pretrain_steps, self.pretrain_batch = pretrain_steps, pretrain_batch
        self.n_pretrain, self.n_train, self.n_eval, self.eval_repeats = n_pretrain, n_train, n_eval, eval_repeats
        self._ready = False
        self._prompts = None

    def describe(self) -> dict:
        return {"model": "embedded tiny SD 1.x (library/tiny_sd.py), U-Net 1.06M params",
                "pretraining": f"full U-Net, AdamW lr 1e-3 cosine, {self.pretrain_steps} steps x batch {self.pretrain_batch} "
                               f"on {self.n_pretrain} generated plain-background images",
                "fine_tuning": f"networks.lora rank {self.rank} alpha {self.rank} on the U-Net, batch {self.batch}, "
                               f"{self.steps} steps on {self.n_train} striped-background images",
                "held_out": f"{self.n_eval} other striped images x {self.eval_repeats} fixed (noise, timestep) draws",
                "loss": "library.trainer.DiffusionLoss (epsilon MSE on cached VAE latents, uniform timesteps)"}

    # the trainer's loss function, driven with a minimal args namespace and no accelerator
    _ARGS = types.SimpleNamespace(noise_offset=0.0, clip_skip=None, v_parameterization=False, min_snr_gamma=None,
                                  loss_type="l2", huber_c=0.1, fourier_weight=0.0, fourier_warmup_steps=0)

    def _loss(self, ds, cached, idx, gen, step, prompts=None):
        """The trainer's loss on the items ``idx``; ``prompts``: cached text-encoder outputs
        (``--cache_text_encoder_outputs``), or None to encode the captions now."""
        from library.trainer import DiffusionLoss, Draws

        return DiffusionLoss(self._ARGS, self._models(), cached_latents=cached,
                             cached_prompts=prompts or {})(ds, idx, Draws(gen), None, step)

    def _models(self):
        from library.trainer.models import Models

        m = self.sd
        return Models(m.tokenizer, m.text_encoder, m.vae, m.unet, m.scheduler)

    def _train_prompts(self) -> dict:
        """The fine-tuning captions' text-encoder outputs, each encoded alone once (as
        ``--cache_text_encoder_outputs`` does; the U-Net-only LoRA leaves the encoder frozen). With
        batch 1 a step sees the bits it would get by encoding its caption then."""
        if self._prompts is None:
            from library.trainer import DiffusionLoss

            ds = self.ds["train"]
            loss = DiffusionLoss(self._ARGS, self._models())
            loss.cache_prompts(ds.batch(range(len(ds)))[1])
            self._prompts = loss.cached_prompts
        return self._prompts

    def _latents(self, ds):
        with torch.no_grad():
            return {it.path: self.sd.vae.encode(ds.image(it.path).unsqueeze(0)).latent_dist.mode()[0] for it in ds.items}

    def setup(self, log=print) -> dict:
        if self._ready:
            return self.info
        from library.dataset import FolderDataset
        from library.dataset_gen import make_dataset
        from library.tiny_sd import build_tiny_sd, load_tiny_sd

        t0 = time.perf_counter()
        path = build_tiny_sd(os.path.join(CACHE_DIR, "tiny-sd"), seed=0)
        self.sd = load_tiny_sd(path)
        for m in (self.sd.vae, self.sd.text_encoder, self.sd.unet):
            m.requires_grad_(False)
            m.eval()
        data = os.path.join(BENCH_CACHE, "diffusion_data")
        sets = {"pretrain": (self.n_pretrain, 0, "plain"), "train": (self.n_train, 1, "striped"),
                "eval": (self.n_eval, 2, "striped")}
        self.ds, raw = {}, {}
        for k, (n, seed, style) in sets.items():
            root = make_dataset(os.path.join(data, k), n_images=n, resolution=64, seed=seed, style=style, repeats=1)
            self.ds[k] = FolderDataset(root, 64, ".txt")
            raw[k] = self._latents(self.ds[k])
        # latent scale: unit std on the pretraining set (the random VAE is not SD's, so its
        # scaling_factor 0.18215 would leave latents at std ~0.03, where noise prediction is trivial)
        std = float(torch.stack(list(raw["pretrain"].values())).std())
        self.scale = 1.0 / std
        self.cached = {k: {p: v * self.scale for p, v in d.items()} for k, d in raw.items()}

        spec = {"v": 1, "steps": self.pretrain_steps, "batch": self.pretrain_batch, "n": self.n_pretrain,
                "scale": round(self.scale, 6), "torch": torch.__version__.split("+")[0]}
        file = os.path.join(BENCH_CACHE, f"unet_pretrained_{_key(spec)}.pt")
        unet = self.sd.unet
        info = {"latent_scale": self.scale, "pretrain_spec": spec, "pretrain_cache": os.path.relpath(file, ROOT)}
        _load_or_pretrain(unet, file, lambda: self._pretrain(unet, log), info)
        info["base_eval_loss"] = self._eval_loss()
        info["setup_seconds"] = time.perf_counter() - t0
        self.info = info
        self._ready = True
        return info

    def _pretrain(self, unet, log) -> dict:
        from diffusers.optimization import get_scheduler

        ds, cached = self.ds["pretrain"], self.cached["pretrain"]
        torch.manual_seed(0)
        unet.requires_grad_(True)
        unet.train()
        opt = torch.optim.AdamW(unet.parameters(), lr=1e-3)
        sched = get_scheduler("cosine", opt, num_warmup_steps=self.pretrain_steps // 20,
                              num_training_steps=self.pretrain_steps)
        gen = torch.Generator().manual_seed(0)
        before = self._eval_loss()
        losses = []
        t0 = time.perf_counter()
        for step in range(self.pretrain_steps):
            idx = torch.randint(0, len(ds), (self.pretrain_batch,), generator=gen).tolist()
            loss = self._loss(ds, cached, idx, gen, step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            if (step + 1) % 100 == 0:
                log(f"  {self.name} pretraining {step + 1}/{self.pretrain_steps}: loss "
                    f"{sum(losses[-100:]) / len(losses[-100:]):.4f}")
        unet.eval()
        return {"pretrain_seconds": time.perf_counter() - t0, "pretrain_eval_loss_before": before,
                "pretrain_train_loss_last50": sum(losses[-50:]) / len(losses[-50:])}

    def _eval_loss(self) -> float:
        ds, cached = self.ds["eval"], self.cached["eval"]
        idx = [i for _ in range(self.eval_repeats) for i in range(len(ds))]
        gen = torch.Generator().manual_seed(12345)  # the same noise and timesteps at every evaluation
        total, n = 0.0, 0
        with torch.no_grad():
            for i in range(0, len(idx), 32):
                chunk = idx[i:i + 32]
                total += float(self._loss(ds, cached, chunk, gen, 0)) * len(chunk)
                n += len(chunk)
        return total / n

    def new_run(self, seed: int) -> Run:
        import networks.lora as lora
        from networks.names import attach_param_names

        m = self.sd
        torch.manual_seed(seed)
        net = lora.create_network(1.0, self.rank, float(self.rank), m.vae, None, m.unet)
        net.apply_to(None, m.unet, False, True)
        groups, _desc = net.prepare_optimizer_params(None, None, None)
        groups, _desc = attach_param_names((groups, _desc), net.named_parameters())
        named = list(net.named_parameters())
        net.train()
        ds, cached = self.ds["train"], self.cached["train"]
        prompts = self._train_prompts()
        gen = torch.Generator().manual_seed(seed)
        per_epoch = ds.batches_per_epoch(self.batch)

        def loss(step):
            epoch, b = divmod(step, per_epoch)
            order = ds.epoch_order(seed, epoch)
            idx = [order[(b * self.batch + j) % len(order)] for j in range(self.batch)]
            return self._loss(ds, cached, idx, gen, step, prompts)

        return Run(groups, named, loss, self._eval_loss, close_fn=net.restore)


# ----------------------------------------------------------------------------- 3. digits
class _MLP(nn.Module):
    def __init__(self, din=64, hidden=128, classes=10):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(din, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, classes)

    def forward(self, x):
        return self.head(F.gelu(self.fc2(F.gelu(self.fc1(x)))))


class DigitsTask:
    name = "digits"
    title = "Digits MLP: pretrained on one half, LoRA on the other half mirrored"

    def __init__(self, steps: int = 300, evals: int = 20, batch: int = 64, rank: int = 4, pretrain_steps: int = 400):
        self.steps, self.evals, self.batch, self.rank, self.pretrain_steps = steps, evals, batch, rank, pretrain_steps
        self._ready = False

    def describe(self) -> dict:
        return {"model": "MLP 64-128-128-10 (GELU); LoRA rank 4 on all three Linear layers",
                "pretraining": f"all weights, AdamW lr 3e-3, {self.pretrain_steps} steps x batch 64 on a random half "
                               "of the 1797 images",
                "fine_tuning": "the other half, mirrored left-right (a new 'style'): 70% to train, "
                               "30% held out (cross-entropy; accuracy is recorded too)",
                "data": "sklearn.datasets.load_digits (bundled with scikit-learn, no download)"}

    def setup(self, log=print) -> dict:
        if self._ready:
            return self.info
        from sklearn.datasets import load_digits

        t0 = time.perf_counter()
        d = load_digits()
        x = torch.tensor(d.data, dtype=torch.float32) / 16.0
        y = torch.tensor(d.target, dtype=torch.long)
        gen = torch.Generator().manual_seed(0)
        perm = torch.randperm(len(y), generator=gen)
        x, y = x[perm], y[perm]
        half = len(y) // 2
        self.x_pre, self.y_pre = x[:half], y[:half]
        xh = x[half:].view(-1, 8, 8).flip(2).reshape(-1, 64)  # mirrored
        yh = y[half:]
        n_tr = int(0.7 * len(yh))
        self.x_tr, self.y_tr, self.x_te, self.y_te = xh[:n_tr], yh[:n_tr], xh[n_tr:], yh[n_tr:]
        torch.manual_seed(0)
        base = _MLP()
        opt = torch.optim.AdamW(base.parameters(), lr=3e-3)
        for _ in range(self.pretrain_steps):
            i = torch.randint(0, len(self.y_pre), (64,), generator=gen)
            loss = F.cross_entropy(base(self.x_pre[i]), self.y_pre[i])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        base.requires_grad_(False)
        self.base = base
        with torch.no_grad():
            acc_pre = float((base(self.x_pre).argmax(1) == self.y_pre).float().mean())
            ce = float(F.cross_entropy(base(self.x_te), self.y_te))
            acc = float((base(self.x_te).argmax(1) == self.y_te).float().mean())
        self.info = {"pretrain_train_accuracy": acc_pre, "base_eval_loss": ce, "base_eval_accuracy": acc,
                     "n_pretrain": len(self.y_pre), "n_train": len(self.y_tr), "n_eval": len(self.y_te),
                     "setup_seconds": time.perf_counter() - t0}
        self._ready = True
        return self.info

    def new_run(self, seed: int) -> Run:
        torch.manual_seed(seed)
        model = copy.deepcopy(self.base)
        _wrap_linears(model, self.rank)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        gen = torch.Generator().manual_seed(seed)

        def loss(step):
            i = torch.randint(0, len(self.y_tr), (self.batch,), generator=gen)
            return F.cross_entropy(model(self.x_tr[i]), self.y_tr[i])

        def evaluate():
            return F.cross_entropy(model(self.x_te), self.y_te)

        run = Run(_groups(named), named, loss, evaluate)
        run.accuracy = lambda: float((model(self.x_te).argmax(1) == self.y_te).float().mean())
        return run


# ----------------------------------------------------------------------------- 4. char LM
class _Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        h = self.ln1(x)
        q, k, v = (f(h).view(b, t, self.heads, d // self.heads).transpose(1, 2) for f in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.o(a)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class _CharLM(nn.Module):
    def __init__(self, d=64, layers=2, heads=4, ctx=64):
        super().__init__()
        self.tok, self.pos = nn.Embedding(256, d), nn.Embedding(ctx, d)
        self.blocks = nn.ModuleList(_Block(d, heads) for _ in range(layers))
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, 256)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln(x))


def _stdlib_text(limit: int) -> tuple[bytes, list[str]]:
    d = sysconfig.get_paths()["stdlib"]
    files = sorted(f for f in os.listdir(d) if f.endswith(".py"))
    out, used = [], []
    total = 0
    for f in files:
        with open(os.path.join(d, f), "rb") as fh:
            b = fh.read()
        out.append(b)
        used.append(f)
        total += len(b)
        if total >= limit:
            break
    return b"\n".join(out)[:limit], used


class CharLMTask:
    name = "char_lm"
    title = "Char-level transformer: pretrained on stdlib code, LoRA on English prose"

    def __init__(self, steps: int = 150, evals: int = 10, batch: int = 8, ctx: int = 64, rank: int = 4,
                 pretrain_steps: int = 800, d: int = 64, eval_windows: int = 64):
        self.steps, self.evals, self.batch, self.ctx, self.rank = steps, evals, batch, ctx, rank
        self.pretrain_steps, self.d, self.eval_windows = pretrain_steps, d, eval_windows
        self._ready = False

    def describe(self) -> dict:
        return {"model": f"byte-level transformer, 2 layers, d={self.d}, 4 heads, context {self.ctx}; "
                         f"LoRA rank {self.rank} on q/k/v/o/fc1/fc2",
                "pretraining": f"all weights, AdamW lr 3e-3 cosine, {self.pretrain_steps} steps x batch 32 on the first "
                               "2 MB of the Python standard library's top-level *.py files",
                "fine_tuning": f"batch {self.batch}, the help topics of pydoc_data.topics (English prose); "
                               f"held-out: every 10th topic, {self.eval_windows} fixed windows (nats per byte)"}

    def setup(self, log=print) -> dict:
        if self._ready:
            return self.info
        from pydoc_data.topics import topics

        t0 = time.perf_counter()
        code, files = _stdlib_text(2_000_000)
        keys = sorted(topics)
        train_t = "\n".join(topics[k] for i, k in enumerate(keys) if i % 10).encode("utf-8")
        eval_t = "\n".join(topics[k] for i, k in enumerate(keys) if not i % 10).encode("utf-8")
        as_t = lambda b: torch.frombuffer(bytearray(b), dtype=torch.uint8).long()  # noqa: E731
        self.code, self.train_t, self.eval_t = as_t(code), as_t(train_t), as_t(eval_t)
        g = torch.Generator().manual_seed(0)
        starts = torch.randint(0, len(self.eval_t) - self.ctx - 1, (self.eval_windows,), generator=g)
        self.eval_x = torch.stack([self.eval_t[s:s + self.ctx] for s in starts])
        self.eval_y = torch.stack([self.eval_t[s + 1:s + self.ctx + 1] for s in starts])
        digest = hashlib.sha256(code + train_t + eval_t).hexdigest()[:12]
        spec = {"v": 1, "steps": self.pretrain_steps, "d": self.d, "ctx": self.ctx, "text": digest,
                "torch": torch.__version__.split("+")[0]}
        file = os.path.join(BENCH_CACHE, f"charlm_pretrained_{_key(spec)}.pt")
        torch.manual_seed(0)
        base = _CharLM(d=self.d, ctx=self.ctx)
        info = {"pretrain_files": f"{files[0]} .. {files[-1]} ({len(files)} files)", "text_sha256_12": digest,
                "pretrain_bytes": len(code), "finetune_bytes": len(train_t), "eval_bytes": len(eval_t),
                "pretrain_cache": os.path.relpath(file, ROOT)}
        _load_or_pretrain(base, file, lambda: self._pretrain(base, log), info)
        self.base = base
        with torch.no_grad():
            info["base_eval_loss"] = self._ce(base, self.eval_x, self.eval_y).item()
        info["setup_seconds"] = time.perf_counter() - t0
        self.info = info
        self._ready = True
        return info

    @staticmethod
    def _ce(model, x, y):
        return F.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1))

    def _batch(self, text, n, gen):
        s = torch.randint(0, len(text) - self.ctx - 1, (n,), generator=gen)
        return (torch.stack([text[i:i + self.ctx] for i in s]), torch.stack([text[i + 1:i + self.ctx + 1] for i in s]))

    def _pretrain(self, model, log) -> dict:
        from diffusers.optimization import get_scheduler

        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        sched = get_scheduler("cosine", opt, num_warmup_steps=self.pretrain_steps // 20,
                              num_training_steps=self.pretrain_steps)
        gen = torch.Generator().manual_seed(0)
        losses, t0 = [], time.perf_counter()
        for step in range(self.pretrain_steps):
            x, y = self._batch(self.code, 32, gen)
            loss = self._ce(model, x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            if (step + 1) % 200 == 0:
                log(f"  char_lm pretraining {step + 1}/{self.pretrain_steps}: loss {sum(losses[-100:]) / 100:.4f}")
        return {"pretrain_seconds": time.perf_counter() - t0,
                "pretrain_train_loss_last50": sum(losses[-50:]) / len(losses[-50:])}

    def new_run(self, seed: int) -> Run:
        torch.manual_seed(seed)
        model = copy.deepcopy(self.base)
        for blk in model.blocks:
            _wrap_linears(blk, self.rank, names={"q", "k", "v", "o", "fc1", "fc2"})
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        gen = torch.Generator().manual_seed(seed)

        def loss(step):
            x, y = self._batch(self.train_t, self.batch, gen)
            return self._ce(model, x, y)

        return Run(_groups(named), named, loss, lambda: self._ce(model, self.eval_x, self.eval_y))


@dataclass(frozen=True)
class TaskSpec:
    """One task of the benchmark: its class and constructor arguments at full and --quick size."""
    name: str
    cls: type
    full: Mapping[str, Any] = field(default_factory=dict)
    quick: Mapping[str, Any] = field(default_factory=dict)
    requires: str | None = None  # a module it needs beyond requirements.txt


_LONG_SD = dict(steps=1500, evals=10, batch=1, rank=8, eval_repeats=4)
TASK_SPECS = {s.name: s for s in (
    TaskSpec("lora_teacher", LoRATeacherTask, quick=dict(steps=200, evals=10)),
    TaskSpec("digits", DigitsTask, quick=dict(steps=200, evals=10), requires="sklearn"),
    TaskSpec("char_lm", CharLMTask, quick=dict(steps=100, evals=5)),
    TaskSpec("tiny_sd_long", TinyDiffusionTask, full=_LONG_SD, quick={**_LONG_SD, "steps": 300, "evals": 6}),
)}
TASK_ORDER = tuple(TASK_SPECS)


def task_kwargs(name: str, quick: bool = False, overrides: Mapping | None = None) -> dict:
    """Constructor arguments of a task at its full or --quick size, with `overrides` applied."""
    spec = TASK_SPECS[name]
    return {**spec.full, **(spec.quick if quick else {}), **(overrides or {})}


def make_task(name: str, quick: bool = False, **overrides):
    """A task at its full or --quick size; `overrides` replace constructor arguments."""
    task = TASK_SPECS[name].cls(**task_kwargs(name, quick, overrides))
    task.name = name
    return task
