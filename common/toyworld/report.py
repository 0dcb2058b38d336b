"""Loss curves of the toy-world runs: read from the Trainer's TensorBoard logs, drawn with PIL (no matplotlib)."""
from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw


def read_losses(run_dir: str | Path) -> list[tuple[int, float]]:
    """(step, loss) of every logged optimizer step under run_dir/logs, the last value kept for a repeated step
    (a resumed run logs again the steps after its checkpoint)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    by_step: dict[int, float] = {}
    for events in sorted(Path(run_dir).glob("logs/**/events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        if "loss" in acc.Tags().get("scalars", []):
            for ev in acc.Scalars("loss"):
                by_step[ev.step] = ev.value
    return sorted(by_step.items())


def read_losses_chain(runs: list[str]) -> list[tuple[int, float]]:
    """Losses of runs that continue one another ('dir' or 'dir:N' = keep steps <= N), steps made consecutive."""
    out: list[tuple[int, float]] = []
    for spec in runs:
        path, _, last = spec.partition(":")
        offset = out[-1][0] if out else 0
        losses = [(s, v) for s, v in read_losses(path) if not last or s <= int(last)]
        out.extend((offset + s, v) for s, v in losses)
    return out


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average over `window` values."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def loss_curve_image(losses: list[tuple[int, float]], title: str, size: tuple[int, int] = (480, 240)) -> Image.Image:
    """A small line plot of log10(loss) against step (moving average over ~1% of the run)."""
    w, h = size
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    steps = [s for s, _ in losses]
    vals = [math.log10(max(v, 1e-8)) for v in smooth([v for _, v in losses], max(1, len(losses) // 100))]
    lo, hi = min(vals), max(vals)
    hi = hi if hi > lo else lo + 1
    left, right, top, bottom = 50, w - 10, 25, h - 25
    draw.rectangle([left, top, right, bottom], outline="black")
    x = lambda s: left + (s - steps[0]) / max(steps[-1] - steps[0], 1) * (right - left)  # noqa: E731
    y = lambda v: bottom - (v - lo) / (hi - lo) * (bottom - top)  # noqa: E731
    draw.line([(x(s), y(v)) for s, v in zip(steps, vals)], fill=(30, 60, 200), width=2)
    draw.text((left, 5), f"{title} (log10, smoothed)", fill="black")
    draw.text((2, top), f"{10 ** hi:.3g}", fill="black")
    draw.text((2, bottom - 10), f"{10 ** lo:.3g}", fill="black")
    draw.text((left, bottom + 5), f"step {steps[0]}", fill="black")
    draw.text((right - 70, bottom + 5), f"step {steps[-1]}", fill="black")
    return img
