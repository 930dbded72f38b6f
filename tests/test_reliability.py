"""Runs survive kills, faults and bad input with nothing lost and nothing silent (docs/reliability.md).

Every test drives the real entry point (``python run_hydra.py`` or torchrun with gloo) in a
subprocess, kills it for real where that is the point, and compares the losses after the
rerun bit for bit with an uninterrupted run of the same command (CPU, fp32: exact).

References are shared to keep the file fast: one Hydra sweep (``-m``, one process for every
optimizer) writes the uninterrupted single-process runs and their checkpoints; a second sweep
resumes them all from damaged checkpoint folders. Checkpoint cadence never changes the losses
(saving consumes no randomness), so kill tests with other cadences compare against them too.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from muonq.commands import entry_command
from muonq.config import OPTIMIZERS
from muonq.train import guard
from muonq.train.checkpoint import CheckpointManager

from . import faults
from .conftest import REPO, TINY

STEPS = 4
BASE = (*TINY, f"recipe.training_params.max_steps={STEPS}")
CKPT = (*BASE, "logging_params.save_checkpoint=true", "logging_params.save_ckpt_step=2", "logging_params.keep_last=2")
BOUND_S = 120  # one step + a checkpoint + teardown, with room for 2 busy shared cores
# One OpenMP thread per process, as torchrun sets for its workers: on 2 cores shared with other
# work, 2 threads spin-wait on each other and a TINY step takes 10 s instead of 0.1 s.
THREADS = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
# A 2-rank resume per optimizer costs two torchrun launches; by default a sample runs (muonq is
# also killed and resumed under torchrun below); MUONQ_TEST_ALL_2RANK=1 runs them all.
TWO_RANK_OPTIMIZERS = OPTIMIZERS if os.environ.get("MUONQ_TEST_ALL_2RANK") else ("muon8bit",)


# -- running and watching the entry point ----------------------------------------------------------

def command(out_dir: Path, data_dir: Path | None, *overrides: str, nproc: int = 1) -> list[str]:
    return entry_command(nproc, f"hydra.run.dir={out_dir}", *([f"data_dir={data_dir}"] if data_dir else []), *overrides)


class Proc:
    """A process in its own session (so a kill reaches all of it), output to a file."""

    def __init__(self, cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> None:
        self.log_path = cwd / f"console-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "w")
        self.p = subprocess.Popen(cmd, cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT,
                                  env={**os.environ, **THREADS, **(env or {})}, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.p.pid

    def wait(self, timeout: float) -> int:
        try:
            return self.p.wait(timeout)
        finally:
            self._log.flush()

    def text(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def kill_all(self) -> None:
        """Cleanup: SIGKILL the whole session of this process (our own child, by its id)."""
        if self.p.poll() is None:
            try:
                os.killpg(self.p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.p.wait(30)
        self._log.close()


def run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 600) -> tuple[int, str]:
    proc = Proc(cmd, cwd, env)
    try:
        return proc.wait(timeout), proc.text()
    finally:
        proc.kill_all()


def wait_for(condition, proc: Proc, what: str, timeout: float = 300, poll: float = 0.002) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.p.poll() is not None:
            pytest.fail(f"process exited ({proc.p.returncode}) before {what}:\n{proc.text()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}:\n{proc.text()[-3000:]}")
        time.sleep(poll)


def rows(out_dir: Path) -> list[dict]:
    path = out_dir / "metrics.jsonl"
    if not path.exists():
        return []
    found = []
    for line in path.read_text().splitlines():
        try:
            found.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill
            pass
    return found


def losses(out_dir: Path) -> dict[int, float]:
    """step -> train loss; rows written again after a resume replace the earlier ones."""
    return {r["step"]: r["train/loss"] for r in rows(out_dir) if "train/loss" in r}


def final_val(out_dir: Path) -> float | None:
    return next((r["val/final_loss"] for r in reversed(rows(out_dir)) if "val/final_loss" in r), None)


def summary(out_dir: Path) -> dict:
    return json.loads((out_dir / "summary.json").read_text())


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def worker_ranks(agent_pid: int) -> dict[int, int]:
    """rank -> pid of torchrun's worker processes."""
    ranks = {}
    for pid in children(agent_pid):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        rank = [e for e in env if e.startswith(b"RANK=")]
        if rank:
            ranks[int(rank[0][5:])] = pid
    return ranks


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def assert_matches(reference: dict[int, float], got: dict[int, float], steps) -> None:
    missing = [s for s in steps if s not in got]
    assert not missing, f"steps {missing} not logged: {got}"
    differ = {s: (reference[s], got[s]) for s in steps if reference[s] != got[s]}
    assert not differ, f"losses differ from the uninterrupted run (bit-exact expected): {differ}"


# -- references -----------------------------------------------------------------------------------

DAMAGES = ("deleted", "partial", "flipped", "truncated", "no-manifest")


