"""The toy study (`hybrid-megatron analyze study`): tiny hybrids trained on CPU, evaluated
and analysed over their checkpoints, in one report (`config`, `runner`, `report`)."""
