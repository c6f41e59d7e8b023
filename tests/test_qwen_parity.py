"""Qwen2/Qwen3 Cells against transformers (the reference), fp32, graph mode on CPU.

Tolerances, each within ~10x of the error measured here (transformers 5.24, torch 2.13, mindspore 2.10, CPU):
logits max|Δ| <= 2e-6 * max|logit| on non-padding positions (measured 2.8e-7); loss within 3e-6 relative
(measured 3.9e-7); each parameter's gradient max|Δ| <= 1e-5 * max|reference gradient| (measured 1.3e-6).

On CPU the layers use memory-saving forms (operands expanded before elementwise ops, the softmax gradient written
out, LogSoftmax's kernel in the loss: ``layers.broadcast_explicitly``); "qwen2_cluster_forms" builds the same model
with the forms a cluster's graph uses, so both are held to the reference.
"""
import mindspore as ms
import numpy as np
import pytest

from mindspore_llm import AutoModelForCausalLM
from mindspore_llm.models import layers
from tests import reference

BATCH, SEQ = 3, 12
LEFT_PAD = (0, 4, 7)

CASES = {
    # Qwen2: q/k/v bias, untied head, default rope.
    "qwen2": lambda d: reference.qwen2(d),
    "qwen2_cluster_forms": lambda d: reference.qwen2(d),
    # Qwen3: q/k RMSNorm, head_dim 24 != 64/4, tied embeddings, linear rope scaling.
    "qwen3_linear": lambda d: reference.qwen3(d, rope_scaling={"rope_type": "linear", "factor": 2.0}),
    # yarn, as long-context Qwen2.5 checkpoints configure it.
    "qwen2_yarn": lambda d: reference.qwen2(d, rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                             "original_max_position_embeddings": 64}),
    # dynamic NTK: max_position_embeddings below the batch length, so the base actually grows.
    "qwen3_dynamic": lambda d: reference.qwen3(d, max_position_embeddings=8,
                                               rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
}


def ms_logits_loss_grads(model, input_ids, mask, labels):
    ids, attn, lab = (ms.Tensor(a, ms.int32) for a in (input_ids, mask, labels))
    logits = model(ids, attn).asnumpy()
    params = model.trainable_params()

    def loss_fn(ids, lab, attn):
        return model.loss(ids, lab, attn)

    loss, grads = ms.value_and_grad(loss_fn, None, params)(ids, lab, attn)
    return logits, float(loss.asnumpy()), {p.name: g.asnumpy() for p, g in zip(params, grads)}


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, module_dir):
    directory = module_dir / request.param
    hf_model = CASES[request.param](directory)
    with pytest.MonkeyPatch.context() as patch:
        if request.param.endswith("_cluster_forms"):
            patch.setattr(layers, "broadcast_explicitly", lambda: False)
        model = AutoModelForCausalLM.from_pretrained(directory)
    batch = reference.random_batch(hf_model.config.vocab_size, BATCH, SEQ, seed=1, left_pad=LEFT_PAD)
    return reference.torch_logits_loss_grads(hf_model, *batch), ms_logits_loss_grads(model, *batch), batch


def test_logits_match_reference(pair):
    (ref_logits, _, _), (logits, _, _), (_, mask, _) = pair
    valid = mask.astype(bool)
    error = np.abs(logits - ref_logits)[valid].max()
    assert error <= 2e-6 * np.abs(ref_logits[valid]).max(), error


def test_loss_matches_reference(pair):
    (_, ref_loss, _), (_, loss, _), _ = pair
    assert loss == pytest.approx(ref_loss, rel=3e-6)


def test_every_gradient_matches_autograd(pair):
    (_, _, ref_grads), (_, _, grads), _ = pair
    assert sorted(grads) == sorted(ref_grads)
    for name, ref in ref_grads.items():
        error = np.abs(grads[name] - ref).max()
        assert error <= 1e-5 * np.abs(ref).max(), (name, error, np.abs(ref).max())
