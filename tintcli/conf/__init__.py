"""tint's Hydra configs, read as ``pkg://tintcli.conf``.

Hydra imports this package when it reads them, and that registers each method's declared
parameters as the config ``method/declared/<name>`` (made from the method's signature,
``tintcli.methods.register_configs``): composing tint's config from Python needs nothing else

    with hydra.initialize_config_module("tintcli.conf", version_base="1.3"):
        cfg = hydra.compose("merge", overrides=["method=ties"])
"""

from tintcli.methods import register_configs

register_configs()
