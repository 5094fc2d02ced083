"""talklora-min: LoRA, MoELoRA and TalkLoRA adapters, the maps between them, and router probes.

See SPEC §1–§4.  Public entry points are re-exported here; ``talklora_min.probes`` holds the probes.
"""
from .layers import (AdapterLayer, LoRALinear, MoELoRALinear, TalkLoRALinear, balance_loss,
                     talk_matrix)
from .inject import (AdapterConfig, InjectionReport, adapter_layers, auxiliary_loss, count_parameters,
                     inject)
# -- io (save/load, official checkpoints)
# -- reparam (SPEC §3 maps)

__version__ = "0.1.0"
