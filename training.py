"""Roostformer and Wrenformer on aviary's Wrenformer (torch.nn.TransformerEncoder),
with a trainer that tensorizes a fold once and then batches on the device.

Inputs are stored as token indices, not feature vectors: a material is one sequence
(Roostformer: its elements) or several equivalent sequences (Wrenformer: its Wyckoff
sites under each equivalent choice of Wyckoff letters). The model looks up aviary's
matscholar element and Wyckoff embeddings inside its forward pass, so a fold of
132k materials takes a few MB on the device and a batch is one gather.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import cache

import numpy as np
import torch
import torch.nn.functional as F
from aviary import PKG_DIR
from aviary.core import AGGREGATORS, sampled_softmax
from aviary.wrenformer.model import Wrenformer
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm import tqdm

from mat_bench import CLASS_THRESHOLD, VAL_METRICS
from mat_bench.runs import CHOICES, DEFAULTS, TORCH_FEEDFORWARD

VAL_CURVE_EPOCHS = 10  # a run records its members' validation scores this often
# the last quarter of the epochs: the window of the weight average (SWA) that a run
# measures on validation beside its recipe, whose predictions stay the last epoch's
SWA_FRACTION = 0.25
ELEM_DIM, WYCKOFF_DIM = 200, 444  # matscholar200 and bra-alg-off embedding sizes
# attention kernels scaled_dot_product_attention may pick on CUDA (SDPBackend
# members; None: torch's own choice). For these short sequences (a material's
# elements) the memory-efficient kernel trains 25% faster than the cuDNN kernel
# torch picks on an H200 (BENCHMARKS.md, v4)
CUDA_SDPA_BACKENDS: list | None = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


# --- vocabularies from aviary's embedding files -------------------------------------
@cache
def element_vocab() -> tuple[dict[str, int], Tensor]:
    """Element symbol -> row of the matscholar200 table (row 0 is padding)."""
    with open(f"{PKG_DIR}/embeddings/element/matscholar200.json") as file:
        features = json.load(file)
    index = {el: idx + 1 for idx, el in enumerate(features)}
    table = torch.zeros(len(features) + 1, ELEM_DIM)
    table[1:] = torch.tensor(list(features.values()), dtype=torch.float32)
    return index, table


@cache
def wyckoff_vocab() -> tuple[dict[tuple[str, str], int], Tensor]:
    """(space group number, Wyckoff letter) -> row of the Wyckoff table (0: padding)."""
    with open(f"{PKG_DIR}/embeddings/wyckoff/bra-alg-off.json") as file:
        features = json.load(file)
    keys = [(spg, letter) for spg, sites in features.items() for letter in sites]
    index = {key: idx + 1 for idx, key in enumerate(keys)}
    table = torch.zeros(len(keys) + 1, WYCKOFF_DIM)
    table[1:] = torch.tensor([features[spg][let] for spg, let in keys],
                             dtype=torch.float32)
    return index, table


def wyckoff_table(scaling: str = "raw") -> Tensor:
    """The Wyckoff table as the model reads it: aviary's features as they are (raw:
    counts up to 192, beside element rows of norm 1) or each feature divided by its
    largest value over all positions, so every feature lies in [0, 1] (max)."""
    table = wyckoff_vocab()[1]
    if scaling == "raw":
        return table
    if scaling == "max":
        return table / table.abs().amax(dim=0).clamp(min=1e-12)
    raise ValueError(f"unknown Wyckoff feature scaling {scaling!r}: use one of "
                     f"{CHOICES['wyckoff_features']}")


# --- tokenization -------------------------------------------------------------------
@dataclass
class Tokens:
    """N materials as S >= N token sequences padded to length L (numpy arrays).

    Material i owns sequences seq_start[i] to seq_start[i + 1] (one for Roostformer,
    one per equivalent Wyckoff set for Wrenformer), all of length length[i].
    """

    elem: np.ndarray  # (S, L) int: element rows, 0 = padding
    frac: np.ndarray  # (S, L) float32: element fraction (Wyckoff site share)
    wyckoff: np.ndarray | None  # (S, L) int: Wyckoff rows (Wrenformer only)
    seq_start: np.ndarray  # (N + 1,) int offsets into the sequences
    length: np.ndarray  # (N,) int tokens per material

    def __len__(self) -> int:
        return len(self.length)

    def subset(self, idx: np.ndarray) -> Tokens:
        """The tokens of materials idx, in that order."""
        n_seq = np.diff(self.seq_start)[idx]
        seq_idx = expand_ranges(self.seq_start[idx], n_seq)
        max_len = int(self.length[idx].max(initial=1))

        def cut(arr: np.ndarray | None) -> np.ndarray | None:
            return None if arr is None else arr[seq_idx, :max_len]

        return Tokens(cut(self.elem), cut(self.frac), cut(self.wyckoff),
                      np.concatenate([[0], np.cumsum(n_seq)]), self.length[idx])


def expand_ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenate arange(start, start + count) for each pair, without a loop."""
    ends = np.cumsum(counts)
    return np.arange(ends[-1] if len(ends) else 0) - np.repeat(ends - counts - starts,
                                                               counts)


def _pad(rows: list[list], dtype: type) -> np.ndarray:
    out = np.zeros((len(rows), max(map(len, rows), default=1)), dtype=dtype)
    for idx, row in enumerate(rows):
        out[idx, : len(row)] = row
    return out


def tokenize_compositions(formulas: Sequence[str]) -> Tokens:
    """Roostformer tokens: one (element, fraction) token per element."""
    from pymatgen.core import Composition

    elem_index, _ = element_vocab()
    parsed: dict[str, tuple[list[int], list[float]]] = {}
    for formula in set(formulas):
        try:
            amounts = Composition(formula).get_el_amt_dict()
            total = sum(amounts.values())
            parsed[formula] = ([elem_index[el] for el in amounts],
                               [amt / total for amt in amounts.values()])
        except (KeyError, ValueError, TypeError, ZeroDivisionError) as exc:
            raise ValueError(f"cannot read composition {formula!r} "
                             f"({type(exc).__name__}: {exc})") from exc
    elems, fracs = zip(*(parsed[f] for f in formulas), strict=True)
    length = np.array([len(e) for e in elems])
    return Tokens(_pad(elems, np.int64), _pad(fracs, np.float32), None,
                  np.arange(len(formulas) + 1), length)


