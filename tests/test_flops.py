"""Tests of pycoe.flops (forward FLOPs through torch.utils.flop_counter)."""

import pytest
import torch
import torchvision
from torch import nn

from pycoe.flops import count_flops, flops_per_sample


def test_linear_exact_count():
    # A multiply-add counts 2 FLOPs; the bias addition is not counted by FlopCounterMode.
    layer = nn.Linear(7, 5)
    assert count_flops(layer, torch.randn(3, 7)) == 2 * 3 * 7 * 5
    assert flops_per_sample(layer, torch.randn(3, 7)) == pytest.approx(2 * 7 * 5)


def test_conv_exact_count():
    conv = nn.Conv2d(4, 6, kernel_size=3, padding=1, bias=False)
    # Each output element: 4 * 3 * 3 multiply-adds; 2 * 6 * 8 * 8 output elements per sample, batch 2.
    assert count_flops(conv, torch.randn(2, 4, 8, 8)) == 2 * (2 * 6 * 8 * 8) * (4 * 3 * 3)


def test_resnet18_224_matches_published_figure():
    # torchvision's resnet18 is quoted at 1.81 GFLOPS (multiply-adds) per 224x224 image: 3.63e9 FLOPs here.
    model = torchvision.models.resnet18(weights=None).eval()
    per_image = flops_per_sample(model, torch.randn(1, 3, 224, 224))
    assert per_image == pytest.approx(3.63e9, rel=0.01)


def test_linear_in_batch_size():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    one = count_flops(model, torch.randn(1, 3, 16, 16))
    assert one > 0
    for b in (2, 5):
        assert count_flops(model, torch.randn(b, 3, 16, 16)) == b * one
        assert flops_per_sample(model, torch.randn(b, 3, 16, 16)) == pytest.approx(one)


def test_kwargs_and_several_inputs():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 3)
            self.b = nn.Linear(6, 3)

        def forward(self, x, y=None):
            return self.a(x) + (self.b(y) if y is not None else 0)

    m = Two()
    x, y = torch.randn(2, 4), torch.randn(2, 6)
    assert count_flops(m, x) == 2 * 2 * 4 * 3
    assert count_flops(m, x, y=y) == 2 * 2 * 4 * 3 + 2 * 2 * 6 * 3
    assert flops_per_sample(m, x, y=y) == pytest.approx(4 * 3 * 2 + 6 * 3 * 2)


def test_data_dependent_module_counts_executed_ops():
    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.big = nn.Linear(8, 8)

        def forward(self, x):
            keep = x[:, 0] > 0
            out = x.clone()
            if keep.any():
                out[keep] = self.big(x[keep])
            return out

    x = torch.randn(10, 8)
    n = int((x[:, 0] > 0).sum())
    assert count_flops(Gate(), x) == 2 * n * 8 * 8


def test_mode_and_buffers_restored_no_grad():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5))
    model.train()
    model[2].eval()  # mixed modes must be kept as they were
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = {}

    def hook(module, inputs, output):
        seen["grad_enabled"] = torch.is_grad_enabled()
        seen["training"] = module.training

    model[1].register_forward_hook(hook)
    count_flops(model, torch.randn(8, 4) * 5 + 3)
    assert seen == {"grad_enabled": False, "training": True}  # the module ran in its own (train) mode
    assert model.training and model[1].training and not model[2].training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # running statistics untouched


def test_bad_input():
    with pytest.raises(TypeError, match="module"):
        count_flops(3, torch.randn(2, 2))
    with pytest.raises(TypeError, match="flops_per_sample needs a batch: at least one batch-first tensor"):
        flops_per_sample(nn.Identity(), [1, 2])
    with pytest.raises(TypeError, match="flops_per_sample needs a batch"):
        flops_per_sample(nn.Identity(), torch.tensor(1.0))
    with pytest.raises(ValueError, match="batch size 0"):
        flops_per_sample(nn.Linear(2, 2), torch.randn(0, 2))


def _mha_flops(length, dim):
    # q, k, v and output projections: 4 * L * d^2 multiply-adds; scores and weighted sum: 2 * L^2 * d.
    return 2 * (4 * length * dim**2 + 2 * length**2 * dim)


@pytest.mark.parametrize("training", [False, True])
def test_multihead_attention_counts_its_matrix_products(training):
    length, dim = 9, 16
    mha = nn.MultiheadAttention(dim, num_heads=4, batch_first=True, dropout=0.0).train(training)
    x = torch.randn(2, length, dim)
    assert count_flops(mha, x, x, x) == 2 * _mha_flops(length, dim)


