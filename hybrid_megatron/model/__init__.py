"""The hybrid model on Megatron-Core: typed TransformerConfig, ModuleSpecs, stack and builder."""
