"""loravl.lora: a user's target names resolve against the model in hand, old and new transformers names alike."""
import pytest
from torch import nn

from loravl.lora import resolve_target_modules


class OldStyleAttention(nn.Module):
    """The layer names transformers <= 5.17 gives DINOv2's attention."""

    def __init__(self):
        super().__init__()
        self.query, self.key, self.value, self.dense = (nn.Linear(4, 4) for _ in range(4))


class NewStyleAttention(nn.Module):
    """The layer names transformers >= 5.23 gives it."""

    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(4, 4) for _ in range(4))


@pytest.mark.parametrize("requested", [["query", "value"], ["q_proj", "v_proj"]])
def test_target_module_aliases_resolve_both_ways(requested):
    assert resolve_target_modules(OldStyleAttention(), requested) == ["query", "value"]
    assert resolve_target_modules(NewStyleAttention(), requested) == ["q_proj", "v_proj"]
