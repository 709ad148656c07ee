"""MeTAL (Baik et al., ICCV 2021, "Meta-Learning with Task-Adaptive Loss Function for Few-Shot
Learning"): a task-adaptive inner loss for MAML-style learners (issue 15, point 3).

Per inner step k the loss the inner loop descends is

    L_k(θ) = CE(f_θ(x_s), y_s) + mean_i ℓ^s_k(u_i) + mean_j ℓ^q_k(v_j)

- τ = [CE(f_θ(x_s), y_s), mean(θ_1), ..., mean(θ_L)]: the task state, the support loss and the
  layer-wise means of the parameters being adapted (one entry per adapted tensor);
- u_i = [τ, f_θ(x_s)_i, onehot(y_s)_i] for each support example (labelled term);
- v_j = [mean(θ_1), ..., mean(θ_L), f_θ(x_q)_j, Σ_c p_jc log p_jc] for each query *input*
  (unlabelled term: logits and negative entropy, never a query label);
- each of u and v is standardised over its whole matrix ((z − mean) / (std + 1e-12)), as the
  reference code does;
- ℓ^s_k, ℓ^q_k: per-step two-layer loss networks (d → d, ReLU, d → 1, d the input width);
- their weights are modulated per task by affine parameters that per-step generators produce
  from the task: for every weight tensor W of a loss network,
  W' = (1 + a_W · g^mult_W) W + b_W · g^off_W, where (g^mult, g^off) is a two-layer network's
  output (d → d, ReLU, d → 2 per tensor) on the standardised τ (support) or on the mean over
  query examples of the standardised v (query), and the scales a_W, b_W are initialised at zero:
  the modulation starts as the identity (W' = W exactly) whatever the generators output.

What this follows: the authors' reference code (github.com/baiksung/MeTAL,
`few_shot_learning_system.py`, `MetaLossNetwork`, `LossAdapter`): the task-state entries, the
standardisation, the per-step networks and generators, the zero-initialised multiplier and offset
scales (the code's `multiplier_bias`, `offset_bias`: zeros that multiply the generated values,
so the generators themselves start at PyTorch's default initialisation), and the inner loss as
the code computes it: plain cross-entropy + support term + query term.

What differs from the paper and its code:

- `start_as_task_loss=True` (the default) zero-initialises the loss networks' output weights, so
  at initialisation the learned terms are exactly 0 and the inner loss *is* the task's
  cross-entropy: MeTAL starts as plain MAML, bit for bit. The reference code initialises them at
  random (PyTorch's default), so its loss starts as CE plus two random terms; with
  `start_as_task_loss=False` this does the same. Zero-initialised, only the output weights (and
  their offset scale) receive a meta-gradient on the first outer step; everything else follows.
- The loss networks' output layer has no bias: a constant added to the inner loss has no
  gradient in θ, so it could never be meta-trained (and would be an unused parameter under DDP).
- Steps past `steps` (a learner that adapts longer at evaluation, e.g. MAML's
  `eval_inner_steps`) reuse the last step's networks; the reference code trains and evaluates
  with the same number of steps.
- The task state takes the means of every tensor the learner adapts (for MAML: all of the
  backbone's, BatchNorm's affine parameters included); the reference code leaves its
  BatchNorm parameters out of the inner loop and so out of the state.
- The support and query inputs go through the network in two passes, not one: with BatchNorm
  on batch statistics the support logits (and so the cross-entropy) are the plain task loss's.
- Without query inputs (`adapt_to(support_x, support_y)`, which adapts before any query
  exists, and so `predict_step`) the unlabelled term is left out: such predictions are MeTAL
  without its transductive term, while validation and test (which hand the inner loop the
  query inputs) use it. Evaluate through the Trainer to get the paper's method.
- Second order only, as the paper: its networks are meta-trained through the inner gradient,
  which first-order MAML detaches (they would then get no meta-gradient and stay at their
  initialisation: with `start_as_task_loss=True`, plain first-order MAML).
- Classification only (the one-hot label and the entropy are class quantities), as the paper.

Torch only (`DESIGN.md`). Pure tensor code per task: proven equal under `torch.func.vmap` and
the loop (`tests/test_metal.py`), so it does not block the task-parallel path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_meta.losses.inner import InnerLoss, Predict
from lightning_meta.task import Params, Task

__all__ = ["MeTALLoss"]

EPS = 1e-12
"""Added to the standard deviation when standardising a state (as the reference code)."""


def _standardise(z: Tensor) -> Tensor:
    return (z - z.mean()) / (z.std() + EPS)


class _ModulatedLossNetwork(nn.Module):
    """One step's loss network (d → d, ReLU, d → 1, no output bias) and its weight generator.

    `forward(z, task_embedding)` returns the loss network's output per row of `z`, computed with
    weights W' = (1 + a · g^mult) W + b · g^off generated from `task_embedding`.
    """

    def __init__(self, width: int, embedding: int, zero_output: bool) -> None:
        super().__init__()
        self.hidden = nn.Linear(width, width)
        self.output = nn.Linear(width, 1, bias=False)
        if zero_output:
            nn.init.zeros_(self.output.weight)
        tensors = 3  # hidden.weight, hidden.bias, output.weight
        self.generator = nn.Sequential(nn.Linear(embedding, embedding), nn.ReLU(), nn.Linear(embedding, 2 * tensors))
        self.multiplier_scale = nn.Parameter(torch.zeros(tensors))
        self.offset_scale = nn.Parameter(torch.zeros(tensors))

    def modulated_weights(self, task_embedding: Tensor) -> list[Tensor]:
        """The three weight tensors after the per-task affine modulation."""
        multiplier, offset = self.generator(task_embedding).chunk(2, dim=-1)
        base = [self.hidden.weight, self.hidden.bias, self.output.weight]
        return [
            (1 + self.multiplier_scale[i] * multiplier[i]) * w + self.offset_scale[i] * offset[i]
            for i, w in enumerate(base)
        ]

    def forward(self, z: Tensor, task_embedding: Tensor) -> Tensor:
        w1, b1, w2 = self.modulated_weights(task_embedding)
        return F.linear(F.relu(F.linear(z, w1, b1)), w2).squeeze(-1)


class MeTALLoss(InnerLoss):
    """MeTAL's task-adaptive inner loss: cross-entropy + a learned support term + a learned
    unlabelled query term, both modulated per task (module docstring: what it follows and what
    differs from the paper).

    Args:
        ways: the number of classes (the size of a prediction).
        parameter_tensors: how many tensors the learner adapts (the task state has one mean per
            tensor): 18 for MAML on `Conv4` (4 blocks of conv and BatchNorm weight and bias, and
            the head). A wrong count is refused at the first call, naming the right one.
        steps: inner steps with their own networks (the learner's training `inner_steps`); later
            steps reuse the last one's.
        start_as_task_loss: zero-initialise the loss networks' output weights so that the inner
            loss starts as exactly the cross-entropy (plain MAML); False: PyTorch's default
            initialisation, as the reference code.
    """

    def __init__(self, ways: int, parameter_tensors: int, steps: int = 1, start_as_task_loss: bool = True) -> None:
        super().__init__()
        if ways < 2 or parameter_tensors < 1 or steps < 1:
            raise ValueError(
                f"MeTALLoss needs ways >= 2, parameter_tensors >= 1 and steps >= 1, got ways={ways}, "
                f"parameter_tensors={parameter_tensors}, steps={steps}"
            )
        self.ways, self.parameter_tensors, self.steps = ways, parameter_tensors, steps
        state = parameter_tensors + 1
        support_width = state + 2 * ways
        query_width = parameter_tensors + ways + 1
        self.support = nn.ModuleList(
            _ModulatedLossNetwork(support_width, state, start_as_task_loss) for _ in range(steps)
        )
        self.query = nn.ModuleList(
            _ModulatedLossNetwork(query_width, query_width, start_as_task_loss) for _ in range(steps)
        )

    def forward(self, params: Params, task: Task, predict: Predict, step: int) -> Tensor:
        labels = task.support_y
        if torch.is_floating_point(labels):
            raise ValueError("MeTALLoss is a classification loss (one-hot labels, entropy): these tasks are regression")
        if len(params) != self.parameter_tensors:
            raise ValueError(
                f"MeTALLoss was built for {self.parameter_tensors} adapted tensors but the learner adapts "
                f"{len(params)}: set its `parameter_tensors` to {len(params)}"
            )
        k = min(step, self.steps - 1)
        n_support = task.support_x.shape[0]
        # Support and query inputs in two passes (the reference code runs one over both): with
        # BatchNorm on batch statistics the support logits are then exactly the task loss's.
        support_logits = predict(task.support_x)
        if support_logits.shape[-1] != self.ways:
            raise ValueError(
                f"MeTALLoss was built for ways={self.ways} but the predictions have {support_logits.shape[-1]} "
                f"classes: set its `ways` to {support_logits.shape[-1]}"
            )
        cross_entropy = F.cross_entropy(support_logits, labels)
        means = torch.stack([p.mean() for p in params.values()]).to(support_logits.dtype)

        # Labelled support term.
        state = torch.cat([cross_entropy.reshape(1), means])
        one_hot = (labels.unsqueeze(-1) == torch.arange(self.ways, device=labels.device)).to(support_logits.dtype)
        u = torch.cat([state.expand(n_support, -1), support_logits, one_hot], dim=-1)
        support_term = self.support[k](_standardise(u), _standardise(state)).mean()

        if task.query_x.shape[0] == 0:  # no query inputs (`adapt_to`): no unlabelled term
            return cross_entropy + support_term
        # Unlabelled query term: the query inputs' logits and negative entropies, no labels.
        query_logits = predict(task.query_x)
        log_p = F.log_softmax(query_logits, dim=-1)
        negative_entropy = (log_p.exp() * log_p).sum(-1, keepdim=True)
        v = _standardise(torch.cat([means.expand(query_logits.shape[0], -1), query_logits, negative_entropy], dim=-1))
        query_term = self.query[k](v, v.mean(0)).mean()
        return cross_entropy + support_term + query_term
