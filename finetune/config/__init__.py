"""The config stage: what a run is, as one validated object.

Owns the schema (`schema.py`: every key, its default, its help text and checks), the names a
config may use (`vocabulary.py`), reading YAML plus command-line overrides (`load.py`), what we
know of Axolotl's keys (`axolotl.py`) and the README's generated reference (`reference.py`).

May import: finetune.errors and third-party libraries. Nothing in finetune imports "up" into
config: every other stage imports it.
"""

from finetune.config.load import LoadedConfig, load_config, render_config
from finetune.config.schema import DatasetConfig, DatasetFormat, FinetuneConfig

__all__ = [
    "DatasetConfig",
    "DatasetFormat",
    "FinetuneConfig",
    "LoadedConfig",
    "load_config",
    "render_config",
]
