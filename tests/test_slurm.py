"""`submit` and the Slurm job template: rendering, shell safety, and real jobs on a local single-node Slurm.

The rendering tests need nothing. The job tests start a real Slurm on localhost once per session
(tests/slurm_cluster.py; installed by scripts/install_slurm.sh from .ci/run) and skip, saying why, where it
cannot run. Jobs run tests/dist/slurm_probe.py in place of `sft` through the same template, or `sft` itself
on recipes/tiny_lora.yaml once the sft command exists.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from glm45_train.cli.main import main as glm45_train
from glm45_train.errors import UserError
from glm45_train.launch import slurm
from tests.conftest import REPO_ROOT
from tests.slurm_cluster import LocalSlurm, SlurmUnavailable, why_unavailable

PROBE = str(REPO_ROOT / "tests/dist/slurm_probe.py")
HOSTILE = '$(touch PWNED) `touch PWNED2`; rm -rf / ; it\'s "quoted"\nsecond line'


# --- rendering (no Slurm needed) ---------------------------------------------------------------------------


def test_gpu_job_has_every_directive(capsys, tmp_path):
    argv = ["submit", str(REPO_ROOT / "recipes/air_lora.yaml"), f"checkpoint.dir={tmp_path}/run", "--config", "air",
            "--nodes", "1", "--gpus-per-node", "4", "--partition", "gpu", "--account", "proj-1",
            "--time", "2-00:00:00", "--container-image", "nvcr.io#nvidia/pytorch:25.01-py3", "--dry-run"]  # fmt: skip
    assert glm45_train(argv) == 0
    script = capsys.readouterr().out
    for line in ("#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=4", "#SBATCH --exclusive",
                 "#SBATCH --time=2-00:00:00", "#SBATCH --partition=gpu", "#SBATCH --account=proj-1",
                 f"#SBATCH --output={tmp_path}/run/slurm/logs/%x-%j.out", "#SBATCH --signal=B:USR1@300",
                 "#SBATCH --requeue", "#SBATCH --export=NONE", "export CUDA_DEVICE_MAX_CONNECTIONS=1",
                 "export TORCH_NCCL_AVOID_RECORD_STREAMS=1", "export NCCL_NVLS_ENABLE=0"):  # fmt: skip
        assert re.search(rf"^{re.escape(line)}$", script, re.M), line
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1' in script
    assert "srun --export=ALL" in script and "--container-image='nvcr.io#nvidia/pytorch:25.01-py3'" in script
    assert f"--container-mounts={tmp_path}/run:{tmp_path}/run," in script
    assert '--nproc-per-node=4 \\\n  --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT"' in script
    assert f"-m glm45_train.cli.main sft {tmp_path}/run/slurm/recipe.yaml" in script
    assert not (tmp_path / "run").exists()  # --dry-run writes nothing
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_cpu_job_asks_for_no_gpus_and_sizes_processes_from_the_layout(capsys, tmp_path):
    argv = ["submit", str(REPO_ROOT / "recipes/tiny_lora.yaml"), f"checkpoint.dir={tmp_path}/run",
            "--config", "air", "--nodes", "1", "--gpus-per-node", "0", "--dry-run"]  # fmt: skip
    assert glm45_train(argv) == 0
    script = capsys.readouterr().out
    assert "--gpus-per-node" not in script.split("srun", 1)[0] and "CUDA_DEVICE_MAX_CONNECTIONS" not in script
    assert "--nproc-per-node=2" in script  # parallel.ep = 2 needs two processes


def test_plan_refusal_stops_submission(capsys, tmp_path):
    argv = ["submit", str(REPO_ROOT / "recipes/air_lora.yaml"), "parallel.ep=2", f"checkpoint.dir={tmp_path}/r",
            "--config", "air", "--nodes", "1", "--gpus-per-node", "4", "--dry-run"]  # fmt: skip
    assert glm45_train(argv) == 2
    assert "does not fit" in capsys.readouterr().err
    assert glm45_train([*argv, "--force"]) == 0


@pytest.mark.parametrize(
    ("flag", "value", "culprit"),
    [
        ("--partition", "gpu;rm -rf /", "--partition"),
        ("--account", "$(rm -rf /)", "--account"),
        ("--time", "1:00:00\n#SBATCH --uid=0", "--time"),
        ("--partition", "a`id`", "--partition"),
        (None, "checkpoint.dir=/tmp/run dir/$(id)", "checkpoint.dir"),
        ("--partition", "gpu\n#SBATCH --uid=0", "--partition"),
        ("--account", "acct\n", "--account"),
        ("--env", "BAD-NAME=1", "--env"),
        ("--container-mounts", "/a:/b:ro:x", "--container-mounts"),
    ],
)
def test_values_sbatch_cannot_carry_are_refused(capsys, flag, value, culprit):
    argv = ["submit", str(REPO_ROOT / "recipes/tiny_lora.yaml")] + ([] if flag else [value])  # overrides follow RECIPE
    argv += ["--config", "air", "--nodes", "1", "--gpus-per-node", "0", "--container-image", "img", "--dry-run"]
    argv += [flag, value] if flag else []
    assert glm45_train(argv) == 2
    assert culprit in capsys.readouterr().err


def test_hostile_values_reach_the_job_as_literal_text(tmp_path):
    """Run the rendered script with stub srun/scontrol: every hostile value arrives as one literal argument."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    (stubs / "srun").write_text(
        '#!/bin/bash\nprintf "%s\\0" "$@" > "$STUB_OUT/argv"\nprintf "%s" "$GLM45_PROBE" > "$STUB_OUT/env"\n'
    )
    (stubs / "scontrol").write_text("#!/bin/bash\necho localhost\n")
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    workdir = tmp_path / f"work {HOSTILE.replace('/', '_')}"
    workdir.mkdir()
    spec = slurm.JobSpec(
        run_dir=tmp_path / "run", workdir=workdir, entry=(PROBE, HOSTILE), gpus_per_node=0, procs_per_node=1,
        container_image=HOSTILE, container_mounts=("/data:/data",), env={"GLM45_PROBE": HOSTILE},
    )  # fmt: skip
    script = tmp_path / "job.sbatch"
    script.write_text(slurm.render_job(spec, slurm.job_environment(spec, source={})))
    env = {"PATH": f"{stubs}:/usr/bin:/bin", "STUB_OUT": str(tmp_path), "SLURM_JOB_ID": "7",
           "SLURM_JOB_NODELIST": "node1", "SLURM_NNODES": "1"}  # fmt: skip
    result = subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    argv = (tmp_path / "argv").read_text().split("\0")[:-1]
    assert f"--container-image={HOSTILE}" in argv and f"--container-workdir={workdir}" in argv
    assert argv[-2:] == [PROBE, HOSTILE]
    assert (tmp_path / "env").read_text() == HOSTILE
    assert not list(tmp_path.rglob("PWNED*")) and not list(workdir.rglob("PWNED*"))


