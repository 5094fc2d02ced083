"""save_adapter refuses a config that does not describe the model (issue 12, item 4)."""
import pytest
import torch
from torch import nn
from talklora_min import AdapterConfig, inject, save_adapter, load_adapter

class Block(nn.Module):
    def __init__(self):
        super().__init__(); self.q_proj = nn.Linear(8, 8); self.v_proj = nn.Linear(8, 8)
class M(nn.Module):
    def __init__(self):
        super().__init__(); self.layers = nn.ModuleList([Block(), Block()])

@pytest.mark.parametrize("field,value,msg", [
    ("rank", 4, "rank is 8 in the model but 4"),
    ("kind", "moelora", "kind is 'talklora'"),
    ("num_experts", 2, "num_experts is 4"),
    ("target_modules", ("q_proj",), "target_modules"),
    ("share_B_across_layers", False, "share_B_across_layers is True"),
])
def test_save_adapter_refuses_a_config_that_does_not_describe_the_model(tmp_path, field, value, msg):
    cfg = AdapterConfig(kind="talklora", rank=8, num_experts=4, target_modules=("q_proj", "v_proj"),
                        share_B_across_layers=True)
    torch.manual_seed(0); model = M(); inject(model, cfg)
    other = AdapterConfig(**{**cfg.to_dict(), field: value}) if field != "kind" else AdapterConfig(
        **{**cfg.to_dict(), "kind": "moelora"})
    with pytest.raises(ValueError, match=msg):
        save_adapter(model, tmp_path / "a", other)
    assert not (tmp_path / "a").exists()
    save_adapter(model, tmp_path / "a", cfg)
    torch.manual_seed(0); fresh = M(); load_adapter(fresh, tmp_path / "a")
    with torch.no_grad():      # B = 0 at init: give it values so the round trip is not trivially equal
        model.layers[0].q_proj.B.normal_()
    save_adapter(model, tmp_path / "a", cfg)
    load_adapter(fresh := M(), tmp_path / "a")
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert n1 == n2
        assert ".base." in n1 or torch.equal(p1, p2), n1

def test_share_B_config_on_untied_model_is_refused(tmp_path):
    cfg = AdapterConfig(kind="talklora", rank=8, num_experts=4, target_modules=("q_proj",))
    model = M(); inject(model, cfg)
    with pytest.raises(ValueError, match="B is not tied"):
        save_adapter(model, tmp_path / "a", AdapterConfig(**{**cfg.to_dict(), "share_B_across_layers": True}))
