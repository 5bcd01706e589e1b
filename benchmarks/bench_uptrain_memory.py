"""Peak memory of one uptraining step of the hedgehog recipe on SmolLM2-135M at long blocks, with and without
activation checkpointing (issue 16, "long sequences").

For each block length and stage, a fresh process converts the model with the hedgehog recipe's options and runs
`uptrain` for one step of that stage at the recipe's batch size (2 blocks): stage 1 is attention transfer, stage 2
LoRA fine-tuning distilled from the original model's logits. Memory is counted by allocation, not by time or by the
operating system: a `TorchDispatchMode` sees every tensor an operator creates (forward, backward, recomputation,
optimizer) and a weak reference to its storage tells when it is freed; the peak of the live bytes is what the step
needed on top of the two models' weights (which are reported apart). The process's peak resident set (VmHWM, weights
and Python included) is reported beside it. Each process runs under an address-space cap (`--cap-gib`) so that a
configuration that does not fit fails on its own instead of taking the machine's memory from others.

    OMP_NUM_THREADS=1 python benchmarks/bench_uptrain_memory.py                    # 512 1024 2048, both stages
    OMP_NUM_THREADS=1 python benchmarks/bench_uptrain_memory.py --lengths 512 --stages 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

GIB = 2**30


class LiveTensorBytes(TorchDispatchMode):
    """Inside: the bytes of the tensor storages created by operators and still alive (`now`), and their peak.
    Tensors that existed before (weights) are not counted, nor views and in-place results (an input's storage);
    a storage counts once however many tensors view it."""

    def __init__(self):
        super().__init__()
        self.now = 0
        self.peak = 0
        self._live: dict[int, tuple[weakref.ref, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # views and in-place results share an input's storage: nothing new was allocated (a view of a weight, say)
        inputs = {
            t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)
        }
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                if storage.nbytes() and storage.data_ptr() not in inputs:
                    self._track(storage)
        return out

    def _track(self, storage) -> None:
        key = id(storage)
        if key in self._live and self._live[key][0]() is storage:
            return
        nbytes = storage.nbytes()
        self._live[key] = (weakref.ref(storage, lambda _, key=key: self._free(key)), nbytes)
        self.now += nbytes
        self.peak = max(self.peak, self.now)

    def _free(self, key: int) -> None:
        entry = self._live.pop(key, None)
        if entry is not None:
            self.now -= entry[1]


def _vm_hwm_gib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) * 1024 / GIB
    return float("nan")


def measure_one(model_name: str, stage: int, seq_len: int, checkpointing: bool, batch: int | None) -> dict:
    """One step of `stage` (1: attention transfer, 2: LoRA with distillation) of the hedgehog recipe."""
    import dataclasses
    import tempfile

    import datasets

    import hf_fastattn
    from hf_fastattn.conversion import convert
    from hf_fastattn.conversion.recipes import make_plan
    from hf_fastattn.conversion.uptraining import uptrain

    teacher, *_ = hf_fastattn.load_causal_lm(model_name)
    overrides = {"seq_len": seq_len}
    if batch:
        overrides.update(batch=batch, transfer_batch=batch)
    plan = make_plan(recipe="hedgehog", steps=1, transfer_steps=1, overrides=overrides)
    blocks = plan.recipe.transfer_batch if stage == 1 else plan.recipe.batch
    ids = torch.randint(
        0, teacher.config.vocab_size, (blocks, seq_len), generator=torch.Generator().manual_seed(0)
    )
    data = datasets.Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": [[1] * seq_len] * blocks, "labels": ids.tolist()}
    )
    torch.manual_seed(0)
    model = convert(teacher, plan.method, **plan.options)
    weights = sum(p.numel() * p.element_size() for m in (teacher, model) for p in m.parameters())
    with tempfile.TemporaryDirectory() as out:
        cfg = dataclasses.replace(
            plan.uptrain_config(out),
            transfer_steps=1 if stage == 1 else 0,
            finetune_steps=1 if stage == 2 else 0,
            warmup_steps=0,
            logging_steps=1,
            gradient_checkpointing=checkpointing,
        )
        with LiveTensorBytes() as mem:
            uptrain(model, data, cfg, teacher=teacher)
    return {
        "stage": stage,
        "seq_len": seq_len,
        "batch": blocks,
        "checkpointing": checkpointing,
        "peak_step_gib": mem.peak / GIB,
        "weights_gib": weights / GIB,
        "vm_hwm_gib": _vm_hwm_gib(),
    }


def run_child(args, stage: int, seq_len: int, checkpointing: bool) -> dict:
    cmd = [sys.executable, __file__, "--one", str(stage), str(seq_len), str(int(checkpointing))]
    cmd += ["--model", args.model, "--cap-gib", str(args.cap_gib), "--threads", str(args.threads)]
    if args.batch:
        cmd += ["--batch", str(args.batch)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        lines = (proc.stderr + proc.stdout).strip().splitlines()
        errors = [line for line in lines if "Error" in line] or lines[-1:] or ["no output"]
        return {"stage": stage, "seq_len": seq_len, "checkpointing": checkpointing, "error": errors[-1][:200]}
    return json.loads(lines[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2], choices=[1, 2])
    parser.add_argument("--batch", type=int, default=None, help="blocks per step (default: the recipe's)")
    parser.add_argument(
        "--cap-gib", type=float, default=14.0, help="address-space cap of each measuring process"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument(
        "--one", nargs=3, type=int, metavar=("STAGE", "SEQ_LEN", "CHECKPOINTING"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)

    if args.one:
        import resource

        cap = int(args.cap_gib * GIB)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        torch.set_num_threads(args.threads)
        stage, seq_len, checkpointing = args.one
        print(
            json.dumps(measure_one(args.model, stage, seq_len, bool(checkpointing), args.batch)), flush=True
        )
        return 0

    from hf_fastattn.showcase.bench.utils import format_table, machine_line

    rows = []
    for stage in args.stages:
        for seq_len in args.lengths:
            for checkpointing in (True, False):
                row = run_child(args, stage, seq_len, checkpointing)
                print(json.dumps(row), flush=True)
                rows.append(row)
    names = {1: "1: attention transfer", 2: "2: LoRA + distillation"}
    table = []
    for stage in args.stages:
        for seq_len in args.lengths:
            by = {r["checkpointing"]: r for r in rows if r["stage"] == stage and r["seq_len"] == seq_len}
            cells = []
            for ck in (False, True):
                r = by[ck]
                cells += [f"over {args.cap_gib:g} GiB cap" if "error" in r else f"{r['peak_step_gib']:.2f}"]
                cells += ["-" if "error" in r else f"{r['vm_hwm_gib']:.2f}"]
            off, on = by[False], by[True]
            saved = (
                "-"
                if "error" in off or "error" in on
                else f"{off['peak_step_gib'] / on['peak_step_gib']:.2f}x"
            )
            table.append([names[stage], seq_len, *cells, saved])
    header = [
        "stage",
        "tokens",
        "step peak (GiB)",
        "process peak",
        "checkpointed step peak",
        "process peak",
        "saving",
    ]
    print(machine_line())
    print(
        f"{args.model}, hedgehog recipe, batch: the recipe's (2 blocks); step peak = live tensor bytes created by "
        "the step; process peak = VmHWM (weights of both models included)"
    )
    print(format_table(header, table))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
