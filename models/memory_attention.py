"""SAM 3's memory attention for a batch of objects on one frame, each memory frame's keys made once.

transformers' ``Sam3TrackerVideoMemoryAttention`` projects every memory token to a key and a value,
and rotates the keys (RoPE), on every frame that reads it: a memory frame is read on up to seven
frames, so it is projected and rotated up to seven times. On CPU that per-token work was the largest
share of a frame with many objects (keys, values and rotation: about 4.5 ms of 10 for 8 objects on the
tiny model, one core). This module restates the forward so that it is done once per memory frame:

- A memory frame's key input is its features ``m`` plus its spatial encoding ``s`` plus a temporal
  encoding ``τ`` that depends only on how far back the frame is (and is the same for every object).
  The projection and the rotation are linear, so
  ``rope(W_k (m + s + τ) + b_k) = rope(W_k (m + s) + b_k) + rope(W_k τ)``.
  The first term and the value ``W_v m + b_v`` are computed when a memory frame is first read and
  kept while its features live (``MemoryKeys``, weakly keyed on the stored features tensor: a frame
  dropped from the memory bank, or re-encoded after a correction, is never served stale). The
  second term is a table per temporal offset and layer, computed once per model.
- The object-pointer tokens (a few per frame, not rotated) are projected on every frame as before.
- The first layer's self-attention reads only the frame, the same for every object, so it runs
  once per frame; so do the first layer's query normalization, projection and rotation.

Rounding: the split sum rounds differently from the model's single sum in the last bits, so results
match the model's forward closely (about 1e-6 on unit-scale features), not bit for bit; the batched
tracker's answers are tested against the per-object loop with a tolerance (``tests/test_batching.py``).
On a GPU nothing is kept (``keep=False``): there the attention's own arithmetic dominates, and keeping
every layer's keys and values would multiply the memory bank's size by 8 per layer.

Relies on the public submodules of transformers' memory attention, listed in ``models.hf_internals``
(``MODEL_RELIED_ON``) and checked when a model is loaded.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from models.hf_internals import ObjectMemory, attention_kernel, rotate_pairwise

Projections = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (keys, values), heads x HW x head_dim


class MemoryKeys:
    """Each memory frame's rotated keys (without the temporal term) and values, per layer, kept while
    the frame's features tensor lives."""

    def __init__(self) -> None:
        self._kept: dict[int, tuple[weakref.ref, Projections]] = {}

    def __len__(self) -> int:
        return len(self._kept)

    def get(self, features: torch.Tensor) -> Projections | None:
        entry = self._kept.get(id(features))
        return entry[1] if entry is not None and entry[0]() is features else None

    def put(self, features: torch.Tensor, projections: Projections) -> None:
        key = id(features)
        self._kept[key] = (weakref.ref(features, self._forgetter(key)), projections)

    def _forgetter(self, key: int) -> Callable[[weakref.ref], None]:
        kept = self._kept

        def forget(ref: weakref.ref) -> None:
            entry = kept.get(key)
            if entry is not None and entry[0] is ref:
                del kept[key]

        return forget


# One store and one table of temporal terms per memory-attention module (weakly keyed: a model freed
# takes its projections with it).
_KEYS: weakref.WeakKeyDictionary[nn.Module, MemoryKeys] = weakref.WeakKeyDictionary()
_TEMPORAL: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, list[torch.Tensor]]] = weakref.WeakKeyDictionary()


def kept_keys(attention: nn.Module) -> MemoryKeys:
    """The store of ``attention``'s kept memory-frame projections."""
    keys = _KEYS.get(attention)
    if keys is None:
        keys = _KEYS[attention] = MemoryKeys()
    return keys


