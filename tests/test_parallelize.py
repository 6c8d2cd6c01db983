"""What is applied to the model from outside for training changes no number: torch.compile (no graph breaks)."""

import torch
from test_model import tiny  # noqa: E402

from tinygemma import Gemma3


def test_compiled_model_agrees_without_graph_breaks():
    torch.manual_seed(0)
    model = Gemma3(tiny())
    x = torch.randint(0, 500, (2, 48))  # longer than the window: the sliding mask is in the graph
    eager_loss = model(x[:, :-1], x[:, 1:])
    eager_loss.backward()
    eager_grad = model.layers[0].self_attn.q_proj.weight.grad.clone()
    model.zero_grad()
    # fullgraph=True fails on any graph break; aot_eager traces forward and backward like inductor does,
    # without its minutes of C++ code generation on a CPU.
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    loss = compiled(x[:, :-1], x[:, 1:])
    loss.backward()
    assert abs(loss.item() - eager_loss.item()) < 1e-5
    assert torch.allclose(model.layers[0].self_attn.q_proj.weight.grad, eager_grad, atol=1e-6)
