"""Typed run configuration: one dataclass per TOML section, CLI overrides, validation.

Every key has a type and a default; the defaults are the embedded debug run. Loading checks
names and types, and `validate` checks combinations, before any work starts.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import sys
import typing
from dataclasses import dataclass, field

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from fq.config import FQConfig


class ConfigError(ValueError):
    """A config file, override or combination is wrong; the message names the key and the fix."""


@dataclass
class ModelConfig:
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    # 0: the vocabulary of the dataset (its .idx records it).
    vocab_size: int = 0
    # 0: 8/3 * dim rounded up to multiple_of (the Llama rule).
    ffn_hidden: int = 0
    multiple_of: int = 64
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02


@dataclass
class DataConfig:
    # Prefix of a {path}.bin/{path}.idx pair from tools/prepare_data.py; "" builds and uses the
    # embedded default corpus (Python standard library text) in the user's cache directory.
    path: str = ""
    # Validation prefix; "" uses {path}_val when it exists.
    val_path: str = ""
    seq_len: int = 128
    # Vocabulary of the tokenizer trained for the embedded default corpus.
    default_vocab_size: int = 2048


@dataclass
class TrainConfig:
    steps: int = 200
    seed: int = 1234
    global_batch_size: int = 16
    micro_batch_size: int = 8
    # auto: bf16 on GPU, fp32 on CPU. fp16 is deliberately not offered (outliers, overflow).
    dtype: str = "auto"
    device: str = "auto"
    compile: bool = False
    # A peer's recipe for the blocks' Linear layers, for benchmarks against FQ: "none" or
    # "torchao_float8" (torchao's float8 training; needs torchao, a GPU with FP8, fq.enabled=false).
    peer_linear: str = "none"
    val_interval: int = 100
    val_batches: int = 8
    # A step with a non-finite loss or gradient norm skips its update (on the device, fused
    # AdamW's found_inf) and logs a warning; this many in a row abort the run.
    max_bad_steps: int = 5
    # Deterministic algorithms (bitwise-reproducible runs, slower on GPU).
    deterministic: bool = False
    # Activation checkpointing: every Nth transformer block keeps only its input and recomputes
    # its activations in the backward (0: off, 1: every block, 2: every other block, ...).
    recompute_every: int = 0


@dataclass
class OptimConfig:
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    # cosine | constant | wsd (warmup, stable, linear decay over the last decay_ratio of steps)
    schedule: str = "cosine"
    warmup_steps: int = 30
    decay_ratio: float = 0.2


@dataclass
class ParallelConfig:
    # fsdp | deepspeed
    engine: str = "fsdp"
    # Replicas across nodes for HSDP (shard within a replica group, replicate across groups).
    dp_replicate: int = 1
    reshard_after_forward: bool = True
    # Dtypes on the wire: int8 | bf16 | fp32.
    all_gather_dtype: str = "int8"
    reduce_scatter_dtype: str = "int8"
    # Elements per FP32 scale in the INT8 payloads.
    comm_block_size: int = 256
    stochastic_rounding: bool = False
    error_feedback: bool = False


@dataclass
class CheckpointConfig:
    # "" -> {logging.dir}/checkpoints
    dir: str = ""
    # Save every N steps and at the last step; 0 saves nothing.
    interval: int = 0
    keep_latest: int = 3
    # auto: the checkpoint `latest` names (an older valid one, with a warning, if it fails
    # verification), else a fresh start | never | a step-N folder
    resume: str = "auto"
    async_save: bool = False
    # Weights to start from when there is nothing to resume: a .pt/.safetensors file from
    # tools/convert_checkpoint.py, a Hugging Face Llama folder, or a step-N folder ("" = none).
    init_from: str = ""


@dataclass
class LoggingConfig:
    dir: str = "outputs"
    interval: int = 10
    tensorboard: bool = True
    # Show a progress bar on an interactive terminal.
    progress_bar: bool = True
    # Activation outlier telemetry (train/outliers.py): hooks count outliers per layer on
    # logged steps that are multiples of outlier_interval (a multiple of logging.interval).
    # Off: no hooks at all.
    outliers: bool = False
    outlier_interval: int = 100
    # torch.profiler over steps profile_start .. profile_start + profile_steps - 1 (0: off):
    # a Chrome trace per rank and a time breakdown in {dir}/profile (train/profiling.py).
    profile_steps: int = 0
    profile_start: int = 10
    # Record every CUDA allocation of this step (0: off): a snapshot per rank in {dir}/profile
    # for pytorch.org/memory_viz, and the log lists what is alive at the step's peak.
    memory_snapshot_step: int = 0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    fq: FQConfig = field(default_factory=FQConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}
_SECTION_CLASSES = {f.name: f.default_factory for f in dataclasses.fields(Config)}

CHOICES = {
    "train.dtype": ("auto", "bf16", "fp32"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.peer_linear": ("none", "torchao_float8"),
    "optim.schedule": ("cosine", "constant", "wsd"),
    "parallel.engine": ("fsdp", "deepspeed"),
    "parallel.all_gather_dtype": ("int8", "bf16", "fp32"),
    "parallel.reduce_scatter_dtype": ("int8", "bf16", "fp32"),
}


def _suggest(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _field_types(cls) -> dict[str, typing.Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(key: str, value, typ):
    """Check a TOML value against the field type (ints are accepted for floats)."""
    origin = typing.get_origin(typ)
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key}: expected a list of strings, got {value!r}")
        return tuple(value)
    if typ is bool:
        if isinstance(value, bool):
            return value
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif typ is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{key}: expected {typ.__name__}, got {type(value).__name__} {value!r}")


def _parse_cli_value(key: str, text: str, typ):
    """Turn a --section.key=value string into the field's type."""
    try:
        if typ is bool:
            low = text.lower()
            if low in ("true", "1", "yes", "on"):
                return True
            if low in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if typ is int:
            return int(text)
        if typ is float:
            return float(text)
    except ValueError:
        raise ConfigError(f"--{key}={text}: expected {typ.__name__}") from None
    return text  # str, and tuple (split in _coerce)