def tokenize_protostructures(labels: Sequence[str]) -> Tokens:
    """Wrenformer tokens: one (element, site share, Wyckoff position) token per
    Wyckoff site, one sequence per equivalent Wyckoff set of the material."""
    from aviary.wren.data import parse_protostructure_label

    elem_index, _ = element_vocab()
    wyk_index, _ = wyckoff_vocab()
    elems, fracs, wyks, n_seq, length = [], [], [], [], []
    for label in labels:
        try:
            spg, mults, elements, equivalent_sets = parse_protostructure_label(label)
        except (KeyError, ValueError, IndexError, TypeError) as exc:
            raise ValueError(f"cannot read Wyckoff label {label!r} "
                             f"({type(exc).__name__}: {exc})") from exc
        el_ids = [elem_index[el] for el in elements]
        shares = [m / sum(mults) for m in mults]
        for wyk_set in sorted(equivalent_sets):
            elems.append(el_ids)
            fracs.append(shares)
            wyks.append([wyk_index[spg, letter] for letter in wyk_set])
        n_seq.append(len(equivalent_sets))
        length.append(len(elements))
    return Tokens(_pad(elems, np.int64), _pad(fracs, np.float32), _pad(wyks, np.int64),
                  np.concatenate([[0], np.cumsum(n_seq)]), np.array(length))


def tokenize(model: str, inputs: Sequence[str]) -> Tokens:
    """Tokens for a model's inputs: compositions (roostformer) or protostructure
    labels (wrenformer)."""
    if model == "wrenformer":
        return tokenize_protostructures(inputs)
    return tokenize_compositions(inputs)


# --- the model ----------------------------------------------------------------------
def fraction_encoding(frac: Tensor, n_dims: int) -> Tensor:
    """Sinusoidal features of the fraction on a linear and a log scale (n_dims / 2
    each), so attention can tell 0.01 from 0.02 as well as 0.5 from 0.6."""
    n_freq = n_dims // 4
    freqs = torch.exp(-math.log(1000) * torch.arange(n_freq, device=frac.device)
                      / n_freq)
    lin = frac.float() * 1000
    log = -torch.log2(frac.float().clamp(min=1e-6)) * 100
    angles = torch.stack([lin, log], dim=-1)[..., None] * freqs  # (..., 2, n_freq)
    return torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(-2)


def token_features(elem_table: Tensor, wyckoff_table: Tensor | None,
                   frac_encoding_dims: int, elem: Tensor, frac: Tensor,
                   wyckoff: Tensor | None) -> Tensor:
    """aviary's input features per token: [fraction, matscholar200 element embedding,
    Wyckoff embedding (Wrenformer)], plus the optional sinusoidal fraction encoding."""
    parts = [frac[..., None], elem_table[elem]]
    if wyckoff is not None:
        assert wyckoff_table is not None
        parts.append(wyckoff_table[wyckoff])
    if frac_encoding_dims:
        parts.append(fraction_encoding(frac, frac_encoding_dims))
    return torch.cat(parts, dim=-1)


def masked_mean(x: Tensor, keep: Tensor, dim: int) -> Tensor:
    """Mean over `dim` of x where keep is True: aviary's masked mean in two kernels
    instead of its NaN fill and nanmean."""
    keep = keep.to(torch.float32)
    return (x.float() * keep).sum(dim=dim) / keep.sum(dim=dim)


class MatbenchTransformer(Wrenformer):
    """One member's weights and hyperparameters: aviary's Wrenformer
    (TransformerEncoder, residual trunk and heads) sized for token features.
    Roostformer when `wyckoff` is False. StackedTransformer stacks members and runs
    them; this class gives each member aviary's initialization and model_params."""

    def __init__(self, *, wyckoff: bool, frac_encoding_dims: int = 0,
                 wyckoff_features: str = "raw",
                 dim_feedforward: int = TORCH_FEEDFORWARD, **kwargs) -> None:
        kwargs.pop("n_features", None)  # derived below (model_params holds it)
        n_features = 1 + ELEM_DIM + (WYCKOFF_DIM if wyckoff else 0) + frac_encoding_dims
        super().__init__(n_features=n_features, **kwargs)
        if wyckoff_features not in CHOICES["wyckoff_features"]:
            raise ValueError(f"unknown Wyckoff feature scaling {wyckoff_features!r}")
        if dim_feedforward != TORCH_FEEDFORWARD:
            # aviary builds its encoder layers at torch's default width; rebuild them
            # (after aviary's whole init, so the default draws the same weights)
            layer = self.transformer_encoder.layers[0]
            self.transformer_encoder = nn.TransformerEncoder(
                nn.TransformerEncoderLayer(
                    d_model=layer.linear1.in_features, nhead=layer.self_attn.num_heads,
                    dim_feedforward=dim_feedforward, dropout=layer.dropout.p,
                    batch_first=True, norm_first=True),
                num_layers=len(self.transformer_encoder.layers),
                enable_nested_tensor=False)
        self.model_params.update(wyckoff=wyckoff,
                                 frac_encoding_dims=frac_encoding_dims,
                                 wyckoff_features=wyckoff_features,
                                 dim_feedforward=dim_feedforward)
        self.frac_encoding_dims = frac_encoding_dims


def member_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """Each member's linear map: x (M, ..., in), weight (M, out, in), bias (M, out)
    -> (M, ..., out), as one batched matrix product (a plain one when M is 1)."""
    if weight.shape[0] == 1:
        return F.linear(x, weight.squeeze(0), None if bias is None else bias.squeeze(0))
    flat = x.reshape(x.shape[0], -1, x.shape[-1])
    wt = weight.transpose(1, 2)
    out = (torch.bmm(flat, wt) if bias is None
           else torch.baddbmm(bias[:, None], flat, wt))
    return out.view(*x.shape[:-1], weight.shape[1])


def member_layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """Layer norm over the last dim with each member's affine weights."""
    if weight.shape[0] == 1:
        return F.layer_norm(x, x.shape[-1:], weight.squeeze(0), bias.squeeze(0), eps)
    shape = (weight.shape[0], *[1] * (x.dim() - 2), weight.shape[-1])
    normed = F.layer_norm(x, x.shape[-1:], eps=eps)
    return torch.addcmul(bias.view(shape), normed, weight.view(shape))


