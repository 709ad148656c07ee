"""Per-task loss selection (issue 15, point 4): pick the inner loss of each task among candidates.

Three selectors, each an `InnerLoss` (so any gradient-based learner takes one as `inner_loss`):

- `MixtureLoss`: the inner loss is Σ_c w_c·L_c with w = softmax(g(features)); the selector g is
  trained by the meta-gradient through the inner loop (differentiable). At test: the argmax
  candidate alone (default) or the mixture.
- `PolicyLoss`: a discrete choice c ~ π(·|features), trained by REINFORCE on the reward
  −(query loss after adaptation), with a running-mean baseline (the reinforcement-learning view
  of loss selection). At test: the most probable candidate.
- `BanditLoss`: UCB1 over the candidates, ignoring the task (the baseline method): the same
  choice for every task, learned from the rewards.

Task features, computed at θ0 on the support set (detached): for each candidate its loss and the
norm of its gradient, and the spread of the task loss over the support examples (mean, median,
max of the per-example losses), each through log1p. A corrupted support set shows up as a
per-example loss whose max is far above its median and as candidates that disagree.

In an N-way task the labels are a random permutation of the classes, so at θ0 no loss value can
tell flipped labels (measured on Omniglot with 40% flips, 300 test tasks: AUC 0.54-0.61 for the
losses; the gradient norms do, AUC 0.95-0.97 after meta-training, since flipped examples'
gradients cancel, but only 0.69-0.73 at a random θ0). Two optional feature groups read label
noise directly: `label_consistency` (`consistency_features`: do look-alike support examples, in
the θ0 logit space, carry the same label; AUC 0.89-0.94 meta-trained, 0.81-0.89 at a random θ0) and
`probe_lr` (`probe_features`: how well the support set fits after one linearised SGD step of the
task loss; AUC 0.98-0.998 meta-trained, 0.69-0.82 at random, and defined for regression too).
Both are off by default, so the default selectors' numbers are unchanged
(`benchmarks/loss_selection_features.py`, `benchmarks/results/loss_selection_features_auc.md`).

**The second candidate axis: step sizes.** Every selector also takes `lr_scales`, multipliers of
the inner step: the candidates are then the product (loss × scale), named `<loss>@<scale>`
(`mse@0.1`), and one mechanism chooses "which loss, which step size" (one loss and several scales
choose the step size alone). A scale s multiplies the candidate's loss, so its gradient, so the
step of any update rule linear in the gradient (SGD, Meta-SGD's and MAML++'s learned rates: θ −
α ⊙ g): with SGD at `inner_lr` α the candidate (L, s) takes the step −s·α·∇L, i.e. the inner
learning rate s·α. The mixture's step is then Σ_c w_c·s_c·α·∇L_c, the softmax-weighted combination
of the candidate steps; a one-hot mixture is that candidate's learning rate (float64 test, equal
up to rounding: α·(s·g) against (s·α)·g). With a rule that is not linear in the gradient (a
learned LSTM optimizer, which also reads the loss) a scale rescales what the rule reads, not its
step. Without `lr_scales` the candidates are the losses alone and every number is as before.

A selector keeps its choice for the task across the task's inner steps (state in Python), so it
runs on the loop path (`vmap_blocker`). After each task the learner calls `after_task(query_loss)`
(the reward of the choice; `PolicyLoss` returns its REINFORCE surrogate, whose value is zero and
whose gradient is the policy gradient, so logged losses are unchanged), and `pop_choices()` for
the per-task choices the learner logs as `*/choice/<candidate>` (the share of tasks that chose it).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lightning_meta.losses.candidates import CANDIDATES, candidate_fn, known_candidates, loo_class_distances
from lightning_meta.losses.inner import InnerLoss, Predict, task_kind
from lightning_meta.task import Params, Task

__all__ = [
    "BanditLoss",
    "MixtureLoss",
    "PolicyLoss",
    "candidate_name",
    "combine",
    "consistency_features",
    "probe_features",
    "task_features",
]


def candidate_name(loss: str, lr_scale: float | None) -> str:
    """A candidate's name in logs: the loss alone, or `<loss>@<scale>` on the step-size axis."""
    return loss if lr_scale is None else f"{loss}@{lr_scale:g}"


def per_example_task_loss(predictions: Tensor, targets: Tensor) -> Tensor:
    """The task's own loss per support example: squared error (summed over outputs) or cross-entropy."""
    if torch.is_floating_point(targets):
        return (predictions - targets).pow(2).flatten(1).sum(-1)
    return nn.functional.cross_entropy(predictions, targets, reduction="none")


