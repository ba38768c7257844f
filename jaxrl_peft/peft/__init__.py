"""PEFT methods as parameter trees. `get(name, **hparams)` builds one (DESIGN.md)."""

from jaxrl_peft.peft import adalora, dora, full, ia3, ln_tuning, lora, miss, parts, svd_init, vera  # noqa: F401
from jaxrl_peft.peft.base import ALL_LINEAR, PeftMethod
from jaxrl_peft.peft.registry import get, init_adapter, labels, merge, methods, register, trainable_count

__all__ = ["ALL_LINEAR", "PeftMethod", "get", "init_adapter", "labels", "merge", "methods", "register",
           "trainable_count"]
