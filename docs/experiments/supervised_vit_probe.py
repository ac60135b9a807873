"""How fast does a from-scratch micro ViT learn a labelled image folder? (docs/ablation.md, "Why the recipe")

Supervised only, in memory, no augmentation: the quickest way to see what the patch grid, the
pooling and the learning rate do before any of M3I's branches get involved.

    python docs/experiments/supervised_vit_probe.py m3i-data/abl/raw "pool='max'" "pool='avg'" "pool='max',patch=4"

Each argument is a set of keyword arguments of ``run``; it prints the last training loss and the
top-1 accuracy on the folder's ``eval`` split after ``steps`` steps of AdamW.
"""

import glob
import sys
import time

import numpy as np
import timm
import torch
import torch.nn.functional as F
from PIL import Image

torch.set_num_threads(1)


def load(root: str, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    classes = sorted(p.split("/")[-1] for p in glob.glob(f"{root}/{kind}/*"))
    for c, name in enumerate(classes):
        for f in sorted(glob.glob(f"{root}/{kind}/{name}/*.png")):
            xs.append(np.asarray(Image.open(f).convert("RGB")))
            ys.append(c)
    x = torch.tensor(np.stack(xs)).permute(0, 3, 1, 2).float() / 255
    return (x - 0.45) / 0.25, torch.tensor(ys)


def run(xtr, ytr, xte, yte, pool="max", patch=8, lr=1e-3, steps=300, bs=32, depth=4, width=96, heads=3):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=int(ytr.max()) + 1, img_size=xtr.shape[-1],
                          patch_size=patch, embed_dim=width, depth=depth, num_heads=heads, global_pool=pool)
    opt = torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.05, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1, (s + 1) / 30) * 0.5 * (1 + np.cos(np.pi * min(1, s / steps))))
    t0 = time.time()
    for _ in range(steps):
        idx = torch.randint(0, len(xtr), (bs,), generator=g)
        loss = F.cross_entropy(m(xtr[idx]), ytr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    m.eval()
    with torch.no_grad():
        acc = (m(xte).argmax(1) == yte).float().mean()
    print(f"pool={pool} patch={patch} lr={lr} bs={bs} steps={steps}: loss {loss.item():.3f}, eval top-1 {100 * acc:.1f} % ({time.time() - t0:.0f}s)", flush=True)


if __name__ == "__main__":
    root = sys.argv[1]
    data = (*load(root, "labelled"), *load(root, "eval"))
    for arg in sys.argv[2:]:
        run(*data, **eval(f"dict({arg})"))
