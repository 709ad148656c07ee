"""Context parameters for a backbone: the network CAVIA adapts (Zintgraf et al., ICML 2019).

A small vector φ (`context`, zero-initialised) conditions the backbone, in one of the two ways of
CAVIA's code:

- `condition="input"`: φ is concatenated to every input row (the sinusoid MLP: 1 input + 5
  context values, so the MLP is built with `in_features=6`).
- `condition="film"`: φ modulates the output of one layer of the backbone by FiLM (Perez et
  al. 2018), `h ← γ ⊙ h + β` per channel with `(γ, β) = Linear(φ)`; CAVIA's Conv4 does it after
  the third block's BatchNorm (`film_at="features.2.1"` in `Conv4`), before its ReLU. (CAVIA's
  network max-pools before the FiLM, ours after the ReLU; the same when γ > 0.) As in its
  code, the FiLM layer has PyTorch's default initialisation, so at φ = 0, γ and β are its bias.

φ is a buffer, not a parameter: it is not meta-learned (CAVIA resets it to zero for every task),
and the outer optimizer never sees it. An algorithm adapts it by passing `{"context": φ}` to
`functional_call` (`lightning_meta.inner_loop.forward`); the FiLM hook reads `self.context` and
`self.film` at call time, so it sees the tensors `functional_call` swapped in.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

CONDITIONS = ("input", "film")


class ContextConditioned(nn.Module):
    """`backbone` conditioned on context parameters φ (module docstring).

    Args:
        backbone: the network (any `nn.Module`).
        context_size: the number of context parameters (5 for CAVIA's sinusoid, 100 for its
            miniImageNet network).
        condition: "input" (concatenated to the input rows) or "film" (FiLM of one layer's output).
        film_at: with "film", the name of the backbone's submodule whose `[N, C, ...]` output
            is modulated; None picks the third block's norm of a `Conv4` ("features.2.1").
    """

    def __init__(
        self, backbone: nn.Module, context_size: int, condition: str = "input", film_at: str | None = None
    ) -> None:
        super().__init__()
        if context_size < 1:
            raise ValueError(f"context_size={context_size} must be at least 1 (model.init_args.context_size)")
        if condition not in CONDITIONS:
            raise ValueError(f"condition={condition!r} is not one of {CONDITIONS} (model.init_args.condition)")
        self.backbone, self.condition, self.context_size = backbone, condition, context_size
        self.register_buffer("context", torch.zeros(context_size))
        self.film_at = None
        self.film: nn.Linear | None = None
        if condition == "film":
            self.film_at = film_at if film_at is not None else "features.2.1"
            names = [name for name, _ in backbone.named_modules() if name]
            if self.film_at not in names:
                raise ValueError(
                    f"film_at={self.film_at!r} is not a submodule of {type(backbone).__name__} "
                    f"(model.init_args.film_at): name one of {names[:12]}{' ...' if len(names) > 12 else ''}"
                )
            target = backbone.get_submodule(self.film_at)
            channels = getattr(target, "num_features", None) or getattr(target, "out_channels", None)
            if channels is None:
                raise ValueError(
                    f"film_at={self.film_at!r} is a {type(target).__name__}, whose channel count is unknown: "
                    "name a BatchNorm or Conv2d layer (model.init_args.film_at)"
                )
            self.channels = int(channels)
            self.film = nn.Linear(context_size, 2 * self.channels)
            target.register_forward_hook(self._modulate)
        else:
            linear = next((m for m in backbone.modules() if isinstance(m, nn.Linear)), None)
            self.in_features = linear.in_features if linear is not None else None

    def _modulate(self, _module: nn.Module, _args: tuple, output: Tensor) -> Tensor:
        gamma, beta = self.film(self.context).split(self.channels)
        shape = (1, -1, *([1] * (output.dim() - 2)))
        return gamma.view(shape) * output + beta.view(shape)

    def forward(self, x: Tensor) -> Tensor:
        if self.condition == "film":
            return self.backbone(x)
        if self.in_features is not None and x.shape[-1] + self.context_size != self.in_features:
            raise ValueError(
                f"{type(self.backbone).__name__} takes {self.in_features} inputs, but the data has "
                f"{x.shape[-1]} and the context {self.context_size}: build it with in_features="
                f"{x.shape[-1] + self.context_size} (model.init_args.backbone.init_args.in_features)"
            )
        return self.backbone(torch.cat([x, self.context.expand(*x.shape[:-1], -1)], dim=-1))