def test_resolved_recipe_round_trips(tmp_path):
    from glm45_train.config.recipe import load_recipe

    recipe = load_recipe(REPO_ROOT / "recipes/air_lora.yaml", [f"data.tokenizer={HOSTILE}"])
    path = tmp_path / "recipe.yaml"
    path.write_text(slurm.dump_recipe(recipe))
    assert load_recipe(path) == recipe


def test_fill_template_is_strict():
    assert slurm.fill_template("a {{x}} b", {"x": "1"}) == "a 1 b"
    with pytest.raises(ValueError):
        slurm.fill_template("a {{x}} {{y}}", {"x": "1"})
    with pytest.raises(UserError):
        slurm.check_directive_value("--partition", "a b")


@pytest.mark.parametrize(("value", "seconds"), [("90", 5400), ("1:30", 90), ("2:00:00", 7200), ("1-2", 93600),
                                                ("1-0:30", 88200), ("0-00:00:45", 45)])  # fmt: skip
def test_slurm_time_formats(value, seconds):
    assert slurm.time_limit_seconds(value) == seconds


def test_a_warning_that_could_come_before_the_job_listens_is_refused(tmp_path):
    spec = slurm.JobSpec(run_dir=tmp_path / "run", workdir=tmp_path, entry=(PROBE,), time="5", signal_seconds=300)
    with pytest.raises(UserError, match="--signal-seconds 300"):
        slurm.render_job(spec)
    slurm.render_job(dataclasses.replace(spec, signal_seconds=240))


# --- real jobs on a local Slurm ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    reason = why_unavailable()
    if reason:
        pytest.skip(f"local Slurm unavailable: {reason}")
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except SlurmUnavailable as err:
        cluster.stop()
        pytest.skip(f"local Slurm could not start: {err}")
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    yield cluster
    subprocess.run(["scancel", "--user", "root"], capture_output=True, timeout=60)
    cluster.stop()
    if previous is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = previous


def job_state(job_id: str) -> str:
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, timeout=30).stdout
    match = re.search(r"JobState=(\w+)", out)
    return match.group(1) if match else "UNKNOWN"


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def wait_for_end(job_id: str, timeout: float = 180) -> str:
    ends = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
    wait_until(lambda: job_state(job_id) in ends, timeout, f"job {job_id} to end")
    return job_state(job_id)


def submit_probe(run_dir: Path, mode: str, **options) -> tuple[str, Path]:
    spec = slurm.JobSpec(run_dir=run_dir, workdir=REPO_ROOT, entry=(PROBE, str(run_dir / "state"), mode),
                         gpus_per_node=0, procs_per_node=2, job_name=f"probe-{mode}", exclusive=False,
                         **options)  # fmt: skip
    job_id = slurm.sbatch(slurm.write_job(spec, slurm.render_job(spec)))
    return job_id, spec.log_dir / f"{spec.job_name}-{job_id}.out"


def read(log: Path) -> str:
    return log.read_text(errors="replace") if log.exists() else ""