def _build(raw: dict[str, dict]) -> Config:
    sections = {}
    for name, cls in _SECTION_CLASSES.items():
        values = raw.get(name, {})
        types = _field_types(cls)
        kwargs = {k: _coerce(f"{name}.{k}", v, types[k]) for k, v in values.items()}
        try:
            sections[name] = cls(**kwargs)
        except ValueError as e:  # a section's own checks (FQConfig)
            raise ConfigError(str(e)) from None
    return Config(**sections)


def _check_names(raw: dict, origin: str) -> None:
    for name, values in raw.items():
        if name not in _SECTION_CLASSES:
            raise ConfigError(f"{origin}: unknown section [{name}]{_suggest(name, _SECTION_CLASSES)}; "
                              f"sections are {', '.join(_SECTION_CLASSES)}")
        if not isinstance(values, dict):
            raise ConfigError(f"{origin}: '{name}' must be a [section] table")
        types = _field_types(_SECTION_CLASSES[name])
        for key in values:
            if key not in types:
                raise ConfigError(f"{origin}: unknown key {name}.{key}{_suggest(key, types)}; "
                                  f"keys of [{name}] are {', '.join(types)}")


def load_config(path: str | None = None, overrides: list[str] = ()) -> Config:
    """Defaults <- TOML file <- `--section.key=value` overrides."""
    raw: dict[str, dict] = {}
    if path:
        if not os.path.isfile(path):
            raise ConfigError(f"--config {path}: no such file (shipped configs are in configs/)")
        try:
            with open(path, "rb") as f:
                raw = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"--config {path}: not valid TOML: {e}") from None
        _check_names(raw, path)
    for item in overrides:
        if not item.startswith("--") or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"override '{item}': expected --section.key=value")
        if "=" not in item:
            raise ConfigError(f"override '{item}': missing '=value'")
        key, text = item[2:].split("=", 1)
        section, _, name = key.partition(".")
        _check_names({section: {name: None}}, "command line")
        typ = _field_types(_SECTION_CLASSES[section])[name]
        raw.setdefault(section, {})[name] = _parse_cli_value(key, text, typ)
    cfg = _build(raw)
    check_choices(cfg)
    return cfg


def check_choices(cfg: Config) -> None:
    for key, options in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in options:
            raise ConfigError(f"{key}='{value}': must be one of {', '.join(options)}"
                              f"{_suggest(str(value), options)}")


