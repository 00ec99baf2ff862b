import pytest
import torch
import torch.nn.functional as F

from diffutron.errors import DiffutronError
from diffutron.objective import mdlm_loss
from diffutron.schedules import get_schedule


def reference_loss(model, ids, maskable, noise_mask, t, mask_id, schedule="linear"):
    """The reference computation: full logits over the whole canvas, the formula of section 3."""
    noisy = torch.where(noise_mask, torch.full_like(ids, mask_id), ids)
    logits = model(input_ids=noisy).logits  # [B, L, V]
    ce = F.cross_entropy(logits.transpose(1, 2).float(), ids, reduction="none")  # [B, L]
    w = get_schedule(schedule).weight(t)[:, None]
    per_seq = (w * ce * noise_mask).sum(1) / maskable.sum(1).clamp(min=1)
    return per_seq.sum() / ids.shape[0]


def batch(tokenizer, b=4, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, len(tokenizer), (b, length), generator=g)
    maskable = torch.ones(b, length, dtype=torch.bool)
    maskable[:, :3] = False  # a prompt
    return ids, maskable


@pytest.mark.parametrize("schedule", ["linear", "cosine", "loglinear"])
def test_sparse_loss_equals_full_logits_reference(model, tokenizer, schedule):
    ids, maskable = batch(tokenizer)
    g = torch.Generator().manual_seed(1)
    t = torch.tensor([0.2, 0.5, 0.7, 0.95])
    noise = (torch.rand(ids.shape, generator=g) < t[:, None]) & maskable
    ours = mdlm_loss(model, ids, maskable, mask_token_id=tokenizer.mask_token_id, t=t, noise_mask=noise, schedule=schedule)
    ref = reference_loss(model, ids, maskable, noise, t, tokenizer.mask_token_id, schedule)
    assert ours.item() == pytest.approx(ref.item(), abs=1e-5)


def test_flat_weighting_is_the_masked_lm_mean_of_full_logits(model, tokenizer):
    """weighting="flat": the mean cross-entropy over the batch's masked tokens (BERT's loss through
    transformers' own labels path), times each target's weight; t then only draws the masks."""
    ids, maskable = batch(tokenizer)
    g = torch.Generator().manual_seed(1)
    t = torch.tensor([0.2, 0.5, 0.7, 0.95])
    noise = (torch.rand(ids.shape, generator=g) < t[:, None]) & maskable
    noisy = torch.where(noise, torch.full_like(ids, tokenizer.mask_token_id), ids)
    ref = model(input_ids=noisy, labels=ids.masked_fill(~noise, -100)).loss
    ours = mdlm_loss(model, ids, maskable, mask_token_id=tokenizer.mask_token_id, t=t, noise_mask=noise, weighting="flat")
    assert ours.item() == pytest.approx(ref.item(), abs=1e-5)
    assert ours.item() != pytest.approx(mdlm_loss(model, ids, maskable, mask_token_id=tokenizer.mask_token_id, t=t,
                                                  noise_mask=noise).item(), abs=1e-3)
    w = torch.rand(ids.shape, generator=g)
    logits = model(input_ids=noisy).logits
    ce = F.cross_entropy(logits.transpose(1, 2), ids, reduction="none")
    weighted = mdlm_loss(model, ids, maskable, mask_token_id=tokenizer.mask_token_id, t=t, noise_mask=noise,
                         weighting="flat", target_weight=w)
    assert weighted.item() == pytest.approx(((ce * w)[noise].sum() / noise.sum()).item(), abs=1e-5)
    with pytest.raises(DiffutronError, match="unknown loss weighting 'bert'; choose one of elbo, flat"):
        mdlm_loss(model, ids, maskable, mask_token_id=tokenizer.mask_token_id, t=t, noise_mask=noise, weighting="bert")


