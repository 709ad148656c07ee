"""Meta-training throughput and peak memory: lightning-meta against bare PyTorch and peers.

One meta-training step (adapt every task, meta-gradient, outer Adam step) on Conv4-64 at
Omniglot N-way 1-shot shapes with synthetic images, timed for:

  lightning-meta            the real Trainer step, eager (`task_batching=auto`: the loop with the
                            default nn.BatchNorm2d backbone; `compile_backbone=False`, what a
                            short run or a second-order algorithm gets by default)
  lightning-meta compiled   the same with `compile_backbone=True`: the default of first-order
                            MAML in CPU fits of >= 1000 steps (compile="auto"); second order runs
                            its support forwards eagerly. Compilation happens in the warm-up
                            steps, which are not timed
  lightning-meta vmap       the real Trainer step, `task_batching=vmap`, PlainBatchNorm2d backbone
  bare vmap                 a torch.func reference written here (functional_call + grad + vmap
                            over tasks, one backward), PlainBatchNorm2d backbone
  bare loop                 a per-task functional loop written here (autograd.grad), nn.BatchNorm2d
  higher / torchopt / l2l   the peers' own MAML idioms, each when importable (else skipped, said;
                            `pip install -e ".[bench]"` brings higher and torchopt)

Each (setting, implementation) runs in a fresh subprocess, so its peak memory is its own: peak
RSS on CPU (the high-water mark at the end, warm-up and timed steps included, minus the one
after set-up, before the first step), peak allocated on CUDA. Repeats are interleaved across
implementations so machine noise hits all alike; the table gives the median step time,
tasks/s, and the ratios to the bare vmap reference, to the bare loop, and to the fastest of
the bare loop and the peers (the goal: lightning-meta's default step faster than all of them).

The default is a sample of a few minutes: 5-way, first-order MAML and ProtoNet, the eager and
compiled lightning-meta steps against the bare loop and the peers. `--full` runs the whole grid
(5- and 20-way, second-order MAML with 1 and 5 steps, the vmap rows); any of --ways, --settings
and --impls overrides either.

    python benchmarks/throughput.py --threads 1                # the sample
    python benchmarks/throughput.py --threads 1 --full         # the grid (tens of minutes on a CPU)
    python benchmarks/throughput.py --device cuda --tasks 32 --steps 10 --full   # unchanged on a GPU
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_trainer import bare_trainer

from lightning_meta.models import Conv4

SETTINGS = {
    "MAML 2nd order, 1 step": dict(algorithm="maml", steps=1, first_order=False, inner_lr=0.4),
    "MAML 2nd order, 5 steps": dict(algorithm="maml", steps=5, first_order=False, inner_lr=0.1),
    "FOMAML, 1 step": dict(algorithm="maml", steps=1, first_order=True, inner_lr=0.4),
    "ProtoNet": dict(algorithm="protonet"),
}
IMPLEMENTATIONS = [
    "lightning-meta",
    "lightning-meta compiled",
    "lightning-meta vmap",
    "bare vmap",
    "bare loop",
    "higher",
    "torchopt",
    "learn2learn",
]
PEER_MODULES = {"higher": "higher", "torchopt": "torchopt", "learn2learn": "learn2learn"}
REFERENCES = ("bare loop", "higher", "torchopt", "learn2learn")
"""What lightning-meta's step is compared against in the 'vs fastest' column."""
SAMPLE = dict(
    ways=[5],
    settings=["FOMAML, 1 step", "ProtoNet"],
    impls=["lightning-meta", "lightning-meta compiled", "bare loop", "higher", "torchopt"],
)
"""The default run: the goal's rows, a few minutes on a CPU."""
FULL = dict(ways=[5, 20], settings=list(SETTINGS), impls=IMPLEMENTATIONS)


