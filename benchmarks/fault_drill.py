"""Kill -9 drill: a training run killed at random moments (some inside a checkpoint save) and resumed
each time ends exactly where an uninterrupted run of the same config ends.

    python benchmarks/fault_drill.py [--kills 20] [--in-save 5] [--steps 60] [--layout tp1|tp2|pp2] [--quick]

A tiny student (4 layers) trains with a checkpoint every step (`opdlm-train`, sampled rollouts, one
thread). The reference run goes through uninterrupted. The drill run is SIGKILLed ``--kills`` times:
the first ``--in-save`` kills land inside a save (the save is held half-written by
``OPDLM_FAULT_DRILL_SAVE_DELAY`` and the kill waits for its temporary directory), the others at a
random moment; after each kill every checkpoint directory is checked (a complete, loadable checkpoint
or nothing) and the run is restarted with automatic resume. At the end the per-step losses and
gradient norms and the final weights are compared with the reference, bit for bit.

``--layout tp2`` / ``pp2`` runs both runs under torchrun with two ranks (tensor / pipeline parallel)
and kills one of the two workers: torchrun then tears the job down (the other worker's collective
fails or torchrun's SIGTERM stops it) and the drill restarts the whole job.

Reports kills survived, corrupt checkpoints (goal 0), steps lost per kill (steps logged but not yet
checkpointed), the time from a restart to its first new step, and ends with the line
``kills=N survived=N corrupt=0 identical=yes|no``. ``--quick`` (4 kills, 2 in a save, 14 steps) runs in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TINY = dict(num_layers=4, hidden_size=64, ffn_hidden_size=160, num_attention_heads=4, num_query_groups=2,
            vocab_size=250, max_sequence_length=128, eos_token_ids=[2], block_size=4)


def prepare(root: str) -> tuple:
    import torch

    from opdlm_megatron.checkpoint.model import save_model_checkpoint
    from opdlm_megatron.config.model import ModelConfig
    from opdlm_megatron.model.build import build_model
    from opdlm_megatron.runtime.platform import initialize_runtime

    ckpt = os.path.join(root, "student")
    with initialize_runtime(device="cpu", seed=7):
        config = ModelConfig(**TINY)
        save_model_checkpoint(build_model(config, "student"), ckpt, config)
    data = os.path.join(root, "prompts.jsonl")
    g = torch.Generator().manual_seed(0)
    with open(data, "w") as f:
        for i in range(8):
            f.write(json.dumps({"prompt_ids": torch.randint(3, 250, (3 + i % 4,), generator=g).tolist()}) + "\n")
    return ckpt, data


LAYOUTS = {"tp1": (1, 1), "tp2": (2, 1), "pp2": (1, 2)}


def command(ckpt: str, data: str, run_dir: str, steps: int, layout: str = "tp1") -> list:
    tp, pp = LAYOUTS[layout]
    launcher = [sys.executable] if layout == "tp1" else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    return launcher + [
        "-m", "opdlm_megatron.train", "--config", os.path.join(ROOT, "configs", "tiny_cpu.yaml"),
        f"model.student_checkpoint={ckpt}", f"data.path={data}", f"run_dir={run_dir}", f"train.steps={steps}",
        "checkpoint.save_every=1", "checkpoint.keep_last=2", "rollout.temperature=1.0",
        "logging.progress_bar=false", f"parallel.tensor_model_parallel_size={tp}",
        f"parallel.pipeline_model_parallel_size={pp}"]


def workers(pid: int) -> list:
    """The child processes of ``pid`` (torchrun's workers)."""
    children = []
    for task in os.listdir(f"/proc/{pid}/task") if os.path.isdir(f"/proc/{pid}/task") else []:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                children += [int(x) for x in f.read().split()]
        except OSError:
            pass
    return children


def kill(proc: subprocess.Popen, layout: str, rng: random.Random) -> str:
    """SIGKILL the run: the process itself, or one torchrun worker (torchrun tears the rest down)."""
    if layout == "tp1":
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return "the process"
    ranks = workers(proc.pid)
    victim = rng.choice(ranks) if ranks else proc.pid
    os.kill(victim, signal.SIGKILL)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:  # torchrun did not notice: end the job as a scheduler would
        for pid in workers(proc.pid) + [proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
    for pid in ranks:  # no worker outlives the job
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return f"worker {ranks.index(victim) if victim in ranks else '?'} of 2"


def environment(save_delay: float = 0.0) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    env.pop("OPDLM_FAULT_DRILL_SAVE_DELAY", None)
    if save_delay:
        env["OPDLM_FAULT_DRILL_SAVE_DELAY"] = str(save_delay)
    return env


def logged_steps(run_dir: str) -> list:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def checkpoint_problems(run_dir: str) -> list:
    """Checkpoint directories that are not complete checkpoints, and a ``latest`` naming a bad one."""
    from opdlm_megatron.checkpoint.model import is_checkpoint

    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    bad = [d for d in os.listdir(root) if d.startswith("step_") and "." not in d
           and not is_checkpoint(os.path.join(root, d))]
    latest = os.path.join(root, "latest")
    if os.path.isfile(latest):
        name = open(latest).read().strip()
        if not is_checkpoint(os.path.join(root, name)):
            bad.append(f"latest -> {name}")
    return bad


def saved_step(run_dir: str) -> int:
    latest = os.path.join(run_dir, "checkpoints", "latest")
    if not os.path.isfile(latest):
        return 0
    return int(open(latest).read().strip().split("_")[-1])


def final_weights(run_dir: str) -> dict:
    from opdlm_megatron.checkpoint.model import build_from_checkpoint
    from opdlm_megatron.runtime.platform import initialize_runtime
    from opdlm_megatron.checkpoint.training import latest_checkpoint

    with initialize_runtime(device="cpu", seed=0):
        model, _ = build_from_checkpoint(latest_checkpoint(os.path.join(run_dir, "checkpoints")), "student")
        return {k: v.clone() for k, v in model.state_dict().items() if hasattr(v, "dtype")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--in-save", type=int, default=5, help="how many of the kills land inside a save")
    parser.add_argument("--steps", type=int, default=60,
                        help="well above --kills: each kill follows a new checkpoint and costs up to two steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layout", choices=sorted(LAYOUTS), default="tp1",
                        help="tp2 / pp2: two ranks under torchrun, one of them killed")
    parser.add_argument("--quick", action="store_true", help="4 kills (2 in a save), 14 steps: the CI smoke test")
    args = parser.parse_args()
    if args.quick:
        args.kills, args.in_save, args.steps = 4, 2, 14
    if not 0 <= args.in_save <= args.kills:
        parser.error(f"--in-save {args.in_save} must lie in [0, --kills {args.kills}]")
    if args.steps < 2 * args.kills:
        parser.error(f"--steps {args.steps} must be at least twice --kills {args.kills} (each kill follows a new "
                     "checkpoint and may land in the next steps)")
    rng = random.Random(args.seed)
    root = tempfile.mkdtemp(prefix="opdlm-fault-drill-")
    ckpt, data = prepare(root)

    reference = os.path.join(root, "reference")
    started = time.perf_counter()
    subprocess.run(command(ckpt, data, reference, args.steps, args.layout), env=environment(), check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run_seconds = time.perf_counter() - started
    step_seconds = run_seconds / (args.steps + 4)  # about four steps' worth is start-up
    print(f"reference ({args.layout}): {args.steps} steps uninterrupted in {run_seconds:.1f} s")

    drill = os.path.join(root, "drill")
    kinds = ["save"] * args.in_save + ["random"] * (args.kills - args.in_save)
    rng.shuffle(kinds)
    kills, survived, corrupt, lost, restarts = 0, 0, 0, [], []
    while True:
        kind = kinds[kills] if kills < len(kinds) else None
        resumed_from = saved_step(drill)
        began = time.perf_counter()
        proc = subprocess.Popen(command(ckpt, data, drill, args.steps, args.layout),
                                env=environment(1.5 if kind == "save" else 0),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        first_step = None
        checkpoints = os.path.join(drill, "checkpoints")
        # the temporary directory of a save by this process (under torchrun: by one of its workers)
        this_save = f".partial-{proc.pid}" if args.layout == "tp1" else ".partial-"
        # every kill waits until the restarted run has saved once more (so each kill costs progress,
        # not just start-up), then: inside its next save, or a random moment of the next steps
        kill_at = None
        while proc.poll() is None:
            now = time.perf_counter()
            if first_step is None and saved_step(drill) > resumed_from:
                first_step = now - began
                kill_at = now + rng.uniform(0.0, 2.0 * step_seconds)
            if kind == "save" and first_step is not None and os.path.isdir(checkpoints) and \
                    any(this_save in d for d in os.listdir(checkpoints)):
                time.sleep(0.2)  # well inside the held save
                break
            if kind == "random" and kill_at is not None and now >= kill_at:
                break
            time.sleep(0.05)
        if proc.poll() is None and kind is not None:
            logged = len(logged_steps(drill))
            victim = kill(proc, args.layout, rng)
            kills += 1
            lost.append(max(0, logged - saved_step(drill)))
            problems = checkpoint_problems(drill)
            corrupt += len(problems)
            survived += 0 if problems else 1
            if first_step is not None:
                restarts.append(first_step)
            print(f"kill {kills} ({kind}, {victim}): after {logged} logged steps, checkpoint at step {saved_step(drill)}"
                  + (f", CORRUPT: {problems}" if problems else ""))
            continue
        proc.wait()
        if proc.returncode != 0:
            print(f"the drill run failed (exit {proc.returncode}) after {kills} kills")
            break
        if first_step is not None:
            restarts.append(first_step)
        if kills >= len(kinds) or saved_step(drill) >= args.steps:
            break  # done; a run that finished before all kills landed reports the kills it took

    identical = "no"
    ref_steps, drill_steps = logged_steps(reference), logged_steps(drill)
    ref_log = [(r["step"], r["loss"], r.get("grad_norm")) for r in ref_steps]
    drill_log = [(r["step"], r["loss"], r.get("grad_norm")) for r in drill_steps]
    same_log = ref_log == drill_log
    if not same_log:
        print(f"first difference: reference {next((a for a, b in zip(ref_log, drill_log) if a != b), ref_log[len(drill_log):][:1])} "
              f"drill {next((b for a, b in zip(ref_log, drill_log) if a != b), drill_log[len(ref_log):][:1])} "
              f"({len(ref_log)} vs {len(drill_log)} records)")
    if proc.returncode == 0:
        a, b = final_weights(reference), final_weights(drill)
        import torch

        same_weights = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        identical = "yes" if same_log and same_weights else "no"
        print(f"per-step losses and grad norms equal: {same_log}; final weights equal bit for bit: {same_weights}")
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    print(f"steps lost per kill: mean {mean(lost):.2f} max {max(lost, default=0)}; restart to its first new "
          f"checkpoint: mean {mean(restarts):.1f} s")
    print(f"kills={kills} survived={survived} corrupt={corrupt} identical={identical}")


if __name__ == "__main__":
    main()