def attend(
    attention: nn.Module,
    temporal_encodings: torch.Tensor,
    current: torch.Tensor,
    current_pos: torch.Tensor,
    memories: list[ObjectMemory],
    keep: bool,
) -> torch.Tensor:
    """``Sam3TrackerVideoMemoryAttention.forward`` for ``N`` objects of one layout on one frame.

    ``temporal_encodings``: the tracker's ``memory_temporal_positional_encoding``;
    ``current``/``current_pos``: the frame's features, ``HW x 1 x C``; ``keep``: keep each memory
    frame's projections for the next frames. Returns ``N x HW x C``.
    """
    size = len(memories)
    output = (current + 0.1 * current_pos).transpose(0, 1)  # 1 x HW x C
    cos, sin = attention.rotary_emb(output, attention.position_ids)  # 1 x HW x head_dim each
    frames = _GroupFrames(attention, memories, cos, sin, keep)
    temporal = _temporal_terms(attention, temporal_encodings, cos, sin)
    encodings = temporal_encodings.shape[0]
    index = torch.tensor([f.temporal_index % encodings for m in memories for f in m.frames], device=cos.device)

    queries = output.unsqueeze(1)  # 1 x 1 x HW x C: the same for every object until the first cross-attention
    for depth, layer in enumerate(attention.layers):
        query = layer.layer_norm1(queries)
        query, _ = layer.self_attn(query=query, key=query, value=query, position_embeddings=(cos, sin))
        queries = queries + layer.dropout1(query)
        frame_keys, frame_values = frames.layer(depth, layer.cross_attn_image)
        frame_keys += temporal[depth].index_select(0, index)
        keys, values = _with_pointers(layer.cross_attn_image, frame_keys, frame_values, memories)
        attended = _cross_attention(layer.cross_attn_image, layer.layer_norm2(queries), keys, values, cos, sin)
        queries = queries.expand(size, -1, -1, -1) + layer.dropout2(attended)
        query = layer.layer_norm3(queries)
        queries = queries + layer.dropout3(layer.linear2(layer.dropout(layer.activation(layer.linear1(query)))))
    frames.keep()
    return attention.layer_norm(queries)[:, 0]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE along the last dimension, in float32 as the model does it."""
    rotated = x.float()
    return (rotated * cos + rotate_pairwise(rotated) * sin).type_as(x)


def _heads(x: torch.Tensor, attention: nn.Module) -> torch.Tensor:
    """``B x L x (heads * head_dim)`` -> ``B x heads x L x head_dim``."""
    return x.view(x.shape[0], -1, attention.num_attention_heads, attention.head_dim).transpose(1, 2)


class _GroupFrames:
    """A group's memory frames (objects in order, frames in order) for one frame's attention: kept
    projections where there are some, the others projected layer by layer as the layers need them."""

    def __init__(
        self, attention: nn.Module, memories: list[ObjectMemory], cos: torch.Tensor, sin: torch.Tensor, keep: bool
    ) -> None:
        self.store = kept_keys(attention) if keep else None
        self.frames = [f for m in memories for f in m.frames]
        self.kept = [self.store.get(f.features) if self.store is not None else None for f in self.frames]
        self.missing = [i for i, p in enumerate(self.kept) if p is None]
        self.rotation = (cos, sin)
        self.fresh: Projections = []  # per layer, the missing frames' keys and values (M x heads x HW x head_dim)
        if self.missing:
            dtype = attention.layer_norm.weight.dtype  # the session keeps memory features in bfloat16
            self.features = torch.cat([self.frames[i].features for i in self.missing], dim=1).transpose(0, 1).to(dtype)
            positions = torch.cat([self.frames[i].spatial_pos for i in self.missing], dim=1).transpose(0, 1)
            self.key_inputs = self.features + positions.to(dtype)

    def layer(self, depth: int, cross: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """Every frame's keys (without the temporal term) and values for layer ``depth``, stacked:
        ``N*F x heads x HW x head_dim`` each (fresh tensors: the caller may add to them in place)."""
        fresh = self._project(depth, cross) if self.missing else None
        if fresh is not None and len(self.missing) == len(self.frames):
            keys, values = fresh
            return (keys.clone() if self.store is not None else keys), values
        row = {i: r for r, i in enumerate(self.missing)}
        pick = [
            p[depth] if p is not None else (fresh[0][row[i]], fresh[1][row[i]])  # type: ignore[index]
            for i, p in enumerate(self.kept)
        ]
        return torch.stack([k for k, _ in pick]), torch.stack([v for _, v in pick])

    def _project(self, depth: int, cross: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """The missing frames' keys (rotated, without the temporal term) and values for one layer."""
        keys = _rotate(_heads(cross.k_proj(self.key_inputs), cross), *self.rotation)
        values = _heads(cross.v_proj(self.features), cross)
        if self.store is not None:
            self.fresh.append((keys, values))
        return keys, values

    def keep(self) -> None:
        """Store the frames projected on this call (each its own copy: frames are dropped one by one)."""
        if self.store is None:
            return
        for row, i in enumerate(self.missing):
            self.store.put(self.frames[i].features, [(k[row].clone(), v[row].clone()) for k, v in self.fresh])