def test_prompt_never_masked_and_t_alone_draws_masks(model, tokenizer):
    ids, maskable = batch(tokenizer)
    t = torch.full((4,), 0.999)
    seen = {}

    def hook(mod, args, kwargs):
        seen["ids"] = kwargs["input_ids"].clone()

    h = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        a = mdlm_loss(model, ids, maskable, mask_token_id=tokenizer.mask_token_id, t=t,
                      generator=torch.Generator().manual_seed(5))
        b = mdlm_loss(model, ids, maskable, mask_token_id=tokenizer.mask_token_id, t=t,
                      generator=torch.Generator().manual_seed(5))
    finally:
        h.remove()
    assert a.item() == b.item()
    noisy = seen["ids"]
    assert torch.equal(noisy[:, :3], ids[:, :3])  # prompt untouched
    assert (noisy[:, 3:] == tokenizer.mask_token_id).float().mean() > 0.9


def test_row_without_maskable_counts_in_mean(model, tokenizer):
    ids, maskable = batch(tokenizer, b=2)
    t = torch.tensor([0.5, 0.5])
    noise = torch.zeros_like(maskable)
    noise[0, 5:9] = True
    one = mdlm_loss(model, ids[:1], maskable[:1], mask_token_id=tokenizer.mask_token_id, t=t[:1], noise_mask=noise[:1])
    maskable2 = maskable.clone()
    maskable2[1] = False
    two = mdlm_loss(model, ids, maskable2, mask_token_id=tokenizer.mask_token_id, t=t, noise_mask=noise)
    assert two.item() == pytest.approx(one.item() / 2, rel=1e-6)


def test_nothing_masked_gives_zero_with_gradient_graph(model, tokenizer):
    ids, maskable = batch(tokenizer, b=2)
    loss = mdlm_loss(model, ids, maskable, mask_token_id=tokenizer.mask_token_id, t=torch.tensor([0.5, 0.5]),
                     noise_mask=torch.zeros_like(maskable))
    assert loss.item() == 0.0
    model.zero_grad()
    loss.backward()
    assert model.decoder.weight.grad is not None and model.decoder.weight.grad.abs().sum() == 0
    model.zero_grad()


def test_head_runs_only_on_masked_positions(model, tokenizer):
    ids, maskable = batch(tokenizer)
    noise = torch.zeros_like(maskable)
    noise[0, 4] = noise[2, 7] = noise[3, 10] = True
    rows = []
    h = model.decoder.register_forward_hook(lambda m, i, o: rows.append(i[0].reshape(-1, i[0].shape[-1]).shape[0]))
    try:
        mdlm_loss(model, ids, maskable, mask_token_id=tokenizer.mask_token_id, t=torch.full((4,), 0.5), noise_mask=noise)
    finally:
        h.remove()
    assert rows == [3]


def test_target_weight_scales_terms(model, tokenizer):
    ids, maskable = batch(tokenizer, b=1)
    t = torch.tensor([0.5])
    noise = maskable.clone()
    w = torch.ones(ids.shape)
    base = mdlm_loss(model, ids, maskable, mask_token_id=tokenizer.mask_token_id, t=t, noise_mask=noise)
    half = mdlm_loss(model, ids, maskable, mask_token_id=tokenizer.mask_token_id, t=t, noise_mask=noise, target_weight=w * 0.5)
    assert half.item() == pytest.approx(base.item() / 2, rel=1e-6)


def test_peft_wrapped_model_gives_same_loss(model, tokenizer):
    from peft import LoraConfig, get_peft_model
    import copy

    ids, maskable = batch(tokenizer)
    t = torch.tensor([0.3, 0.4, 0.6, 0.8])
    noise = (torch.rand(ids.shape, generator=torch.Generator().manual_seed(2)) < t[:, None]) & maskable
    plain = mdlm_loss(model, ids, maskable, mask_token_id=tokenizer.mask_token_id, t=t, noise_mask=noise)
    wrapped = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=4, target_modules=["Wqkv", "Wo", "Wi"]))
    lora = mdlm_loss(wrapped, ids, maskable, mask_token_id=tokenizer.mask_token_id, t=t, noise_mask=noise)
    assert lora.item() == pytest.approx(plain.item(), abs=1e-6)  # LoRA B starts at zero
    lora.backward()
    grads = [p.grad for n, p in wrapped.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None for g in grads)
