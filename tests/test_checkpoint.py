"""Crash safety: a save killed at each fault point leaves the previous checkpoint loadable and
`latest` on a complete one; truncated/corrupted/missing files are named at load and `auto`
falls back past them; an unwritable or full checkpoint.dir is refused before training."""
import logging
import os
import shutil

import pytest

from tests.test_resume import train, train_state
from train import config as C
from train.checkpoint import (FAULT_EXIT_CODE, FAULT_POINTS, MANIFEST, CheckpointError, Checkpointer,
                              verify)


def read_latest(ck) -> str:
    with open(os.path.join(ck, "latest"), encoding="utf-8") as f:
        return f.read().strip()


@pytest.fixture(scope="module")
def saved(default_cache, tmp_path_factory):
    """A world-of-1 run with a checkpoint at step 2 (tied embeddings: stored once, re-tied at load)."""
    tmp = tmp_path_factory.mktemp("ckpt")
    train(default_cache["cache"], tmp / "run", "--train.steps=2", "--checkpoint.interval=2",
          "--model.tie_embeddings=true", f"--checkpoint.dir={tmp / 'ck'}")
    return {"ck": tmp / "ck", "cache": default_cache["cache"], "tmp": tmp}


def checkpointer(ck, resume="auto") -> Checkpointer:
    cfg = C.Config()
    cfg.model.vocab_size = 2048
    cfg.checkpoint.dir, cfg.checkpoint.resume, cfg.checkpoint.interval = str(ck), resume, 2
    return Checkpointer(cfg, str(ck), rank=0, world_size=1)


@pytest.mark.slow
def test_kill_during_save_at_each_point_keeps_previous_checkpoint(saved, tmp_path):
    ck = tmp_path / "ck"
    shutil.copytree(saved["ck"], ck)
    for point in FAULT_POINTS:
        res = train(saved["cache"], tmp_path / point, "--train.steps=3", "--checkpoint.interval=3",
                    "--model.tie_embeddings=true", f"--checkpoint.dir={ck}", env={"FQTRAIN_FAULT": point}, expect_rc=FAULT_EXIT_CODE)
        assert f"FQTRAIN_FAULT={point}" in res.stderr
        # Every run resumed from step 2: the previous checkpoint stayed loadable.
        assert "resuming from" in res.stderr and "step-00000002 at step 2" in res.stderr, point
        assert verify(str(ck / "step-00000002"), full=True) is None, point
        assert read_latest(ck) == "step-00000002", point  # `latest` never names a partial save
        assert checkpointer(ck).find_resume() == str(ck / "step-00000002"), point
        if point == "before_latest":  # complete and in place, but not marked by `latest`
            assert verify(str(ck / "step-00000003"), full=True) is None
        else:
            assert not (ck / "step-00000003").exists()
            assert (ck / "step-00000003.tmp").is_dir()
    # The next run ignores the unmarked step 3, its saves replace it and clear the leftovers,
    # and keep_latest prunes the oldest.
    res = train(saved["cache"], tmp_path / "after", "--train.steps=4", "--checkpoint.interval=1",
                "--checkpoint.keep_latest=2", "--model.tie_embeddings=true", f"--checkpoint.dir={ck}")
    assert "ignoring step-00000003: newer than 'latest'" in res.stderr
    assert "step-00000002 at step 2" in res.stderr
    assert read_latest(ck) == "step-00000004" and not list(ck.glob("*.tmp"))
    assert sorted(p.name for p in ck.glob("step-*")) == ["step-00000003", "step-00000004"]
    assert train_state(ck / "step-00000004")["consumed_samples"] == 4 * 8


@pytest.mark.slow
def test_one_rank_dying_mid_save_on_two_ranks(saved, tmp_path):
    """Resume the 1-rank checkpoint on 2 ranks; rank 1 dies right after writing its shards of
    the next save: rank 0's shards are in step-3.tmp/, which is never renamed into place."""
    ck = tmp_path / "ck"
    shutil.copytree(saved["ck"], ck)
    train(saved["cache"], tmp_path / "run", "--train.steps=3", "--checkpoint.interval=3",
          "--model.tie_embeddings=true", f"--checkpoint.dir={ck}", nproc=2,
          env={"FQTRAIN_FAULT": "after_shards", "FQTRAIN_FAULT_RANK": "1"}, expect_rc=1)
    assert read_latest(ck) == "step-00000002" and not (ck / "step-00000003").exists()
    assert list((ck / "step-00000003.tmp").glob("__0_*.distcp"))
    assert checkpointer(ck).find_resume() == str(ck / "step-00000002")