def _temporal_terms(
    attention: nn.Module, temporal_encodings: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> list[torch.Tensor]:
    """Per layer, ``rope(W_k τ)`` for every temporal encoding ``τ``: ``T x heads x HW x head_dim``."""
    stamp = (temporal_encodings.data_ptr(), temporal_encodings._version, cos.device, cos.dtype, cos.shape)
    cached = _TEMPORAL.get(attention)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    encodings = temporal_encodings.reshape(temporal_encodings.shape[0], 1, -1)  # T x 1 x C
    tables = []
    for layer in attention.layers:
        cross = layer.cross_attn_image
        projected = _heads(F.linear(encodings, cross.k_proj.weight), cross)  # T x heads x 1 x head_dim
        tables.append(_rotate(projected.expand(-1, -1, cos.shape[-2], -1), cos, sin))
    _TEMPORAL[attention] = (stamp, tables)
    return tables


def _with_pointers(
    cross: nn.Module, frame_keys: torch.Tensor, frame_values: torch.Tensor, memories: list[ObjectMemory]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The group's keys and values for one layer, ``N x heads x L x head_dim`` each: the memory frames'
    (``N*F x heads x HW x head_dim``, frames in order) then the object-pointer tokens', projected here."""
    size = len(memories)
    count, pointer_tokens = memories[0].layout
    heads, tokens, head_dim = frame_keys.shape[1:]

    def per_object(x: torch.Tensor) -> torch.Tensor:
        return x.view(size, count, heads, tokens, head_dim).transpose(1, 2).reshape(size, heads, -1, head_dim)

    keys, values = per_object(frame_keys), per_object(frame_values)
    if pointer_tokens:
        pointers = torch.cat([m.pointers for m in memories], dim=1).transpose(0, 1)  # type: ignore[misc]
        pointer_pos = torch.cat([m.pointer_pos for m in memories], dim=1).transpose(0, 1)  # type: ignore[misc]
        keys = torch.cat([keys, _heads(cross.k_proj(pointers + pointer_pos), cross)], dim=2)
        values = torch.cat([values, _heads(cross.v_proj(pointers), cross)], dim=2)
    return keys, values


def _cross_attention(
    cross: nn.Module,
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
) -> torch.Tensor:
    """``Sam3TrackerVideoRoPEAttention.forward`` with the keys and values given (already projected).

    ``query``: ``B x 1 x HW x C`` with ``B`` 1 (shared by every object) or ``N``. Returns ``N x 1 x HW x C``.
    """
    size = keys.shape[0]
    q = _rotate(_heads(cross.q_proj(query[:, 0]), cross), cos, sin).expand(size, -1, -1, -1)
    kernel = attention_kernel(cross)
    attended, _ = kernel(cross, q, keys, values, attention_mask=None, scaling=cross.scaling, is_causal=cross.is_causal)
    attended = attended.reshape(size, 1, -1, cross.num_attention_heads * cross.head_dim)  # from N x HW x heads x d
    return cross.o_proj(attended)
