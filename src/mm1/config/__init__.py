"""Typed configuration for every section of a run, loaded from YAML with dotted overrides.

OmegaConf structured configs do the parsing and type checking (an unknown key or a value of the
wrong type is rejected with the full dotted key); `validate` adds the semantic checks that types
cannot express, each naming its key. Connectors, FFNs and model families are looked up in their
registries (`mm1.registry`), which import the modules that register them on first use; this
package imports nothing of mm1 but the registry.

`schema` holds the dataclasses, `validation` the checks, `loading` reading and writing; every
public name is importable from `mm1.config`.
"""

from mm1.config.loading import (
    EXTENDS_KEY,
    load_config,
    load_eval_config,
    model_config_from_dict,
    to_dict,
    to_yaml,
)
from mm1.config.schema import (
    ACTIVATIONS,
    ATTENTION_BACKENDS,
    BAD_IMAGE_POLICIES,
    DEMO_SELECTIONS,
    FORMAT_KINDS,
    IMAGE_LAYOUTS,
    IMAGE_ROOT_FORMATS,
    INIT_PARTS,
    OVERVIEW_PLACES,
    ROPE_TYPES,
    SOURCE_FORMATS,
    SOURCE_KINDS,
    SOURCE_NAME,
    VISION_VARIANTS,
    Config,
    ConfigError,
    ConnectorConfig,
    DataConfig,
    DecoderConfig,
    EvalConfig,
    FFNConfig,
    ImageLayoutConfig,
    InitConfig,
    ModelConfig,
    OptimConfig,
    RopeScalingConfig,
    SourceConfig,
    TrainConfig,
    VisionConfig,
    source_names,
)
from mm1.config.validation import (
    apply_deprecated_keys,
    deprecated_keys_in_dict,
    has_starting_weights,
    parse_component,
    resolve_components,
    validate,
    validate_eval,
    validate_model,
)

__all__ = [
    "ACTIVATIONS",
    "ATTENTION_BACKENDS",
    "BAD_IMAGE_POLICIES",
    "DEMO_SELECTIONS",
    "EXTENDS_KEY",
    "FORMAT_KINDS",
    "IMAGE_LAYOUTS",
    "IMAGE_ROOT_FORMATS",
    "INIT_PARTS",
    "OVERVIEW_PLACES",
    "ROPE_TYPES",
    "SOURCE_FORMATS",
    "SOURCE_KINDS",
    "SOURCE_NAME",
    "VISION_VARIANTS",
    "Config",
    "ConfigError",
    "ConnectorConfig",
    "DataConfig",
    "DecoderConfig",
    "EvalConfig",
    "FFNConfig",
    "ImageLayoutConfig",
    "InitConfig",
    "ModelConfig",
    "OptimConfig",
    "RopeScalingConfig",
    "SourceConfig",
    "TrainConfig",
    "VisionConfig",
    "apply_deprecated_keys",
    "deprecated_keys_in_dict",
    "has_starting_weights",
    "load_config",
    "load_eval_config",
    "model_config_from_dict",
    "parse_component",
    "resolve_components",
    "source_names",
    "to_dict",
    "to_yaml",
    "validate",
    "validate_eval",
    "validate_model",
]