@pytest.fixture
def two_checkpoints(saved, tmp_path):
    """step-2 and a copy of it as step-4 (a manifest describes contents, not names), `latest`
    naming step-4."""
    ck = tmp_path / "ck"
    shutil.copytree(saved["ck"], ck)
    shutil.copytree(ck / "step-00000002", ck / "step-00000004")
    (ck / "latest").write_text("step-00000004\n")
    return ck


def shard(path) -> str:
    return next(str(p) for p in sorted(path.glob("__0_*.distcp")))


def test_truncated_shard_is_named_and_auto_falls_back(two_checkpoints, caplog):
    ck = two_checkpoints
    bad = shard(ck / "step-00000004")
    with open(bad, "r+b") as f:
        f.truncate(os.path.getsize(bad) // 2)
    problem = verify(str(ck / "step-00000004"))
    assert bad in problem and "truncated" in problem
    with caplog.at_level(logging.WARNING, logger="fqtrain"):
        assert checkpointer(ck).find_resume() == str(ck / "step-00000002")
    assert bad in caplog.text and "trying an older one" in caplog.text
    with pytest.raises(CheckpointError, match=bad):
        checkpointer(ck, resume=str(ck / "step-00000004")).find_resume()


def test_corrupted_shard_fails_crc_and_auto_falls_back(two_checkpoints, caplog):
    ck = two_checkpoints
    bad = shard(ck / "step-00000004")
    with open(bad, "r+b") as f:  # same size, one byte flipped: only the crc32 sees it
        f.seek(os.path.getsize(bad) // 3)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert verify(str(ck / "step-00000004")) is None
    assert bad in verify(str(ck / "step-00000004"), full=True)
    with caplog.at_level(logging.WARNING, logger="fqtrain"):
        assert checkpointer(ck).find_resume() == str(ck / "step-00000002")
    assert f"{bad} fails its crc32 check" in caplog.text
    with pytest.raises(CheckpointError, match="crc32"):
        checkpointer(ck, resume=str(ck / "step-00000004")).find_resume()


@pytest.mark.parametrize("name", [".metadata", MANIFEST, "train_state.json", "rng-rank0.pt"])
def test_missing_file_is_named(two_checkpoints, name):
    ck = two_checkpoints
    os.remove(ck / "step-00000004" / name)
    with pytest.raises(CheckpointError, match=str(ck / "step-00000004" / name)):
        checkpointer(ck, resume=str(ck / "step-00000004")).find_resume()
    assert checkpointer(ck).find_resume() == str(ck / "step-00000002")


def test_auto_ignores_folders_newer_than_latest(two_checkpoints, caplog):
    """A run restarted from step 2 has `latest` on its own saves; an old step-4 is not its past."""
    ck = two_checkpoints
    (ck / "latest").write_text("step-00000002\n")
    with caplog.at_level(logging.WARNING, logger="fqtrain"):
        assert checkpointer(ck).find_resume() == str(ck / "step-00000002")
    assert "ignoring step-00000004" in caplog.text
    os.remove(ck / "latest")  # no marker at all: the newest valid folder
    assert checkpointer(ck).find_resume() == str(ck / "step-00000004")


def test_nothing_valid_means_a_fresh_start(two_checkpoints):
    ck = two_checkpoints
    for step in ("step-00000002", "step-00000004"):
        os.remove(ck / step / ".metadata")
    assert checkpointer(ck).find_resume() is None
    assert checkpointer(ck, resume="never").find_resume() is None


def test_unwritable_checkpoint_dir_is_refused_before_training(saved, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(CheckpointError, match="is not writable"):
        checkpointer(blocker / "ck").check_writable()
    # Through the trainer: it stops before the first step, naming the key.
    res = train(saved["cache"], tmp_path / "run", "--train.steps=2", "--checkpoint.interval=1",
                f"--checkpoint.dir={blocker / 'ck'}", expect_rc=1)
    assert "checkpoint.dir" in res.stderr and "not writable" in res.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_full_checkpoint_dir_is_refused_before_training(tmp_path, monkeypatch):
    import train.checkpoint as ckpt

    total = ckpt.estimate_bytes(checkpointer(tmp_path).model_cfg)
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**12, 10**12, total // 2))
    with pytest.raises(CheckpointError, match="GiB free"):
        checkpointer(tmp_path / "ck").check_writable()
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**12, 10**12, total * 2))
    checkpointer(tmp_path / "ck").check_writable()  # enough for one: a warning, not an error
    # parallel.error_feedback adds each rank's fp32 residuals: 12 + 4 x 8 bytes per parameter on 8 ranks.
    model_cfg = checkpointer(tmp_path).model_cfg
    assert (ckpt.estimate_bytes(model_cfg, 8) - (1 << 20)) * 12 == (total - (1 << 20)) * 44
