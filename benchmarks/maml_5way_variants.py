"""First-order MAML at Omniglot 5-way 1-shot under network and loss variants, at one inner lr:
what was tried to explain why the papers' inner lr 0.4 did not learn here (README, "MAML's inner
learning rate at 5-way"). A plain training loop (no Trainer), one torch thread.

    python benchmarks/maml_5way_variants.py --lr 0.4 --steps 150 --val-every 50                 # ours
    python benchmarks/maml_5way_variants.py --lr 0.4 --adapt-bn 0                                 # BN not adapted
    python benchmarks/maml_5way_variants.py --lr 0.4 --init xavier                                # Xavier convs
    python benchmarks/maml_5way_variants.py --lr 0.4 --init zeros                                 # zero head
    python benchmarks/maml_5way_variants.py --lr 0.4 --arch stride --init finn --bn-scale 0 --adapt-bn 0 --loss-scale 5
        # a replica of Finn et al.'s network and loss (strided Conv4, Xavier convs, N(0, 1) head,
        # no BN scale, BN offsets not adapted, per-example losses summed / K = 5 x the mean)

Each validation prints one JSON line: step, validation accuracy on `--val-tasks` fixed tasks
(3 inner steps, transductive), mean training query accuracy since the last validation.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn

from lightning_meta.algorithms import MAML
from lightning_meta.algorithms.base import supervised_loss
from lightning_meta.data import OmniglotDataModule
from lightning_meta.inner_loop import adapt, forward, named_params
from lightning_meta.models import Conv4


def build_backbone(args: argparse.Namespace, ways: int) -> nn.Module:
    net = Conv4(out_features=ways, downsample="max_pool" if args.arch == "max_pool" else "stride")
    if args.init in ("xavier", "finn"):
        for module in net.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
    with torch.no_grad():
        if args.init == "finn":
            net.head.weight.normal_()
        if args.init in ("finn", "zeros"):
            net.head.bias.zero_()
        if args.init == "zeros":
            net.head.weight.zero_()
    if not args.bn_scale:
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.requires_grad_(False)
    return net


class VariantMAML(MAML):
    """MAML whose support loss is scaled and whose inner loop may leave BatchNorm alone."""

    def __init__(self, backbone: nn.Module, loss_scale: float, adapt_bn: bool, **kwargs) -> None:
        super().__init__(backbone, **kwargs)
        self.loss_scale, self.adapt_bn = loss_scale, adapt_bn

    def adapt(self, task, steps):
        def support_loss(params):
            return self.loss_scale * supervised_loss(forward(self.backbone, params, task.support_x), task.support_y)

        params = named_params(self.backbone)
        if not self.adapt_bn:
            norms = {n for n, m in self.backbone.named_modules() if isinstance(m, nn.BatchNorm2d)}
            params = {k: v for k, v in params.items() if k.rsplit(".", 1)[0] not in norms}
        return adapt(support_loss, params, steps, self.inner_lr, self.first_order or not self.training)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lr", type=float, default=0.4)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--val-every", type=int, default=50)
    parser.add_argument("--val-tasks", type=int, default=100)
    parser.add_argument("--adapt-bn", type=int, default=1)
    parser.add_argument("--loss-scale", type=float, default=1.0, help="5 at 5-way: Finn's sum / K")
    parser.add_argument("--arch", choices=["max_pool", "stride"], default="max_pool")
    parser.add_argument("--init", choices=["torch", "xavier", "zeros", "finn"], default="torch")
    parser.add_argument("--bn-scale", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    ways = 5
    model = VariantMAML(
        build_backbone(args, ways),
        args.loss_scale,
        bool(args.adapt_bn),
        inner_lr=args.lr,
        inner_steps=1,
        eval_inner_steps=3,
        first_order=True,
    )
    data = OmniglotDataModule(
        ways=ways, shots=1, query_shots=15, tasks_per_batch=args.tasks, batches_per_epoch=10**6,
        val_tasks=args.val_tasks, eval_tasks_per_batch=25,
    )  # fmt: skip
    data.setup("fit")
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], 1e-3)
    batches, train_accs, start = iter(data.train_dataloader()), [], time.time()
    for step in range(1, args.steps + 1):
        loss, stats = model.meta_loss(next(batches))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        train_accs.append(float(stats["acc"].mean()))
        if step % args.val_every == 0:
            model.eval()
            accs = torch.cat([model.meta_loss(batch)[1]["acc"] for batch in data.val_dataloader()])
            model.train()
            row = {
                "step": step,
                "val_acc": float(accs.mean()),
                "train_acc": sum(train_accs[-args.val_every :]) / args.val_every,
            }
            print(json.dumps({**row, "seconds": round(time.time() - start)}), flush=True)


if __name__ == "__main__":
    main()