def task_features(params: Params, task: Task, predict: Predict, candidates: list[str], kind: str) -> Tensor:
    """`[2·C + 3]` detached features of a task at `params` (θ0): each candidate's support loss and
    gradient norm, and the mean, median and max of the per-example task loss, all through log1p."""
    predictions = predict(task.support_x)
    values, norms = [], []
    tensors = [p for p in params.values() if p.requires_grad]
    for name in candidates:
        loss = candidate_fn(kind, name)(predictions, task.support_y, params)
        values.append(loss.detach())
        if tensors:
            grads = torch.autograd.grad(loss, tensors, retain_graph=True, allow_unused=True)
            norms.append(torch.sqrt(sum((g.detach() ** 2).sum() for g in grads if g is not None)))
        else:
            norms.append(torch.zeros((), dtype=predictions.dtype))
    per_example = per_example_task_loss(predictions.detach(), task.support_y)
    spread = torch.stack([per_example.mean(), per_example.median(), per_example.max()])
    return torch.log1p(torch.cat([torch.stack(values), torch.stack(norms), spread]).clamp_min(0))


def consistency_features(embeddings: Tensor, labels: Tensor) -> Tensor:
    """`[3]` label-consistency features of a classification support set in an embedding space
    (`[N, D]`, e.g. the θ0 logits), all in [0, 1], detached.

    In an N-way task the labels are a random permutation of the classes, so at θ0 no loss value
    can say whether they are right; whether examples that *look* alike carry the same label can.
    - `loo_agreement`: the share of support examples whose nearest class mean (squared Euclidean,
      the example left out of its own class's mean) is their given label's;
    - `loo_soft`: the mean over examples of softmax(−d²/s)[given label] over those leave-one-out
      class means, s the mean squared distance between examples (a smooth `loo_agreement`);
    - `spread_ratio`: the within-class share of the total spread (Σ‖z − μ_label‖² / Σ‖z − μ‖²).
    A class whose only example is left out has no mean for it (infinitely far).
    """
    z = embeddings.detach().flatten(1).to(torch.float64)
    y = labels.detach().long()
    d2, scale, sums, counts = loo_class_distances(z, y, int(y.max()) + 1)  # [N, C], [], [C, D], [C]
    agreement = (d2.argmin(-1) == y).to(z.dtype).mean()
    soft = torch.softmax(-d2 / scale.clamp_min(1e-12), dim=-1).gather(-1, y.unsqueeze(-1)).mean()
    within = (z - (sums / counts.clamp_min(1).unsqueeze(-1))[y]).pow(2).sum()
    total = (z - z.mean(0)).pow(2).sum()
    ratio = within / total.clamp_min(1e-12)
    return torch.stack([agreement, soft, ratio.clamp(0, 1)]).to(embeddings.dtype)


def probe_features(params: Params, task: Task, predict: Predict, lr: float) -> Tensor:
    """`[4]` detached features of the support set after one probe step of the task's own loss.

    The step is SGD at `lr` on every adapted tensor of `params` (θ0), linearised: the predictions
    move by −lr·J·Jᵀ·∂L/∂f (J the Jacobian of the support predictions in the parameters), computed
    with two backward passes through `predict` (it runs the network at `params` only). Clean tasks
    fit easily; an example whose label (or target) disagrees with its look-alikes stays badly fit.
    Features: log1p of the mean, median and max per-example task loss after the step, and the share
    of badly fit examples (classification: misclassified; regression: squared residual above 9×
    the median one). Without adapted tensors the step is zero.
    """
    predictions = predict(task.support_x)
    tensors = [p for p in params.values() if p.requires_grad]
    moved = predictions.detach()
    if tensors and predictions.requires_grad:
        loss = per_example_task_loss(predictions, task.support_y).mean()
        (df,) = torch.autograd.grad(loss, predictions, retain_graph=True)
        grads = torch.autograd.grad(predictions, tensors, grad_outputs=df, retain_graph=True, allow_unused=True)
        u = torch.zeros_like(predictions, requires_grad=True)
        vjp = torch.autograd.grad(predictions, tensors, grad_outputs=u, create_graph=True, allow_unused=True)
        dot = sum((a * g.detach()).sum() for a, g in zip(vjp, grads, strict=True) if a is not None and g is not None)
        if isinstance(dot, Tensor) and dot.requires_grad:
            (jvp,) = torch.autograd.grad(dot, u)
            moved = moved - lr * jvp.detach()
    per_example = per_example_task_loss(moved, task.support_y)
    if torch.is_floating_point(task.support_y):
        bad = per_example > 9 * per_example.median()
    else:
        bad = moved.argmax(-1) != task.support_y
    spread = torch.log1p(torch.stack([per_example.mean(), per_example.median(), per_example.max()]).clamp_min(0))
    return torch.cat([spread, bad.to(spread.dtype).mean().unsqueeze(0)])


