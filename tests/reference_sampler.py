"""A straightforward implementation of the reference sampler (section 5 of the Diffutron notes).

The oracle for tests and benchmarks: the authors' generator (dLLM's ``LLaDAGenerator.generate``
as the Diffutron fork runs it), written again in plain torch: full logits over the whole canvas
every step, the rows of a batch in lockstep, the tokens revealed per step from
``get_num_transfer_tokens`` with the linear alpha scheduler (float32 arithmetic, zero steps
dropped), and, at a temperature, float64 Gumbel noise from the global generator.
"""

import math

import torch


def transfer_schedule(masks: int, steps: int) -> list[int]:
    """The reference's ``get_num_transfer_tokens`` for one row (linear scheduler, not stochastic):
    the nonzero counts, as its scheduler computes them (0-dim float32 tensors, ``.item()``, a
    float64 product rounded half to even by ``torch.round``)."""
    left = torch.tensor(masks, dtype=torch.int64)
    out = []
    for t, s in zip(range(steps, 0, -1), range(steps - 1, -1, -1)):
        s, t = s / steps, t / steps
        s32, t32 = torch.as_tensor(s, dtype=torch.float32), torch.as_tensor(t, dtype=torch.float32)
        q = ((1 - (1 - s32)) / (1 - (1 - t32))).item()  # alpha(x) = 1 - x, all float32
        k = torch.minimum(torch.round(left.to(torch.float64) * (1 - q)).to(torch.int64), left)
        left = left - k
        if int(k) > 0:
            out.append(int(k))
        if int(left) == 0:
            break
    return out


@torch.no_grad()
def oracle_batch(model, prompts, *, mask_id, eos_id, steps, gen_length, block_length, repetition_penalty=1.0,
                 cfg_scale=0.0, remasking="low_confidence", temperature=0.0, seed=None):
    """Reference semantics for a batch: canvas [B, max_prompt + gen_length] filled with EOS after
    each row's masks, attention ``x != eos`` when B > 1, one forward per step for every row.
    ``seed``: ``torch.manual_seed(seed)`` before decoding (the global generator is restored after).
    Returns ``(sequences as lists, forwards)``."""
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        return _decode(model, prompts, mask_id=mask_id, eos_id=eos_id, steps=steps, gen_length=gen_length,
                       block_length=block_length, repetition_penalty=repetition_penalty, cfg_scale=cfg_scale,
                       remasking=remasking, temperature=temperature)


def oracle(model, prompt, **kw):
    """``oracle_batch`` for one prompt: ``(tokens, forwards)``."""
    seqs, nfe = oracle_batch(model, [prompt], **kw)
    return seqs[0], nfe


def _decode(model, prompts, *, mask_id, eos_id, steps, gen_length, block_length, repetition_penalty, cfg_scale,
            remasking, temperature):
    lens = [len(p) for p in prompts]
    b, width = len(prompts), max(lens) + gen_length
    x = torch.full((b, width), eos_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        x[i, : lens[i]] = torch.tensor(p)
        x[i, lens[i] : lens[i] + gen_length] = mask_id
    attention = (x != eos_id).long() if b > 1 else None
    prompt_index = (x != mask_id) & (x != eos_id)
    num_blocks = math.ceil(gen_length / block_length)
    spb = math.ceil(steps / num_blocks)
    nfe = 0
    for nb in range(num_blocks):
        plans = []
        for i in range(b):
            s, e = lens[i] + nb * block_length, min(lens[i] + (nb + 1) * block_length, lens[i] + gen_length)
            plans.append(transfer_schedule(int((x[i, s:e] == mask_id).sum()), spb))
        for j in range(max(len(p) for p in plans)):
            if not (x == mask_id).any():
                break
            mask_index = x == mask_id
            if cfg_scale > 0:
                un = x.clone()
                un[prompt_index] = mask_id
                both = model(input_ids=torch.cat([x, un]),
                             attention_mask=None if attention is None else torch.cat([attention, attention])).logits
                cond, unc = both.chunk(2)
                logits = unc + (cfg_scale + 1) * (cond - unc)
            else:
                logits = model(input_ids=x, attention_mask=attention).logits
            nfe += 1
            if repetition_penalty != 1.0:
                for i in range(b):
                    present = x[i][(x[i] != mask_id) & (x[i] != eos_id)].unique()
                    for tok in present.tolist():
                        col = logits[i, :, tok]
                        logits[i, :, tok] = torch.where(col > 0, col / repetition_penalty, col * repetition_penalty)
            if temperature > 0:  # the reference's add_gumbel_noise, float64, from the global generator
                noisy = logits.to(torch.float64)
                u = torch.rand_like(noisy, dtype=torch.float64)
                x0 = (noisy.exp() / (-torch.log(u)) ** temperature).argmax(-1)
            else:
                x0 = logits.argmax(-1)
            probs = torch.softmax(logits.double(), -1)
            if remasking == "low_confidence":
                x0_p = probs.gather(-1, x0[..., None]).squeeze(-1)
            elif remasking == "random":
                x0_p = torch.rand((b, width)).double()
            elif remasking == "margin":
                top2 = probs.topk(2, -1).values
                x0_p = top2[..., 0] - top2[..., 1]
            else:
                x0_p = (probs * probs.clamp_min(1e-300).log()).sum(-1)
            for i in range(b):
                x0_p[i, lens[i] + (nb + 1) * block_length :] = -math.inf
            x0 = torch.where(mask_index, x0, x)
            conf = torch.where(mask_index, x0_p, torch.tensor(-math.inf, dtype=x0_p.dtype))
            for i in range(b):
                k = min(plans[i][j] if j < len(plans[i]) else 0, int((x[i] == mask_id).sum()))
                if k > 0:
                    idx = torch.topk(conf[i], k).indices
                    x[i, idx] = x0[i, idx]
    return x.tolist(), nfe
