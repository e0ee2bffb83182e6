"""Short layer names for tick labels and legends that still tell the layers apart."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["shorten", "short_labels", "layer_labels", "labels_numbered"]


def shorten(name: str, width: int = 30) -> str:
    """Cut the middle of a long name so tick labels stay readable.

    Example:
        >>> shorten("model.1.submodule.1.submodule.1.submodule.0.conv", 24)
        'model.1.sub…odule.0.conv'
    """
    if len(name) <= width:
        return name
    head = (width - 1) // 2
    tail = width - 1 - head
    return name[:head] + "…" + name[-tail:]


def short_labels(names: Sequence[str], width: int = 24) -> tuple[list[str], bool]:
    """Labels of at most ``width`` characters that still tell the names apart.

    A name that fits is kept. A longer one keeps its distinguishing tail: the shortest run of
    trailing dotted parts that no other name ends with, after its first part when that fits
    (``encoder…2.convs.0.conv``). When no such tail fits (nested names such as MONAI's
    ``model.1.submodule.1.submodule.0.conv`` differ in the middle), the middle is cut and the
    second value is True: the caller must number the labels and give a key.

    Returns:
        The labels, and whether any of them lost the part that tells it apart.

    Example:
        >>> short_labels(["encoder.stages.2.convs.0.conv", "encoder.stages.3.convs.0.conv", "head"], 22)
        (['encoder…2.convs.0.conv', 'encoder…3.convs.0.conv', 'head'], False)
        >>> short_labels(["model.1.submodule.1.submodule.0.conv", "model.1.submodule.0.conv"], 22)[1]
        True
    """
    names = [str(n) for n in names]
    labels, lossy = [], False
    for i, name in enumerate(names):
        if len(name) <= width:
            labels.append(name)
            continue
        others = [m for j, m in enumerate(names) if j != i]
        parts = name.split(".")
        label = None
        for k in range(1, len(parts)):
            tail = ".".join(parts[-k:])
            if any(m == tail or m.endswith("." + tail) for m in others):
                continue
            if k < len(parts) - 1 and len(parts[0]) + 1 + len(tail) <= width:
                label = f"{parts[0]}…{tail}"
            elif len(tail) + 1 <= width:
                label = f"…{tail}"
            break
        if label is None:
            label, lossy = shorten(name, width), True
        labels.append(label)
    return labels, lossy or len(set(labels)) < len(labels)


def layer_labels(names: Sequence[str], order: Sequence[str], width: int = 24) -> list[str]:
    """Short layer labels; numbered by forward position (the table's ``depth``) when shortening
    loses what tells two names apart, so the layer table is the key.

    Example:
        >>> layer_labels(["a.b.c.d.e.f.1.conv", "a.b.c.x.e.f.1.conv"], ["input", "a.b.c.d.e.f.1.conv", "a.b.c.x.e.f.1.conv"], 12)
        ['1 a.b.c…1.conv', '2 a.b.c…1.conv']
        >>> layer_labels(["enc.block.1.conv", "enc.block.2.conv"], ["enc.block.1.conv", "enc.block.2.conv"], 12)
        ['enc…1.conv', 'enc…2.conv']
    """
    short, lossy = short_labels(names, width)
    if not lossy:
        return short
    pos = {n: i for i, n in enumerate(order)}
    return [f"{pos[n]} {s}" if n in pos else s for n, s in zip(names, short, strict=True)]


def labels_numbered(names: Sequence[str], width: int = 24) -> bool:
    """Whether :func:`layer_labels` numbers these names (their short labels lose information)."""
    return short_labels(names, width)[1]