def combine(
    weights: Tensor,
    predictions: Tensor,
    targets: Tensor,
    candidates: list[str],
    kind: str,
    params: Params | None = None,
    lr_scales: list[float | None] | None = None,
) -> Tensor:
    """Σ_c weights[c]·s_c·L_c(predictions, targets), s_c = `lr_scales[c]` (None: 1, not multiplied).

    `candidates` names each weight's loss (a loss may repeat, with different scales: each loss is
    computed once, with the sum of its coefficients). A zero weight's loss is not computed and a
    coefficient of exactly 1 multiplies nothing, so a one-hot `weights` is exactly that candidate's
    loss (times its scale). `params` reaches the losses that read the weights (`mse_l1`).
    """
    scales = [None] * len(candidates) if lr_scales is None else lr_scales
    coefficients: dict[str, Tensor] = {}
    for w, name, scale in zip(weights, candidates, scales, strict=True):
        if not w.requires_grad and float(w) == 0.0:
            continue
        c = w if scale is None else w * scale
        coefficients[name] = c if name not in coefficients else coefficients[name] + c
    total = None
    for name, c in coefficients.items():
        term = candidate_fn(kind, name)(predictions, targets, {} if params is None else params)
        term = term if (not c.requires_grad and float(c) == 1.0) else c * term
        total = term if total is None else total + term
    if total is None:
        raise ValueError("combine: every weight is zero")
    return total


class _Selector(InnerLoss):
    """Candidates, their kind, the per-task choice kept across the inner steps, and the log."""

    vmap_blocker = "a loss selector keeps its per-task choice across the inner steps in Python"

    def __init__(self, candidates: list[str] | None, kind: str, lr_scales: list[float] | None = None) -> None:
        super().__init__()
        if kind not in CANDIDATES:
            raise ValueError(f"kind={kind!r} must be one of {sorted(CANDIDATES)}")
        losses = list(CANDIDATES[kind]) if candidates is None else list(candidates)
        known = known_candidates(kind)
        unknown = [c for c in losses if c not in known]
        single_loss_ok = lr_scales is not None and len(lr_scales) >= 2 and len(losses) == 1
        if unknown or len(set(losses)) != len(losses) or not (len(losses) >= 2 or single_loss_ok):
            raise ValueError(
                f"candidates={losses} must be at least two distinct {kind} losses of {sorted(known)} (or one "
                "loss with at least two lr_scales)" + (f" ({unknown} are not)" if unknown else "")
            )
        if lr_scales is not None:
            lr_scales = [float(s) for s in lr_scales]
            if (
                not lr_scales
                or not all(math.isfinite(s) and s > 0 for s in lr_scales)
                or len(set(lr_scales)) != len(lr_scales)
            ):
                raise ValueError(
                    f"lr_scales={lr_scales} must be distinct positive multipliers of the inner step "
                    "(e.g. [0.3, 1.0, 3.0]: with SGD, inner learning rates inner_lr × each)"
                )
        self.kind, self.losses, self.lr_scales = kind, losses, lr_scales
        scales: list[float | None] = [None] if lr_scales is None else list(lr_scales)
        self.pairs: list[tuple[str, float | None]] = [(loss, s) for loss in losses for s in scales]
        """Each candidate's (loss, step multiplier or None)."""
        self.candidates = [candidate_name(loss, scale) for loss, scale in self.pairs]
        """Each candidate's name (the loss itself without `lr_scales`): the keys of `*/choice/<name>`."""
        self._choices: list[int] = []
        self._probabilities: list[Tensor] = []

    def candidate_loss(self, index: int, params: Params, task: Task, predict: Predict) -> Tensor:
        """Candidate `index`'s support loss at `params`: its loss, times its step multiplier if any."""
        loss, scale = self.pairs[index]
        value = candidate_fn(self.kind, loss)(predict(task.support_x), task.support_y, params)
        return value if scale is None else scale * value

    def _check_kind(self, task: Task) -> None:
        kind = task_kind(task.support_y)
        if kind != self.kind:
            raise ValueError(f"this loss selector chooses among {self.kind} losses but the tasks are {kind}")

    def pop_choices(self) -> Tensor | None:
        """The index of the candidate each task since the last call chose (argmax of a mixture)."""
        if not self._choices:
            return None
        choices, self._choices = torch.tensor(self._choices), []
        return choices

    def pop_probabilities(self) -> Tensor | None:
        """`[tasks, candidates]`: each task evaluated (eval mode) since the last call, its softmax over
        the candidates (the mixture's weights before any argmax, the policy's π), or None (the bandit has none). How
        far from uniform, and how different between task types, the selector's preferences are."""
        if not self._probabilities:
            return None
        probabilities, self._probabilities = torch.stack(self._probabilities), []
        return probabilities

    def after_task(self, query_loss: Tensor, training: bool) -> Tensor | None:
        """Called by the learner with the task's query loss after adaptation; a term to add to it."""
        return None


