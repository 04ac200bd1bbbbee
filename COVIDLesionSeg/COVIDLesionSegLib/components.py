"""3D connected components of a mask in bounded memory: labelled a chunk of axial slices at a time.

``sitk.ConnectedComponent`` on a whole thin-section volume returns 32-bit labels, 4 bytes per voxel: for a
512×512×600 CT, 600 MiB beside the masks themselves. :class:`ChunkedComponents` labels
:data:`CHUNK_SLICES` slices at a time inside the mask's bounding box, joins the pieces that touch across
the chunks' faces (union–find) and keeps only per-piece sums; a second pass labels each chunk again (the
labelling is deterministic) to give each voxel a value of its component.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import SimpleITK as sitk

CHUNK_SLICES = 32  # slices labelled at a time: 32-bit labels of 32 × 512 × 512 voxels are 32 MiB


def bounding_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """The smallest box of ``mask`` (any dimension) holding all its nonzero voxels, as slices; None when empty."""
    box = []
    for axis in range(mask.ndim):
        present = np.flatnonzero(np.any(mask, axis=tuple(other for other in range(mask.ndim) if other != axis)))
        if present.size == 0:
            return None
        box.append(slice(int(present[0]), int(present[-1]) + 1))
    return tuple(box)


class ChunkedComponents:
    """The connected components of a non-empty ``mask[z, y, x]`` (nonzero = in): ``fully_connected`` = 26-connected,
    else face-connected (6).

    Pieces (one chunk's components) are numbered in the order a raster scan of the volume reaches them; a
    component is known by its first piece, its *root*. So ranking components by size, ties to the lower root, is
    ``sitk.RelabelComponent``'s ranking of ``sitk.ConnectedComponent``'s labels on the whole grid, whose labels
    also follow the raster scan.

    - ``box``: the mask's bounding box (slices); all indices below are the whole grid's.
    - ``roots``: int64 ``[components]``, ascending.
    - ``sums``: float64 ``[pieces, 4]``; at a root, its component's voxel count and the sums of its voxels' x, y
      and z indices (exact: integers below 2**53).
    """

    def __init__(self, mask: np.ndarray, fully_connected: bool, chunk_slices: int = 0):
        self.mask, self.fully_connected = mask, fully_connected
        self.chunk_slices = chunk_slices or CHUNK_SLICES
        self.box = bounding_box(mask)
        if self.box is None:
            raise ValueError("the mask is empty: it has no connected components")
        parent: list[int] = []  # union-find over the pieces
        piece_sums: list[np.ndarray] = []
        self.first_piece: dict[int, int] = {}  # chunk start -> number of its first piece

        def root(piece: int) -> int:
            while parent[piece] != piece:
                parent[piece] = parent[parent[piece]]
                piece = parent[piece]
            return piece

        previous = None  # the last plane of the chunk before: piece number + 1, 0 outside
        for start, labels in self.chunks():
            count, offset = int(labels.max()), len(parent)
            self.first_piece[start] = offset
            parent.extend(range(offset, offset + count))
            piece_sums.append(self.index_sums(labels, start, count))
            first = np.where(labels[0] > 0, labels[0].astype(np.int64) + offset, 0)
            if previous is not None:
                base = offset + count + 1
                pairs = np.unique(np.concatenate([below * base + above for below, above in self.touching(previous, first)]))
                for below, above in zip(*np.divmod(pairs, base)):
                    a, b = root(int(below) - 1), root(int(above) - 1)
                    parent[max(a, b)] = min(a, b)  # the root stays the piece reached first
            previous = np.where(labels[-1] > 0, labels[-1].astype(np.int64) + offset, 0)
        self.root_of_piece = np.array([root(piece) for piece in range(len(parent))], dtype=np.int64)
        self.sums = np.zeros((len(parent), 4))
        np.add.at(self.sums, self.root_of_piece, np.concatenate(piece_sums))
        self.roots = np.unique(self.root_of_piece)

    def chunks(self) -> Iterator[tuple[int, np.ndarray]]:
        """``(start, labels)`` per chunk: uint32 labels ``[k, y, x]`` of the box's slices from ``start`` (0 outside)."""
        z_range, rows, columns = self.box
        for start in range(z_range.start, z_range.stop, self.chunk_slices):
            chunk = self.mask[start : min(start + self.chunk_slices, z_range.stop), rows, columns]
            image = sitk.GetImageFromArray(np.ascontiguousarray(chunk, dtype=np.uint8))
            yield start, sitk.GetArrayFromImage(sitk.ConnectedComponent(image, self.fully_connected))

    def index_sums(self, labels: np.ndarray, start: int, count: int) -> np.ndarray:
        """float64 ``[count, 4]``: voxels and x, y, z index sums (whole grid) of the chunk's pieces 1…count."""
        _, rows, columns = self.box
        y, x = (index.ravel().astype(np.float64) for index in np.mgrid[rows, columns])
        sums = np.zeros((count + 1, 4))
        for z, plane in enumerate(labels, start):  # plane by plane: no chunk-sized weight arrays
            flat = plane.ravel()
            voxels = np.bincount(flat, minlength=count + 1)
            sums += np.stack([voxels, np.bincount(flat, weights=x, minlength=count + 1),
                              np.bincount(flat, weights=y, minlength=count + 1), voxels * float(z)], axis=1)
        return sums[1:]

    def touching(self, below: np.ndarray, above: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Piece numbers (+1) of voxel pairs that connect plane ``below`` to the next plane ``above``."""
        shifts = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)] if self.fully_connected else [(0, 0)]
        height, width = below.shape
        for dy, dx in shifts:
            lower = below[max(0, -dy) : height - max(0, dy), max(0, -dx) : width - max(0, dx)]
            upper = above[max(0, dy) : height - max(0, -dy), max(0, dx) : width - max(0, -dx)]
            both = (lower > 0) & (upper > 0)
            yield lower[both], upper[both]

    def component_values(self, per_root: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        """``(start, values)`` per chunk: ``[k, y, x]`` over the box's rows and columns, each voxel's
        ``per_root[root of its component]`` (``per_root`` indexed like ``sums``; only roots are read), 0 outside."""
        for start, labels in self.chunks():
            offset, count = self.first_piece[start], int(labels.max())
            lookup = np.zeros(count + 1, dtype=per_root.dtype)  # chunk label -> value; label 0 is outside
            lookup[1:] = per_root[self.root_of_piece[offset : offset + count]]
            yield start, lookup[labels]
