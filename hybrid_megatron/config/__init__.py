"""Typed run configuration, loaded from YAML and validated before any process group starts.

One `RunConfig` flows through every stage. Each section is a dataclass (`schema`);
`from_dict` rejects unknown keys and wrong types with a message naming the key (`loading`),
and `RunConfig.validate()` checks the cross-field rules (`validation`: divisibility by parallel
sizes, pattern vs pipeline layout, ...).
"""

from hybrid_megatron.config.loading import apply_override, from_dict, load_config, to_dict
from hybrid_megatron.config.schema import (
    AfterTrainingConfig,
    AttentionBackend,
    AttentionTypeConfig,
    CheckpointConfig,
    DataConfig,
    MambaBackend,
    MambaConfig,
    ModelConfig,
    OptimizerConfig,
    ParallelConfig,
    RunConfig,
    SyntheticDataConfig,
    TrainConfig,
)
from hybrid_megatron.config.validation import (
    validate_batch_layout,
    validate_data_source,
    validate_model,
    validate_parallel,
    validate_training,
)

__all__ = [
    "AfterTrainingConfig",
    "AttentionBackend",
    "AttentionTypeConfig",
    "CheckpointConfig",
    "DataConfig",
    "MambaBackend",
    "MambaConfig",
    "ModelConfig",
    "OptimizerConfig",
    "ParallelConfig",
    "RunConfig",
    "SyntheticDataConfig",
    "TrainConfig",
    "apply_override",
    "from_dict",
    "load_config",
    "to_dict",
    "validate_batch_layout",
    "validate_data_source",
    "validate_model",
    "validate_parallel",
    "validate_training",
]
