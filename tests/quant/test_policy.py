"""Which tensors are quantized (docs/algorithms.md §1): rank / linear policies and module_linear_keys."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from tvq_lightning.errors import QuantConfigError
from tvq_lightning.quant.policy import is_quantized, list_policies, module_linear_keys

F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64


def test_list_policies():
    assert {"rank", "linear", "none"} <= set(list_policies())
    assert list_policies() == sorted(list_policies())


@pytest.mark.parametrize("dtype", [F32, F16, BF16, F64])
def test_rank_policy_floating(dtype):
    assert is_quantized("a.weight", (4, 5), dtype)  # rank is the default policy
    assert is_quantized("a.weight", (4, 5), dtype, "rank")
    assert is_quantized("conv.weight", (8, 3, 3, 3), dtype, "rank")
    assert is_quantized("visual.proj", (768, 512), dtype, "rank")
    assert is_quantized("positional_embedding", (50, 768), dtype, "rank")
    assert not is_quantized("a.bias", (5,), dtype, "rank")
    assert not is_quantized("logit_scale", (), dtype, "rank")
    assert not is_quantized("class_embedding", (768,), dtype, "rank")


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_rank_policy_integer_never(dtype):
    for policy in ("rank", "linear", "none"):
        assert not is_quantized("bn.num_batches_tracked", (), dtype, policy)
        assert not is_quantized("idx.weight", (4, 5), dtype, policy)
        assert not is_quantized("buf", (2, 3, 4, 5), dtype, policy)


def test_linear_policy():
    assert not is_quantized("visual.proj", (768, 512), F32, "linear")
    assert is_quantized("visual.conv1.weight", (768, 3, 32, 32), F32, "linear")
    assert is_quantized("x.attn.in_proj_weight", (2304, 768), F32, "linear")
    assert is_quantized("visual.transformer.resblocks.0.attn.out_proj.weight", (768, 768), F32, "linear")
    assert is_quantized("visual.transformer.resblocks.0.mlp.c_fc.weight", (3072, 768), F16, "linear")
    assert not is_quantized("visual.positional_embedding", (50, 768), F32, "linear")
    assert not is_quantized("positional_embedding", (50, 768), F32, "linear")
    assert not is_quantized("visual.class_embedding", (768,), F32, "linear")
    assert not is_quantized("visual.ln_post.weight", (768,), F32, "linear")  # rank 1
    assert not is_quantized("x.attn.in_proj_bias", (2304,), F32, "linear")
    assert not is_quantized("x.mlp.c_fc.bias", (3072,), F32, "linear")
    # the parameter's own name decides, not a "weight" substring elsewhere in the key
    assert not is_quantized("weights.proj", (4, 4), F32, "linear")
    # HF names
    assert is_quantized("vision_model.encoder.layers.0.self_attn.q_proj.weight", (768, 768), F32, "linear")
    assert not is_quantized("vision_model.embeddings.position_embedding.weight", (50,), F32, "linear")


def test_none_policy():
    assert not is_quantized("a.weight", (4, 5), F32, "none")
    assert not is_quantized("conv.weight", (8, 3, 3, 3), F32, "none")


@pytest.mark.parametrize("policy", ["RANK", "Linear", "all", "", "fp32"])
def test_unknown_policy(policy):
    with pytest.raises(QuantConfigError):
        is_quantized("a.weight", (4, 5), F32, policy)


def test_shape_can_be_torch_size_or_list():
    assert is_quantized("a.weight", torch.Size([4, 5]), F32)
    assert is_quantized("a.weight", [4, 5], F32)
    assert not is_quantized("a.bias", torch.Size([5]), F32)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln_1 = nn.LayerNorm(16)
        self.attn = nn.MultiheadAttention(16, 2)
        self.ln_2 = nn.LayerNorm(16)
        self.fc = nn.Linear(16, 32)
        self.c_proj = nn.Linear(32, 16, bias=False)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 4, stride=4, bias=False)
        self.embed = nn.Embedding(10, 16)
        self.positional_embedding = nn.Parameter(torch.zeros(5, 16))
        self.proj = nn.Parameter(torch.zeros(16, 8))
        self.block = Block()
        self.bn = nn.BatchNorm2d(16)
        self.xattn = nn.MultiheadAttention(16, 2, kdim=8, vdim=12)  # separate q/k/v projections
        self.head = nn.Linear(8, 3)


EXPECTED = {
    "conv1.weight",
    "block.attn.in_proj_weight",
    "block.attn.out_proj.weight",
    "block.fc.weight",
    "block.c_proj.weight",
    "xattn.q_proj_weight",
    "xattn.k_proj_weight",
    "xattn.v_proj_weight",
    "xattn.out_proj.weight",
    "head.weight",
}


def test_module_linear_keys():
    model = Tiny()
    keys = module_linear_keys(model)
    assert keys == EXPECTED
    assert keys <= set(model.state_dict())
    # no norms, embeddings, biases, raw parameters, buffers
    for k in keys:
        assert not any(s in k for s in ("ln_", "bn", "embed", "bias", "positional", "running"))


def test_module_linear_keys_prefix_and_agreement_with_linear_policy():
    model = Tiny()
    keys = module_linear_keys(model, prefix="visual.")
    assert keys == {"visual." + k for k in EXPECTED}
    # on this model the state-dict-only "linear" policy picks the same tensors, except the
    # embedding table (a 2-D "weight" that is not a Linear/Conv), which the module walk excludes
    sd = model.state_dict()
    by_policy = {k for k, v in sd.items() if is_quantized(k, v.shape, v.dtype, "linear")}
    assert by_policy - set(EXPECTED) == {"embed.weight"}
    assert set(EXPECTED) <= by_policy


def test_module_linear_keys_single_module():
    assert module_linear_keys(nn.Linear(3, 4)) == {"weight"}
    assert module_linear_keys(nn.Linear(3, 4), prefix="fc.") == {"fc.weight"}
    assert module_linear_keys(nn.LayerNorm(4)) == set()
    assert module_linear_keys(nn.Embedding(4, 3)) == set()
    assert module_linear_keys(nn.Sequential(nn.Conv1d(2, 3, 1), nn.ReLU(), nn.ConvTranspose2d(3, 2, 2))) == {
        "0.weight", "2.weight"}
