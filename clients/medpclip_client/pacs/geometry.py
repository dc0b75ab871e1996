"""The outline of a mask as an SCOORD polygon (no scipy or scikit-image in the client).

Why pixel edges: a viewer draws an SR's region outline over the source image, and the outline
should enclose exactly the pixels of the served mask, not a smoothed guess of them. Vertices lie
on pixel corners in DICOM's image-relative convention (PS3.3 C.18.6.1.2: (0, 0) is the top-left
corner of the top-left pixel, (columns, rows) the bottom-right corner of the bottom-right one),
the convention of the model's prompts too, so the polygon rasterises back to the mask's pixels.

One SCOORD holds one polygon: a mask with several parts is outlined by its largest part
(4-connected), and holes are not drawn. The SEG written with the report holds the exact mask.
"""

from __future__ import annotations

import numpy as np

__all__ = ["largest_component", "outline"]

# clockwise on screen (y down): right, down, left, up; a right turn is the next entry
_DIRECTIONS = ((1, 0), (0, 1), (-1, 0), (0, -1))


def _runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row, start, end) of every horizontal run of True pixels, row by row, left to right."""
    padded = np.pad(mask.astype(np.int8), ((0, 0), (1, 1)))
    step = np.diff(padded, axis=1)
    rows, starts = np.nonzero(step == 1)
    _, ends = np.nonzero(step == -1)  # row-major like the starts, so they pair up
    return rows, starts, ends


def largest_component(mask: np.ndarray) -> np.ndarray | None:
    """The largest 4-connected part of `mask` (the topmost of equal ones), None if empty.
    Runs are joined with a union-find, so the cost follows the runs, not the pixels."""
    mask = np.asarray(mask) != 0
    rows, starts, ends = _runs(mask)
    if len(rows) == 0:
        return None
    parent = list(range(len(rows)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first = np.searchsorted(rows, np.arange(mask.shape[0] + 1))  # runs of row r: first[r]..
    for r in range(mask.shape[0] - 1):
        i, i_end = int(first[r]), int(first[r + 1])
        j, j_end = int(first[r + 1]), int(first[r + 2])
        while i < i_end and j < j_end:  # overlapping column ranges touch 4-connectedly
            if starts[i] < ends[j] and starts[j] < ends[i]:
                a, b = root(i), root(j)
                if a != b:
                    parent[max(a, b)] = min(a, b)
            if ends[i] < ends[j]:
                i += 1
            else:
                j += 1
    roots = np.array([root(i) for i in range(len(rows))])
    sizes = np.bincount(roots, weights=(ends - starts).astype(np.float64))
    best = int(np.argmax(sizes))  # argmax takes the first maximum: the topmost part
    out = np.zeros(mask.shape, dtype=bool)
    keep = roots == best
    for r, s, e in zip(rows[keep], starts[keep], ends[keep], strict=True):
        out[r, s:e] = True
    return out


def outline(mask: np.ndarray) -> np.ndarray | None:
    """The outer boundary of the largest part of `mask` as a closed polygon: float [N, 2]
    (x = column, y = row) on pixel corners, first vertex repeated last, only the corners
    (no collinear vertices). None for an empty mask."""
    part = largest_component(mask)
    if part is None:
        return None
    p = np.pad(part, 1)
    inner = p[1:-1, 1:-1]
    # boundary edges of each pixel, walked clockwise (the region on the right-hand side)
    edges: dict[tuple[int, int], list[int]] = {}
    for direction, (neighbour, corner) in enumerate(
        (
            (p[:-2, 1:-1], (0, 0)),  # nothing above: top edge, from the top-left corner
            (p[1:-1, 2:], (1, 0)),  # nothing right: right edge, from the top-right corner
            (p[2:, 1:-1], (1, 1)),  # nothing below: bottom edge, from the bottom-right corner
            (p[1:-1, :-2], (0, 1)),  # nothing left: left edge, from the bottom-left corner
        )
    ):
        ys, xs = np.nonzero(inner & ~neighbour)
        for x, y in zip((xs + corner[0]).tolist(), (ys + corner[1]).tolist(), strict=True):
            edges.setdefault((x, y), []).append(direction)
    ys, xs = np.nonzero(part)
    start = (int(xs[0]), int(ys[0]))  # top-left corner of the topmost, leftmost pixel
    vertex, direction = start, 0  # its top edge exists: nothing lies above the topmost row
    edges[start].remove(0)
    corners = [start]
    while True:
        dx, dy = _DIRECTIONS[direction]
        vertex = (vertex[0] + dx, vertex[1] + dy)
        if vertex == start:
            break
        out = edges[vertex]
        # prefer the right turn where two parts of the region touch at a corner: the walk
        # then stays on 4-connected pixels, as the component was found
        for turn in (1, 0, 3):
            if (direction + turn) % 4 in out:
                nxt = (direction + turn) % 4
                break
        else:  # pragma: no cover - a closed boundary always continues
            raise RuntimeError("mask boundary is not closed")
        out.remove(nxt)
        if nxt != direction:
            corners.append(vertex)
        direction = nxt
    corners.append(start)
    return np.asarray(corners, dtype=np.float64)