class _FeatureSelector(_Selector):
    def __init__(
        self,
        candidates: list[str] | None,
        kind: str,
        hidden: int,
        lr_scales: list[float] | None,
        label_consistency: bool = False,
        probe_lr: float | None = None,
    ) -> None:
        super().__init__(candidates, kind, lr_scales)
        if label_consistency and kind != "classification":
            raise ValueError(
                "label_consistency=True reads class labels (leave-one-out class means): it is for "
                f"classification selectors, not {kind} (use probe_lr for a feature of both kinds)"
            )
        if probe_lr is not None and not (math.isfinite(probe_lr) and probe_lr > 0):
            raise ValueError(f"probe_lr={probe_lr} must be a positive step size (or None: no probe features)")
        self.label_consistency, self.probe_lr = label_consistency, probe_lr
        # Features per distinct loss (a scaled copy of a loss says nothing new), one output per candidate.
        width = 2 * len(self.losses) + 3 + (3 if label_consistency else 0) + (4 if probe_lr is not None else 0)
        self.selector = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, len(self.candidates)))
        # Start uniform: every candidate equally likely until the meta-gradient says otherwise.
        nn.init.zeros_(self.selector[-1].weight)
        nn.init.zeros_(self.selector[-1].bias)

    def features(self, params: Params, task: Task, predict: Predict) -> Tensor:
        """The selector's input: `task_features`, then (if asked) `consistency_features` of the θ0
        support logits and `probe_features` at `probe_lr`."""
        parts = [task_features(params, task, predict, self.losses, self.kind)]
        if self.label_consistency:
            with torch.no_grad():
                parts.append(consistency_features(predict(task.support_x), task.support_y))
        if self.probe_lr is not None:
            parts.append(probe_features(params, task, predict, self.probe_lr))
        return torch.cat([p.to(parts[0].dtype) for p in parts])

    def logits(self, params: Params, task: Task, predict: Predict) -> Tensor:
        return self.selector(self.features(params, task, predict).to(self.selector[0].weight.dtype))


class MixtureLoss(_FeatureSelector):
    """Σ_c softmax(g(features))_c · L_c, g trained through the inner loop by the meta-gradient.

    Args:
        candidates: candidate names of `CANDIDATES[kind]` (default: all of that kind).
        kind: "regression" or "classification".
        hidden: width of the selector's hidden layer.
        eval_choice: at validation and test, "argmax" (the most weighted candidate alone) or
            "mixture".
        lr_scales: the step-size axis (module docstring): multipliers of the inner step; the
            candidates become every (loss, scale). None: the losses alone.
        label_consistency: also feed `consistency_features` of the θ0 support logits (label
            consistency: can tell flipped labels, which no loss value at θ0 can); classification only.
        probe_lr: also feed `probe_features`, the support fit after one linearised SGD step of the
            task loss at this step size (e.g. the inner learning rate); None: not computed.
    """

    def __init__(
        self,
        candidates: list[str] | None = None,
        kind: str = "regression",
        hidden: int = 32,
        eval_choice: str = "argmax",
        lr_scales: list[float] | None = None,
        label_consistency: bool = False,
        probe_lr: float | None = None,
    ) -> None:
        super().__init__(candidates, kind, hidden, lr_scales, label_consistency, probe_lr)
        if eval_choice not in ("argmax", "mixture"):
            raise ValueError(f"eval_choice={eval_choice!r} must be 'argmax' or 'mixture'")
        self.eval_choice = eval_choice
        self._weights: Tensor | None = None

    def weights(self, params: Params, task: Task, predict: Predict) -> Tensor:
        """The candidates' weights for this task (sum to 1)."""
        w = torch.softmax(self.logits(params, task, predict), dim=-1)
        if not self.training:  # a report of evaluation: nothing kept in the training hot path
            self._probabilities.append(w.detach())
        if not self.training and self.eval_choice == "argmax":
            w = nn.functional.one_hot(w.argmax(), len(self.candidates)).to(w.dtype)
        return w

    def forward(self, params: Params, task: Task, predict: Predict, step: int) -> Tensor:
        self._check_kind(task)
        if step == 0 or self._weights is None:
            self._weights = self.weights(params, task, predict)
            self._choices.append(int(self._weights.detach().argmax()))
        losses = [loss for loss, _ in self.pairs]
        scales = [scale for _, scale in self.pairs]
        return combine(self._weights, predict(task.support_x), task.support_y, losses, self.kind, params, scales)