def ffn_hidden(m: ModelConfig) -> int:
    if m.ffn_hidden:
        return m.ffn_hidden
    hidden = int(8 * m.dim / 3)
    return m.multiple_of * ((hidden + m.multiple_of - 1) // m.multiple_of)


def validate(cfg: Config, world_size: int = 1) -> None:
    """Combinations that cannot work, caught before any work starts."""
    m, t, o, p = cfg.model, cfg.train, cfg.optim, cfg.parallel

    def need(ok: bool, msg: str):
        if not ok:
            raise ConfigError(msg)

    for key in ("dim", "n_layers", "n_heads", "n_kv_heads", "max_seq_len", "multiple_of"):
        need(getattr(m, key) > 0, f"model.{key}={getattr(m, key)}: must be > 0")
    need(m.vocab_size >= 0, f"model.vocab_size={m.vocab_size}: must be >= 0 (0 = the dataset's)")
    need(m.dim % m.n_heads == 0,
         f"model.n_heads={m.n_heads} does not divide model.dim={m.dim}; pick a divisor of {m.dim}")
    need((m.dim // m.n_heads) % 2 == 0,
         f"model.dim/model.n_heads={m.dim // m.n_heads} must be even for RoPE")
    need(m.n_heads % m.n_kv_heads == 0,
         f"model.n_kv_heads={m.n_kv_heads} does not divide model.n_heads={m.n_heads}")
    need(cfg.data.seq_len > 0, f"data.seq_len={cfg.data.seq_len}: must be > 0")
    need(cfg.data.seq_len <= m.max_seq_len,
         f"data.seq_len={cfg.data.seq_len} exceeds model.max_seq_len={m.max_seq_len}; "
         f"lower data.seq_len or raise model.max_seq_len")
    need(t.steps > 0, f"train.steps={t.steps}: must be > 0")
    need(t.micro_batch_size > 0, f"train.micro_batch_size={t.micro_batch_size}: must be > 0")
    per_step = t.micro_batch_size * world_size
    need(t.global_batch_size % per_step == 0,
         f"train.global_batch_size={t.global_batch_size} is not divisible by "
         f"train.micro_batch_size x data-parallel size = {t.micro_batch_size} x {world_size}; "
         f"use a multiple of {per_step}")
    need(t.val_interval >= 0 and t.val_batches >= 0, "train.val_interval and train.val_batches must be >= 0")
    need(t.max_bad_steps > 0, f"train.max_bad_steps={t.max_bad_steps}: must be > 0")
    need(t.recompute_every >= 0, f"train.recompute_every={t.recompute_every}: must be >= 0 (0 = off)")
    need(t.recompute_every == 0 or p.engine == "fsdp",
         f"train.recompute_every={t.recompute_every} is implemented for parallel.engine=fsdp only; "
         f"set train.recompute_every=0 with parallel.engine={p.engine}")
    need(t.peer_linear == "none" or not cfg.fq.enabled,
         f"train.peer_linear={t.peer_linear} replaces the Linear layers FQ would convert; add --fq.enabled=false")
    need(o.lr > 0, f"optim.lr={o.lr}: must be > 0")
    need(0 <= o.min_lr_ratio <= 1, f"optim.min_lr_ratio={o.min_lr_ratio}: must be in [0, 1]")
    need(o.warmup_steps >= 0, f"optim.warmup_steps={o.warmup_steps}: must be >= 0")
    need(0 < o.decay_ratio <= 1, f"optim.decay_ratio={o.decay_ratio}: must be in (0, 1]")
    need(o.grad_clip >= 0, f"optim.grad_clip={o.grad_clip}: must be >= 0 (0 disables clipping)")
    need(p.dp_replicate >= 1 and world_size % p.dp_replicate == 0,
         f"parallel.dp_replicate={p.dp_replicate} must divide the world size {world_size}")
    need(p.comm_block_size > 0, f"parallel.comm_block_size={p.comm_block_size}: must be > 0")
    need(p.reduce_scatter_dtype == "int8" or not (p.error_feedback or p.stochastic_rounding),
         f"parallel.error_feedback and parallel.stochastic_rounding shape INT8 reduce-scatters, but "
         f"parallel.reduce_scatter_dtype='{p.reduce_scatter_dtype}'; set parallel.reduce_scatter_dtype=int8 "
         f"or turn them off")
    need(cfg.checkpoint.interval >= 0, f"checkpoint.interval={cfg.checkpoint.interval}: must be >= 0")
    need(cfg.checkpoint.keep_latest >= 1, f"checkpoint.keep_latest={cfg.checkpoint.keep_latest}: must be >= 1")
    need(cfg.logging.interval > 0, f"logging.interval={cfg.logging.interval}: must be > 0")
    lg = cfg.logging
    need(lg.profile_steps >= 0 and lg.profile_start >= 1,
         f"logging.profile_steps={lg.profile_steps} / logging.profile_start={lg.profile_start}: "
         f"steps must be >= 0 and the start step >= 1")
    need(lg.profile_steps == 0 or lg.profile_start + lg.profile_steps - 1 <= cfg.train.steps,
         f"logging.profile_start={lg.profile_start} + profile_steps={lg.profile_steps} runs past "
         f"train.steps={cfg.train.steps}; profile earlier steps or train longer")
    need(0 <= lg.memory_snapshot_step <= cfg.train.steps,
         f"logging.memory_snapshot_step={lg.memory_snapshot_step}: must be a step of the run, "
         f"1..train.steps={cfg.train.steps} (0: off)")
    need(not lg.outliers or (lg.outlier_interval > 0 and lg.outlier_interval % lg.interval == 0),
         f"logging.outlier_interval={lg.outlier_interval} must be a positive multiple of "
         f"logging.interval={lg.interval} (outlier counts are logged with the other metrics)")


def to_dict(cfg: Config) -> dict:
    out = {}
    for name in _SECTION_CLASSES:
        sec = dataclasses.asdict(getattr(cfg, name))
        out[name] = {k: list(v) if isinstance(v, tuple) else v for k, v in sec.items()}
    return out


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_toml(cfg: Config) -> str:
    lines = []
    for name, values in to_dict(cfg).items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
        lines.append("")
    return "\n".join(lines)
