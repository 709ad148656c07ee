"""Inner-loop update rules (`lightning_meta.inner_loop.UpdateRule`): how θ_k and the support
gradient give θ_{k+1}. Each is one file, chosen in YAML as a learner's `update_rule`.

- `SGD`: θ − α g with a fixed α (MAML, ANIL, CAVIA).
- `LearnedRates`: θ − α ⊙ g with α learned per parameter entry (Meta-SGD, Li et al. 2017).
- `PerStepRates`: α learned per parameter tensor and per inner step (MAML++'s LSLR, Antoniou et
  al. 2019).
- `LearnedOptimizer`: a coordinate-wise LSTM proposes the step (Andrychowicz et al. 2016).
- `MetaLSTM`: θ is an LSTM's cell state with learned input and forget gates (Ravi & Larochelle 2017).
"""

from lightning_meta.inner_loop import UpdateRule
from lightning_meta.update_rules.learned_optimizer import LearnedOptimizer, preprocess_gradients, truncated_unroll
from lightning_meta.update_rules.metalstm import MetaLSTM
from lightning_meta.update_rules.rates import LearnedRates, PerStepRates, rate_key
from lightning_meta.update_rules.sgd import SGD

__all__ = [
    "SGD",
    "LearnedOptimizer",
    "LearnedRates",
    "MetaLSTM",
    "PerStepRates",
    "UpdateRule",
    "preprocess_gradients",
    "rate_key",
    "truncated_unroll",
]
