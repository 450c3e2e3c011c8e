"""Adapters for Megatron-Core internals (kept in one place)."""
