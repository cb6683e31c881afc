"""Group keys → dense integer codes and the level tree.

Works on the cell table (one row per leaf × arm), never on rows, with Polars
joins rather than Python loops, so millions of keys encode in seconds.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from engine.cells import Cells
from engine.errors import DataError


@dataclass(frozen=True)
class Encoding:
    """The level tree over the cells.

    ``nodes[l]`` is a table with, for level l: the key columns of levels 0..l,
    ``code`` (dense 0..nodes-1, in key order), ``parent`` (code at level l-1,
    null at the top), ``n`` and ``n_treated`` (rows under the node).
    """

    levels: tuple[str, ...]
    nodes: tuple[pl.DataFrame, ...]
    parents: tuple[np.ndarray, ...]   # per level 1..L-1: (nodes_l,) int32 parent codes
    cell_leaf: np.ndarray             # (cells,) int32 leaf code of each cell row
    leaf_rows: np.ndarray             # (leaves,) float64 rows in each leaf (ATE weights)

    @property
    def num_nodes(self) -> tuple[int, ...]:
        return tuple(t.height for t in self.nodes)


def encode(cells: Cells) -> Encoding:
    levels = list(cells.levels)
    table = cells.table
    if not levels:
        # One population: a single pseudo-leaf that every cell belongs to.
        leaf_rows = np.array([float(table["n"].sum())])
        return Encoding((), (), (), np.zeros(table.height, np.int32), leaf_rows)
    key = table[levels[0]]
    if (len(levels) == 1 and table.height and not key.null_count()
            and (key.dtype == pl.String or key.dtype.is_integer()) and key.is_sorted()):
        return _sorted_one_level(table, levels[0])
    treated_rows = pl.when(pl.col("arm") == 1).then(pl.col("n")).otherwise(0)
    nodes: list[pl.DataFrame] = []
    for depth, level in enumerate(levels):
        keys = levels[: depth + 1]
        node = (table.group_by(keys)
                .agg(pl.col("n").sum().alias("n"), treated_rows.sum().alias("n_treated"))
                .sort(level))
        # The top level's keys are unique by construction; below it a key may sit under two parents.
        duplicated = node.filter(pl.col(level).is_duplicated()) if depth else node.clear()
        if duplicated.height:
            key = duplicated[level][0]
            parents = duplicated.filter(pl.col(level) == key)[levels[depth - 1]].to_list()
            raise DataError(
                f"group {key!r} of level {level!r} sits under {len(parents)} different "
                f"{levels[depth - 1]!r} groups ({', '.join(map(repr, parents[:3]))}); each group must "
                f"have one parent — make the keys unique (e.g. prefix the {levels[depth - 1]!r} key)"
            )
        node = node.with_row_index("code").with_columns(pl.col("code").cast(pl.Int32))
        if depth == 0:
            node = node.with_columns(pl.lit(None, dtype=pl.Int32).alias("parent"))
        else:
            above = nodes[-1].select(pl.col(levels[depth - 1]), pl.col("code").alias("parent"))
            node = node.join(above, on=levels[depth - 1], how="left").sort("code")
        nodes.append(node)
    parents = tuple(t["parent"].to_numpy().astype(np.int32) for t in nodes[1:])
    leaf = nodes[-1].select(pl.col(levels[-1]), pl.col("code"))
    cell_leaf = table.select(levels[-1]).join(leaf, on=levels[-1], how="left", maintain_order="left")["code"]
    return Encoding(
        levels=tuple(levels), nodes=tuple(nodes), parents=parents,
        cell_leaf=cell_leaf.to_numpy().astype(np.int32),
        leaf_rows=nodes[-1]["n"].to_numpy().astype(np.float64),
    )


def _sorted_one_level(table: pl.DataFrame, level: str) -> Encoding:
    """``encode`` for one level when the cells are sorted by their key (what every reduce
    backend returns): each key's cells are one run, so the codes are the runs' ranks and
    the node sums one ``np.add.reduceat``, with no hashing (0.16 s → ~0.03 s at 10⁶ keys).
    The same encoding as the general path (a test)."""
    key = table[level]
    starts = np.flatnonzero(np.concatenate([[True], (key.slice(1) != key.slice(0, key.len() - 1)).to_numpy()]))
    n = table["n"].to_numpy()        # its own dtype: a shared cell table may hold float counts
    treated = np.where(table["arm"].to_numpy() == 1, n, 0)
    first = np.zeros(table.height, dtype=np.int32)
    first[starts] = 1
    cell_leaf = np.cumsum(first, dtype=np.int32) - 1
    node = pl.DataFrame({
        level: key.gather(starts),
        "n": pl.Series(np.add.reduceat(n, starts)).cast(table["n"].dtype),
        "n_treated": pl.Series(np.add.reduceat(treated, starts)).cast(table["n"].dtype),
    }).with_row_index("code").with_columns(pl.col("code").cast(pl.Int32), pl.lit(None, dtype=pl.Int32).alias("parent"))
    node = node.select("code", level, "n", "n_treated", "parent")
    return Encoding(levels=(level,), nodes=(node,), parents=(), cell_leaf=cell_leaf,
                    leaf_rows=node["n"].to_numpy().astype(np.float64))
