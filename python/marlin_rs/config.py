"""Model configs, as `marlin_pytorch.config`: `register_model_from_yaml(name, path)` makes a
training YAML (the reference's `config/pretrain/*.yaml` layout) loadable by
`Marlin.from_file(name, path)`."""

from ._marlin_rs import model_names, register_model_from_yaml

__all__ = ["register_model_from_yaml", "model_names"]