@pytest.mark.slow
def test_probe_job_runs_through_the_template(slurm_cluster, tmp_path):
    job_id, log = submit_probe(tmp_path / "run", "quick", env={"GLM45_PROBE": HOSTILE})
    assert wait_for_end(job_id) == "COMPLETED", read(log)
    text = read(log)
    assert f"glm45-train: job {job_id} start 0" in text and "training exited with status 0" in text
    reports = [json.loads(line.split(": ", 1)[1]) for line in text.splitlines() if line.startswith("probe rank")]
    assert len(reports) == 2 and {r["SLURM_JOB_ID"] for r in reports} == {job_id}
    assert all(r["GLM45_PROBE"] == HOSTILE and r["PYTHONUNBUFFERED"] == "1" for r in reports)
    assert re.search(r"probe rank 1 of 2", text)
    assert not list(REPO_ROOT.glob("PWNED*")) and not list(tmp_path.rglob("PWNED*"))


@pytest.mark.slow
def test_usr1_checkpoints_requeues_and_the_restart_resumes(slurm_cluster, tmp_path):
    job_id, log = submit_probe(tmp_path / "run", "wait")
    wait_until(lambda: read(log).count("waiting for USR1") == 2, 120, "both ranks to start")
    subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], check=True, timeout=30)
    assert wait_for_end(job_id) == "COMPLETED", read(log)
    text = read(log)
    steps = re.findall(r"USR1: checkpoint at step (\d+)", text)
    assert len(steps) == 2 and f"requeueing job {job_id}" in text
    assert f"glm45-train: job {job_id} start 1" in text  # SLURM_RESTART_COUNT seen by the job
    resumed = sorted(re.findall(r"restart 1: resumed from step (\d+)", text))
    assert resumed == sorted(steps)


@pytest.mark.slow
def test_time_limit_signal_requeues_without_help(slurm_cluster, tmp_path):
    """--time 3 minutes with --signal=B:USR1@60: Slurm itself warns the job, which checkpoints and requeues.

    Slurm sends the warning up to 60 s early (its time-limit check runs every 30 s and looks one period ahead), so
    the margin must leave the batch shell time to install its trap: with --time 2 and @90 the signal could come
    at the job's start, before the trap, and was lost (the job then ran into its limit).
    """
    job_id, log = submit_probe(tmp_path / "run", "wait", time="3", signal_seconds=60)
    assert wait_for_end(job_id, timeout=420) == "COMPLETED", read(log)
    assert re.search(r"restart 1: resumed from step \d+", read(log))


# --- the real thing: `glm45-train submit recipes/tiny_lora.yaml` ------------------------------------------------


def sft_unavailable() -> str | None:
    from glm45_train.cli import main

    if not any(getattr(command, "__name__", "").endswith(".sft") for command in main.COMMANDS):
        return "the sft command is not registered yet (glm45_train/cli/main.py)"
    try:
        from glm45_train.train.loop import run_sft  # noqa: F401
    except ImportError:
        return "glm45_train.train has no run_sft yet"
    return None


def submit_tiny_lora(tmp_path: Path, tiny_dir: Path, *overrides: str) -> tuple[str, Path, Path]:
    reason = sft_unavailable()
    if reason:
        pytest.skip(reason)
    run_dir = tmp_path / "run"
    argv = ["submit", str(REPO_ROOT / "recipes/tiny_lora.yaml"), f"model.source={tiny_dir}",
            f"checkpoint.dir={run_dir}", f"data.inputs=[{REPO_ROOT / 'data/sample_distill.jsonl'}]", *overrides,
            "--nodes", "1", "--gpus-per-node", "0", "--time", "30"]  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "glm45_train.cli.main", *argv], cwd=REPO_ROOT, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    job_id = re.search(r"submitted job (\d+)", result.stdout).group(1)  # type: ignore[union-attr]
    return job_id, run_dir, run_dir / "slurm/logs" / f"glm45-tiny_lora-{job_id}.out"


@pytest.mark.slow
def test_submit_tiny_lora_trains_and_checkpoints(slurm_cluster, tiny_air, tmp_path):
    job_id, run_dir, log = submit_tiny_lora(tmp_path, tiny_air)
    assert wait_for_end(job_id, timeout=900) == "COMPLETED", read(log)[-3000:]
    assert (run_dir / "latest_checkpointed_iteration.txt").read_text().strip() == "12"
    assert "sft finished at step 12" in read(log)


@pytest.mark.slow
def test_submit_tiny_lora_preempted_resumes_from_its_checkpoint(slurm_cluster, tiny_air, tmp_path):
    job_id, run_dir, log = submit_tiny_lora(tmp_path, tiny_air, "train.steps=24", "checkpoint.interval=100")
    metrics = run_dir / "metrics.jsonl"
    wait_until(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3, 600, "training steps")
    subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], check=True, timeout=30)
    before = metrics.read_text().splitlines()[:3]  # carry wall-clock tokens/s: a rerun from step 0 would differ
    assert wait_for_end(job_id, timeout=900) == "COMPLETED", read(log)[-3000:]
    text = read(log)
    stopped = re.search(r"sft stopped by signal, checkpointed at step (\d+)", text)
    assert stopped and f"glm45-train: job {job_id} start 1" in text and "sft finished at step 24" in text
    lines = metrics.read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, 25))
    assert lines[:3] == before  # the second start resumed after the checkpoint instead of starting over
