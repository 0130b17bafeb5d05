"""Checkpoint format, atomicity under a real SIGKILL, and resume through the store."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from dist_llm_train.core.job import JobSpec, WireJobSpec
from dist_llm_train.core.types import PushHeader, TensorSpec
from dist_llm_train.paramserver import checkpoint as ck
from dist_llm_train.paramserver.job import JobSnapshot, ParameterStore


def snapshot(version: int, n: int = 6) -> JobSnapshot:
    return JobSnapshot(
        spec=JobSpec.from_wire(
            WireJobSpec(
                "job-1",
                mode="async",
                optimizer="adam",
                options={"adam_eps": "1e-7"},
                aggregation_params={"beta": 0.1},
            )
        ),
        layout=[TensorSpec("a", (2, 2), 0), TensorSpec("b", (2,), 4)],
        params=np.arange(n, dtype=np.float32) + version,
        version=version,
        members=["w0", "w1"],
        open_membership=False,
        counters={"pushes_applied": version},
        last_loss=1.25,
        optimizer_arrays={"exp_avg": np.ones(n, np.float32), "exp_avg_sq": np.full(n, 2.0, np.float32)},
        optimizer_scalars={"step": version},
        seen_steps={"w0": [1, 2, 2**62]},
    )


def test_round_trip_preserves_everything(tmp_path: Path) -> None:
    snap = snapshot(3)
    path = ck.write_checkpoint(tmp_path, snap)
    assert path == tmp_path / "job-1.ckpt.npz"
    back = ck.read_checkpoint(path)
    np.testing.assert_array_equal(back.params, snap.params)
    for k in snap.optimizer_arrays:
        np.testing.assert_array_equal(back.optimizer_arrays[k], snap.optimizer_arrays[k])
    assert (back.spec, back.layout, back.version, back.members, back.open_membership) == (
        snap.spec,
        snap.layout,
        snap.version,
        snap.members,
        snap.open_membership,
    )
    assert (back.counters, back.last_loss, back.optimizer_scalars, back.seen_steps) == (
        snap.counters,
        snap.last_loss,
        snap.optimizer_scalars,
        snap.seen_steps,
    )
    assert [p.name for p in tmp_path.iterdir()] == ["job-1.ckpt.npz"]  # no temp file left


def test_file_loads_without_pickle(tmp_path: Path) -> None:
    path = ck.write_checkpoint(tmp_path, snapshot(1))
    with np.load(path, allow_pickle=False) as z:
        assert set(z.files) == {"meta", "params", "opt.exp_avg", "opt.exp_avg_sq"}


def test_failed_rename_keeps_the_old_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ck.write_checkpoint(tmp_path, snapshot(1))

    def boom(src: str, dst: str) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(ck.os, "replace", boom)
    with pytest.raises(OSError, match="disk on fire"):
        ck.write_checkpoint(tmp_path, snapshot(2))
    monkeypatch.undo()
    assert [s.version for s in ck.load_all(tmp_path)] == [1]
    assert [p.name for p in tmp_path.iterdir()] == ["job-1.ckpt.npz"]


KILLER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    import numpy as np
    sys.path.insert(0, {tests!r})
    from test_ps_checkpoint import snapshot
    from dist_llm_train.paramserver import checkpoint as ck

    where = sys.argv[2]
    if where == "during-write":
        real = np.savez
        def partial(f, **arrays):
            f.write(b"PK\\x03\\x04 half a zip")
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        np.savez = partial
    else:  # the temp file is complete and synced, the rename never happens
        real_fsync = os.fsync
        def fsync_then_die(fd):
            real_fsync(fd)
            os.kill(os.getpid(), signal.SIGKILL)
        os.fsync = fsync_then_die
    ck.write_checkpoint(Path(sys.argv[1]), snapshot(2))
""")


@pytest.mark.parametrize("where", ["during-write", "before-rename"])
def test_killed_writer_never_replaces_a_good_checkpoint(tmp_path: Path, where: str) -> None:
    ck.write_checkpoint(tmp_path, snapshot(1))
    script = KILLER.format(tests=str(Path(__file__).parent))
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path), where], capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    leftovers = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) == 1  # the writer really died mid-way
    snaps = ck.load_all(tmp_path)
    assert [s.version for s in snaps] == [1]
    np.testing.assert_array_equal(snaps[0].params, snapshot(1).params)
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())  # cleaned up on resume


def test_unreadable_checkpoint_refuses_to_start(tmp_path: Path) -> None:
    (tmp_path / "job-1.ckpt.npz").write_bytes(b"not a zip at all")
    with pytest.raises(ck.CheckpointError, match="job-1.ckpt.npz"):
        ck.load_all(tmp_path)


def test_missing_directory_means_nothing_to_resume(tmp_path: Path) -> None:
    assert ck.load_all(tmp_path / "absent") == []


def test_checkpointer_coalesces_and_flushes(tmp_path: Path) -> None:
    cp = ck.Checkpointer(tmp_path)
    try:
        for v in range(1, 6):
            cp.submit(snapshot(v))
        cp.flush()
        assert 1 <= cp.written <= 5 and cp.errors == 0
        assert [s.version for s in ck.load_all(tmp_path)] == [5]  # the newest always wins
    finally:
        cp.close()


def test_store_resumes_from_checkpoints(tmp_path: Path) -> None:
    cp = ck.Checkpointer(tmp_path)
    store = ParameterStore(1 << 20, checkpoint_hook=cp.submit, checkpoint_every=2)
    spec = JobSpec.from_wire(
        WireJobSpec("job-r", mode="async", optimizer="sgd", learning_rate=1.0, momentum=0.5, total_steps=10)
    )
    store.init_job(spec, [TensorSpec("w", (3,), 0)], np.zeros(3, np.float32), ["w"])
    for s in range(4):
        payload = np.ones(3, "<f4").tobytes()
        store.push(PushHeader("job-r", "w", s, s, payload_bytes=len(payload)), payload)
    cp.close()
    resumed = ParameterStore(1 << 20)
    for snap in ck.load_all(tmp_path):
        resumed.restore(snap)
    assert resumed.stats("job-r")[0].version == 4
    np.testing.assert_array_equal(resumed.pull("job-r", "w").params, store.pull("job-r", "w").params)
    assert os.listdir(tmp_path) == ["job-r.ckpt.npz"]