class StackedTransformer(nn.Module):
    """M members (MatbenchTransformers of one shape) with their weights stacked on a
    leading member dimension, run together: every linear map is one batched matrix
    product over members, attention runs over members x sequences. Members share no
    weights and no data; a member computes what aviary's Wrenformer computes with its
    weights (tests check this). A single model is M = 1."""

    def __init__(self, members: Sequence[MatbenchTransformer]) -> None:
        super().__init__()
        first = members[0]
        self.model_params = dict(first.model_params)
        self.n_members = len(members)
        self.frac_encoding_dims = first.frac_encoding_dims
        self.aggregations = tuple(first.embedding_aggregations)
        layers = first.transformer_encoder.layers
        self.n_layers, self.n_heads = len(layers), layers[0].self_attn.num_heads
        self.dropout, self.eps = layers[0].dropout.p, layers[0].norm1.eps
        if layers[0].activation is not F.relu or not layers[0].norm_first:
            raise ValueError("expected aviary's pre-norm ReLU encoder layers")
        self.trunk_res = [isinstance(r, nn.Linear) for r in first.trunk_nn.res_fcs]
        self.head_res = [isinstance(r, nn.Linear) for r in first.output_nns[0].res_fcs]
        self.weights = nn.ParameterDict()
        per_member = [dict(m.named_parameters()) for m in members]
        for name in per_member[0]:
            stacked = torch.stack([params[name].detach() for params in per_member])
            self.weights[name.replace(".", "__")] = nn.Parameter(stacked)
        # fixed embedding tables come from aviary's package, not from checkpoints
        self.register_buffer("elem_table", element_vocab()[1], persistent=False)
        self.register_buffer(
            "wyckoff_table", wyckoff_table(self.model_params["wyckoff_features"])
            if self.model_params["wyckoff"] else None, persistent=False)

    def member_state_dict(self, idx: int) -> dict[str, Tensor]:
        """Member idx's weights as a MatbenchTransformer state dict."""
        return {name.replace("__", "."): param[idx].detach()
                for name, param in self.weights.items()}

    def forward(  # type: ignore[override]
        self, elem: Tensor, frac: Tensor, wyckoff: Tensor | None, seq_mask: Tensor,
        seq_owner: Tensor | None = None, mask: Tensor | None = None,
    ) -> Tensor:
        """Each member's outputs (M, B, n_outputs) from padded token sequences.

        Args:
            elem, frac, wyckoff: (M, S, L) element rows, fractions, Wyckoff rows.
            seq_mask: (M, S, L) True at padding.
            seq_owner: (M, S) position of each sequence's material in its member's
                batch (Wrenformer: the embeddings of a material's equivalent
                sequences are averaged; position B marks filler sequences, dropped).
            mask: (M, B, L) True at padding, per material (Wrenformer).
        """
        w = {name.replace("__", "."): param for name, param in self.weights.items()}
        dtype = w["resize_embedding.weight"].dtype  # bf16 in a Bf16Copy
        features = token_features(self.elem_table, self.wyckoff_table,
                                  self.frac_encoding_dims, elem, frac, wyckoff)
        x = member_linear(features.to(dtype), w["resize_embedding.weight"],
                          w["resize_embedding.bias"])
        x = self.encode(x, seq_mask, w)

        n_members, n_seq, length, d_model = x.shape
        if seq_owner is not None:  # mean over each material's equivalent Wyckoff sets
            assert mask is not None
            n_mat = mask.shape[1]
            slot = (seq_owner + (n_mat + 1) * torch.arange(
                n_members, device=x.device)[:, None]).flatten()
            flat = x.reshape(n_members * n_seq, length, d_model)
            summed = flat.new_zeros((n_members * (n_mat + 1), length, d_model))
            summed.index_add_(0, slot, flat)
            counts = flat.new_zeros(n_members * (n_mat + 1)).index_add_(
                0, slot, torch.ones_like(slot, dtype=flat.dtype))
            x = (summed / counts.clamp(min=1)[:, None, None]).view(
                n_members, n_mat + 1, length, d_model)[:, :n_mat]
        else:
            mask = seq_mask

        keep = ~mask[..., None]
        pooled = torch.cat([
            masked_mean(x, keep, 2) if key == "mean"
            else AGGREGATORS[key](x.flatten(0, 1), keep.flatten(0, 1), 1).view(
                *x.shape[:2], -1)
            for key in self.aggregations], dim=-1)
        hidden = F.relu(self.residual(pooled.to(dtype), w, "trunk_nn", self.trunk_res))
        return self.residual(hidden, w, "output_nns.0", self.head_res)

    @staticmethod
    def residual(x: Tensor, w: dict[str, Tensor], prefix: str, res: list[bool]
                 ) -> Tensor:
        """aviary's ResidualNetwork: x = relu(fc(x)) + res_fc(x) per layer, then
        fc_out."""
        for idx, has_res_fc in enumerate(res):
            hidden = F.relu(member_linear(x, w[f"{prefix}.fcs.{idx}.weight"],
                                          w[f"{prefix}.fcs.{idx}.bias"]))
            x = hidden + (member_linear(x, w[f"{prefix}.res_fcs.{idx}.weight"])
                          if has_res_fc else x)
        return member_linear(x, w[f"{prefix}.fc_out.weight"],
                             w[f"{prefix}.fc_out.bias"])

    def encode(self, x: Tensor, pad: Tensor, w: dict[str, Tensor]) -> Tensor:
        """aviary's transformer encoder (pre-norm nn.TransformerEncoderLayers, ReLU)
        on x (M, S, L, d_model), pad (M, S, L) True at padding, each member with its
        own weights. In bf16 on a CPU the attention core runs in fp32, which is faster
        there at these sizes."""
        n_members, n_seq, length, _ = x.shape
        attend = ~pad.reshape(n_members * n_seq, 1, 1, length)
        fp32_attention = x.device.type == "cpu" and (
            torch.is_autocast_enabled("cpu") or x.dtype == torch.bfloat16)
        p_drop = self.dropout if self.training else 0.0  # skip no-op calls
        cuda_backends = x.device.type == "cuda" and CUDA_SDPA_BACKENDS
        for idx in range(self.n_layers):
            layer = f"transformer_encoder.layers.{idx}."
            qkv = member_linear(
                member_layer_norm(x, w[layer + "norm1.weight"], w[layer + "norm1.bias"],
                                  self.eps),
                w[layer + "self_attn.in_proj_weight"],
                w[layer + "self_attn.in_proj_bias"])
            if fp32_attention:
                qkv = qkv.float()
            q, k, v = qkv.view(n_members * n_seq, length, 3, self.n_heads, -1).permute(
                2, 0, 3, 1, 4)
            with (sdpa_kernel(CUDA_SDPA_BACKENDS) if cuda_backends else nullcontext()):
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=attend,
                                                     dropout_p=p_drop)
            out = member_linear(out.transpose(1, 2).reshape(x.shape).to(x.dtype),
                                w[layer + "self_attn.out_proj.weight"],
                                w[layer + "self_attn.out_proj.bias"])
            x = x + (F.dropout(out, p_drop) if p_drop else out)
            hidden = F.relu(member_linear(
                member_layer_norm(x, w[layer + "norm2.weight"], w[layer + "norm2.bias"],
                                  self.eps),
                w[layer + "linear1.weight"], w[layer + "linear1.bias"]))
            if p_drop:
                hidden = F.dropout(hidden, p_drop)
            out = member_linear(hidden, w[layer + "linear2.weight"],
                                w[layer + "linear2.bias"])
            x = x + (F.dropout(out, p_drop) if p_drop else out)
        return x


# --- device-resident data and the members' batches ---------------------------------
ORDER_STREAM = 1_000_003  # seeds the step order all members share (TaskData.plan)
SEQ_MULTIPLE = 8  # Wrenformer steps hold a multiple of this many sequences per member


@dataclass
class Member:
    """One model of a stacked run: a (fold, seed) pair with its own training and
    validation materials (row indices into the task's TaskData)."""

    fold: int
    seed: int
    fit_idx: np.ndarray
    val_idx: np.ndarray


