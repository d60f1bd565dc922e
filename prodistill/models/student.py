"""The student: the teacher UNet plus LoRA (through peft), optionally with whole modules trainable.

Frozen weights are *shared* with the teacher (the copy reuses the teacher's Parameter objects), so a
student costs only its adapters and the modules it trains — at SVD-XT size that is ~3 GB of bf16 saved.
Trainable tensors are kept in fp32 (Adam at lr 5e-6 does not survive bf16 weights) and meet the bf16 frozen
weights under autocast. LoRA stays unmerged during training (OSV §4); merging happens only at export.
"""

from __future__ import annotations

import copy
import re

import torch
from torch import nn


def build_student(teacher: nn.Module, lora_rank: int, lora_alpha: float | None = None,
                  lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0"),
                  train_modules: tuple[str, ...] = ()) -> nn.Module:
    """Copy `teacher`, add a LoRA adapter of rank `lora_rank` and make it (plus `train_modules`) trainable.

    `train_modules` are regular expressions searched in parameter names (e.g. "temporal_transformer_blocks");
    matching parameters get their own fp32 copy, everything else is shared with the teacher.
    """
    from peft import LoraConfig, inject_adapter_in_model

    patterns = [re.compile(p) for p in train_modules]
    trained = {n for n, _ in teacher.named_parameters() if any(p.search(n) for p in patterns)}
    if train_modules and not trained:
        raise ValueError(f"--train-modules {','.join(train_modules)} matches no parameter of the UNet; "
                         "use a regex that appears in its parameter names, e.g. temporal_transformer_blocks")
    shared = {id(p): p for n, p in teacher.named_parameters() if n not in trained}
    # a compiled region's forward belongs to the teacher's module (and may hold unpicklable compiled code): not
    # copied, then dropped
    memo = dict(shared) | {id(vars(m)["forward"]): None for m in teacher.modules() if "forward" in vars(m)}
    student = copy.deepcopy(teacher, memo=memo)
    for module in student.modules():
        vars(module).pop("forward", None)
    student.requires_grad_(False)
    if lora_rank > 0:
        config = LoraConfig(r=lora_rank, lora_alpha=lora_alpha or lora_rank, init_lora_weights=True,
                            target_modules=list(lora_targets))
        student = inject_adapter_in_model(config, student)
    for name, p in student.named_parameters():
        if "lora_" in name or _base_name(name) in trained:
            p.data = p.data.float()
            p.requires_grad_(True)
    if not any(p.requires_grad for p in student.parameters()):
        raise ValueError("the student has nothing to train: set --lora-rank > 0 or --train-modules")
    return student


def check_targets(cfg, teacher: nn.Module | None = None) -> None:
    """`--train-modules` (regexes of parameter names) and `--lora-targets` (module names, matched as peft does: the
    name or its last parts) as one sentence each: their syntax before any model is built, then, given the built
    `teacher`, that each names something in it — before stage 1 trains rather than when stage 2 builds its
    student (after stage 1 had trained, in a folder that could then not be resumed with the corrected value)."""
    from prodistill.config import csv_items

    for pattern in csv_items(cfg.train_modules):
        try:
            found = re.compile(pattern)
        except re.error as e:
            raise ValueError(f"--train-modules {pattern!r} is not a regular expression ({e})") from None
        if teacher is not None and not any(found.search(n) for n, _ in teacher.named_parameters()):
            raise ValueError(f"--train-modules {pattern} matches no parameter of the UNet; use a regex that appears "
                             "in its parameter names, e.g. temporal_transformer_blocks")
    if teacher is None or cfg.lora_rank == 0 or cfg.method == "decoder":
        return
    modules = [n for n, _ in teacher.named_modules()]
    missing = [t for t in csv_items(cfg.lora_targets) if not any(n == t or n.endswith("." + t) for n in modules)]
    if missing:
        raise ValueError(f"--lora-targets {','.join(missing)}: no module of the UNet is named so; use the last parts "
                         "of its module names, e.g. to_q,to_k,to_v,to_out.0")


def _base_name(name: str) -> str:
    """Parameter name with peft's wrapper segment removed, to match the teacher's names."""
    return name.replace(".base_layer.", ".")


def trainable_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in module.named_parameters() if p.requires_grad}


@torch.no_grad()
def load_trainable(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load the trainable tensors of a student (strict on both sides: a mismatch is a config change)."""
    params = trainable_parameters(module)
    if set(params) != set(state):
        missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        raise ValueError(f"student weights do not match this student ({len(missing)} missing, e.g. {missing[:2]}; "
                         f"{len(extra)} unexpected, e.g. {extra[:2]}): were LoRA rank or --train-modules changed?")
    for k, p in params.items():
        p.copy_(state[k])
