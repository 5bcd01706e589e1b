"""Worker of `test_distributed_uptrain.py`: uptrain a tiny Llama with two recipes and save the weights (rank 0).

    python distributed_uptrain_worker.py OUT [--checkpointing] [--save-steps]          # one process
    python -m torch.distributed.run --nproc_per_node 2 distributed_uptrain_worker.py OUT  # two (gloo on CPU)
    accelerate launch --config_file examples/accelerate/fsdp_8gpu.yaml --num_processes 2 --mixed_precision no \
        distributed_uptrain_worker.py OUT --fsdp-on-cpu                                 # FSDP (see the test)

Recipes: "attention-lora" (Hedgehog hybrid: attention transfer, then LoRA distilled from the original's logits) and
"layer-full" (T2R: layer transfer with the attention-score loss, then full fine-tuning distilled from the logits and
hidden states). The global batch is 4 blocks whatever the number of processes (`UptrainConfig.batch_size`). Rank 0
saves each trained model's weights (`NAME.pt`) and `save_pretrained`s it (`NAME-saved/`). With `--save-steps` the
Trainer also checkpoints each stage at its last step (`OUT/trainer/NAME/STAGE/checkpoint-STEPS`).
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from conftest import tiny_model  # noqa: E402

import hf_fastattn  # noqa: E402,F401
from hf_fastattn.conversion import convert  # noqa: E402
from hf_fastattn.conversion.distill import UptrainConfig, attention_transfer_loss, uptrain  # noqa: E402

N, BLOCKS, STEPS = 32, 24, 3
RECIPES = {
    "attention-lora": (
        "hedgehog",
        {"hybrid": True, "window": 8},
        dict(transfer_mode="attention", finetune="lora", distill_weight=1.0, finetune_lr=1e-2),
    ),
    "layer-full": (
        "t2r",
        {"feature_dim": 16},
        dict(
            transfer_mode="layer",
            transfer_score_weight=1.0,
            finetune="full",
            distill_weight=1.0,
            distill_hidden_weight=1.0,
            finetune_lr=1e-3,
        ),
    ),
}


def dataset():
    import datasets

    ids = torch.randint(3, 300, (BLOCKS, N), generator=torch.Generator().manual_seed(1))
    return datasets.Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": [[1] * N] * BLOCKS, "labels": ids.tolist()}
    )


def _record_wrapping(seen: list[str]) -> None:
    """Note the class the Trainer wrapped the model in (DDP, FSDP or none) at the end of each `train()`."""
    from transformers import Trainer

    train = Trainer.train

    def recorded(self, *args, **kwargs):
        out = train(self, *args, **kwargs)
        seen.append(type(self.model_wrapped).__name__)
        return out

    Trainer.train = recorded


def _fsdp_on_cpu() -> None:
    """Make accelerate shard with FSDP on CPU: it resolves an FSDP request (`ACCELERATE_USE_FSDP=true` and the
    `FSDP_*` variables, what `accelerate launch` sets from an FSDP config) to MULTI_CPU on a machine without GPUs and
    keeps the model whole. After its state is set up this turns that back into FSDP with the plugin accelerate built
    from the request, the one change: accelerate's own FSDP2 preparation (`fully_shard` of each decoder layer and of
    the model, gloo collectives) then runs, as it does on GPUs."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    init = AcceleratorState.__init__

    def fsdp_init(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    AcceleratorState.__init__ = fsdp_init


def main() -> None:
    out = sys.argv[1]
    if "--fsdp-on-cpu" in sys.argv:
        _fsdp_on_cpu()
    checkpointing = "--checkpointing" in sys.argv
    save_steps = STEPS if "--save-steps" in sys.argv else 0
    only = sys.argv[sys.argv.index("--only") + 1] if "--only" in sys.argv else None
    wrapped: list[str] = []
    _record_wrapping(wrapped)
    torch.set_num_threads(1)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    data = dataset()
    result = {"world_size": world, "losses": {}, "trained": {}}
    for name, (method, options, stages) in RECIPES.items():
        if only and name != only:
            continue
        teacher = tiny_model("llama", initializer_range=0.2)
        torch.manual_seed(0)  # t2r's maps start random: the same on every process and in every run
        model = convert(teacher, method, **options)
        cfg = UptrainConfig(
            transfer_steps=STEPS,
            finetune_steps=STEPS,
            batch_size=4,
            output_dir=os.path.join(out, "trainer", name),
            logging_steps=1,
            gradient_checkpointing=checkpointing,
            save_steps=save_steps,
            **stages,
        )
        model = uptrain(model, data, cfg, teacher=teacher)
        if rank == 0:
            state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            torch.save(state, os.path.join(out, f"{name}.pt"))
            model.save_pretrained(os.path.join(out, f"{name}-saved"))
            result.setdefault("returned", {})[name] = type(model).__name__
            batch = {"input_ids": torch.tensor(data[:4]["input_ids"])}
            with torch.no_grad():
                lm = model(**batch, labels=batch["input_ids"]).loss.item()
                transfer = attention_transfer_loss(model, batch).item() if method == "hedgehog" else None
            result["losses"][name] = {"lm": lm, "transfer": transfer}
            original = teacher.state_dict()
            result["trained"][name] = max((state[k] - original[k]).abs().max().item() for k in original)
    if rank == 0:
        from accelerate.state import AcceleratorState

        result["distributed_type"] = str(AcceleratorState().distributed_type).split(".")[-1]
        result["wrapped"] = sorted(set(wrapped))[0] if len(set(wrapped)) == 1 else sorted(set(wrapped))
        with open(os.path.join(out, "result.json"), "w") as f:
            json.dump(result, f, indent=1)
    # tear the gloo group down before the interpreter exits: left to exit, a process can abort ("terminate called
    # without an active exception", SIGABRT), seen once in the full suite
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