@dataclass
class Plan:
    """One pass over each member's materials: step s gives member m the materials
    mat[s, m] (`TaskData.pad` where a member's batch is short; weight 0 there)."""

    mat: Tensor  # (steps, M, B) long, on the device
    weight: Tensor  # (steps, M, B) float32, 1 for real materials
    width: list[int]  # longest material of each step
    seq: Tensor | None = None  # Wrenformer: (M, sum of steps' S) sequence rows
    owner: Tensor | None = None  # (M, sum of S) batch position owning each sequence
    seq_bounds: np.ndarray | None = None  # (steps + 1,) step offsets into seq/owner

    def __len__(self) -> int:
        return len(self.width)


class TaskData:
    """A task's tokens and targets on the device, and the members' batches drawn
    from them: per epoch a few numpy ops and one host-to-device copy of the plan; per
    step one gather on the device and no synchronization. Row `pad` (one hydrogen
    token, target 0) fills short batches; its loss weight is 0."""

    def __init__(self, tokens: Tokens, targets: np.ndarray, device: torch.device
                 ) -> None:
        self.device, self.pad = device, len(tokens)
        self.is_wren = tokens.wyckoff is not None
        self.length = np.append(tokens.length, 1)
        self.n_seq = np.append(np.diff(tokens.seq_start), 1)
        self.seq_start = np.append(tokens.seq_start, tokens.seq_start[-1] + 1)
        self.filler = len(tokens.elem)  # the pad row's sequence: Wrenformer filler too

        def add_row(arr: np.ndarray | None, first: float) -> Tensor | None:
            if arr is None:
                return None
            row = np.zeros((1, arr.shape[1]), arr.dtype)
            row[0, 0] = first
            return torch.as_tensor(np.concatenate([arr, row]), device=device)

        self.elem, self.frac = add_row(tokens.elem, 1), add_row(tokens.frac, 1.0)
        self.wyckoff = add_row(tokens.wyckoff, 0)
        self.targets = torch.as_tensor(np.append(targets, np.zeros(1, targets.dtype)),
                                       device=device)
        self.first_seq = torch.as_tensor(self.seq_start[:-1], device=device)
        self.max_len = int(self.length.max())

    def __len__(self) -> int:
        return self.pad

    def member_batches(self, idx: np.ndarray, batch_size: int,
                       rng: np.random.Generator | None, bucket_batches: int = 16
                       ) -> list[np.ndarray]:
        """Batches of materials idx: random buckets of `bucket_batches` batches, each
        sorted by length (little padding); the batches sorted by their longest
        material (ties in random order), for `plan` to order. Without an rng:
        sorted by length, for evaluation."""
        length = self.length[idx]
        if rng is None:
            order = idx[np.argsort(length, kind="stable")]
        else:
            perm = rng.permutation(len(idx))
            bucket = batch_size * bucket_batches
            for start in range(0, len(perm), bucket):
                chunk = perm[start: start + bucket]
                perm[start: start + bucket] = chunk[np.argsort(length[chunk],
                                                               kind="stable")]
            order = idx[perm]
        batches = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
        if rng is not None:
            shuffled = [batches[i] for i in rng.permutation(len(batches))]
            widths = [self.length[batch].max() for batch in shuffled]
            batches = [shuffled[i] for i in np.argsort(widths, kind="stable")]
        return batches

    def plan(self, member_idx: Sequence[np.ndarray], batch_size: int,
             rngs: Sequence[np.random.Generator] | None = None,
             order_rng: np.random.Generator | None = None,
             bucket_batches: int = 16) -> Plan:
        """Every member's materials once, in steps of at most batch_size each.
        Training (rngs: one per member): each member's batches are drawn with its
        own rng and ranked by their longest material, and step s gives every member
        its batch of rank order[s], for one random permutation `order` shared by all
        members (from order_rng): a step's batches are about equally long, so
        stacked members pad little, and a member's batches never depend on another
        member's. Evaluation (no rngs): sorted by length."""
        per_member = [self.member_batches(idx, batch_size, None if rngs is None
                                          else rngs[m], bucket_batches)
                      for m, idx in enumerate(member_idx)]
        n_steps = max(map(len, per_member))
        ranks = (np.arange(n_steps) if rngs is None else
                 (order_rng or np.random.default_rng(0)).permutation(n_steps))
        mat = np.full((n_steps, len(per_member), batch_size), self.pad, np.int64)
        for m, batches in enumerate(per_member):
            for step, rank in enumerate(ranks):
                if rank < len(batches):
                    mat[step, m, : len(batches[rank])] = batches[rank]
        return self.plan_from(mat)

    def plan_from(self, mat: np.ndarray) -> Plan:
        """The plan whose step s gives member m the materials mat[s, m] (steps, M, B;
        `pad` fills short batches), with Wrenformer's sequence rows."""
        n_steps, n_members, batch_size = mat.shape
        real = mat != self.pad
        width = self.length[mat].max(axis=(1, 2)).tolist()
        plan = Plan(torch.as_tensor(mat, device=self.device),
                    torch.as_tensor(real, dtype=torch.float32, device=self.device),
                    width)
        if self.is_wren:  # each step's sequences per member, then filler sequences
            seq_rows, owner_rows, bounds = [], [], [0]
            for step in range(n_steps):
                seqs, owners = [], []
                for m in range(n_members):
                    batch = mat[step, m][real[step, m]]
                    counts = self.n_seq[batch]
                    seqs.append(expand_ranges(self.seq_start[batch], counts))
                    owners.append(np.repeat(np.arange(len(batch)), counts))
                n_seq = max(map(len, seqs))
                n_seq += -n_seq % SEQ_MULTIPLE
                for m, (seq, owner) in enumerate(zip(seqs, owners, strict=True)):
                    fill = n_seq - len(seq)
                    seqs[m] = np.concatenate([seq, np.full(fill, self.filler)])
                    owners[m] = np.concatenate([owner, np.full(fill, batch_size)])
                seq_rows.append(np.stack(seqs))
                owner_rows.append(np.stack(owners))
                bounds.append(bounds[-1] + n_seq)
            plan.seq = torch.as_tensor(np.concatenate(seq_rows, axis=1),
                                       device=self.device)
            plan.owner = torch.as_tensor(np.concatenate(owner_rows, axis=1),
                                         device=self.device)
            plan.seq_bounds = np.array(bounds)
        return plan

    def inputs(self, mat: Tensor, width: int, seq: Tensor | None = None,
               owner: Tensor | None = None) -> tuple:
        """The model's inputs for materials mat (M, B), `width` tokens wide."""
        if not self.is_wren:
            elem = self.elem[:, :width][mat]
            return elem, self.frac[:, :width][mat], None, elem == 0
        assert seq is not None and self.wyckoff is not None
        elem = self.elem[:, :width][seq]
        return (elem, self.frac[:, :width][seq], self.wyckoff[:, :width][seq],
                elem == 0, owner, self.elem[:, :width][self.first_seq[mat]] == 0)

    def step(self, plan: Plan, step: int) -> tuple[tuple, Tensor, Tensor, Tensor]:
        """(inputs, targets, loss weights, material rows) of one step of a plan."""
        mat = plan.mat[step]
        seq = owner = None
        if plan.seq_bounds is not None:
            lo, hi = plan.seq_bounds[step], plan.seq_bounds[step + 1]
            seq, owner = plan.seq[:, lo:hi], plan.owner[:, lo:hi]
        return (self.inputs(mat, plan.width[step], seq, owner), self.targets[mat],
                plan.weight[step], mat)


