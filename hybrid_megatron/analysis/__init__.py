"""Mechanism analysis of hybrid LMs (one module per analysis; `hybrid-megatron analyze`).

- `attention_probe`: attention weights of chosen query positions from any attention layer
  (cached prefill with the fast kernel, eager attention only for the probed queries);
- `retrieval_heads`: the attention-mass and copy-paste retrieval scores per head;
- `trace`: retrieval scores, attention entropy and Q/K weight distance over checkpoints;
- `capping`: receptive-field capping of attention / Mamba layers at inference;
- `grad_distance`, `probe`: gradient influence by distance and linear probes per layer;
- `monitor`: the in-training retrieval-score monitor.
"""
