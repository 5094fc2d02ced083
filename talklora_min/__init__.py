"""talklora-min: LoRA, MoELoRA and TalkLoRA adapters, the maps between them, and router probes.

See docs/method.md §1–§4, §8.  Public entry points are re-exported here; ``talklora_min.probes`` holds the probes,
``talklora_min.hf`` the Hugging Face integration (imports transformers / peft only when used).
"""
from .layers import (AdapterLayer, LoRALinear, MoELoRALinear, TalkLoRALinear, balance_loss,
                     talk_matrix)
from .inject import (AdapterConfig, InjectionReport, adapter_layers, auxiliary_loss, count_parameters, inject,
                     unload)
from .lifecycle import (adapter_config, disable_adapters, merge_and_unload, print_trainable_parameters,
                        trainable_summary)
from .io import (AdapterFormatError, AdapterIntegrityError, load_adapter, load_adapter_weights, read_adapter,
                 save_adapter)
from .official import export_official_state_dict, load_official_state_dict
from .reparam import (absorb_talk, absorbed_router, code_router_from_input, code_router_weight,
                      input_router_from_code, input_router_weight, is_code_representable,
                      moelora_from_identity_talk, non_representable_counterexample,
                      rowspace_residual, talklora_from_moelora)

__version__ = "0.1.0"
