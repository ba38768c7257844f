"""The training core: one loop, one optimizer builder, one step for every task (DESIGN.md)."""
