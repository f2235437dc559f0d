"""SAM 2 / SAM 2.1: our implementation, key- and config-compatible with the official release.

Importing the package registers `sam2` as Hydra's config module, so model configs compose by name
(`configs/sam2.1/sam2.1_hiera_t.yaml`), as in the official package.
"""

from hydra import initialize_config_module
from hydra.core.global_hydra import GlobalHydra

if not GlobalHydra.instance().is_initialized():
    initialize_config_module("sam2", version_base="1.2")
