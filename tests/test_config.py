import glob
import os

import pytest

from train.config import ConfigError, load_config, to_toml, validate
from tests.conftest import ROOT

CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.toml")))


def test_shipped_configs_exist():
    names = {os.path.basename(p) for p in CONFIGS}
    assert {"debug.toml", "llama-125m.toml", "llama-350m.toml", "llama-1b.toml", "llama-8b.toml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_shipped_config_loads_and_validates(path):
    cfg = load_config(path)
    validate(cfg, world_size=1)


def test_debug_config_is_the_embedded_default():
    assert to_toml(load_config(os.path.join(ROOT, "configs", "debug.toml"))) == to_toml(load_config())


def test_overrides_are_typed():
    cfg = load_config(None, ["--train.steps=7", "--optim.lr=1e-3", "--fq.enabled=false",
                             "--data.path=/x/y", "--fq.include=layers.*,foo"])
    assert cfg.train.steps == 7 and isinstance(cfg.train.steps, int)
    assert cfg.optim.lr == 1e-3
    assert cfg.fq.enabled is False
    assert cfg.data.path == "/x/y"
    assert cfg.fq.include == ("layers.*", "foo")


@pytest.mark.parametrize("override,needle", [
    (["--trian.steps=3"], "did you mean 'train'"),
    (["--train.stpes=3"], "did you mean 'steps'"),
    (["--train.steps=three"], "--train.steps=three: expected int"),
    (["--fq.enabled=maybe"], "expected bool"),
    (["--parallel.all_gather_dtype=int4"], "parallel.all_gather_dtype='int4'"),
    (["--optim.schedule=cosin"], "did you mean 'cosine'"),
    (["--fq.tile=100"], "fq.tile=100"),
    (["train.steps=3"], "expected --section.key=value"),
])
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=None) as e:
        load_config(None, override)
    assert needle in str(e.value)


def test_bad_file(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[train]\nsteps = 'ten'\n")
    with pytest.raises(ConfigError, match="train.steps: expected int"):
        load_config(str(p))
    p.write_text("[model]\ndimm = 3\n")
    with pytest.raises(ConfigError, match="did you mean 'dim'"):
        load_config(str(p))
    p.write_text("[modle]\n")
    with pytest.raises(ConfigError, match="did you mean 'model'"):
        load_config(str(p))
    with pytest.raises(ConfigError, match="no such file"):
        load_config(str(tmp_path / "missing.toml"))
    p.write_text("[train\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(str(p))


@pytest.mark.parametrize("override,world,needle", [
    (["--train.global_batch_size=12", "--train.micro_batch_size=8"], 1, "use a multiple of 8"),
    (["--train.global_batch_size=16", "--train.micro_batch_size=8"], 4, "use a multiple of 32"),
    (["--model.n_heads=7"], 1, "model.n_heads=7 does not divide model.dim"),
    (["--model.n_kv_heads=3"], 1, "model.n_kv_heads=3 does not divide"),
    (["--data.seq_len=4096"], 1, "exceeds model.max_seq_len"),
    (["--parallel.dp_replicate=3", "--train.global_batch_size=32"], 4, "parallel.dp_replicate=3"),
    (["--logging.profile_steps=5", "--logging.profile_start=198"], 1, "runs past train.steps=200"),
    (["--train.peer_linear=torchao_float8", "--fq.enabled=true"], 1, "add --fq.enabled=false"),
    (["--train.recompute_every=-1"], 1, "train.recompute_every=-1: must be >= 0"),
    (["--train.recompute_every=1", "--parallel.engine=deepspeed"], 1, "set train.recompute_every=0"),
    (["--parallel.error_feedback=true", "--parallel.reduce_scatter_dtype=fp32"], 2,
     "set parallel.reduce_scatter_dtype=int8"),
    (["--parallel.stochastic_rounding=true", "--parallel.reduce_scatter_dtype=bf16"], 2,
     "parallel.reduce_scatter_dtype='bf16'"),
])
def test_impossible_combinations(override, world, needle):
    cfg = load_config(None, override)
    with pytest.raises(ConfigError) as e:
        validate(cfg, world_size=world)
    assert needle in str(e.value)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["--train.steps=11", "--fq.include=a,b"])
    p = tmp_path / "resolved.toml"
    p.write_text(to_toml(cfg))
    assert to_toml(load_config(str(p))) == to_toml(cfg)


def test_float8_peer_says_what_it_needs(monkeypatch):
    import builtins

    import torch

    from train.model import Transformer
    from train.trainer import _torchao_float8

    model = Transformer(load_config(None, ["--model.vocab_size=64"]).model)
    with pytest.raises(ConfigError, match="needs a CUDA GPU with FP8"):
        _torchao_float8(model, torch.device("cpu"))
    real_import = builtins.__import__

    def no_torchao(name, *args, **kwargs):
        if name.startswith("torchao"):
            raise ImportError("No module named 'torchao'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torchao)
    with pytest.raises(ConfigError, match="needs torchao"):
        _torchao_float8(model, torch.device("cuda"))