class PolicyLoss(_FeatureSelector):
    """A discrete per-task choice c ~ π(·|features) trained by REINFORCE.

    The reward of a choice is −(the task's query loss after adapting with it); the advantage is
    the reward minus a running mean of the rewards (`baseline_momentum`). The surrogate added to
    the task's loss is −advantage·(log π(c) − log π(c).detach()) − entropy_coef·(H − H.detach()):
    zero in value, the policy gradient (plus an entropy bonus) in gradient.

    Args:
        candidates: candidate names (default: all of `kind`).
        kind: "regression" or "classification".
        hidden: width of the policy's hidden layer.
        baseline_momentum: the running-mean baseline's momentum.
        entropy_coef: weight of the entropy bonus.
        lr_scales: the step-size axis (module docstring): multipliers of the inner step; the
            candidates become every (loss, scale). None: the losses alone.
        label_consistency: also feed `consistency_features` of the θ0 support logits (label
            consistency: can tell flipped labels, which no loss value at θ0 can); classification only.
        probe_lr: also feed `probe_features`, the support fit after one linearised SGD step of the
            task loss at this step size (e.g. the inner learning rate); None: not computed.
        baseline: "mean" (the running mean of the rewards) or "features": a ridge regression of the
            reward on the task's features and a constant, fitted to the earlier tasks (exponentially
            weighted by `baseline_momentum`, so set it near 0.99 there): a state-dependent baseline
            that takes the reward gap between task types out of the advantage.
        baseline_ridge: the ridge penalty of the "features" baseline.
    """

    def __init__(
        self,
        candidates: list[str] | None = None,
        kind: str = "regression",
        hidden: int = 32,
        baseline_momentum: float = 0.9,
        entropy_coef: float = 0.0,
        lr_scales: list[float] | None = None,
        label_consistency: bool = False,
        probe_lr: float | None = None,
        baseline: str = "mean",
        baseline_ridge: float = 1e-2,
    ) -> None:
        super().__init__(candidates, kind, hidden, lr_scales, label_consistency, probe_lr)
        if not 0 <= baseline_momentum < 1:
            raise ValueError(f"baseline_momentum={baseline_momentum} must be in [0, 1)")
        if baseline not in ("mean", "features"):
            raise ValueError(f"baseline={baseline!r} must be 'mean' or 'features'")
        if not baseline_ridge > 0:
            raise ValueError(f"baseline_ridge={baseline_ridge} must be > 0")
        self.baseline_momentum, self.entropy_coef = baseline_momentum, entropy_coef
        self.baseline_kind, self.baseline_ridge = baseline, baseline_ridge
        self.register_buffer("baseline", torch.zeros(()))
        self.register_buffer("baseline_ready", torch.zeros((), dtype=torch.bool))
        if baseline == "features":
            # Exponentially weighted ridge-regression statistics of the reward on [features, 1].
            width = self.selector[0].in_features + 1
            self.register_buffer("baseline_gram", torch.zeros(width, width, dtype=torch.float64))
            self.register_buffer("baseline_moment", torch.zeros(width, dtype=torch.float64))
        self._choice: int | None = None
        self._log_prob: Tensor | None = None
        self._entropy: Tensor | None = None
        self._features: Tensor | None = None

    def forward(self, params: Params, task: Task, predict: Predict, step: int) -> Tensor:
        self._check_kind(task)
        if step == 0 or self._choice is None:
            features = self.features(params, task, predict)
            self._features = features.detach()
            logits = self.selector(features.to(self.selector[0].weight.dtype))
            dist = torch.distributions.Categorical(logits=logits)
            if not self.training:
                self._probabilities.append(dist.probs.detach())
            choice = dist.sample() if self.training else logits.argmax()
            self._choice, self._log_prob, self._entropy = int(choice), dist.log_prob(choice), dist.entropy()
            self._choices.append(self._choice)
        return self.candidate_loss(self._choice, params, task, predict)

    def after_task(self, query_loss: Tensor, training: bool) -> Tensor | None:
        log_prob, entropy, features = self._log_prob, self._entropy, self._features
        self._choice = self._log_prob = self._entropy = self._features = None
        if not training or log_prob is None:
            return None
        reward = -query_loss.detach().to(self.baseline.dtype)
        if not bool(self.baseline_ready):
            self.baseline.copy_(reward)
            self.baseline_ready.fill_(True)
        advantage = reward - self.baseline
        if self.baseline_kind == "features" and features is not None:
            # b(x) = wᵀ[x, 1] fitted to the earlier tasks' rewards, so reward gaps between task types
            # (flipped labels: a higher query loss whatever the choice) leave the advantage; b does not
            # depend on this task's choice, so the estimator stays unbiased. Until it has seen as many
            # (weighted) tasks as it has coefficients, the running mean stands in.
            x = torch.cat([features.to(torch.float64).flatten(), torch.ones(1, dtype=torch.float64)])
            if float(self.baseline_gram[-1, -1]) >= len(x):
                ridge = self.baseline_ridge * torch.eye(len(x), dtype=torch.float64)
                w = torch.linalg.solve(self.baseline_gram + ridge, self.baseline_moment)
                advantage = reward - (w @ x).to(reward.dtype)
            m = self.baseline_momentum
            self.baseline_gram.mul_(m).add_(torch.outer(x, x))
            self.baseline_moment.mul_(m).add_(float(reward) * x)
        self.baseline.mul_(self.baseline_momentum).add_((1 - self.baseline_momentum) * reward)
        surrogate = -advantage * (log_prob - log_prob.detach())
        if self.entropy_coef:
            surrogate = surrogate - self.entropy_coef * (entropy - entropy.detach())
        return surrogate.to(query_loss.dtype)


