"""Log-likelihoods under a masked diffusion LM: the one estimator everything that scores text uses.

Two public entry points:

- :func:`loglikelihood` scores ``(context, continuation)`` pairs, as lm-eval passes them:
  exact for a one-token continuation, the ELBO (a lower bound on log p) for longer ones.
- :func:`elbo_perplexity` is the held-out perplexity bound of training logs, model cards and
  ``diffutron eval perplexity``: the training objective's weighted masked cross-entropy,
  summed over a data set and divided by its number of maskable tokens.

Both rest on the same bound, in two forms that are equal in expectation (for the linear
schedule): with T answer tokens,

    log p(x) >= E_{k ~ U{1..T}} E_{|S| = k} [ T/k * sum_{i in S} log p(x_i | x with S masked) ]
    log p(x) >= -E_{t ~ U(0,1)} E_{S ~ Bernoulli(t)} [ w(t) * sum_{i in S} CE_i ],  w(t) = 1/t

The first (LLaDA's / dLLM's form, lower variance) scores answers; the second is the objective.
Logits are computed only at masked positions (``backbone.logits_at``).
"""

from .answers import METHODS, Score, encode_pair, loglikelihood, loglikelihood_ids, special_affixes
from .perplexity import PerplexityResult, elbo_perplexity, sequence_noise

__all__ = [
    "METHODS", "PerplexityResult", "Score", "elbo_perplexity", "encode_pair", "loglikelihood", "loglikelihood_ids",
    "sequence_noise", "special_affixes",
]
