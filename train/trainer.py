"""The training story: build everything in `Trainer.__init__`, then `train()` runs steps.

One process per device under torchrun; a lone `python -m train` runs as a world of one. Every run
goes through FSDP2, so checkpoints have one format whatever the process count; or, with
parallel.engine=deepspeed, through DeepSpeed ZeRO-3 and its checkpoints (docs/deepspeed.md).
"""
from __future__ import annotations

import logging
import math
import os
import random
import signal
import time
import warnings

import numpy as np
import torch
import torch.distributed as dist

import fq
from parallel.fsdp import build_mesh, shard_model
from train import config as C
from train.checkpoint import Checkpointer
from train.data import IndexedDataset, SampleStream, resolve_val_prefix
from train.metrics import MetricsWriter
from train.model import Transformer, compile_blocks, flops_per_token, num_params
from train.outliers import OutlierMonitor
from train.profiling import MemorySnapshot, StepProfiler
from train.schedule import lr_factor

log = logging.getLogger("fqtrain")

# Dense BF16 peak of the GPUs we measure on, for MFU (datasheet figures).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


class TrainingAborted(RuntimeError):
    """Training cannot go on (e.g. too many consecutive non-finite steps)."""


class StepNumbers:
    """A launched step's numbers on their way to the host: device tensors by name, copied in one
    piece to pinned memory without waiting (`send`); `read` waits for that copy only."""

    def __init__(self, step: int, lr: float, values: dict[str, torch.Tensor | None]):
        self.step, self.lr = step, lr
        self.values = values
        self.host: dict = {}  # numbers already on the host (tokens seen, outlier metrics)
        self.log = False
        self._packed = self._event = None

    def send(self) -> None:
        present = {k: v for k, v in self.values.items() if v is not None}
        self._shapes = {k: v.shape for k, v in present.items()}
        packed = torch.cat([v.detach().reshape(-1).to(torch.float64) for v in present.values()])
        self.t_host = time.perf_counter()
        if packed.is_cuda:
            self._packed = packed.to("cpu", non_blocking=True)  # into pinned memory
            self._event = torch.cuda.Event(enable_timing=True)
            self._event.record()
        else:
            self._packed = packed

    def seconds_since(self, earlier: "StepNumbers") -> float:
        """Time from the end of `earlier` to the end of this step, both read: on the GPU's clock
        (the host runs a step ahead of it), on the host's where the host does the work (CPU)."""
        if self._event is not None and earlier._event is not None:
            return earlier._event.elapsed_time(self._event) / 1000
        return self.t_host - earlier.t_host

    def seconds_from(self, t0: float) -> float:
        """Host time from t0 to the end of this step (read): for the first step, with its set-up."""
        return (self.t_read if self._event is not None else self.t_host) - t0

    def read(self) -> dict[str, list | None]:
        """Each value as a (nested) list of floats; None where the value was None."""
        if self._packed is None:
            self.send()
        if self._event is not None:
            self._event.synchronize()
        self.t_read = time.perf_counter()
        out, i = {}, 0
        for k, v in self.values.items():
            if v is None:
                out[k] = None
                continue
            n = math.prod(self._shapes[k])
            out[k] = self._packed[i:i + n].reshape(self._shapes[k]).tolist() if self._shapes[k] else \
                [self._packed[i].item()]
            i += n
        return out


def init_distributed(device_pref: str) -> tuple[int, int, torch.device]:
    """Join torchrun's process group, or make a world of one for a plain `python -m train`."""
    use_cuda = torch.cuda.is_available() if device_pref == "auto" else device_pref == "cuda"
    if device_pref == "cuda" and not torch.cuda.is_available():
        raise C.ConfigError("train.device='cuda' but CUDA is not available; use train.device=auto or cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    backend = "cpu:gloo,cuda:nccl" if use_cuda else "gloo"
    if not dist.is_initialized():
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend, timeout=_timeout())
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return dist.get_rank(), dist.get_world_size(), device


