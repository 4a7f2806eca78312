"""Chunked confidence against a naive full-vocabulary fp32 log-softmax."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import t3s_ray.t3s.confidence as confidence
from t3s_ray.t3s import token_confidence, token_logprobs_from_hidden, token_logprobs_from_logits

B, T, V, H = 3, 10, 17, 8


def padded_batch(generator):
    """Three sequences: left-padded, right-padded, unpadded; each a prompt then a response."""
    input_ids = torch.randint(0, V, (B, T), generator=generator)
    attention_mask = torch.ones(B, T, dtype=torch.long)
    target_mask = torch.zeros(B, T, dtype=torch.bool)
    attention_mask[0, :3] = 0  # left padding, prompt 3..4, response 5..9
    target_mask[0, 5:] = True
    attention_mask[1, 7:] = 0  # prompt 0..2, response 3..6, right padding
    target_mask[1, 3:7] = True
    target_mask[2, 4:] = True  # prompt 0..3, response 4..9
    return input_ids, attention_mask, target_mask


def naive_token_logprobs(logits, input_ids, target_mask):
    """Straight from the definition: full fp32 log-softmax, one position at a time."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    expected = torch.zeros(input_ids.shape)
    for b in range(input_ids.shape[0]):
        for t in range(1, input_ids.shape[1]):
            if target_mask[b, t]:
                expected[b, t] = logprobs[b, t - 1, input_ids[b, t]]
    return expected