def damage(folder: Path, kind: str) -> None:
    """What a kill or a bad disk can leave of the newest checkpoint ``folder``."""
    if kind == "deleted":  # killed before the commit: the .partial was cleaned up, nothing else
        shutil.rmtree(folder)
    elif kind == "partial":  # killed between writing the files and the final rename
        folder.rename(folder.with_name(folder.name + ".partial"))
    elif kind == "flipped":
        path = folder / "main.pt"
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x55
        path.write_bytes(bytes(data))
    elif kind == "truncated":  # the optimizer-state file, if it has its own, else main.pt
        files = sorted(p for p in folder.glob("*.pt") if p.name != "main.pt") or [folder / "main.pt"]
        files[0].write_bytes(files[0].read_bytes()[: files[0].stat().st_size // 3])
    elif kind == "no-manifest":
        (folder / "manifest.json").unlink()
    else:
        raise ValueError(kind)


@dataclass
class Matrix:
    root: Path
    full_output: str
    resumed_output: str
    jobs: dict[str, dict[str, Path]]  # phase -> optimizer -> job folder
    damaged: dict[str, str]

    def job(self, phase: str, optimizer: str) -> Path:
        found = self.jobs[phase].get(optimizer)
        if found is None:
            output = self.full_output if phase == "full" else self.resumed_output
            pytest.fail(f"no {phase} job for {optimizer}:\n{output[-4000:]}")
        return found


def sweep_jobs(sweep_dir: Path) -> dict[str, Path]:
    jobs = {}
    for job in sweep_dir.iterdir() if sweep_dir.is_dir() else []:
        if (job / ".hydra" / "config.yaml").exists():
            jobs[OmegaConf.load(job / ".hydra" / "config.yaml").optimizer_params.name] = job
    return jobs


@pytest.fixture(scope="module")
def matrix(tmp_path_factory, shakespeare_data) -> Matrix:
    """Every optimizer: uninterrupted (one sweep), then resumed from damaged checkpoints."""
    root = tmp_path_factory.mktemp("matrix")
    names = ",".join(OPTIMIZERS)
    sweep = [sys.executable, str(REPO / "run_hydra.py"), "-m", f"data_dir={shakespeare_data}", *CKPT,
             f"optimizer_params={names}"]
    _, full_output = run([*sweep, f"hydra.sweep.dir={root / 'full'}"], root, timeout=1200)
    damaged = {}
    for i, opt in enumerate(OPTIMIZERS):
        damaged[opt] = DAMAGES[i % len(DAMAGES)]
        newest = root / "checkpoints" / f"llama-tiny_{opt}" / f"step_{STEPS:06d}"
        if newest.is_dir():
            damage(newest, damaged[opt])
    _, resumed_output = run([*sweep, f"hydra.sweep.dir={root / 'resumed'}", "resume=true"], root, timeout=1200)
    jobs = {phase: sweep_jobs(root / phase) for phase in ("full", "resumed")}
    return Matrix(root, full_output, resumed_output, jobs, damaged)


def reference(matrix: Matrix, optimizer: str = "muonq") -> dict[int, float]:
    got = losses(matrix.job("full", optimizer))
    assert sorted(got) == list(range(1, STEPS + 1)), got
    return got


_two_rank_runs: dict[str, Path] = {}


@pytest.fixture(scope="module")
def two_rank_full(tmp_path_factory, shakespeare_data):
    """optimizer -> folder of an uninterrupted 2-rank run (checkpoints in its ``ckpt/``), made once."""
    def make(optimizer: str) -> Path:
        if optimizer not in _two_rank_runs:
            root = tmp_path_factory.mktemp(f"two-{optimizer}")
            code, output = run(command(root / "out", shakespeare_data, *CKPT, f"optimizer_params={optimizer}",
                                       f"logging_params.checkpoint_dir={root / 'ckpt'}", nproc=2), root)
            assert code == 0, output[-4000:]
            _two_rank_runs[optimizer] = root
        return _two_rank_runs[optimizer]
    return make


# -- exact resume, every optimizer ------------------------------------------------------------------

@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_resume_from_damaged_checkpoints_is_bit_identical(matrix: Matrix, optimizer: str) -> None:
    """The newest checkpoint is deleted, left .partial, bit-flipped, truncated or without manifest:
    resume=true takes the previous one (warning when it was corrupt) and continues exactly."""
    ref = reference(matrix, optimizer)
    resumed = matrix.job("resumed", optimizer)
    got = losses(resumed)
    assert sorted(got) == [3, 4], got
    assert_matches(ref, got, [3, 4])
    assert final_val(resumed) == final_val(matrix.job("full", optimizer))
    assert summary(resumed)["resumed_from"] == 2
    log = (resumed / "run_hydra.log").read_text()
    kind = matrix.damaged[optimizer]
    if kind in ("flipped", "truncated", "no-manifest"):
        assert re.search(r"checkpoint .*step_000004 is corrupt \((checksum mismatch|no manifest\.json)", log), log
    # the rerun rewrote step 4 whole; nothing partial is left, the last K=2 are kept
    mgr = CheckpointManager(matrix.root / "checkpoints" / f"llama-tiny_{optimizer}", keep_last=2)
    assert mgr.steps() == [2, 4] and mgr.verify(4) is None
    assert not list(mgr.directory.glob("*.partial"))


@pytest.mark.parametrize("optimizer", TWO_RANK_OPTIMIZERS)
def test_two_rank_resume_is_bit_identical(tmp_path: Path, shakespeare_data: Path, two_rank_full, optimizer: str) -> None:
    full = two_rank_full(optimizer)
    ckpt = tmp_path / "ckpt"
    shutil.copytree(full / "ckpt", ckpt)
    damage(ckpt / f"step_{STEPS:06d}", "flipped")
    code, output = run(command(tmp_path / "out", shakespeare_data, *CKPT, f"optimizer_params={optimizer}",
                               f"logging_params.checkpoint_dir={ckpt}", "resume=true", nproc=2), tmp_path)
    assert code == 0, output[-4000:]
    assert_matches(losses(full / "out"), losses(tmp_path / "out"), [3, 4])
    assert final_val(tmp_path / "out") == final_val(full / "out")
    assert "is corrupt" in output


# -- real kills ------------------------------------------------------------------------------------

def test_sigkill_mid_step_then_same_command_continues_exactly(tmp_path: Path, shakespeare_data: Path, matrix) -> None:
    ref = reference(matrix)
    rng = random.Random(20260808)
    kill_after, delay = rng.randint(1, STEPS - 1), rng.uniform(0.0, 0.2)
    cmd = command(tmp_path / "out", shakespeare_data, *CKPT, "optimizer_params=muonq",
                  "logging_params.save_ckpt_step=1", "resume=auto")  # every step: keep_last=2 prunes
    proc = Proc(cmd, tmp_path)
    try:
        wait_for(lambda: kill_after in losses(tmp_path / "out"), proc, f"step {kill_after}")
        time.sleep(delay)
        proc.p.send_signal(signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
    finally:
        proc.kill_all()
    mgr = CheckpointManager(tmp_path / "checkpoints" / "llama-tiny_muonq")
    left = mgr.steps()
    assert len(left) <= 3, left  # keep_last=2, +1 if killed between a commit and its pruning
    code, output = run(cmd, tmp_path)  # the very same command
    assert code == 0, output[-4000:]
    assert re.search(rf"checkpoint folder \S+llama-tiny_muonq: taking over the lock of a run that ended without "
                     rf"releasing it \(pid {proc.pid} on ", output), output[-3000:]
    assert_matches(ref, losses(tmp_path / "out"), range(1, STEPS + 1))
    assert summary(tmp_path / "out")["resumed_from"] == (left[-1] if left else None)
    assert mgr.steps() == [STEPS - 1, STEPS]


def test_sigkill_during_checkpoint_write_then_rerun_continues_exactly(tmp_path: Path, shakespeare_data: Path, matrix) -> None:
    ref = reference(matrix)
    ckpt = tmp_path / "ckpt"
    cmd = command(tmp_path / "out", shakespeare_data, *CKPT, "optimizer_params=muonq", "logging_params.save_ckpt_step=1",
                  f"logging_params.checkpoint_dir={ckpt}", "resume=auto")
    proc = Proc(cmd, tmp_path)
    caught = None
    try:
        target = random.Random(7).randint(2, STEPS - 1)
        for step in range(target, STEPS + 1):
            partial = ckpt / f"step_{step:06d}.partial"
            wait_for(partial.exists, proc, f"{partial.name}", poll=0.0005)
            os.kill(proc.pid, signal.SIGSTOP)  # freeze, then check the write is really unfinished
            if partial.exists() and not (ckpt / f"step_{step:06d}").exists():
                caught = step
                os.kill(proc.pid, signal.SIGKILL)
                break
            os.kill(proc.pid, signal.SIGCONT)
        assert caught is not None, "never caught a checkpoint mid-write"
        proc.wait(30)
    finally:
        proc.kill_all()
    assert (ckpt / f"step_{caught:06d}.partial").exists()
    assert CheckpointManager(ckpt).steps()[-1] == caught - 1
    code, output = run(cmd, tmp_path)
    assert code == 0, output[-4000:]
    assert summary(tmp_path / "out")["resumed_from"] == caught - 1
    assert_matches(ref, losses(tmp_path / "out"), range(1, STEPS + 1))
    assert not list(ckpt.glob("*.partial"))


def test_sigkill_one_rank_ends_the_job_and_the_rerun_continues_exactly(tmp_path: Path, shakespeare_data: Path,
                                                                        two_rank_full) -> None:
    """A rank that dies (SIGKILL) ends every rank within a bound (torchrun stops its peers; the
    survivor's next collective fails at once); the same command then resumes bit-identically."""
    ref = losses(two_rank_full("muonq") / "out")
    ckpt = tmp_path / "ckpt"
    cmd = command(tmp_path / "out", shakespeare_data, *CKPT, "optimizer_params=muonq", "logging_params.save_ckpt_step=1",
                  f"logging_params.checkpoint_dir={ckpt}", "resume=auto", nproc=2)
    kill_after = random.Random(3).randint(1, STEPS - 1)
    proc = Proc(cmd, tmp_path)
    try:
        wait_for(lambda: kill_after in losses(tmp_path / "out"), proc, f"step {kill_after}")
        workers = worker_ranks(proc.pid)
        assert set(workers) == {0, 1}, workers
        os.kill(workers[1], signal.SIGKILL)
        t0 = time.monotonic()
        code = proc.wait(BOUND_S)
        elapsed = time.monotonic() - t0
        assert code != 0
        assert not alive(workers[0]), "rank 0 outlived the job"
    finally:
        proc.kill_all()
    print(f"\n[reliability] torchrun ended {elapsed:.1f} s after rank 1 was SIGKILLed")
    assert elapsed < 60, f"the job took {elapsed:.0f} s to end after a rank died"
    code, output = run(cmd, tmp_path)
    assert code == 0, output[-4000:]
    assert_matches(ref, losses(tmp_path / "out"), range(1, STEPS + 1))


@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_rank_that_raises_ends_the_job_on_every_rank(tmp_path: Path, shakespeare_data: Path, parallelism: str) -> None:
    """Under FSDP the peer waits in the owners' all_to_all or a reduce-scatter instead of DDP's
    all-reduce: the job still ends within the bound."""
    cmd = command(tmp_path / "out", shakespeare_data, *BASE, "optimizer_params=muon", f"parallelism={parallelism}", nproc=2)
    t0 = time.monotonic()
    code, output = run(cmd, tmp_path, env={**faults.raise_at(2, 1), "MUONQ_DIST_TIMEOUT_S": "60"}, timeout=BOUND_S + 60)
    elapsed = time.monotonic() - t0
    print(f"\n[reliability] rank 1 raised ({parallelism}): torchrun exit {code} after {elapsed:.1f} s in all")
    assert code != 0
    assert "injected fault on rank 1 at step 2" in output
    assert elapsed < BOUND_S


def test_one_run_per_checkpoint_folder_and_workers_end_with_their_launcher(tmp_path: Path,
                                                                          shakespeare_data: Path) -> None:
    """A 2-rank run holds its checkpoint folder (rank 0 alone takes the lock): a second run with
    the same checkpoint_dir exits 2 at startup naming the holder. SIGKILL of torchrun alone ends
    both workers within a bound and no checkpoint is written after; the second run's command then
    runs, taking over the dead run's lock if it was left behind, and leaves the folder unlocked."""
    ckpt = tmp_path / "ckpt"
    first = Proc(command(tmp_path / "first", shakespeare_data, *TINY, "recipe.training_params.max_steps=1000",
                         "optimizer_params=adamw", "logging_params.save_checkpoint=true", "logging_params.save_ckpt_step=1",
                         f"logging_params.checkpoint_dir={ckpt}", nproc=2), tmp_path)
    second = command(tmp_path / "second", shakespeare_data, *BASE, "optimizer_params=adamw",
                     f"logging_params.checkpoint_dir={ckpt}")
    workers: dict[int, int] = {}
    try:
        wait_for(lambda: 1 in losses(tmp_path / "first"), first, "step 1")
        workers = worker_ranks(first.pid)
        assert set(workers) == {0, 1}, workers
        assert json.loads((ckpt / "run.lock").read_text())["pid"] == workers[0]
        code, output = run(second, tmp_path, timeout=300)
        assert code == guard.EXIT_BAD_INPUT, output[-3000:]
        assert re.search(rf"error: checkpoint folder {re.escape(str(ckpt))} is in use by another run \(pid "
                         rf"{workers[0]} on {re.escape(os.uname().nodename)}, started \S+, output \S+first\)", output), \
            output[-3000:]
        assert "Traceback" not in output and first.p.poll() is None
        os.kill(first.pid, signal.SIGKILL)  # the launcher only: its workers run in sessions of their own
        t0 = time.monotonic()
        while any(alive(pid) for pid in workers.values()) and time.monotonic() - t0 < 30:
            time.sleep(0.05)
        elapsed = time.monotonic() - t0
        assert not any(alive(pid) for pid in workers.values()), f"workers outlived their launcher: {first.text()[-2000:]}"
        written = sorted(p.name for p in ckpt.iterdir())
        time.sleep(2)
        assert sorted(p.name for p in ckpt.iterdir()) == written  # nothing written after
        # the lock is left behind when rank 0 was SIGKILLed first, and released when rank 0 saw
        # rank 1 die first (its next collective failed) and ended with that error
        stale = "run.lock" in written
    finally:
        first.kill_all()
        for pid in workers.values():  # our own grandchildren, by their ids
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
    print(f"\n[reliability] both workers ended {elapsed:.1f} s after torchrun was SIGKILLed")
    assert elapsed < 10
    code, output = run(second, tmp_path, timeout=300)
    assert code == 0, output[-3000:]
    assert bool(re.search(rf"checkpoint folder \S+ckpt: taking over the lock of a run that ended without releasing "
                          rf"it \(pid {workers[0]} on ", output)) == stale, output[-3000:]
    assert not (ckpt / "run.lock").exists()


# -- preemption ------------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT twice", "SIGTERM, nonfinite=abort"])
def test_preemption_saves_a_checkpoint_and_exits_75(tmp_path: Path, shakespeare_data: Path, matrix, how: str) -> None:
    """No periodic checkpoints configured: the signal alone makes one, at the next step boundary.
    A second Ctrl-C right after the first (a terminal reaches torchrun and its workers) is the same event.
    With nonfinite=abort (verdicts read a step late) the stop and the losses are the same."""
    ref = reference(matrix)
    ckpt = tmp_path / "ckpt"
    late = ("recipe.training_params.nonfinite=abort",) if "abort" in how else ()
    cmd = command(tmp_path / "out", shakespeare_data, *BASE, "optimizer_params=muonq", f"logging_params.checkpoint_dir={ckpt}",
                  *late)
    proc = Proc(cmd, tmp_path)
    try:
        wait_for(lambda: 1 in losses(tmp_path / "out"), proc, "step 1")
        t0 = time.monotonic()
        if how.startswith("SIGTERM"):
            proc.p.send_signal(signal.SIGTERM)
        else:
            proc.p.send_signal(signal.SIGINT)
            time.sleep(0.05)
            proc.p.send_signal(signal.SIGINT)
        code = proc.wait(BOUND_S)
        elapsed = time.monotonic() - t0
    finally:
        proc.kill_all()
    output = proc.text()
    print(f"\n[reliability] {how}: exit {code} {elapsed:.1f} s after the signal")
    assert code == guard.EXIT_PREEMPTED, output[-3000:]
    assert elapsed < BOUND_S
    match = re.search(r"(SIGTERM|SIGINT): stopped after step (\d+)/4 with a checkpoint in .*resume=true", output)
    assert match, output[-3000:]
    assert "Traceback" not in output
    stopped = int(match.group(2))
    mgr = CheckpointManager(ckpt)
    assert mgr.steps() == [stopped] and mgr.verify(stopped) is None
    assert not (ckpt / "run.lock").exists()  # released on the way out
    if how == "SIGINT twice":
        return
    code, output = run([*cmd, "resume=true"], tmp_path)
    assert code == 0, output[-4000:]
    assert summary(tmp_path / "out")["resumed_from"] == stopped
    assert_matches(ref, losses(tmp_path / "out"), range(1, STEPS + 1))


def test_sigterm_to_torchrun_stops_all_ranks_at_one_step_with_a_checkpoint(tmp_path: Path, shakespeare_data: Path,
                                                                          two_rank_full) -> None:
    ref = losses(two_rank_full("muonq") / "out")
    ckpt = tmp_path / "ckpt"
    cmd = command(tmp_path / "out", shakespeare_data, *BASE, "optimizer_params=muonq",
                  f"logging_params.checkpoint_dir={ckpt}", nproc=2)
    proc = Proc(cmd, tmp_path)
    try:
        wait_for(lambda: 1 in losses(tmp_path / "out"), proc, "step 1")
        proc.p.send_signal(signal.SIGTERM)  # as a scheduler does; torchrun forwards it to the workers
        t0 = time.monotonic()
        code = proc.wait(BOUND_S)
        elapsed = time.monotonic() - t0
    finally:
        proc.kill_all()
    output = proc.text()
    print(f"\n[reliability] torchrun SIGTERM: exit {code} {elapsed:.1f} s after the signal")
    assert code != 0 and elapsed < BOUND_S
    match = re.search(r"SIGTERM: stopped after step (\d+)/4", output)
    assert match, output[-4000:]
    stopped = int(match.group(1))
    mgr = CheckpointManager(ckpt)
    assert mgr.steps() == [stopped] and mgr.verify(stopped) is None
    code, output = run([*cmd, "resume=true"], tmp_path)
    assert code == 0, output[-4000:]
    assert_matches(ref, losses(tmp_path / "out"), range(stopped + 1, STEPS + 1))


# -- non-finite steps -------------------------------------------------------------------------------

def assert_torchrun_nonfinite_exit(output: str) -> None:
    """torchrun reports every rank's exit: the first with the non-finite code; the other rank exits
    the same way, unless torchrun's monitor saw the first exit and sent it SIGTERM a moment before."""
    others, _, root = output.rpartition("Root Cause (first observed failure)")
    assert re.search(rf"exitcode\s*: {guard.EXIT_NONFINITE} ", root), output[-3000:]
    codes = [int(c) for c in re.findall(r"exitcode\s*: (-?\d+) ", others)]
    assert len(codes) <= 1 and set(codes) <= {guard.EXIT_NONFINITE, -signal.SIGTERM}, output[-3000:]


def test_nonfinite_skip_counts_the_step_and_goes_on(tmp_path: Path, shakespeare_data: Path, matrix) -> None:
    """Also: with output to a file (no terminal), progress shows as plain lines (every step here)."""
    ref = reference(matrix)
    code, output = run(command(tmp_path / "out", shakespeare_data, *BASE, "optimizer_params=muonq",
                               "recipe.training_params.nonfinite=skip", "logging_params.progress_every_s=0"),
                       tmp_path, env=faults.nan_at(2))
    assert code == 0, output[-3000:]
    assert re.search(r"^progress llama-tiny_muonq: step 4/4 \(100\.0%\), [\d.]+ steps/s, 0:00:00 left$", output, re.M), \
        output[-3000:]
    assert "\r" not in output
    assert re.search(r"step 2: non-finite loss/gradient \(first in \S*layers\.0\.\S+, Muon group\); step skipped \(1 so far\)", output)
    got = losses(tmp_path / "out")
    assert got[1] == ref[1] and 2 not in got and sorted(got) == [1, 3, 4]
    assert summary(tmp_path / "out")["skipped_steps"] == 1
    assert any(r.get("train/skipped_steps") == 1 for r in rows(tmp_path / "out"))


@pytest.mark.parametrize("case", ["in-a-row", "every-step"])
def test_nonfinite_skip_stops_when_nothing_trains(tmp_path: Path, shakespeare_data: Path, case: str) -> None:
    """nonfinite=skip does not skip forever: 2 non-finite steps in a row with
    max_consecutive_skips=2 stop the run; a run whose every step was skipped fails at its end."""
    limit, nan_steps, steps = (["recipe.training_params.max_consecutive_skips=2"], (2, 3), 4) if case == "in-a-row" \
        else ([], (1, 2), 2)
    code, output = run(command(tmp_path / "out", shakespeare_data, *TINY, f"recipe.training_params.max_steps={steps}",
                               "optimizer_params=muon", "recipe.training_params.nonfinite=skip", *limit),
                       tmp_path, env=faults.nan_at(*nan_steps))
    assert code == guard.EXIT_NONFINITE, output[-3000:]
    expected = (r"error: step 3: 2 non-finite steps in a row skipped \(steps 2-3, the last in \S+, Muon group\), "
                r"recipe\.training_params\.max_consecutive_skips=2: the weights of step 1 fail on every batch; "
                r"nothing was saved; to retry with a lower learning rate, start over" if case == "in-a-row" else
                r"error: every step of this run \(1-2\) was non-finite and skipped: nothing was trained; nothing was "
                r"saved; these are the initial weights, which no learning rate changes")
    assert re.search(expected, output), output[-3000:]
    assert "Traceback" not in output and not (tmp_path / "out" / "summary.json").exists()


def test_weights_that_overflow_are_never_saved_and_the_advice_trains_on(tmp_path: Path, shakespeare_data: Path) -> None:
    """Step 3's loss and gradients are finite but its update leaves infinite weights (injected);
    step 4's loss is NaN. The checkpoint of step 3 would make every resume fail again, so it is
    not written; the message's advice (resume=true, lower lr) is followed and trains to the end.
    Each run has its own log file."""
    ckpt = tmp_path / "ckpt"
    cmd = command(tmp_path / "out", shakespeare_data, *CKPT, "optimizer_params=adamw", f"logging_params.checkpoint_dir={ckpt}")
    code, output = run(cmd, tmp_path, env=faults.inf_weights_at(3))
    assert code == guard.EXIT_NONFINITE, output[-3000:]
    assert re.search(r"error: step 3: the weights are not finite \(first in \S*layers\.0\.\S+\) .*this state is not "
                     r"saved; the newest checkpoint is step 2 in \S+step_000002: rerun with resume=true and a lower "
                     r"learning rate", output), output[-3000:]
    assert CheckpointManager(ckpt).steps() == [2]
    code, output2 = run([*cmd, "hydra.run.dir=" + str(tmp_path / "out2"), "resume=true", "optimizer_params.args.lr=0.0005"],
                        tmp_path)
    assert code == 0, output2[-3000:]
    assert summary(tmp_path / "out2")["resumed_from"] == 2 and sorted(losses(tmp_path / "out2")) == [3, 4]
    assert CheckpointManager(ckpt).steps() == [2, 4]
    logs = sorted((tmp_path / "logs").glob("llama-tiny_adamw_*.log"))
    assert len(logs) == 2, logs
    for log_file, console in zip(logs, (output, output2)):  # named by start time: in order
        assert f"log file {log_file.relative_to(tmp_path)}" in console
    first, second = (f.read_text() for f in logs)  # each holds its own run only
    assert "step 1/4" in first and "step 4/4" not in first
    assert "step 4/4" in second and "step 1/4" not in second


def test_nonfinite_stop_on_one_rank_stops_both_with_a_checkpoint(tmp_path: Path, shakespeare_data: Path) -> None:
    """The NaN is on rank 0 only; both ranks agree to stop at the same step, rank 0 names the step,
    the parameter and its group, and the checkpoint of the last good step is complete."""
    ckpt = tmp_path / "ckpt"
    code, output = run(command(tmp_path / "out", shakespeare_data, *BASE, "optimizer_params=adamw",
                               f"logging_params.checkpoint_dir={ckpt}", nproc=2), tmp_path, env=faults.nan_at(3),
                       timeout=BOUND_S + 120)
    assert code != 0
    assert re.search(r"error: step 3: non-finite loss or gradient \(first in rank 0: \S*layers\.0\.\S+, AdamW group\); "
                     r"checkpoint of step 2 saved in \S+; to skip step 3 and go on, rerun with resume=true "
                     r"recipe\.training_params\.nonfinite=skip; a lower learning rate does not change step 3's gradient, "
                     r"which comes from the weights of step 2: to retry with a lower learning rate, start over",
                     output), output[-3000:]
    assert_torchrun_nonfinite_exit(output)
    mgr = CheckpointManager(ckpt)
    assert mgr.steps() == [2] and mgr.verify(2) is None
    assert not (ckpt / "run.lock").exists()


def test_nonfinite_abort_on_one_rank_stops_both_without_saving_the_damage(tmp_path: Path, shakespeare_data: Path) -> None:
    """nonfinite=abort reads each step's verdict a step later (no host sync in the step). The NaN
    (rank 0 only, step 3) is applied, found when step 4 reads step 3's verdict, and both ranks stop
    with exit 3; the checkpoint of step 2 is the newest, and nothing after it is written."""
    ckpt = tmp_path / "ckpt"
    code, output = run(command(tmp_path / "out", shakespeare_data, *CKPT, "optimizer_params=muonq",
                               "recipe.training_params.nonfinite=abort", "logging_params.log_step=100",
                               f"logging_params.checkpoint_dir={ckpt}", nproc=2), tmp_path,
                       env=faults.nan_at(3), timeout=BOUND_S + 120)
    assert code != 0
    assert re.search(r"error: step 3: non-finite loss or gradient \(rank 0: loss [\d.]+, gradient norm nan\); with "
                     r"recipe\.training_params\.nonfinite=abort .* the newest checkpoint is step 2 in \S+step_000002: "
                     r"to skip step 3, rerun with resume=true recipe\.training_params\.nonfinite=skip; to retry with "
                     r"a lower learning rate, start over", output), output[-3000:]
    assert_torchrun_nonfinite_exit(output)
    mgr = CheckpointManager(ckpt)
    assert mgr.steps() == [2] and mgr.verify(2) is None


# -- W&B resume, secrets --------------------------------------------------------------------------

def test_wandb_resume_reuses_the_run_id_and_secrets_never_leak(tmp_path: Path, shakespeare_data: Path) -> None:
    secrets = {"env_wandb": "f" * 36 + "aa11", "dotenv_hf": "hf_FakeTokenForTestsOnly1234567890",
               "dotenv_wandb": "e" * 36 + "bb22"}
    # .env is found from the working directory; DATA_DIR there proves it was read
    (tmp_path / ".env").write_text(f"DATA_DIR={shakespeare_data}\nHF_TOKEN={secrets['dotenv_hf']}\n"
                                   f"WANDB_API_KEY={secrets['dotenv_wandb']}\n")
    env = {"WANDB_MODE": "offline", "WANDB_API_KEY": secrets["env_wandb"], "DATA_DIR": ""}
    env_clean = {k: v for k, v in os.environ.items() if k not in ("DATA_DIR", "HF_TOKEN")}
    ckpt = tmp_path / "ckpt"
    cmd = command(tmp_path / "out", None, *CKPT, "optimizer_params=muon", f"logging_params.checkpoint_dir={ckpt}",
                  "+logging_params.wandb.project=reliability")

    def go(*extra: str) -> tuple[int, str]:
        proc = subprocess.run([*cmd, *extra], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                              env={**env_clean, **THREADS, **{k: v for k, v in env.items() if v}})
        return proc.returncode, proc.stdout + proc.stderr

    code, output = go()
    assert code == 0, output[-4000:]
    first_id = summary(tmp_path / "out")["wandb_id"]
    assert first_id
    shutil.rmtree(ckpt / f"step_{STEPS:06d}")
    code, output2 = go("resume=true", "hydra.run.dir=" + str(tmp_path / "out2"))
    assert code == 0, output2[-4000:]
    assert summary(tmp_path / "out2")["wandb_id"] == first_id
    runs = sorted((tmp_path / "wandb").glob(f"offline-run-*-{first_id}"))
    assert len(runs) == 2, list((tmp_path / "wandb").iterdir())
    steps = [r["step"] for r in rows(tmp_path / "out2") if "train/loss" in r]
    assert steps == [3, 4]  # continues after the checkpoint's step, increasing
    leaks = []
    for path in tmp_path.rglob("*"):
        if path.is_file() and path.name != ".env" and not path.name.startswith("console-"):
            data = path.read_bytes()
            leaks += [f"{path.relative_to(tmp_path)}: {name}" for name, s in secrets.items() if s.encode() in data]
    assert not leaks, leaks
    assert not any(s in output + output2 for s in secrets.values())


# -- bad input: one clear line, non-zero exit, nothing written ----------------------------------------

BAD_INPUT = [
    # (id, overrides, env, exit code, message regex)
    ("unknown-recipe", ["recipe=llama-13b"], {}, 1, r"Could not find 'recipe/llama-13b'[\s\S]*llama-60m"),
    ("unknown-optimizer", ["optimizer_params=sgd"], {}, 1, r"Could not find 'optimizer_params/sgd'[\s\S]*muonq"),
    ("wrong-type", ["recipe.training_params.batch_size=abc"], {}, 1,
     r"Value 'abc' of type 'str' could not be converted to Integer[\s\S]*recipe.training_params.batch_size"),
    ("unknown-key", ["optimizer_params.args.qbits=4"], {}, 1, r"Could not override 'optimizer_params.args.qbits'"),
    ("out-of-range", ["optimizer_params.args.lr=-1"], {}, 2, r"config error: optimizer_params\.args\.lr: must be in \(0, 10\], got -1"),
    ("batch-not-dividing", ["recipe.training_params.tokens_processed=1000"], {}, 2,
     r"config error: recipe\.training_params\.tokens_processed: 1000 is not divisible by world_size x batch_size x "
     r"context_length = 1 x 4 x 64 = 256"),
    ("vocab-mismatch", ["recipe.model.vocab_size=1000"], {}, 2,
     r"error: .*the data's vocab \(8192 ids, tokenizer bpe-8192\) is larger than the model's vocab_size 1000"),
    ("no-gpu", ["device=cuda"], {}, 2, r"error: device=cuda was requested but no CUDA device is available"),
    ("wandb-online-without-key", [], {"WANDB_MODE": "online", "WANDB_API_KEY": "", "HOME": "/nonexistent"}, 2,
     r"error: WANDB_MODE=online needs WANDB_API_KEY"),
    # the validation split (1222 windows of 65 tokens) cannot fill one batch: found before step 1,
    # not at the first validation
    ("val-smaller-than-a-batch", ["recipe.training_params.batch_size=2048", "recipe.training_params.tokens_processed=131072"],
     {}, 2, r"error: the val split of \S+ has 1222 windows of seq_len \+ 1 = 65 tokens, fewer than one validation batch, "
            r"recipe\.training_params\.batch_size x ranks = 2048 x 1 \(2048\); lower batch_size"),
    ("train-smaller-than-a-step", ["recipe.training_params.tokens_processed=2097152"], {}, 2,
     r"error: the train split of \S+ has 22021 windows .* fewer than one optimizer step, "
     r"recipe\.training_params\.tokens_processed / context_length = 2097152 / 64 \(32768\)"),
]


@pytest.mark.parametrize("overrides, env, exit_code, message", [c[1:] for c in BAD_INPUT], ids=[c[0] for c in BAD_INPUT])
def test_bad_input_fails_in_one_line_and_writes_nothing(tmp_path: Path, shakespeare_data: Path, overrides, env,
                                                         exit_code: int, message: str) -> None:
    code, output = run(command(tmp_path / "out", shakespeare_data, *BASE, *overrides), tmp_path,
                       env={k: v for k, v in env.items()}, timeout=300)
    assert code == exit_code, output[-3000:]
    assert re.search(message, output), output[-3000:]
    assert "Traceback" not in output
    assert not (tmp_path / "out").exists()  # checked before Hydra makes its folder
    assert not (tmp_path / "logs").exists() and not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("where", ["checkpoint_dir", "run_dir", "logs"])
def test_unwritable_output_folders_fail_before_anything_is_written(tmp_path: Path, shakespeare_data: Path,
                                                                  where: str) -> None:
    """A file where the run would make a folder (running as root, permissions cannot be taken
    away): found by preflight, not by the first checkpoint or by Hydra's mkdir."""
    blocker = tmp_path / ("logs" if where == "logs" else "afile")
    blocker.write_text("")
    out = tmp_path / "afile" / "out" if where == "run_dir" else tmp_path / "out"
    extra = [f"logging_params.checkpoint_dir={blocker / 'ckpt'}"] if where == "checkpoint_dir" else []
    code, output = run(command(out, shakespeare_data, *CKPT, *extra), tmp_path, timeout=300)
    assert code == 2, output[-3000:]
    key = {"checkpoint_dir": r"logging_params\.checkpoint_dir: \S+/afile/ckpt is under \S+/afile, which is a file",
           "run_dir": r"hydra\.run\.dir: \S+/afile/out is under \S+/afile, which is a file",
           "logs": r"the log folder: \S+/logs is a file"}[where]
    assert re.search(rf"error: {key}; it must be a folder", output), output[-3000:]
    assert "Traceback" not in output
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("console-")) == [blocker.name]


def test_a_folder_the_run_may_not_write_fails_before_anything_is_written(tmp_path: Path, shakespeare_data: Path) -> None:
    """A checkpoint_dir under a folder this process may not write: the tests run as root, whom
    permission bits do not stop, so the folder is made immutable (chattr +i), which stops root too."""
    locked = tmp_path / "readonly"
    locked.mkdir()
    if subprocess.run(["chattr", "+i", str(locked)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here (needs ext2/3/4 or XFS and CAP_LINUX_IMMUTABLE)")
    try:
        code, output = run(command(tmp_path / "out", shakespeare_data, *CKPT,
                                   f"logging_params.checkpoint_dir={locked / 'ckpt'}"), tmp_path, timeout=300)
    finally:
        subprocess.run(["chattr", "-i", str(locked)], check=True)
    assert code == 2, output[-3000:]
    assert re.search(rf"error: logging_params\.checkpoint_dir: cannot write to {re.escape(str(locked))}/ckpt "
                     rf"\({re.escape(str(locked))} exists and is not writable\)$", output, re.M), output[-3000:]
    assert "Traceback" not in output and not (tmp_path / "out").exists() and not any(locked.iterdir())


def test_config_error_under_torchrun_is_printed_once(tmp_path: Path, shakespeare_data: Path) -> None:
    code, output = run(command(tmp_path / "out", shakespeare_data, *BASE, "optimizer_params.args.lr=-1", nproc=2),
                       tmp_path, timeout=300)
    assert code != 0
    assert output.count("config error: optimizer_params.args.lr: must be in (0, 10]") == 1, output[-3000:]
    assert str(REPO / "src") not in output  # torchrun prints its own ChildFailedError traceback, none of ours
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("max_steps", [3, 4])
def test_resume_at_or_past_the_last_step_says_so(tmp_path: Path, shakespeare_data: Path, matrix, max_steps: int) -> None:
    """The newest checkpoint is step 4: a run of 3 steps would train nothing and report a final
    loss of a 4-step run (refused); a run of 4 is complete, and a repeat of its command says so."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(matrix.root / "checkpoints" / "llama-tiny_muonq", ckpt)
    overrides = [o for o in CKPT if "max_steps" not in o]
    code, output = run(command(tmp_path / "out", shakespeare_data, *overrides, f"recipe.training_params.max_steps={max_steps}",
                               "optimizer_params=muonq", f"logging_params.checkpoint_dir={ckpt}", "resume=auto"),
                       tmp_path, timeout=300)
    assert "Traceback" not in output
    if max_steps == 3:
        assert code == 2, output[-3000:]
        assert re.search(r"error: \S+step_000004 is at step 4, past this run's 3 steps \(recipe\.training_params\.max_steps", output)
    else:
        assert code == 0, output[-3000:]
        assert re.search(r"nothing to train: \S+step_000004 already holds all 4 steps of this run; raise "
                         r"recipe\.training_params\.max_steps", output), output[-3000:]
        assert "final val loss" not in output
    assert CheckpointManager(ckpt).steps() == [2, 4]
    assert not (tmp_path / "logs").exists() and not (tmp_path / "out" / "metrics.jsonl").exists()


@pytest.mark.parametrize("problem", ["missing", "truncated-shard", "no-meta"])
def test_missing_or_corrupt_shards_fail_in_one_line(tmp_path: Path, shakespeare_data: Path, problem: str) -> None:
    data = tmp_path / "data"
    folder = data / "tiny_shakespeare-bpe-8192"
    if problem != "missing":
        shutil.copytree(shakespeare_data / folder.name, folder)
    if problem == "truncated-shard":
        shard = folder / "train_000001.bin"
        shard.write_bytes(shard.read_bytes()[:-100])
    elif problem == "no-meta":
        (folder / "meta.json").unlink()
    code, output = run(command(tmp_path / "out", data, *BASE), tmp_path, timeout=300)
    assert code == 2, output[-3000:]
    expected = {"missing": r"dataset folder .* not found; create it with `python process_data.py",
                "truncated-shard": r"train_000001\.bin: file is \d+ bytes but its header promises \d+ tokens",
                "no-meta": r"has no meta\.json: its preparation did not finish; rerun `python process_data.py"}[problem]
    assert re.search(expected, output), output[-3000:]
    assert "Traceback" not in output and not (tmp_path / "out").exists()


@pytest.mark.parametrize("change, message, nproc", [
    ("recipe.model.n_layer=3", r"holds a model of another shape", 1),
    ("optimizer_params=muon", r"error: checkpoint \S+step_000004 was written by optimizer 'muonq', this run uses 'muon'", 2),
])
def test_checkpoint_of_another_model_or_optimizer_is_refused(tmp_path: Path, shakespeare_data: Path, matrix,
                                                            change: str, message: str, nproc: int) -> None:
    """Refused at resume with exit 2; under torchrun every rank refuses and the line is printed once."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(matrix.root / "checkpoints" / "llama-tiny_muonq", ckpt)
    code, output = run(command(tmp_path / "out", shakespeare_data, *CKPT, "optimizer_params=muonq", change,
                               f"logging_params.checkpoint_dir={ckpt}", "resume=true", nproc=nproc), tmp_path, timeout=300)
    assert code == (2 if nproc == 1 else 1), output[-3000:]  # torchrun exits 1 when its workers fail
    assert len(re.findall(message, output)) == 1, output[-3000:]
    assert "exitcode  : 2" in output if nproc > 1 else "Traceback" not in output
    # the checkpoint is read after Hydra made its folder: only its config copy and log are there
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".hydra", "run_hydra.log"]
    assert not (tmp_path / "logs").exists()


def test_resume_auto_with_every_checkpoint_corrupt_refuses_to_start_over(tmp_path: Path, shakespeare_data: Path,
                                                                        matrix) -> None:
    """Starting from step 0 would silently drop the run: exit 2 before training, naming each
    rejected checkpoint and why; the checkpoints are left as they are and the folder unlocked."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(matrix.root / "checkpoints" / "llama-tiny_muonq", ckpt)
    damage(ckpt / "step_000004", "flipped")
    damage(ckpt / "step_000002", "no-manifest")
    before = sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*"))
    code, output = run(command(tmp_path / "out", shakespeare_data, *CKPT, "optimizer_params=muonq",
                               f"logging_params.checkpoint_dir={ckpt}", "resume=auto"), tmp_path, timeout=300)
    assert code == guard.EXIT_BAD_INPUT, output[-3000:]
    assert re.search(rf"error: resume=auto: every checkpoint in {re.escape(str(ckpt))} is corrupt or incomplete: "
                     r"step_000004 \(checksum mismatch in main\.pt\); step_000002 \(no manifest\.json\); move them away",
                     output), output[-3000:]
    assert "Traceback" not in output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".hydra", "run_hydra.log"]  # no training
    assert sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*")) == before  # nothing written, lock released


SETUP_BUG = """
def install(trainer):
    raise ValueError("internal invariant broken (injected into the trainer's setup)")
"""


@pytest.mark.parametrize("case", ["bad-plugin-spec", "internal-valueerror"])
def test_setup_errors_keep_their_traceback_unless_the_user_caused_them(tmp_path: Path, shakespeare_data: Path,
                                                                        case: str) -> None:
    """Only user errors end in one line and exit 2: a MUONQ_PLUGINS entry that does not import is
    the user's; a ValueError raised while the trainer is built (here by a plugin, as a bug deep in
    the setup would) is a bug and keeps its traceback."""
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "setup_bug.py").write_text(SETUP_BUG)
    path = os.pathsep.join(p for p in (str(plugins), os.environ.get("PYTHONPATH", "")) if p)
    spec = "no_such_plugin_module:install" if case == "bad-plugin-spec" else "setup_bug:install"
    code, output = run(command(tmp_path / "out", shakespeare_data, *BASE), tmp_path,
                       env={"PYTHONPATH": path, "MUONQ_PLUGINS": spec}, timeout=300)
    if case == "bad-plugin-spec":
        assert code == 2, output[-3000:]
        assert re.search(r"error: MUONQ_PLUGINS: cannot load 'no_such_plugin_module:install' \(ModuleNotFoundError", output), \
            output[-3000:]
        assert "Traceback" not in output
    else:
        assert code not in (0, 2), output[-3000:]
        assert "Traceback" in output and "ValueError: internal invariant broken" in output, output[-3000:]
        assert "setup_bug.py" in output  # the frame that raised is shown
    assert not (tmp_path / "logs").exists()  # no training started


def test_sweep_under_torchrun_is_refused_instead_of_hanging(tmp_path: Path, shakespeare_data: Path) -> None:
    cmd = command(tmp_path / "out", shakespeare_data, *BASE, nproc=2)
    cmd.insert(cmd.index(str(REPO / "run_hydra.py")) + 1, "-m")
    code, output = run(cmd, tmp_path, timeout=120)
    assert code != 0
    assert "sweeps (-m/--multirun) run outside torchrun" in output
    assert not (tmp_path / "out").exists() and not (tmp_path / "multirun").exists()


def test_exit_codes_agree_between_launch_and_guard() -> None:
    # launch is a command-line module: read its codes in a subprocess, never import it here
    probe = "from muonq import launch; print(launch.EXIT_BAD_INPUT, launch.EXIT_NONFINITE, launch.EXIT_PREEMPTED)"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert tuple(int(v) for v in proc.stdout.split()) == (
        guard.EXIT_BAD_INPUT, guard.EXIT_NONFINITE, guard.EXIT_PREEMPTED)


def test_every_torch_load_in_the_repo_is_weights_only() -> None:
    """Checkpoints and captured tensors load with weights_only=True; nothing unpickles."""
    import ast

    offenders = []
    for path in [*REPO.glob("src/**/*.py"), *REPO.glob("benchmarks/*.py"), *REPO.glob("scripts/*.py"), *REPO.glob("*.py")]:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                name = ast.unparse(node.func)
                if name == "torch.load" or name.endswith(".torch.load"):
                    safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                               for k in node.keywords)
                    if not safe:
                        offenders.append(f"{path.relative_to(REPO)}:{node.lineno}: {ast.unparse(node)}")
                if name.startswith("pickle.") or (name.endswith("np.load") and any(
                        k.arg == "allow_pickle" for k in node.keywords)):
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}: {ast.unparse(node)}")
            # naming the exception torch.load raises for bytes it cannot read unpickles nothing
            error_only = isinstance(node, ast.ImportFrom) and [a.name for a in node.names] == ["UnpicklingError"]
            if isinstance(node, (ast.Import, ast.ImportFrom)) and any(
                    a.name in ("pickle", "dill", "cloudpickle") for a in node.names) or (
                    isinstance(node, ast.ImportFrom) and node.module in ("pickle", "dill", "cloudpickle")
                    and not error_only):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}: imports a pickle module")
    assert not offenders, offenders


# -- data preparation killed mid-shard-write ---------------------------------------------------------

def test_sigkill_mid_shard_write_then_rerun_gives_the_same_dataset(tmp_path: Path) -> None:
    args = ["--name", "tiny_shakespeare", "--tokenizer", "bpe-8192", "--shard-tokens", "200000", "--num-proc", "1"]
    prep = [sys.executable, str(REPO / "process_data.py"), *args]
    reference = Proc([*prep, "--data-dir", str(tmp_path / "ref")], tmp_path)  # runs beside the killed one
    folder = tmp_path / "killed" / "tiny_shakespeare-bpe-8192"
    proc = Proc([*prep, "--data-dir", str(tmp_path / "killed")], tmp_path)
    try:
        caught = None
        while caught is None:
            wait_for(lambda: any(folder.glob(".train_*.tmp")), proc, "a shard being written", poll=0.0005)
            os.killpg(proc.pid, signal.SIGSTOP)
            temps = list(folder.glob(".train_*.tmp"))
            if temps:
                caught = temps[0]
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                os.killpg(proc.pid, signal.SIGCONT)
        proc.wait(30)
        assert reference.wait(300) == 0, reference.text()[-3000:]
    finally:
        proc.kill_all()
        reference.kill_all()
    assert not (folder / "meta.json").exists()  # incomplete, and says so
    code, output = run([*prep, "--data-dir", str(tmp_path / "killed")], tmp_path, timeout=300)
    assert code == 0, output[-3000:]
    ref_folder = tmp_path / "ref" / folder.name
    names = sorted(p.name for p in ref_folder.iterdir())
    assert sorted(p.name for p in folder.iterdir()) == names
    for name in names:
        ours, theirs = (folder / name).read_bytes(), (ref_folder / name).read_bytes()
        if name == "meta.json":  # it records the tokenizer file's path, which names the folder
            ours = ours.replace(str(folder).encode(), str(ref_folder).encode())
        assert ours == theirs, name