# --- training -----------------------------------------------------------------------
@dataclass
class TrainConfig:
    """Optimization settings (model size lives in the model), defaulting to
    runs.DEFAULTS."""

    task_type: str  # "regression" or "classification"
    epochs: int = DEFAULTS["epochs"]
    batch_size: int = DEFAULTS["batch_size"]  # per member
    learning_rate: float = DEFAULTS["learning_rate"]
    weight_decay: float = DEFAULTS["weight_decay"]
    warmup_frac: float = DEFAULTS["warmup_frac"]
    robust: bool = DEFAULTS["robust"]
    gate: bool = DEFAULTS["gate"]  # regression: prediction x sigmoid(gate output)
    log_target: bool = DEFAULTS["log_target"]  # regression: fit log(target)
    frac_jitter: float = DEFAULTS["frac_jitter"]  # fractions x (1 + jitter x N(0, 1))
    epoch_choice: bool = DEFAULTS["epoch_choice"]  # keep each member's best curve epoch
    amp: bool = False  # bf16 compute, fp32 weights and optimizer (runs: per device)
    cuda_graphs: bool = False  # capture the whole training step (CUDA, Roostformer)


def make_optimizer(params: Sequence[Tensor], cfg: TrainConfig, steps: int,
                   device: torch.device
                   ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (fused where the device supports it; capturable, with the learning rate
    in a device tensor, for CUDA graphs) with linear warm-up and cosine decay over
    `steps` optimizer steps."""
    kwargs: dict = {"weight_decay": cfg.weight_decay}
    if cfg.cuda_graphs:
        optimizer = torch.optim.AdamW(
            params, lr=torch.tensor(cfg.learning_rate, device=device), fused=True,
            capturable=True, **kwargs)
    else:
        try:
            optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, fused=True,
                                          **kwargs)
        except (RuntimeError, TypeError):
            optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, **kwargs)
    warmup = max(1, int(cfg.warmup_frac * steps))

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)


class Bf16Copy:
    """Mixed precision without autocast: forward and backward run on a bf16 copy of
    the model; its gradients are copied into fp32 master weights, which the optimizer
    updates (`master`: the model's parameters as one flat tensor, each parameter a
    view of it), and `refresh` copies those back into the bf16 copy. Flat buffers make
    each copy one op and the fused AdamW step one kernel. On a CPU this skips
    autocast's per-op casts, which at these sizes cost more than a tenth of a step."""

    def __init__(self, model: nn.Module) -> None:
        params = list(model.parameters())
        self.model = copy.deepcopy(model).to(torch.bfloat16)
        self.twins = list(self.model.parameters())
        self.master = nn.Parameter(torch.cat([p.detach().reshape(-1) for p in params]))
        self.master_grad = torch.zeros_like(self.master)
        self.weights = self.master.detach().to(torch.bfloat16)  # the copy, flat
        self.grads = []  # views of master_grad, one per parameter
        start = 0
        for param, twin in zip(params, self.twins, strict=True):
            end = start + param.numel()
            param.data = self.master.data[start:end].view_as(param)
            twin.data = self.weights[start:end].view_as(param)
            self.grads.append(self.master_grad[start:end].view_as(param))
            start = end

    def backward(self, loss: Tensor) -> None:
        """Backpropagate through the copy into the master gradients."""
        self.master.grad = self.master_grad  # (a zero_grad may have dropped it)
        for twin in self.twins:
            twin.grad = None
        loss.backward()
        grads, twin_grads = [], []
        for grad, twin in zip(self.grads, self.twins, strict=True):
            if twin.grad is None:  # a parameter the loss did not reach
                grad.zero_()
            else:
                grads.append(grad)
                twin_grads.append(twin.grad)
        torch._foreach_copy_(grads, twin_grads)  # bf16 -> fp32

    @torch.no_grad()
    def refresh(self) -> None:
        """Copy the master weights (after an optimizer step or a checkpoint load)
        into the bf16 copy."""
        self.weights.copy_(self.master)


def regression_output(output: Tensor, cfg: TrainConfig, norm_mean: Tensor,
                      norm_std: Tensor) -> tuple[Tensor, Tensor | None]:
    """A regression head's (M, B) prediction in normalized units and its log
    standard deviation (robust loss; else None). Outputs: [value, gate (cfg.gate)]
    then as many log standard deviations (cfg.robust, as aviary doubles them). With
    a gate, the prediction in target units is sigmoid(gate) x value, so the model
    can predict exactly 0 (a metal's band gap) whatever the targets' mean."""
    value = output[..., 0]
    if cfg.gate:
        mean, std = norm_mean[:, None], norm_std[:, None]
        value = (torch.sigmoid(output[..., 1]) * (value * std + mean) - mean) / std
    log_std = output[..., 2 if cfg.gate else 1] if cfg.robust else None
    return value, log_std


def member_losses(output: Tensor, targets: Tensor, weight: Tensor, cfg: TrainConfig,
                  norm_mean: Tensor, norm_std: Tensor) -> Tensor:
    """Each member's mean loss (M,) over its real materials (weight 1): L1 on
    targets normalized by the member's training targets (regression) or
    cross-entropy (classification); aviary's robust variants with --robust."""
    output = output.float()
    if cfg.task_type == "regression":
        if cfg.log_target:  # the pad row's target 0 is clamped (its weight is 0)
            targets = torch.log(targets.clamp(min=1e-12))
        normed = (targets - norm_mean[:, None]) / norm_std[:, None]
        pred, log_std = regression_output(output, cfg, norm_mean, norm_std)
        if log_std is not None:  # aviary.losses.robust_l1_loss, per material
            per = 2**0.5 * (pred - normed).abs() * torch.exp(-log_std) + log_std
        else:
            per = (pred - normed).abs()
    else:
        if cfg.robust:
            pre_logits, log_std = output.chunk(2, dim=-1)
            log_probs = torch.log(sampled_softmax(pre_logits.flatten(0, 1),
                                                  log_std.flatten(0, 1)))
            per = F.nll_loss(log_probs, targets.flatten(), reduction="none")
        else:
            per = F.cross_entropy(output.flatten(0, 1), targets.flatten(),
                                  reduction="none")
        per = per.view(weight.shape)
    return (per * weight).sum(dim=1) / weight.sum(dim=1).clamp(min=1)


def output_to_prediction(output: Tensor, cfg: TrainConfig, norm_mean: Tensor,
                         norm_std: Tensor) -> Tensor:
    """De-normalized predictions (regression) or class-1 probabilities, (M, B)."""
    output = output.float()
    if cfg.task_type == "regression":
        pred, _ = regression_output(output, cfg, norm_mean, norm_std)
        pred = pred * norm_std[:, None] + norm_mean[:, None]
        return torch.exp(pred) if cfg.log_target else pred
    logits = output[..., : output.shape[-1] // 2] if cfg.robust else output
    return logits.softmax(dim=-1)[..., 1]


def jitter_fractions(inputs: tuple, sigma: float) -> tuple:
    """Model inputs with each token's fraction scaled by 1 + sigma x N(0, 1) (at
    least 1e-3 of itself) and renormalized to sum to 1 per sequence: CrabNet's
    augmentation. Padding (fraction 0) stays 0."""
    if not sigma:
        return inputs
    frac = inputs[1]
    noisy = frac * (1 + sigma * torch.randn_like(frac)).clamp(min=1e-3)
    noisy = noisy / noisy.sum(dim=-1, keepdim=True).clamp(min=1e-12)
    return (inputs[0], noisy, *inputs[2:])


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU runs bf16 matrix products natively (x86 AVX-512, ARM bf16),
    as PyTorch's oneDNN backend decides; elsewhere they are emulated and slow."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


def autocast(device: torch.device, enabled: bool, cache: bool = True
             ) -> torch.autocast:
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                          enabled=enabled, cache_enabled=cache)


def score(targets: np.ndarray, preds: np.ndarray, task_type: str,
          threshold: float = CLASS_THRESHOLD) -> dict[str, float]:
    """Matbench's metrics: MAE, RMSE, R^2 (regression) or, from class-1
    probabilities, as matbench scores the labels (probability > `threshold`): their
    ROC-AUC `rocauc` (for labels, their balanced accuracy), accuracy and F1, plus the
    ROC-AUC of the probabilities themselves, `rocauc_prob` (classification)."""
    from sklearn.metrics import accuracy_score, f1_score, r2_score, roc_auc_score

    if not np.isfinite(preds).all():  # diverged: no metric means anything
        names = ("mae", "rmse", "r2") if task_type == "regression" else (
            "rocauc", "rocauc_prob", "accuracy", "f1")
        return dict.fromkeys(names, math.nan)
    if task_type == "regression":
        err = preds - targets
        return {"mae": float(np.abs(err).mean()),
                "rmse": float(np.sqrt((err**2).mean())),
                "r2": float(r2_score(targets, preds))}
    labels = preds > threshold
    return {"rocauc": float(roc_auc_score(targets, labels)),
            "rocauc_prob": float(roc_auc_score(targets, preds)),
            "accuracy": float(accuracy_score(targets, labels)),
            "f1": float(f1_score(targets, labels))}


def collapsed(preds: np.ndarray) -> bool:
    """Whether a member's predictions for two or more materials are all one value: its
    training collapsed (its output no longer depends on its input, e.g. after a loss
    spike saturated its classifier), so it adds nothing to an ensemble."""
    return len(preds) > 1 and bool(np.all(preds == preds[0]))


def best_threshold(targets: np.ndarray, probs: np.ndarray) -> float:
    """The class-1 probability threshold that maximizes the balanced accuracy of
    the labels (probability > threshold, Matbench's ROC-AUC of labels) on these
    materials: the midpoint between two neighbouring probabilities, the middle one
    of equal bests."""
    order = np.argsort(probs, kind="stable")
    probs, targets = probs[order], targets[order].astype(bool)
    n_pos, n_neg = targets.sum(), (~targets).sum()
    if not n_pos or not n_neg:
        return CLASS_THRESHOLD
    # threshold below probs[k]: materials k.. are labelled 1
    tpr = (n_pos - np.concatenate([[0], np.cumsum(targets)])) / n_pos
    tnr = np.concatenate([[0], np.cumsum(~targets)]) / n_neg
    cuts = np.concatenate([[np.nextafter(probs[0], -np.inf)],
                           (probs[1:] + probs[:-1]) / 2, [probs[-1]]])
    distinct = np.concatenate([[True], probs[1:] > probs[:-1], [True]])
    balanced = np.where(distinct, tpr + tnr, -np.inf)
    best = np.flatnonzero(balanced == balanced.max())
    return float(cuts[best[len(best) // 2]])


def crossfit_balanced_accuracy(targets: np.ndarray, probs: np.ndarray,
                               seed: int = 0) -> float:
    """An unbiased estimate of the balanced accuracy that best_threshold buys: the
    materials split in two halves at random, each half labelled at the threshold
    chosen on the other, the two halves' balanced accuracies averaged."""
    from sklearn.metrics import balanced_accuracy_score

    half = np.random.default_rng(seed).permutation(len(targets)) % 2 == 0
    return float(np.mean([
        balanced_accuracy_score(targets[part], probs[part] > best_threshold(
            targets[~part], probs[~part])) for part in (half, ~half)]))


@dataclass
class TrainState:
    """Everything a resumed run needs besides the data."""

    model: StackedTransformer
    members: list[Member]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    norm_mean: Tensor  # (M,) each member's training-target mean (0 for classes)
    norm_std: Tensor  # (M,) and standard deviation (1 for classes)
    epoch: int = 0  # epochs completed
    train_seconds: float = 0.0
    # every VAL_CURVE_EPOCHS epochs: (epoch, each member's validation score)
    val_curve: list[tuple[int, list[float]]] = field(default_factory=list)
    # at the same epochs, each member's validation predictions (float32)
    val_curve_preds: list[tuple[int, list[np.ndarray]]] = field(default_factory=list)
    # the members' weights averaged over the epochs after swa_start (SWA), and over
    # how many epochs: measured on validation only
    weight_average: list[Tensor] = field(default_factory=list)
    n_averaged: int = 0
    # with cfg.epoch_choice: each member's weights at its curve epoch with the best
    # validation score so far (stacked as the model's), that epoch and that score
    chosen_weights: list[Tensor] = field(default_factory=list)
    chosen_epochs: list[int] = field(default_factory=list)
    chosen_scores: list[float] = field(default_factory=list)
    bf16: Bf16Copy | None = None  # bf16 compute copy (amp on a CPU)
    graph: GraphedStep | None = None  # the captured step (cuda_graphs)


def swa_start(epochs: int) -> int:
    """The epoch after which the weight average begins: the last SWA_FRACTION of
    `epochs` (at least the last one) are averaged."""
    return epochs - max(1, math.ceil(epochs * SWA_FRACTION))


@torch.no_grad()
def average_weights(state: TrainState) -> None:
    """Add the model's weights now to state.weight_average, a running mean (the
    members' stacked weights stay apart, so each member averages its own)."""
    params = [p.detach() for p in state.model.parameters()]
    state.n_averaged += 1
    if state.n_averaged == 1:
        state.weight_average = [p.clone() for p in params]
    else:
        torch._foreach_lerp_(state.weight_average, params, 1 / state.n_averaged)


@torch.no_grad()
def keep_best_epochs(state: TrainState, epoch: int, val: Sequence[float],
                     lower_is_better: bool) -> None:
    """At a curve epoch: keep the weights of each member whose validation score
    `val` beats its best so far (the first curve epoch's all; a score that is not
    finite never counts) in state.chosen_weights, with that epoch and score."""
    params = [p.detach() for p in state.model.parameters()]
    sign = 1.0 if lower_is_better else -1.0
    scores = [sign * v if math.isfinite(v) else math.inf for v in val]
    if not state.chosen_weights:
        state.chosen_weights = [p.clone() for p in params]
        state.chosen_epochs, state.chosen_scores = [epoch] * len(val), scores
        return
    better = [m for m, v in enumerate(scores) if v < state.chosen_scores[m]]
    if not better:
        return
    rows = torch.tensor(better, device=params[0].device)
    for kept, param in zip(state.chosen_weights, params, strict=True):
        kept[rows] = param[rows]
    for m in better:
        state.chosen_epochs[m], state.chosen_scores[m] = epoch, scores[m]


@torch.no_grad()
def use_chosen_epochs(state: TrainState) -> None:
    """Give each member for good the weights of its chosen epoch (keep_best_epochs):
    from here on the model predicts with them (none kept: no change)."""
    if not state.chosen_weights:
        return
    torch._foreach_copy_(list(state.model.parameters()), state.chosen_weights)
    if state.bf16:
        state.bf16.refresh()


@contextmanager
def weights_swapped(state: TrainState, weights: Sequence[Tensor]) -> Iterator[None]:
    """Within the block the model holds `weights` (e.g. state.weight_average);
    its own come back after it, exactly."""
    params = list(state.model.parameters())
    with torch.no_grad():
        kept = [p.detach().clone() for p in params]
        torch._foreach_copy_(params, list(weights))
    try:
        yield
    finally:
        with torch.no_grad():
            torch._foreach_copy_(params, kept)


def steps_per_epoch(members: Sequence[Member], batch_size: int) -> int:
    return max(math.ceil(len(m.fit_idx) / batch_size) for m in members)


def new_train_state(model: str, data: TaskData, members: Sequence[Member],
                    cfg: TrainConfig, *, frac_encoding_dims: int = 0,
                    **model_kwargs) -> TrainState:
    """Fresh members (each initialized by aviary under its own seed) stacked on
    data's device, each member's normalizer fitted on its training targets
    (regression), and one AdamW with its schedule over cfg.epochs epochs. With
    cfg.amp on a CPU, training runs on a Bf16Copy (the optimizer updates its flat fp32
    master); on CUDA, under autocast. model_kwargs go to aviary's Wrenformer (d_model,
    n_attn_layers, n_attn_heads, dropout, embedding_aggregations, ...)."""
    if (cfg.gate or cfg.log_target) and cfg.task_type != "regression":
        raise ValueError("a gate or a log target takes regression tasks only")
    if cfg.gate and cfg.log_target:
        raise ValueError("a gate predicts exact zeros, which a log target cannot fit")
    if cfg.cuda_graphs and data.is_wren:
        raise ValueError("CUDA graphs take Roostformer only (Wrenformer's steps vary "
                         "in their number of sequences)")
    nets = []
    for member in members:
        torch.manual_seed(member.seed)
        nets.append(MatbenchTransformer(
            wyckoff=model == "wrenformer", frac_encoding_dims=frac_encoding_dims,
            task_dict={"target": cfg.task_type}, robust=cfg.robust,
            n_targets=[(2 if cfg.gate else 1) if cfg.task_type == "regression" else 2],
            **model_kwargs))
    net = StackedTransformer(nets).to(data.device)
    means, stds = [], []
    for member in members:
        targets = data.targets[torch.as_tensor(member.fit_idx, device=data.device)]
        if cfg.task_type == "regression":  # as aviary's Normalizer fits
            if cfg.log_target:
                if (targets <= 0).any():
                    raise ValueError("a log target needs every training target "
                                     "above 0")
                targets = torch.log(targets)
            means.append(targets.double().mean())
            stds.append(targets.double().std())
        else:
            means.append(torch.zeros((), device=data.device))
            stds.append(torch.ones((), device=data.device))
    bf16 = Bf16Copy(net) if cfg.amp and data.device.type == "cpu" else None
    optimizer, scheduler = make_optimizer(
        [bf16.master] if bf16 else list(net.parameters()), cfg,
        cfg.epochs * steps_per_epoch(members, cfg.batch_size), data.device)
    return TrainState(net, list(members), optimizer, scheduler,
                      torch.stack(means).float(), torch.stack(stds).float(), bf16=bf16)


@torch.no_grad()
def predict(state: TrainState, data: TaskData, member_idx: Sequence[np.ndarray],
            cfg: TrainConfig, batch_size: int = 512) -> list[np.ndarray]:
    """Each member's predictions for its materials member_idx[m], in that order."""
    model = state.model
    model.eval()
    plan = data.plan(member_idx, batch_size)
    preds = torch.zeros(len(member_idx), len(data) + 1, device=data.device)
    for step in range(len(plan)):
        inputs, _, _, mat = data.step(plan, step)
        with autocast(data.device, cfg.amp):
            output = model(*inputs)
        preds.scatter_(1, mat, output_to_prediction(output, cfg, state.norm_mean,
                                                    state.norm_std))
    preds = preds.cpu().numpy()
    return [preds[m, idx] for m, idx in enumerate(member_idx)]


class GraphedStep:
    """The whole training step of a stacked model (the batch gather, forward, loss,
    backward, AdamW and learning-rate update) captured in CUDA graphs over fixed
    shapes, one graph per step width (the longest material of a step: a few per
    task, as the plan gives each step batches of one rank): every step takes
    cfg.batch_size rows per member (short batches padded with TaskData.pad at loss
    weight 0). An epoch copies its plan into static buffers, then replays one graph
    per step, chosen on the host from the plan's widths: no synchronization. The
    first steps of each width run eagerly (as real steps) to warm up its kernels,
    and the optimizer's state, before its capture. Each graph keeps its own memory
    pool and its own gradients, which its replays overwrite."""

    WARMUP_STEPS = 3

    def __init__(self, state: TrainState, data: TaskData, cfg: TrainConfig,
                 n_steps: int) -> None:
        self.state, self.data, self.cfg = state, data, cfg
        dev, n_members = data.device, len(state.members)
        self.mat = torch.full((n_steps, n_members, cfg.batch_size), data.pad,
                              dtype=torch.long, device=dev)
        self.weight = torch.zeros(n_steps, n_members, cfg.batch_size, device=dev)
        self.step = torch.zeros(1, dtype=torch.long, device=dev)  # within the epoch
        group = state.optimizer.param_groups[0]
        if not isinstance(group["lr"], Tensor):  # e.g. loaded from an eager run
            group["lr"] = torch.tensor(float(group["lr"]), device=dev)
        self.lr = group["lr"]
        scheduler = state.scheduler
        total = cfg.epochs * n_steps
        self.lr_schedule = torch.tensor(
            [float(scheduler.base_lrs[0]) * scheduler.lr_lambdas[0](s)
             for s in range(total + 1)], device=dev)
        self.global_step = torch.tensor([scheduler.last_epoch], device=dev)
        self.loss_sum = torch.zeros(n_members, device=dev)
        self.replays: dict[int, Callable[[], None]] = {}  # by width; keep their graphs
        self.eager_steps: dict[int, int] = {}

    def body(self, width: int) -> None:
        state, data, cfg = self.state, self.data, self.cfg
        mat = self.mat.index_select(0, self.step).squeeze(0)
        weight = self.weight.index_select(0, self.step).squeeze(0)
        with autocast(data.device, cfg.amp, cache=False):
            output = state.model(*jitter_fractions(data.inputs(mat, width),
                                                   cfg.frac_jitter))
        losses = member_losses(output, data.targets[mat], weight, cfg, state.norm_mean,
                               state.norm_std)
        losses.sum().backward()
        self.lr.copy_(self.lr_schedule.index_select(0, self.global_step).squeeze(0))
        state.optimizer.step()
        self.loss_sum += losses.detach()
        self.step += 1
        self.global_step += 1

    def warmup_step(self, width: int) -> None:
        """One eager step on a side stream, as CUDA graph capture wants."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.state.optimizer.zero_grad(set_to_none=True)
            self.body(width)
        torch.cuda.current_stream().wait_stream(side)

    def capture(self, width: int) -> Callable[[], None]:
        """Capture one step of this width in a CUDA graph (nothing runs); returns its
        replay. The gradients, allocated in the capture, are overwritten by each
        replay."""
        self.state.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.body(width)
        return graph.replay

    def run_epoch(self, plan: Plan, on_step: Callable[[], None] | None = None
                  ) -> Tensor:
        """Train one epoch of `plan`; returns the members' summed step losses.
        `on_step` runs after each step (a test hook: reading the GPU there
        synchronizes)."""
        n_steps = len(plan)
        if n_steps > len(self.mat):
            raise ValueError("an epoch has more steps than the graph's buffers")
        self.mat[:n_steps].copy_(plan.mat)
        self.weight[:n_steps].copy_(plan.weight)
        self.step.zero_()
        self.loss_sum.zero_()
        for width in plan.width:
            if width in self.replays:
                self.replays[width]()
            elif (eager := self.eager_steps.get(width, 0)) < self.WARMUP_STEPS:
                self.warmup_step(width)
                self.eager_steps[width] = eager + 1
            else:
                self.replays[width] = self.capture(width)
                self.replays[width]()
            if on_step is not None:
                on_step()
        self.state.scheduler.last_epoch += n_steps  # (the graph set the lr itself)
        return self.loss_sum


def train(state: TrainState, data: TaskData, cfg: TrainConfig, *,
          on_epoch_end: Callable[[int, dict], bool] | None = None,
          progress: bool = True) -> TrainState:
    """Train every member from state.epoch to cfg.epochs. After each epoch
    `on_epoch_end(epoch, metrics)` may return True to stop early (e.g. on SIGTERM,
    after checkpointing). metrics: the members' mean training loss and validation
    score, each member's validation score under `val_<metric>_members`, and the
    members whose validation predictions have collapsed to one value
    (`collapsed_members`)."""
    members, optimizer, scheduler = state.members, state.optimizer, state.scheduler
    rngs = [np.random.default_rng(m.seed + state.epoch) for m in members]
    order_rng = np.random.default_rng((state.epoch, ORDER_STREAM))  # shared: see plan
    metric = VAL_METRICS[cfg.task_type]
    pbar = tqdm(range(state.epoch, cfg.epochs), initial=state.epoch, total=cfg.epochs,
                desc="epochs", disable=not progress, mininterval=1, dynamic_ncols=True)
    bf16 = state.bf16  # bf16 on a CPU: a bf16 copy is faster than autocast
    if bf16:
        bf16.refresh()  # the master weights may come from a checkpoint
    net = bf16.model if bf16 else state.model
    fit_idx = [m.fit_idx for m in members]
    for epoch in pbar:
        start = time.perf_counter()
        net.train()
        plan = data.plan(fit_idx, cfg.batch_size, rngs, order_rng)
        if cfg.cuda_graphs:
            if state.graph is None:
                state.graph = GraphedStep(state, data, cfg, len(plan))
            loss_sum = state.graph.run_epoch(plan)
        else:
            loss_sum = torch.zeros(len(members), device=data.device)
            for step in range(len(plan)):
                inputs, targets, weight, _ = data.step(plan, step)
                with autocast(data.device, cfg.amp and bf16 is None):
                    output = net(*jitter_fractions(inputs, cfg.frac_jitter))
                losses = member_losses(output, targets, weight, cfg, state.norm_mean,
                                       state.norm_std)
                if bf16:
                    bf16.backward(losses.sum())
                else:
                    optimizer.zero_grad(set_to_none=True)
                    losses.sum().backward()
                optimizer.step()
                scheduler.step()
                if bf16:
                    bf16.refresh()
                loss_sum += losses.detach()
        member_loss = (loss_sum / len(plan)).tolist()  # one sync per epoch
        state.train_seconds += time.perf_counter() - start
        metrics: dict = {"train_loss": float(np.mean(member_loss)),
                         "lr": float(scheduler.base_lrs[0])
                         * scheduler.lr_lambdas[0](scheduler.last_epoch)}
        val_idx = [m.val_idx for m in members]
        if all(len(idx) for idx in val_idx):
            val_preds = predict(state, data, val_idx, cfg)
            targets = data.targets.cpu().numpy()
            val = [score(targets[idx], preds, cfg.task_type)[metric]
                   for idx, preds in zip(val_idx, val_preds, strict=True)]
            metrics[f"val_{metric}"] = float(np.mean(val))
            metrics[f"val_{metric}_members"] = val
            metrics["collapsed_members"] = [m for m, preds in enumerate(val_preds)
                                            if collapsed(preds)]
            if (epoch + 1) % VAL_CURVE_EPOCHS == 0 or epoch + 1 == cfg.epochs:
                state.val_curve.append((epoch + 1, val))
                state.val_curve_preds.append(
                    (epoch + 1, [p.astype(np.float32) for p in val_preds]))
                if cfg.epoch_choice:
                    keep_best_epochs(state, epoch + 1, val, metric == "mae")
        state.epoch = epoch + 1
        if state.epoch > swa_start(cfg.epochs):
            average_weights(state)
        pbar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items()
                          if k != "lr" and not isinstance(v, list)})
        if on_epoch_end is not None and on_epoch_end(state.epoch, metrics):
            break
    pbar.close()
    return state
