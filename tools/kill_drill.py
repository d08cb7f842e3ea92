"""Kill drill: SIGKILL `gptlab train` at random moments of one run, resume it each time, and compare the final
weights with an uninterrupted run of the same recipe. On CPU in fp32 they must be bit-identical.

    python tools/kill_drill.py                      # 5 kills, a small GPT on the embedded python-docs corpus
    python tools/kill_drill.py --kills 3 --seed 7 --steps 120 --workdir /tmp/drill

The kill moments are 5 random steps of the run (sorted; each a random fraction of a second after the run's
output reaches that step, so some land mid-step and some mid-save; the output lags the run a little);
each resume is `gptlab train RECIPE --resume`. Prints where each kill landed (the step reported and the last
checkpoint's step), then the comparison, and exits 1 if any tensor differs.
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
from pathlib import Path

RECIPE = """\
data: {data}
out_dir: {out}
max_steps: {steps}
batch_size: 4
warmup_steps: 5
eval_every: {every}
eval_batches: 2
log_every: 1
save_every: {save}
sample_tokens: 0
precision: fp32
seed: 3
model:
  n_layer: 2
  n_head: 2
  n_embd: 64
  context_length: 64
  dropout: 0.1
"""


def gptlab(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "gptlab", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, **kw)


def last_step(out: Path) -> int | None:
    state = out / "last" / "trainer" / "state.json"
    try:
        return json.loads(state.read_text())["step"]
    except (OSError, ValueError, KeyError):
        return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=5)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="gptlab-drill-"))
    work.mkdir(parents=True, exist_ok=True)

    data = work / "data"
    if not (data / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "gptlab", "tokenizer", "train", "python-docs", "--vocab-size", "1024",
                        "-o", str(work / "tok"), "--quiet"], check=True)
        subprocess.run([sys.executable, "-m", "gptlab", "prepare", "python-docs", "--tokenizer", str(work / "tok"),
                        "-o", str(data), "--quiet"], check=True)

    def recipe(name: str) -> Path:
        path = work / f"{name}.yaml"
        path.write_text(RECIPE.format(data=data, out=work / name, steps=args.steps, every=args.steps // 3,
                                      save=max(2, args.steps // 12)))
        return path

    # the reference: one uninterrupted run (timed, to place the kills)
    t0 = time.perf_counter()
    ref = gptlab("train", str(recipe("straight")), "--overwrite")
    out, _ = ref.communicate()
    whole = time.perf_counter() - t0
    if ref.returncode != 0:
        print(out[-3000:])
        return 1
    print(f"uninterrupted run: {whole:.1f} s")

    drill = recipe("drilled")
    save = max(2, args.steps // 12)
    targets = sorted(rng.sample(range(1, save), 1) + rng.sample(range(save, args.steps), args.kills - 1))
    first = True
    for k, target in enumerate(targets):
        proc = gptlab("train", str(drill), *(["--overwrite"] if first else ["--resume"]))
        first = False
        reported = None
        for line in proc.stdout:  # "step N/M: loss ..." per step (log_every 1, no progress bar off a terminal)
            if line.startswith("step ") and "/" in line:
                reported = int(line.split()[1].split("/")[0])
                if reported >= target:
                    time.sleep(rng.uniform(0.0, 0.3))  # somewhere in the next step or save
                    proc.send_signal(signal.SIGKILL)
                    break
        proc.wait()
        if proc.returncode != -signal.SIGKILL:
            print(f"kill {k + 1}: the run ended (exit {proc.returncode}) before step {target}")
            continue
        print(f"kill {k + 1}: SIGKILL once step {reported} was printed; last checkpoint at step "
              f"{last_step(work / 'drilled')}")
    final = gptlab("train", str(drill), "--resume")
    out, _ = final.communicate()
    if final.returncode != 0:
        print(out[-3000:])
        return 1

    from safetensors.torch import load_file

    a = load_file(str(work / "straight" / "final" / "model.safetensors"))
    b = load_file(str(work / "drilled" / "final" / "model.safetensors"))
    differ = [k for k in a if k not in b or not (a[k] == b[k]).all()]
    if a.keys() != b.keys() or differ:
        print(f"DIFFERENT: {len(differ)} of {len(a)} tensors differ ({', '.join(differ[:5])})")
        return 1
    print(f"bit-identical: all {len(a)} tensors of final/ equal the uninterrupted run's ({args.steps} steps)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