@pytest.mark.parametrize("chunk_size", [1, 3, T, T + 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_path_matches_naive(chunk_size, dtype):
    generator = torch.Generator().manual_seed(0)
    input_ids, _, target_mask = padded_batch(generator)
    logits = (3 * torch.randn(B, T, V, generator=generator)).to(dtype)

    result = token_logprobs_from_logits(logits, input_ids, target_mask, chunk_size=chunk_size)

    assert result.dtype == torch.float32 and result.shape == (B, T)
    torch.testing.assert_close(result, naive_token_logprobs(logits, input_ids, target_mask), rtol=0, atol=1e-5)
    assert (result[~target_mask] == 0).all()
    assert (result[target_mask] < 0).all()


def test_target_at_position_zero_is_ignored():
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, V, (1, 4), generator=generator)
    logits = torch.randn(1, 4, V, generator=generator)
    target_mask = torch.ones(1, 4, dtype=torch.bool)

    result = token_logprobs_from_logits(logits, input_ids, target_mask)

    assert result[0, 0] == 0
    torch.testing.assert_close(result[:, 1:], naive_token_logprobs(logits, input_ids, target_mask)[:, 1:])


def test_no_targets_gives_zeros_attached_to_graph():
    hidden = torch.randn(B, T, H, requires_grad=True)
    weight = torch.randn(V, H)
    empty = torch.zeros(B, T, dtype=torch.bool)

    result = token_logprobs_from_hidden(hidden, weight, torch.zeros(B, T, dtype=torch.long), empty)

    assert (result == 0).all()
    result.sum().backward()
    assert (hidden.grad == 0).all()


def hidden_inputs(requires_grad):
    generator = torch.Generator().manual_seed(2)
    input_ids, _, target_mask = padded_batch(generator)
    hidden = torch.randn(B, T, H, generator=generator).requires_grad_(requires_grad)
    weight = torch.randn(V, H, generator=generator).requires_grad_(requires_grad)
    bias = torch.randn(V, generator=generator).requires_grad_(requires_grad)
    return input_ids, target_mask, hidden, weight, bias


@pytest.mark.parametrize("chunk_size", [1, 4, 256])
def test_hidden_path_matches_logits_path(chunk_size):
    input_ids, target_mask, hidden, weight, bias = hidden_inputs(requires_grad=False)
    logits = hidden @ weight.T + bias

    from_hidden = token_logprobs_from_hidden(hidden, weight, input_ids, target_mask, chunk_size, lm_head_bias=bias)

    torch.testing.assert_close(
        from_hidden, token_logprobs_from_logits(logits, input_ids, target_mask), rtol=0, atol=1e-5
    )
    torch.testing.assert_close(from_hidden, naive_token_logprobs(logits, input_ids, target_mask), rtol=0, atol=1e-5)


@pytest.mark.parametrize("checkpoint_chunks", [None, True, False])
def test_hidden_path_gradients_match_naive(checkpoint_chunks):
    input_ids, target_mask, hidden, weight, bias = hidden_inputs(requires_grad=True)
    upstream = torch.randn(B, T, generator=torch.Generator().manual_seed(3))

    result = token_logprobs_from_hidden(
        hidden, weight, input_ids, target_mask, 3, lm_head_bias=bias, checkpoint_chunks=checkpoint_chunks
    )
    grads = torch.autograd.grad((result * upstream).sum(), (hidden, weight, bias))
    naive = naive_token_logprobs(hidden @ weight.T + bias, input_ids, target_mask)
    naive_grads = torch.autograd.grad((naive * upstream).sum(), (hidden, weight, bias))

    for grad, naive_grad in zip(grads, naive_grads, strict=True):
        torch.testing.assert_close(grad, naive_grad, rtol=1e-5, atol=1e-5)


def test_checkpointing_defaults_to_grad_mode(monkeypatch):
    calls = []

    def counting_checkpoint(function, *args, **kwargs):
        calls.append(1)
        return torch.utils.checkpoint.checkpoint(function, *args, **kwargs)

    monkeypatch.setattr(confidence, "checkpoint", counting_checkpoint)
    input_ids, target_mask, hidden, weight, _ = hidden_inputs(requires_grad=True)
    n_chunks = -(-int(target_mask[:, 1:].sum()) // 4)

    token_logprobs_from_hidden(hidden, weight, input_ids, target_mask, 4)
    assert len(calls) == n_chunks
    with torch.no_grad():
        token_logprobs_from_hidden(hidden, weight, input_ids, target_mask, 4)
    token_logprobs_from_hidden(hidden.detach(), weight.detach(), input_ids, target_mask, 4)
    assert len(calls) == n_chunks


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out


def test_hidden_path_never_builds_full_logits():
    batch, length, vocab, chunk_size = 2, 64, 500, 8
    input_ids = torch.randint(0, vocab, (batch, length))
    target_mask = torch.ones(batch, length, dtype=torch.bool)
    hidden = torch.randn(batch, length, H, requires_grad=True)
    weight = torch.randn(vocab, H, requires_grad=True)

    with LargestTensor() as mode:
        token_logprobs_from_hidden(hidden, weight, input_ids, target_mask, chunk_size).sum().backward()

    assert mode.largest <= chunk_size * vocab < batch * length * vocab


def tiny_model(architecture, tie_word_embeddings):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_class, model_class = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    }[architecture]
    config = config_class(
        vocab_size=101,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tie_word_embeddings,
    )
    torch.manual_seed(0)
    return model_class(config).eval()


def model_batch(vocab_size):
    generator = torch.Generator().manual_seed(4)
    input_ids = torch.randint(0, vocab_size, (B, T), generator=generator)
    _, attention_mask, target_mask = padded_batch(generator)
    return input_ids, attention_mask, target_mask


@pytest.mark.parametrize(
    "architecture,tie_word_embeddings", [("llama", True), ("llama", False), ("qwen2", True), ("qwen2", False)]
)
def test_token_confidence_matches_model_logits(architecture, tie_word_embeddings):
    model = tiny_model(architecture, tie_word_embeddings)
    input_ids, attention_mask, target_mask = model_batch(model.config.vocab_size)

    with torch.no_grad():
        result = token_confidence(model, input_ids, attention_mask, target_mask, chunk_size=4)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits

    torch.testing.assert_close(result, naive_token_logprobs(logits, input_ids, target_mask), rtol=0, atol=1e-5)


def test_token_confidence_bf16_model_is_fp32_and_close():
    model = tiny_model("llama", True).to(torch.bfloat16)
    input_ids, attention_mask, target_mask = model_batch(model.config.vocab_size)

    with torch.no_grad():
        result = token_confidence(model, input_ids, attention_mask, target_mask)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits

    assert result.dtype == torch.float32
    torch.testing.assert_close(result, naive_token_logprobs(logits, input_ids, target_mask), rtol=0, atol=2e-2)


def test_token_confidence_is_differentiable_for_training():
    model = tiny_model("llama", False).train()
    input_ids, attention_mask, target_mask = model_batch(model.config.vocab_size)

    loss = -token_confidence(model, input_ids, attention_mask, target_mask, chunk_size=4).sum()
    grads = torch.autograd.grad(loss, [model.lm_head.weight, model.model.embed_tokens.weight])
    naive = naive_token_logprobs(
        model(input_ids=input_ids, attention_mask=attention_mask).logits, input_ids, target_mask
    )
    naive_grads = torch.autograd.grad(-naive.sum(), [model.lm_head.weight, model.model.embed_tokens.weight])

    for grad, naive_grad in zip(grads, naive_grads, strict=True):
        torch.testing.assert_close(grad, naive_grad, rtol=1e-4, atol=1e-5)


def test_token_confidence_falls_back_for_softcapped_logits(monkeypatch):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(
        vocab_size=101,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        final_logit_softcapping=2.0,
    )
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(config).eval()
    input_ids, attention_mask, target_mask = model_batch(config.vocab_size)

    def fail(*args, **kwargs):
        raise AssertionError("the lm-head path ignores softcapping")

    monkeypatch.setattr(confidence, "token_logprobs_from_hidden", fail)
    with torch.no_grad():
        result = token_confidence(model, input_ids, attention_mask, target_mask)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits

    torch.testing.assert_close(result, naive_token_logprobs(logits, input_ids, target_mask), rtol=0, atol=1e-5)


# ------------------------------------------------------------------ the fused training loss


@pytest.mark.parametrize("chunk_size", [1, 3, 256])
def test_linear_token_loss_value_and_gradients_match_naive(chunk_size):
    """Σ w·CE from hidden states, its log-probabilities and its gradients (hidden, lm head weight
    and bias, formed in the forward pass) against autograd through the full logits."""
    from t3s_ray.t3s import linear_token_loss

    input_ids, target_mask, hidden, weight, bias = hidden_inputs(requires_grad=True)
    loss_weights = torch.rand(B, T, generator=torch.Generator().manual_seed(5))

    loss, logprobs = linear_token_loss(hidden, weight, input_ids, target_mask, loss_weights, chunk_size,
                                       lm_head_bias=bias)
    grads = torch.autograd.grad(2.5 * loss, (hidden, weight, bias))  # an upstream factor other than 1
    naive = naive_token_logprobs(hidden @ weight.T + bias, input_ids, target_mask)
    naive_loss = -(loss_weights * naive).sum()
    naive_grads = torch.autograd.grad(2.5 * naive_loss, (hidden, weight, bias))

    torch.testing.assert_close(loss, naive_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logprobs, naive.detach(), rtol=0, atol=1e-5)
    assert not logprobs.requires_grad
    for grad, naive_grad in zip(grads, naive_grads, strict=True):
        torch.testing.assert_close(grad, naive_grad, rtol=1e-5, atol=1e-5)


def test_linear_token_loss_keeps_no_vocabulary_sized_tensor_for_backward():
    """Nothing larger than one chunk's logits is formed, and backward forms nothing vocabulary-sized
    at all (no recompute): the largest tensor of backward is the W gradient."""
    from t3s_ray.t3s import linear_token_loss

    batch, length, vocab, chunk_size = 2, 64, 500, 8
    input_ids = torch.randint(0, vocab, (batch, length))
    target_mask = torch.ones(batch, length, dtype=torch.bool)
    hidden = torch.randn(batch, length, H, requires_grad=True)
    weight = torch.randn(vocab, H, requires_grad=True)
    with LargestTensor() as forward:
        loss, _ = linear_token_loss(hidden, weight, input_ids, target_mask, torch.ones(batch, length), chunk_size)
    with LargestTensor() as backward:
        loss.backward()
    assert forward.largest <= chunk_size * vocab < batch * length * vocab
    assert backward.largest == max(vocab * H, batch * length * H)


def test_linear_token_loss_under_bf16_autocast_is_close_to_fp32():
    from t3s_ray.t3s import linear_token_loss

    input_ids, target_mask, hidden, weight, bias = hidden_inputs(requires_grad=True)
    loss_weights = torch.rand(B, T, generator=torch.Generator().manual_seed(6))
    loss32, _ = linear_token_loss(hidden, weight, input_ids, target_mask, loss_weights, 4, lm_head_bias=bias)
    g32 = torch.autograd.grad(loss32, (hidden, weight))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss16, lp16 = linear_token_loss(hidden, weight, input_ids, target_mask, loss_weights, 4, lm_head_bias=bias)
    g16 = torch.autograd.grad(loss16, (hidden, weight))
    assert lp16.dtype == torch.float32 and g16[1].dtype == torch.float32  # fp32 master weight's gradient
    torch.testing.assert_close(loss16, loss32, rtol=3e-2, atol=3e-2)
    for a, b in zip(g16, g32):
        torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("tie_word_embeddings", [True, False])
def test_token_loss_and_confidence_matches_the_differentiable_confidence(tie_word_embeddings):
    from t3s_ray.t3s import token_loss_and_confidence

    model = tiny_model("llama", tie_word_embeddings).train()
    input_ids, attention_mask, target_mask = model_batch(model.config.vocab_size)
    loss_weights = torch.rand(B, T, generator=torch.Generator().manual_seed(7))
    params = [p for p in model.parameters()]

    loss, conf = token_loss_and_confidence(model, input_ids, attention_mask, target_mask, loss_weights, 4)
    grads = torch.autograd.grad(loss, params)
    reference = token_confidence(model, input_ids, attention_mask, target_mask, chunk_size=4)
    ref_loss = -(loss_weights * reference).sum()
    ref_grads = torch.autograd.grad(ref_loss, params)

    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(conf, reference.detach(), rtol=0, atol=1e-5)
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-5)