def test_transformer_encoder_counts_attention_and_feedforward():
    length, dim, ff, layers = 7, 16, 32, 2
    layer = nn.TransformerEncoderLayer(dim, nhead=2, dim_feedforward=ff, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(layer, num_layers=layers, enable_nested_tensor=False).eval()
    per_layer = _mha_flops(length, dim) + 2 * 2 * length * dim * ff
    assert count_flops(encoder, torch.randn(1, length, dim)) == layers * per_layer


def test_attention_settings_restored():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    mha = nn.MultiheadAttention(8, num_heads=2, batch_first=True).eval()
    x = torch.randn(1, 3, 8)
    before = torch.backends.mha.get_fastpath_enabled()
    count_flops(mha, x, x, x)
    assert torch.backends.mha.get_fastpath_enabled() is before
    with sdpa_kernel(SDPBackend.MATH):  # an outer user setting survives the count, too
        count_flops(mha, x, x, x)
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        count_flops(mha, x, x, x)
        assert torch.backends.mha.get_fastpath_enabled() is False
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("builder", "weights"),
    [
        (torchvision.models.resnet18, torchvision.models.ResNet18_Weights.IMAGENET1K_V1),
        (torchvision.models.vit_b_16, torchvision.models.ViT_B_16_Weights.IMAGENET1K_V1),
    ],
)
def test_twice_torchvisions_published_multiply_adds(builder, weights):
    # torchvision publishes GFLOPS as multiply-adds ("_ops"); a multiply-add counts 2 FLOPs here.
    model = builder(weights=None).eval()
    published = weights.meta["_ops"] * 1e9
    assert count_flops(model, torch.randn(1, 3, 224, 224)) == pytest.approx(2 * published, rel=2e-3)


# ---------------------------------------------------------------------------------------------- Hugging Face models
def tiny_bert(attn_implementation: str, layers: int = 2, d: int = 16, ffn: int = 32, classes: int = 3):
    import transformers

    config = transformers.BertConfig(
        vocab_size=50,
        hidden_size=d,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=ffn,
        num_labels=classes,
        attn_implementation=attn_implementation,
    )
    return transformers.BertForSequenceClassification(config).eval()


def bert_hand_count(b: int, length: int, layers: int = 2, d: int = 16, ffn: int = 32, classes: int = 3) -> int:
    """Per layer: the Q, K, V and output projections (4 L d^2 multiply-adds a sample), the two attention products
    Q K^T and A V (2 L^2 d), the feed-forward network (2 L d f); then the pooler (d^2) and the classifier (d C).
    2 FLOPs a multiply-add; embedding look-ups, normalisation, softmax and activations are not counted."""
    per_layer = 4 * length * d * d + 2 * length * length * d + 2 * length * d * ffn
    return 2 * b * (layers * per_layer + d * d + d * classes)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_hf_bert_with_keyword_inputs_matches_a_hand_count(attn_implementation):
    model = tiny_bert(attn_implementation)
    ids = torch.randint(1, 50, (3, 10))
    mask = torch.ones(3, 10, dtype=torch.long)
    assert count_flops(model, input_ids=ids, attention_mask=mask) == bert_hand_count(3, 10)
    assert flops_per_sample(model, input_ids=ids, attention_mask=mask) == bert_hand_count(1, 10)


def test_hf_sdpa_attention_is_counted_only_through_the_math_kernel():
    """The reason for count_flops's attention routing: SDPA's fused CPU kernel has no FLOP formula."""
    from torch.utils.flop_counter import FlopCounterMode

    model = tiny_bert("sdpa")
    ids = torch.randint(1, 50, (3, 10))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(input_ids=ids)
    attention = 2 * 3 * 2 * (2 * 10 * 10 * 16)  # two layers of Q K^T and A V
    assert counter.get_total_flops() == bert_hand_count(3, 10) - attention
    assert count_flops(model, input_ids=ids) == bert_hand_count(3, 10)


def test_a_padded_batch_is_counted_at_its_padded_length():
    """Padding tokens are computed like real ones (the mask only hides them from attention), so they are counted."""
    model = tiny_bert("sdpa")
    ids = torch.randint(1, 50, (4, 12))
    padded = (torch.arange(12) < torch.tensor([[3], [12], [7], [1]])).long()
    assert count_flops(model, input_ids=ids * padded, attention_mask=padded) == bert_hand_count(4, 12)
    assert count_flops(model, input_ids=ids[:, :3]) == bert_hand_count(4, 3)


def test_an_eval_coe_of_hf_experts_counts_the_delegator_and_the_kept_samples_expert():
    from _export_models import TEXT_CLASSES, TEXT_K, hf_coe, text_batch

    torch.manual_seed(3)
    model = hf_coe("bert")  # one-layer BERTs of width 16 (FFN 32); the delegator mean-pools its BERT encoder
    batch = text_batch(16, 8, padded=False)
    with torch.no_grad():
        out = model(**batch)
    kept = int((~out.exited).sum())
    assert 0 < kept < 16 and (out.expert_index == 0).any() and (out.expert_index == 1).any()
    layer = 4 * 8 * 16 * 16 + 2 * 8 * 8 * 16 + 2 * 8 * 16 * 32  # multiply-adds of one sample through one layer
    # the delegator on every sample: its layer, BERT's pooler (computed, though the mean is used), both heads
    delegator = 2 * 16 * (layer + 16 * 16 + 16 * TEXT_K + 16 * TEXT_CLASSES)
    experts = bert_hand_count(kept, 8, layers=1)  # each kept sample through exactly one expert
    assert count_flops(model, **batch) == delegator + experts


def test_the_batch_is_the_first_tensor_with_a_batch_dimension():
    """As everywhere in pycoe: a 0-d tensor before the batch (a scale, a temperature) is no batch."""
    lin = nn.Linear(3, 5)
    assert flops_per_sample(lambda scale, x: lin(x) * scale, torch.tensor(2.0), torch.randn(4, 3)) == 2 * 3 * 5
    assert flops_per_sample(lambda x=None: lin(x), x=torch.randn(4, 3)) == 2 * 3 * 5
