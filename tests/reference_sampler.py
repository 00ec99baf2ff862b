"""A straightforward implementation of the reference sampler (section 5 of the Diffutron notes).

The oracle for tests and benchmarks: batch 1, temperature 0, full logits over the whole canvas
every step, exactly as the research code computes them.
"""

import math

import torch


@torch.no_grad()
def oracle(model, prompt, *, mask_id, eos_id, steps, gen_length, block_length, repetition_penalty=1.0,
           cfg_scale=0.0, remasking="low_confidence"):
    """Reference semantics (section 5), batch 1, temperature 0: full logits over the whole canvas."""
    x = torch.tensor([list(prompt) + [mask_id] * gen_length])
    prompt_index = (x != mask_id) & (x != eos_id)
    p = len(prompt)
    num_blocks = math.ceil(gen_length / block_length)
    spb = math.ceil(steps / num_blocks)
    nfe = 0
    for nb in range(num_blocks):
        s, e = p + nb * block_length, min(p + (nb + 1) * block_length, p + gen_length)
        left = (x[0, s:e] == mask_id).sum()
        ks = []
        for j in range(spb):
            k = torch.round(left / (spb - j)).long()
            ks.append(int(k))
            left = left - k
        for k in ks:
            if k == 0:
                continue
            mask_index = x == mask_id
            if cfg_scale > 0:
                un = x.clone()
                un[prompt_index] = mask_id
                both = model(input_ids=torch.cat([x, un])).logits
                cond, unc = both[:1], both[1:]
                logits = unc + (cfg_scale + 1) * (cond - unc)
            else:
                logits = model(input_ids=x).logits
            nfe += 1
            if repetition_penalty != 1.0:
                present = x[(x != mask_id) & (x != eos_id)].unique()
                for tok in present.tolist():
                    col = logits[:, :, tok]
                    logits[:, :, tok] = torch.where(col > 0, col / repetition_penalty, col * repetition_penalty)
            x0 = logits.argmax(-1)
            probs = torch.softmax(logits.double(), -1)
            if remasking == "low_confidence":
                x0_p = probs.gather(-1, x0[..., None]).squeeze(-1)
            elif remasking == "margin":
                top2 = probs.topk(2, -1).values
                x0_p = top2[..., 0] - top2[..., 1]
            else:
                x0_p = (probs * probs.clamp_min(1e-300).log()).sum(-1)
            x0_p[:, e:] = -math.inf
            x0 = torch.where(mask_index, x0, x)
            conf = torch.where(mask_index, x0_p, torch.tensor(-math.inf, dtype=x0_p.dtype))
            idx = torch.topk(conf[0], k).indices
            x[0, idx] = x0[0, idx]
    return x[0].tolist(), nfe