def synthetic_batch(tasks: int, ways: int, queries: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    sx = torch.rand(tasks, ways, 1, 28, 28, generator=g)
    qx = torch.rand(tasks, ways * queries, 1, 28, 28, generator=g)
    sy = torch.arange(ways).repeat(tasks, 1)
    qy = torch.arange(ways).repeat_interleave(queries).repeat(tasks, 1)
    return tuple(t.to(device) for t in (sx, sy, qx, qy))


def backbone(ways: int | None, norm: str, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    return Conv4(out_features=ways, norm=norm).to(device)


# --- the implementations: each returns a function doing one full meta-training step ---------


def bare_vmap(cfg: dict, ways: int, data: tuple, device: torch.device):
    model = backbone(ways, "plain_batch", device)
    params = dict(model.named_parameters())
    opt = torch.optim.Adam(params.values(), 1e-3)

    def task_loss(sx, sy, qx, qy):
        def support_loss(p):
            return F.cross_entropy(functional_call(model, p, (sx,)), sy)

        p = params
        for _ in range(cfg["steps"]):
            g = grad(support_loss)(p)
            p = {k: p[k] - cfg["inner_lr"] * (g[k].detach() if cfg["first_order"] else g[k]) for k in p}
        return F.cross_entropy(functional_call(model, p, (qx,)), qy)

    def step():
        opt.zero_grad()
        vmap(task_loss)(*data).mean().backward()
        opt.step()

    return step


def bare_loop(cfg: dict, ways: int, data: tuple, device: torch.device):
    if cfg["algorithm"] == "protonet":
        model = backbone(None, "batch", device)
        opt = torch.optim.Adam(model.parameters(), 1e-3)

        def step():
            opt.zero_grad()
            for sx, _, qx, qy in zip(*data, strict=True):
                z = model(torch.cat([sx, qx]))
                protos = z[: len(sx)]  # 1-shot: the support embeddings are the prototypes
                logits = -(z[len(sx) :, None] - protos[None]).pow(2).sum(-1)
                (F.cross_entropy(logits, qy) / len(data[0])).backward()
            opt.step()

        return step
    model = backbone(ways, "batch", device)
    params = dict(model.named_parameters())
    opt = torch.optim.Adam(params.values(), 1e-3)

    def step():
        opt.zero_grad()
        for sx, sy, qx, qy in zip(*data, strict=True):
            p = params
            for _ in range(cfg["steps"]):
                loss = F.cross_entropy(functional_call(model, p, (sx,)), sy)
                g = torch.autograd.grad(loss, list(p.values()), create_graph=not cfg["first_order"])
                p = {k: w - cfg["inner_lr"] * gk for (k, w), gk in zip(p.items(), g, strict=True)}
            (F.cross_entropy(functional_call(model, p, (qx,)), qy) / len(data[0])).backward()
        opt.step()

    return step


def with_higher(cfg: dict, ways: int, data: tuple, device: torch.device):
    import higher

    model = backbone(ways, "batch", device)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    inner = torch.optim.SGD(model.parameters(), lr=cfg["inner_lr"])

    def step():
        opt.zero_grad()
        for sx, sy, qx, qy in zip(*data, strict=True):
            with higher.innerloop_ctx(
                model, inner, copy_initial_weights=False, track_higher_grads=not cfg["first_order"]
            ) as (
                fmodel,
                diffopt,
            ):
                for _ in range(cfg["steps"]):
                    diffopt.step(F.cross_entropy(fmodel(sx), sy))
                (F.cross_entropy(fmodel(qx), qy) / len(data[0])).backward()
        opt.step()

    return step


def with_torchopt(cfg: dict, ways: int, data: tuple, device: torch.device):
    import torchopt

    model = backbone(ways, "batch", device)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    inner = torchopt.MetaSGD(model, lr=cfg["inner_lr"])

    def step():
        opt.zero_grad()
        for sx, sy, qx, qy in zip(*data, strict=True):
            state = torchopt.extract_state_dict(model)
            for _ in range(cfg["steps"]):
                inner.step(F.cross_entropy(model(sx), sy))
                if cfg["first_order"]:
                    torchopt.stop_gradient(model)
            (F.cross_entropy(model(qx), qy) / len(data[0])).backward()
            torchopt.recover_state_dict(model, state)
        opt.step()

    return step


def with_learn2learn(cfg: dict, ways: int, data: tuple, device: torch.device):
    import learn2learn as l2l

    maml = l2l.algorithms.MAML(backbone(ways, "batch", device), lr=cfg["inner_lr"], first_order=cfg["first_order"])
    opt = torch.optim.Adam(maml.parameters(), 1e-3)

    def step():
        opt.zero_grad()
        for sx, sy, qx, qy in zip(*data, strict=True):
            learner = maml.clone()
            for _ in range(cfg["steps"]):
                learner.adapt(F.cross_entropy(learner(sx), sy))
            (F.cross_entropy(learner(qx), qy) / len(data[0])).backward()
        opt.step()

    return step


def with_lightning_meta(
    cfg: dict, ways: int, data: tuple, device: torch.device, vmapped: bool, compiled: bool, chunk: int | None = None
):
    import pytorch_lightning as pl

    from lightning_meta.algorithms import MAML, ProtoNet
    from lightning_meta.data import EpisodicDataModule, TaskSource
    from lightning_meta.task import Task

    sx, sy, qx, qy = (t.cpu() for t in data)

    class FixedTasks(TaskSource):
        def sample(self, rng) -> Task:  # the same synthetic tasks every step, as for the others
            i = int(rng.integers(len(sx)))
            return Task(sx[i], sy[i], qx[i], qy[i])

    class FixedData(EpisodicDataModule):
        def build_sources(self) -> dict:
            return {"train": FixedTasks(), "val": FixedTasks(), "test": FixedTasks()}

    norm = "plain_batch" if vmapped else "batch"
    if cfg["algorithm"] == "protonet":
        model = ProtoNet(backbone(None, norm, device))
    else:
        model = MAML(backbone(ways, norm, device), cfg["inner_lr"], cfg["steps"], first_order=cfg["first_order"])
    if vmapped:
        model.task_batching = "vmap"
        model.task_chunk_size = chunk
    model.compile_backbone = compiled
    times: list[float] = []
    baseline: list[int] = []

    class Timer(pl.Callback):
        def on_train_batch_start(self, *args) -> None:
            self.start = time.perf_counter()

        def on_train_start(self, *args) -> None:  # memory is counted from here, as for the others
            baseline.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()

        def on_train_batch_end(self, *args) -> None:
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.start)

    def run(steps: int) -> tuple[list[float], int]:
        trainer = bare_trainer(
            accelerator="gpu" if device.type == "cuda" else "cpu",
            devices=1,
            max_steps=steps,
            callbacks=[Timer()],
        )
        trainer.fit(model, datamodule=FixedData(tasks_per_batch=len(sx), batches_per_epoch=10**6))
        return times, baseline[0]

    return run


def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = SETTINGS[args.setting]
    queries = args.queries
    data = synthetic_batch(args.tasks, args.ways, queries, device)
    if args.impl.startswith("lightning-meta"):
        compiled = "compiled" in args.impl
        # Compiled: the first step compiles every graph (support and query shapes), the second
        # is the first one run from compiled code alone; neither is timed.
        warmup = max(2 if compiled else 1, args.warmup)
        chunk = int(args.impl.split("chunk=")[1]) if "chunk=" in args.impl else None
        run = with_lightning_meta(cfg, args.ways, data, device, "vmap" in args.impl, compiled, chunk)
        times, base = run(warmup + args.steps)
        times = times[warmup:]
    else:
        make = {"bare vmap": bare_vmap, "bare loop": bare_loop, "higher": with_higher, "torchopt": with_torchopt}
        make["learn2learn"] = with_learn2learn
        step = make[args.impl](cfg, args.ways, data, device)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        for _ in range(args.warmup):
            step()
        times = []
        for _ in range(args.steps):
            start = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    print(json.dumps({"times": times, "peak_mb": peak_mb}))


def applicable(impl: str, setting: str) -> bool:
    if SETTINGS[setting]["algorithm"] == "protonet":
        return impl in ("lightning-meta", "lightning-meta compiled", "bare loop")
    return True


def importable(module: str) -> bool:
    try:
        __import__(module)
    except Exception:  # a peer that fails to import for any reason is simply absent
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tasks", type=int, default=8, help="tasks per meta-batch")
    parser.add_argument("--full", action="store_true", help="the whole grid, not the default sample")
    parser.add_argument("--ways", type=int, nargs="+", help="default: 5 (--full: 5 20)")
    parser.add_argument("--queries", type=int, default=15, help="query examples per class")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (compiled rows: at least 2)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), help="default: FOMAML and ProtoNet")
    parser.add_argument("--impls", nargs="+", choices=IMPLEMENTATIONS, help="default: see the module docstring")
    parser.add_argument(
        "--vmap-chunks",
        type=int,
        nargs="*",
        default=[],
        help="also run 'lightning-meta vmap' with these task_chunk_size values (memory against speed)",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--impl", help=argparse.SUPPRESS)
    parser.add_argument("--setting", help=argparse.SUPPRESS)
    args = parser.parse_args()
    grid = FULL if args.full else SAMPLE
    for key in ("ways", "settings", "impls"):
        if getattr(args, key) is None:
            setattr(args, key, grid[key])
    if args.worker:
        args.ways = args.ways[0]
        worker(args)
        return

    impls = []
    for impl in args.impls:
        if impl in PEER_MODULES and not importable(PEER_MODULES[impl]):
            extra = ' (pip install -e ".[bench]")' if impl in ("higher", "torchopt") else ""
            print(f"skipping {impl}: not importable here{extra}")
        else:
            impls.append(impl)
    impls += [f"lightning-meta vmap chunk={chunk}" for chunk in args.vmap_chunks]
    print(
        f"torch {torch.__version__}, device {args.device}, threads {args.threads}, {args.tasks} tasks/step, "
        f"{args.queries} queries/class, Conv4-64, {args.steps} timed steps x {args.repeats} interleaved repeats"
    )
    results: dict[tuple, dict] = {}
    for _ in range(args.repeats):
        for ways in args.ways:
            for setting in args.settings:
                for impl in impls:
                    if not applicable(impl, setting):
                        continue
                    command = [sys.executable, __file__, "--worker", f"--impl={impl}", "--setting", setting]
                    command += ["--ways", str(ways), "--threads", str(args.threads), "--device", args.device]
                    command += ["--tasks", str(args.tasks), "--queries", str(args.queries)]
                    command += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
                    out = subprocess.run(command, capture_output=True, text=True)
                    key = (ways, setting, impl)
                    entry = results.setdefault(key, {"times": [], "peak_mb": []})
                    if out.returncode != 0:
                        entry["error"] = out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"
                        continue
                    record = json.loads(out.stdout.strip().splitlines()[-1])
                    entry["times"] += record["times"]
                    entry["peak_mb"].append(record["peak_mb"])
    header = f"{'shape':8s} {'setting':24s} {'implementation':28s} {'ms/step':>9s} {'tasks/s':>8s} "
    header += f"{'vs bare vmap':>12s} {'vs bare loop':>12s} {'vs fastest':>10s} {'peak MB':>8s}"
    print(header)
    for ways in args.ways:
        for setting in args.settings:
            medians = {
                impl: statistics.median(results[(ways, setting, impl)]["times"])
                for impl in impls
                if (ways, setting, impl) in results and results[(ways, setting, impl)]["times"]
            }
            fastest = min((medians[ref] for ref in REFERENCES if ref in medians), default=None)
            for impl in impls:
                entry = results.get((ways, setting, impl))
                if entry is None:
                    continue
                shape = f"{ways}w1s"
                if "error" in entry and not entry["times"]:
                    print(f"{shape:8s} {setting:24s} {impl:28s} failed: {entry['error'][:80]}")
                    continue
                median = medians[impl]
                ratio = {
                    ref: (f"{median / medians[ref]:.2f}x" if ref in medians else "-")
                    for ref in ("bare vmap", "bare loop")
                }
                vs_fastest = f"{median / fastest:.2f}x" if fastest is not None else "-"
                print(
                    f"{shape:8s} {setting:24s} {impl:28s} {1000 * median:9.0f} {args.tasks / median:8.1f} "
                    f"{ratio['bare vmap']:>12s} {ratio['bare loop']:>12s} {vs_fastest:>10s} "
                    f"{statistics.median(entry['peak_mb']):8.0f}"
                )
    print(
        "ratios are step-time ratios (lower is faster); 'vs fastest': against the fastest of "
        f"{', '.join(r for r in REFERENCES if r in impls)} in this run; "
        "'bare vmap' uses PlainBatchNorm2d, the loops nn.BatchNorm2d"
    )


if __name__ == "__main__":
    main()