def _timeout():
    import datetime

    return datetime.timedelta(seconds=int(os.environ.get("FQTRAIN_DIST_TIMEOUT", 600)))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _torchao_float8(model: torch.nn.Module, device: torch.device) -> None:
    """The float8 peer: torchao's dynamic float8 training on the blocks' Linear layers."""
    if device.type != "cuda":
        raise C.ConfigError("train.peer_linear=torchao_float8 needs a CUDA GPU with FP8 (sm_89 or newer)")
    try:
        from torchao.float8 import convert_to_float8_training
    except ImportError as e:
        raise C.ConfigError(f"train.peer_linear=torchao_float8 needs torchao (pip install torchao): {e}") from None
    convert_to_float8_training(model, module_filter_fn=lambda mod, fqn: fqn.startswith("layers."))
    n = sum(type(m).__name__ == "Float8Linear" for m in model.modules())
    log.info(f"peer: torchao float8 training on {n} Linear layers (bf16 all-gathers)")


def build_optimizer(model: torch.nn.Module, cfg: C.OptimConfig):
    """AdamW; no weight decay on norms, biases and embeddings (they are not GEMM weights)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "tok_embeddings" in name or name.endswith("norm.weight"):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel per group of tensors; at 1B on the H100 a step takes 11.4 ms against
    # 31.0 with foreach (docs/benchmarks.md, session 16). Same update rule, CPU included.
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             fused=True)


class Trainer:
    def __init__(self, cfg: C.Config):
        self.cfg = cfg
        self.rank, self.world_size, self.device = init_distributed(cfg.train.device)
        C.validate(cfg, self.world_size)
        if cfg.parallel.engine == "deepspeed":
            from parallel import deepspeed_engine
            deepspeed_engine.check_config(cfg, self.world_size, self.device.type)
        self.is_main = self.rank == 0
        # Installed first, so a stop requested while the model and data are being built is
        # honoured at the first step.
        self.stop_requested = False
        self._install_signal_handlers()
        self.run_dir = cfg.logging.dir
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True)
        seed_everything(cfg.train.seed)

        # Data first: the model's vocabulary comes from it.
        self.train_prefix = self._data_prefix()
        self.train_data = IndexedDataset(self.train_prefix)
        if cfg.model.vocab_size == 0:
            cfg.model.vocab_size = self.train_data.vocab_size
        elif cfg.model.vocab_size < self.train_data.vocab_size:
            raise C.ConfigError(
                f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer vocabulary "
                f"({self.train_data.vocab_size}) of data.path '{self.train_prefix}'; "
                f"set model.vocab_size >= {self.train_data.vocab_size} or 0 (take the dataset's)")
        self.train_stream = SampleStream(self.train_data, cfg.data.seq_len, cfg.train.seed)
        val_prefix = resolve_val_prefix(self.train_prefix, cfg.data.val_path)
        self.val_stream = (SampleStream(IndexedDataset(val_prefix), cfg.data.seq_len, cfg.train.seed + 1)
                           if val_prefix else None)

        if self.is_main:
            os.makedirs(self.run_dir, exist_ok=True)
            with open(os.path.join(self.run_dir, "config.toml"), "w", encoding="utf-8") as f:
                f.write(C.to_toml(cfg))
        checkpointer = (deepspeed_engine.DeepSpeedCheckpointer if cfg.parallel.engine == "deepspeed"
                        else Checkpointer)
        self.checkpointer = checkpointer(cfg, self.run_dir, self.rank, self.world_size)
        self.checkpointer.check_writable()

        # Model: built in full on every rank from the same seed (identical init whatever the
        # world size), FQ layers swapped in, then sharded; the shards stay FP32 master weights.
        self.compute_dtype = self._compute_dtype()
        model = Transformer(cfg.model)
        self.n_params = num_params(model)
        fq.convert(model, cfg.fq)
        if cfg.fq.swiglu_int8:
            for block in model.layers:
                block.mlp.swiglu_int8 = True
            log.info("fq.swiglu_int8: SwiGLU keeps gate and up for the backward as INT8 (fq/swiglu.py)")
        if cfg.train.peer_linear == "torchao_float8":
            _torchao_float8(model, self.device)
        model.to(self.device)
        self.mesh = build_mesh(self.world_size, cfg.parallel.dp_replicate, self.device.type)
        pcfg = cfg.parallel
        if self.world_size == 1 and (pcfg.all_gather_dtype == "int8" or pcfg.reduce_scatter_dtype == "int8"):
            # Nothing crosses a wire in a world of one: quantizing would only add error.
            log.info("parallel: world size 1, INT8 collectives not used (nothing to communicate)")
            pcfg = C.ParallelConfig(**{**pcfg.__dict__, "all_gather_dtype": "fp32", "reduce_scatter_dtype": "fp32"})
        if cfg.parallel.engine == "deepspeed":
            self.model = model  # DeepSpeed shards it below, together with the optimizer
        else:
            self.model = shard_model(model, self.mesh, pcfg, param_dtype=self.compute_dtype)
        every = cfg.train.recompute_every
        if every:
            for i, block in enumerate(model.layers):
                block.recompute = i % every == every - 1
            log.info("train.recompute_every=%d: %d of %d blocks recompute their activations in the backward",
                     every, sum(b.recompute for b in model.layers), len(model.layers))
        # Off: no hooks at all. On: hooks count only during steps whose metrics they join.
        self.outliers = OutlierMonitor(self.model) if cfg.logging.outliers else None
        if cfg.train.compile:
            if every:
                # Recomputed blocks hold side effects (FQ telemetry, budget thresholds, attribute
                # updates) that must happen once per forward, as in eager mode (fq/linear.py); by
                # default dynamo refuses side effects inside checkpointed code and would fall back
                # to running those blocks uncompiled.
                torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
            fq_layers = [m for m in self.model.modules() if isinstance(m, fq.FQLinear)]
            why = fq_layers[0].compile_blocker(self.device.type == "cuda") if fq_layers else None
            compile_blocks(self.model, traceable=why is None)
            if fq_layers:
                log.info("train.compile: FQ layers %s", "traced into the compiled blocks (fq/ops.py)" if why is None
                         else f"run uncompiled inside the compiled blocks ({why})")

        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, cfg.train.steps, cfg.optim))
        if cfg.parallel.engine == "deepspeed":
            self.model, self.optimizer, self.scheduler = deepspeed_engine.initialize(
                self.model, self.optimizer, self.scheduler, cfg, self.world_size, self.compute_dtype)

        self.step = 0
        self.consumed_samples = 0
        self.tokens_seen = 0
        self.skipped_steps = 0
        self.bad_streak = 0
        resume = self.checkpointer.find_resume()
        if resume:
            state = self.checkpointer.load(resume, self.model, self.optimizer, self.scheduler)
            self.step = state["step"]
            self.consumed_samples = state["consumed_samples"]
            self.tokens_seen = state["tokens_seen"]
            self.skipped_steps = state.get("skipped_steps", 0)
            log.info(f"resuming from {resume} at step {self.step} "
                     f"(sample {self.consumed_samples}, {self.tokens_seen:,} tokens seen)")
        else:
            if cfg.checkpoint.init_from:
                self.checkpointer.init_weights(cfg.checkpoint.init_from, self.model)
            if self.is_main:
                why = "never" if cfg.checkpoint.resume == "never" else \
                    f"auto, no valid checkpoint in {self.checkpointer.root}"
                init = f", weights from {cfg.checkpoint.init_from}" if cfg.checkpoint.init_from else ""
                log.info(f"starting fresh (checkpoint.resume={why}{init})")

        self.metrics = MetricsWriter(self.run_dir, cfg.train.steps, self.is_main,
                                     cfg.logging.tensorboard, cfg.logging.progress_bar, log)
        self.flops_per_token = flops_per_token(cfg.model, cfg.data.seq_len)
        self.peak_flops = self._peak_flops()
        if self.is_main:
            log.info(f"model: {self.n_params / 1e6:.2f}M non-embedding params, vocab {cfg.model.vocab_size}, "
                     f"{self.world_size} process(es) on {self.device.type}, compute {self.compute_dtype}, "
                     f"fq {'on' if cfg.fq.enabled else 'off'}, "
                     f"comms all-gather {pcfg.all_gather_dtype} / reduce-scatter {pcfg.reduce_scatter_dtype}")
            log.info(f"data: {self.train_prefix} ({self.train_data.num_tokens:,} tokens, "
                     f"{len(self.train_stream):,} windows of {cfg.data.seq_len + 1}); "
                     f"validation: {val_prefix or 'none'}")

    # ---- set-up helpers -------------------------------------------------------------------
    def _data_prefix(self) -> str:
        if self.cfg.data.path:
            return self.cfg.data.path
        from train.default_data import ensure_default_dataset

        # Rank 0 builds the cached default corpus; the others wait, then find it built.
        if self.is_main:
            prefix = ensure_default_dataset(self.cfg.data.default_vocab_size)
        dist.barrier()
        if not self.is_main:
            prefix = ensure_default_dataset(self.cfg.data.default_vocab_size)
        return prefix

    def _compute_dtype(self) -> torch.dtype:
        dtype = self.cfg.train.dtype
        if dtype == "auto":
            return torch.bfloat16 if self.device.type == "cuda" else torch.float32
        return {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]

    def _peak_flops(self) -> float | None:
        if self.device.type != "cuda":
            return None
        name = torch.cuda.get_device_name(self.device)
        return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)

    # ---- the step ---------------------------------------------------------------------------
    def micro_batches(self, base: int):
        """This rank's micro-batches of the global batch that starts at sample `base`.

        The global batch is samples base .. base+G-1 whatever the world size, so a run resumed
        on a different number of ranks sees exactly the same data."""
        t = self.cfg.train
        accum = t.global_batch_size // (t.micro_batch_size * self.world_size)
        for m in range(accum):
            start = base + (m * self.world_size + self.rank) * t.micro_batch_size
            yield self.train_stream.batch(start, t.micro_batch_size)

    def loss_fn(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":  # a copy from pageable memory would wait for the GPU
            tokens = tokens.pin_memory()
        tokens = tokens.to(self.device, non_blocking=True)
        return self.model(tokens[:, :-1], tokens[:, 1:])

    def train_step(self) -> dict:
        """One step with its numbers read at once: {"loss", "lr", "grad_norm"}. `train()` reads
        each step's numbers only after launching the next (`_launch_step`, `_complete`)."""
        rec = self._launch_step()
        return self._account(rec, rec.read())

    def _launch_step(self) -> "StepNumbers":
        """Launch one step and send its loss and gradient norm towards the host, without waiting."""
        if self.cfg.parallel.engine == "deepspeed":
            return self._deepspeed_step()
        t = self.cfg.train
        accum = t.global_batch_size // (t.micro_batch_size * self.world_size)
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=self.device)
        for tokens in self.micro_batches(self.consumed_samples):
            loss = self.loss_fn(tokens) / accum
            loss.backward()
            loss_sum += loss.detach()
        dist.all_reduce(loss_sum)
        loss = loss_sum / self.world_size
        clip = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip, foreach=True)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        lr = self.optimizer.param_groups[0]["lr"]
        # A step whose loss or gradient norm is not finite skips the update on the device (fused
        # AdamW's found_inf, as under a gradient scaler), so nothing here waits for the GPU.
        # Every rank has the same global loss and norm, so all skip together.
        self.optimizer.found_inf = (~(torch.isfinite(loss) & torch.isfinite(grad_norm))).float()
        self.optimizer.step()
        with warnings.catch_warnings():
            # A skipped update still advances the schedule, which torch warns about.
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
            self.scheduler.step()
        self._advance()
        return StepNumbers(self.step, lr, {"loss": loss, "grad_norm": grad_norm})

    def _account(self, rec: "StepNumbers", values: dict) -> dict:
        """Count a step whose numbers have arrived: a non-finite one was skipped (or, under
        DeepSpeed, applied) and counts toward train.max_bad_steps."""
        loss, grad_norm = float(values["loss"][0]), float(values["grad_norm"][0])
        skips = self.cfg.parallel.engine != "deepspeed"
        if not self._check_finite(loss, grad_norm, "update skipped" if skips else "DeepSpeed applied the update",
                                  rec.step) and skips:
            self.skipped_steps += 1
        return {"loss": loss, "lr": rec.lr, "grad_norm": grad_norm}

    def _check_finite(self, loss: float, grad_norm: float, consequence: str, step: int) -> bool:
        """True for a usable step; a bad one is counted, and train.max_bad_steps in a row abort."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.bad_streak = 0
            return True
        self.bad_streak += 1
        log.warning(f"step {step}: non-finite loss ({loss}) or grad norm ({grad_norm}); "
                    f"{consequence} ({self.bad_streak} in a row)")
        limit = self.cfg.train.max_bad_steps
        if self.bad_streak >= limit:
            raise TrainingAborted(
                f"{self.bad_streak} consecutive steps with a non-finite loss or gradient "
                f"(train.max_bad_steps={limit}); lower optim.lr, check the data, or resume "
                f"from an earlier checkpoint")
        return False

    def _advance(self) -> None:
        t = self.cfg.train
        self.step += 1
        self.consumed_samples += t.global_batch_size
        self.tokens_seen += t.global_batch_size * self.cfg.data.seq_len

    def _deepspeed_step(self) -> "StepNumbers":
        """DeepSpeed divides each micro-batch's loss by the accumulation steps, and at the last
        one clips, steps the optimizer and the LR schedule. The logged loss is the same global
        mean as in `_launch_step`. A non-finite step is not skipped (DeepSpeed applies bf16/fp32
        updates whatever the norm) but counts toward train.max_bad_steps (docs/deepspeed.md).
        Its gradient norm is a host number, so this step waits for the GPU."""
        lr = self.optimizer.param_groups[0]["lr"]
        loss_sum = torch.zeros((), device=self.device)
        micro = 0
        for tokens in self.micro_batches(self.consumed_samples):
            loss = self.loss_fn(tokens)
            self.model.backward(loss)
            self.model.step()
            loss_sum += loss.detach()
            micro += 1
        dist.all_reduce(loss_sum)
        loss = loss_sum / (micro * self.world_size)
        grad_norm = torch.full((), float(self.model.get_global_grad_norm()), dtype=torch.float64, device=self.device)
        self._advance()
        return StepNumbers(self.step, lr, {"loss": loss, "grad_norm": grad_norm})

    @torch.no_grad()
    def evaluate(self) -> float | None:
        if self.val_stream is None or self.cfg.train.val_batches == 0:
            return None
        self.model.eval()
        mb = self.cfg.train.micro_batch_size
        total = torch.zeros((), device=self.device)
        for i in range(self.cfg.train.val_batches):
            start = (i * self.world_size + self.rank) * mb
            total += self.loss_fn(self.val_stream.batch(start, mb))
        dist.all_reduce(total)
        self.model.train()
        fq.collect_stats(self.model, reset=True)  # keep eval out of the training telemetry
        return (total / (self.cfg.train.val_batches * self.world_size)).item()

    def _fq_counts(self) -> torch.Tensor | None:
        """The FQ layers' counters since the last read, summed over ranks, left on the device."""
        counts = fq.stats_counts(self.model, reset=True) if self.cfg.fq.enabled else None
        if counts is not None:
            dist.all_reduce(counts)
        return counts

    def _outlier_step(self, step: int) -> bool:
        """Outlier counts are taken on these steps (all of them logged: see config.validate)."""
        return step % self.cfg.logging.outlier_interval == 0 or step == self.cfg.train.steps

    # ---- the loop ---------------------------------------------------------------------------
    def _install_signal_handlers(self) -> None:
        # Only a flag: the same request may arrive several times (slurmstepd and the launcher),
        # and logging from a signal handler can deadlock on the logging lock.
        def request_stop(signum, _frame):
            self.stop_requested = signal.Signals(signum).name

        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, request_stop)

    def _stop_flags(self) -> torch.Tensor:
        """[stop requested on some rank, a rank still writing an asynchronous save], reduced over
        ranks on the device; read with the step's other numbers, so that all ranks stop (and
        finalise a save) at the same step. Filled on the device: a tensor built from host values
        would be a copy that waits for the GPU."""
        flag = torch.zeros(2, device=self.device)
        if self.stop_requested:
            flag[0] = 1.0
        if self.checkpointer.busy():
            flag[1] = 1.0
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag

    def train(self) -> dict:
        cfg = self.cfg
        self.model.train()
        start_step = self.step
        if start_step >= cfg.train.steps:
            log.info(f"nothing to do: the run is already at step {start_step} of train.steps={cfg.train.steps}")
        profiler = StepProfiler(cfg.logging.profile_start, cfg.logging.profile_steps, self.run_dir,
                                self.rank, self.device)
        memory = MemorySnapshot(cfg.logging.memory_snapshot_step, self.run_dir, self.rank, self.device)
        t0 = time.perf_counter()
        last_val = None
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        # Step N's numbers (loss, norm, telemetry, the stop flag) are read after step N+1 is
        # launched: reading them at once would leave the GPU idle from the end of each step until
        # the host has launched the next one's first kernels (docs/benchmarks.md, session 18).
        # Where the host's state must be exact (evaluation, a save, the end), `_settle` reads them first.
        self._pending: StepNumbers | None = None  # launched, numbers not yet read
        self._last_logged: StepNumbers | None = None
        self._t0, self._start_step = t0, start_step
        stop = False
        while self.step < cfg.train.steps and not stop:
            if self.outliers is not None:
                self.outliers.active = self._outlier_step(self.step + 1)
            profiler.before(self.step + 1)
            memory.before(self.step + 1)
            rec = self._launch_step()
            memory.after(self.step)
            profiler.after(self.step)
            done = self.step == cfg.train.steps
            rec.log = self.step % cfg.logging.interval == 0 or self.step == start_step + 1 or done
            if rec.log:
                rec.values["fq"] = self._fq_counts()
                rec.host["tokens_seen"] = self.tokens_seen
                if self.outliers is not None and self._outlier_step(self.step):
                    rec.host.update(self.outliers.collect())  # reads the device: only on these steps
            if self.outliers is not None:
                self.outliers.active = False
            rec.values["stop"] = self._stop_flags()
            rec.send()
            stop = self._settle()
            self._pending = rec
            val_due = bool(cfg.train.val_interval) and (self.step % cfg.train.val_interval == 0 or done)
            save_due = self.checkpointer.due(self.step, done)
            if stop or val_due or save_due or done:
                stop = self._settle() or stop
            if val_due:
                last_val = self.evaluate()
                if last_val is not None:
                    self.metrics.log_eval(self.step, last_val)
            if stop:
                why = f"received {self.stop_requested}" if self.stop_requested else "stop requested by another rank"
                log.warning(f"{why}: saving a checkpoint at step {self.step} and exiting")
                self.save()
                log.info(f"stopped at step {self.step} on request; resume with checkpoint.resume=auto")
            elif save_due:
                self.save()
        self.checkpointer.wait()
        self.metrics.close()
        return {"step": self.step, "val_loss": last_val}

    def _settle(self) -> bool:
        """Read the pending step's numbers, if a step is pending (`_complete`)."""
        rec, self._pending = self._pending, None
        return self._complete(rec) if rec is not None else False

    def _complete(self, rec: "StepNumbers") -> bool:
        """Step `rec.step`'s numbers have arrived (or are waited for): count it, log it if it is a
        logged step, finalise a finished asynchronous save. True: some rank asked to stop."""
        values = rec.read()
        out = self._account(rec, values)
        if rec.log:
            now = time.perf_counter()
            last = self._last_logged  # None: the first logged step, timed from the start of train()
            seconds = rec.seconds_since(last) if last is not None else rec.seconds_from(self._t0)
            tokens = (rec.step - (last.step if last is not None else self._start_step)) * \
                self.cfg.train.global_batch_size * self.cfg.data.seq_len
            tps = tokens / max(seconds, 1e-9)
            if self.cfg.fq.enabled:
                out.update(fq.stats_from_counts(self.model, values.get("fq")))
            out.update(rec.host)
            out.setdefault("fallback_ratio", None)
            out["tokens_per_sec"] = tps
            out["skipped_steps"] = self.skipped_steps
            if self.device.type == "cuda":
                out["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
                out["tflops"] = tps * self.flops_per_token / self.world_size / 1e12
                out["mfu"] = out["tflops"] * 1e12 / self.peak_flops if self.peak_flops else None
            self.metrics.log(rec.step, out, now - self._t0, rec.step - self._start_step)
            self._last_logged = rec
        else:
            self.metrics.show_progress(rec.step)
        stop, busy_anywhere = values["stop"]
        self.checkpointer.poll(all_done=not busy_anywhere)
        return bool(stop)

    def save(self) -> None:
        self.checkpointer.save(self.step, self.model, self.optimizer, self.scheduler, {
            "step": self.step, "consumed_samples": self.consumed_samples,
            "tokens_seen": self.tokens_seen, "skipped_steps": self.skipped_steps,
        })


def setup_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", force=True)


def run(cfg: C.Config) -> dict:
    setup_logging(int(os.environ.get("RANK", 0)))
    trainer = Trainer(cfg)
    result = trainer.train()
    dist.barrier()  # leave together: no rank tears down while another still talks to it
    return result
