"""Time every registered encoder: ``python -m medfusion.models.timing [--threads N]``.

Prints the median wall time of an eval-mode forward pass (no grad) and of a training step
(forward + backward) per encoder, grid (32^3, 64^3) and batch size (1, 8) on this machine.
Not a test: numbers depend on the CPU and on what else runs on it.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from medfusion.models.registry import ENCODERS, build_encoder


def _median_seconds(fn, repeats: int) -> float:  # noqa: ANN001
    fn()  # warm-up: first calls pick kernels and allocate
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_encoders(
    grids: tuple[int, ...] = (32, 64),
    batches: tuple[int, ...] = (1, 8),
    repeats: int = 3,
    embed_dim: int = 64,
) -> list[dict]:
    """Rows of {encoder, grid, batch, params, forward_ms, train_step_ms}."""
    rows = []
    for name in ENCODERS:
        torch.manual_seed(0)
        enc = build_encoder(name, embed_dim=embed_dim)
        n_params = sum(p.numel() for p in enc.parameters())
        for g in grids:
            for b in batches:
                x = torch.randn(b, 1, g, g, g)

                def forward(enc: torch.nn.Module = enc, x: torch.Tensor = x) -> None:
                    with torch.no_grad():
                        enc(x)

                def step(enc: torch.nn.Module = enc, x: torch.Tensor = x) -> None:
                    enc.zero_grad()
                    enc(x).sum().backward()

                enc.eval()
                fwd = _median_seconds(forward, repeats)
                enc.train()
                # batch 1 in training would use BatchNorm on one sample: time batch >= 2.
                trn = _median_seconds(step, max(1, repeats - 1)) if b > 1 else float("nan")
                rows.append(
                    {
                        "encoder": name,
                        "grid": g,
                        "batch": b,
                        "params": n_params,
                        "forward_ms": 1000 * fwd,
                        "train_step_ms": 1000 * trn,
                    }
                )
                print(
                    f"{name:12s} {g:3d}^3 batch {b}: forward {1000 * fwd:8.1f} ms"
                    f"   train step {1000 * trn:8.1f} ms   ({n_params / 1e6:.2f} M params)",
                    flush=True,
                )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s)")
    time_encoders(repeats=args.repeats)


if __name__ == "__main__":
    main()