class BanditLoss(_Selector):
    """UCB1 over the candidates, the same for every task (the baseline for the per-task selectors).

    In training each task takes the candidate with the highest mean reward + c·sqrt(2·ln t / n)
    (every candidate once first); the reward is −(query loss after adaptation). At test: the
    candidate with the best mean reward.

    Args:
        candidates: candidate names (default: all of `kind`).
        kind: "regression" or "classification".
        exploration: c, the exploration bonus's scale (in units of the reward).
        lr_scales: the step-size axis (module docstring): multipliers of the inner step; the
            candidates become every (loss, scale). None: the losses alone.
    """

    def __init__(
        self,
        candidates: list[str] | None = None,
        kind: str = "regression",
        exploration: float = 1.0,
        lr_scales: list[float] | None = None,
    ) -> None:
        super().__init__(candidates, kind, lr_scales)
        if exploration < 0:
            raise ValueError(f"exploration={exploration} must be >= 0")
        self.exploration = exploration
        self.register_buffer("pulls", torch.zeros(len(self.candidates), dtype=torch.float64))
        self.register_buffer("reward_sum", torch.zeros(len(self.candidates), dtype=torch.float64))
        self._choice: int | None = None

    def choose(self) -> int:
        untried = (self.pulls == 0).nonzero()
        if self.training and len(untried):
            return int(untried[0])
        means = self.reward_sum / self.pulls.clamp_min(1)
        if not self.training:
            return int(means.argmax())
        bonus = self.exploration * torch.sqrt(2 * math.log(float(self.pulls.sum())) / self.pulls)
        return int((means + bonus).argmax())

    def forward(self, params: Params, task: Task, predict: Predict, step: int) -> Tensor:
        self._check_kind(task)
        if step == 0 or self._choice is None:
            self._choice = self.choose()
            self._choices.append(self._choice)
        return self.candidate_loss(self._choice, params, task, predict)

    def after_task(self, query_loss: Tensor, training: bool) -> Tensor | None:
        choice, self._choice = self._choice, None
        if training and choice is not None:
            self.pulls[choice] += 1
            self.reward_sum[choice] += -float(query_loss.detach())
        return None
