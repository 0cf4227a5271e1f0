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
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch
import torch.nn.functional as F
from aviary import PKG_DIR
from aviary.core import AGGREGATORS, sampled_softmax
from aviary.data import Normalizer
from aviary.losses import robust_l1_loss
from aviary.wrenformer.model import Wrenformer
from torch import Tensor, nn
from tqdm import tqdm

ELEM_DIM, WYCKOFF_DIM = 200, 444  # matscholar200 and bra-alg-off embedding sizes


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
        cut = (lambda arr: None if arr is None else arr[seq_idx, :max_len])
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
        amounts = Composition(formula).get_el_amt_dict()
        total = sum(amounts.values())
        parsed[formula] = ([elem_index[el] for el in amounts],
                           [amt / total for amt in amounts.values()])
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
        spg, mults, elements, equivalent_sets = parse_protostructure_label(label)
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


def masked_mean(x: Tensor, keep: Tensor) -> Tensor:
    """Mean over dim 1 of x where keep is True: aviary's masked mean in two kernels
    instead of its NaN fill and nanmean."""
    keep = keep.to(torch.float32)
    return (x.float() * keep).sum(dim=1) / keep.sum(dim=1)


class MatbenchTransformer(Wrenformer):
    """aviary's Wrenformer (TransformerEncoder, residual trunk and heads) reading token
    indices. Roostformer when `wyckoff` is False.

    Input features per token are aviary's: [fraction, matscholar200 element
    embedding, Wyckoff embedding (Wrenformer)], plus an optional sinusoidal encoding
    of the fraction (`frac_encoding_dims`).
    """

    def __init__(self, *, wyckoff: bool, frac_encoding_dims: int = 0,
                 **kwargs) -> None:
        kwargs.pop("n_features", None)  # derived below (model_params holds it)
        n_features = 1 + ELEM_DIM + (WYCKOFF_DIM if wyckoff else 0) + frac_encoding_dims
        super().__init__(n_features=n_features, **kwargs)
        self.model_params.update(wyckoff=wyckoff,
                                 frac_encoding_dims=frac_encoding_dims)
        self.frac_encoding_dims = frac_encoding_dims
        # fixed embedding tables come from aviary's package, not from checkpoints
        self.register_buffer("elem_table", element_vocab()[1], persistent=False)
        if wyckoff:
            self.register_buffer("wyckoff_table", wyckoff_vocab()[1],
                                 persistent=False)

    def forward(  # type: ignore[override]
        self, elem: Tensor, frac: Tensor, wyckoff: Tensor | None, seq_mask: Tensor,
        seq_owner: Tensor | None = None, mask: Tensor | None = None,
    ) -> tuple[Tensor, ...]:
        """Predict from padded token sequences.

        Args:
            elem, frac, wyckoff: (S, L) element rows, fractions, Wyckoff rows.
            seq_mask: (S, L) True at padding.
            seq_owner: (S,) index of each sequence's material in the batch (Wrenformer:
                the embeddings of a material's equivalent sequences are averaged;
                index B marks filler sequences, which are ignored).
            mask: (B, L) True at padding, per material (Wrenformer).
        """
        dtype = self.resize_embedding.weight.dtype  # bf16 in a Bf16Copy
        parts = [frac[..., None], self.elem_table[elem]]
        if wyckoff is not None:
            parts.append(self.wyckoff_table[wyckoff])
        if self.frac_encoding_dims:
            parts.append(fraction_encoding(frac, self.frac_encoding_dims))
        features = self.resize_embedding(torch.cat(parts, dim=-1).to(dtype))
        embeddings = self.encode(features, seq_mask)

        if seq_owner is not None:  # mean over each material's equivalent Wyckoff sets
            assert mask is not None  # owner n_mat: filler sequences, dropped here
            n_mat = mask.shape[0]
            summed = embeddings.new_zeros((n_mat + 1, *embeddings.shape[1:]))
            summed.index_add_(0, seq_owner, embeddings)
            counts = embeddings.new_zeros(n_mat + 1).index_add_(
                0, seq_owner, torch.ones_like(seq_owner, dtype=embeddings.dtype))
            embeddings = summed[:n_mat] / counts[:n_mat, None, None]
        else:
            mask = seq_mask

        inv_mask = ~mask[..., None]
        pooled = torch.cat([masked_mean(embeddings, inv_mask) if key == "mean"
                            else AGGREGATORS[key](embeddings, inv_mask, 1)
                            for key in self.embedding_aggregations], dim=1)
        hidden = F.relu(self.trunk_nn(pooled.to(dtype)))
        return tuple(head(hidden) for head in self.output_nns)

    def encode(self, x: Tensor, pad: Tensor) -> Tensor:
        """aviary's transformer encoder (pre-norm nn.TransformerEncoderLayers) on x
        (S, L, d_model), pad (S, L) True at padding: the layers' own parameters and
        math in fewer ops than nn.MultiheadAttention's general path (a test checks
        they agree). In bf16 on a CPU the attention core runs in fp32, which is
        faster there at these sizes."""
        n_seq, length, _ = x.shape
        attend = ~pad[:, None, None, :]
        fp32_attention = x.device.type == "cpu" and (
            torch.is_autocast_enabled("cpu") or x.dtype == torch.bfloat16)
        for layer in self.transformer_encoder.layers:
            attn = layer.self_attn
            p_drop = layer.dropout.p if self.training else 0.0  # skip no-op calls
            qkv = F.linear(layer.norm1(x), attn.in_proj_weight, attn.in_proj_bias)
            if fp32_attention:
                qkv = qkv.float()
            q, k, v = qkv.view(n_seq, length, 3, attn.num_heads, -1).permute(
                2, 0, 3, 1, 4)
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attend,
                dropout_p=attn.dropout if self.training else 0.0)
            out = attn.out_proj(out.transpose(1, 2).reshape(x.shape).to(x.dtype))
            x = x + (layer.dropout1(out) if p_drop else out)
            hidden = layer.activation(layer.linear1(layer.norm2(x)))
            if p_drop:
                hidden = layer.dropout(hidden)
            out = layer.linear2(hidden)
            x = x + (layer.dropout2(out) if p_drop else out)
        return x


# --- device-resident batching -------------------------------------------------------
Batch = tuple[tuple, Tensor, Tensor]  # (model inputs, targets, material indices)
SEQ_MULTIPLE = 8  # Wrenformer batches hold a multiple of this many sequences


class DeviceData:
    """A data split's tokens and targets on the device, served in length-bucketed
    batches: per epoch, a few numpy ops and one host-to-device copy of the order;
    per batch, one gather on the device and no synchronization."""

    def __init__(self, tokens: Tokens, targets: np.ndarray, device: torch.device,
                 batch_size: int, bucket_batches: int = 16) -> None:
        self.tokens, self.batch_size, self.device = tokens, batch_size, device
        self.bucket_batches = bucket_batches
        as_dev = (lambda arr: None if arr is None
                  else torch.as_tensor(arr, device=device))
        self.elem, self.frac = as_dev(tokens.elem), as_dev(tokens.frac)
        self.wyckoff = as_dev(tokens.wyckoff)
        self.targets = torch.as_tensor(targets, device=device)
        self.n_seq = np.diff(tokens.seq_start)
        self.is_wren = tokens.wyckoff is not None
        if self.is_wren:  # a filler sequence (one hydrogen token) pads batches to
            # SEQ_MULTIPLE sequences, so batch shapes repeat across epochs
            self.filler = len(tokens.elem)
            filler = torch.zeros_like(self.elem[:1])
            filler[0, 0] = 1
            self.elem = torch.cat([self.elem, filler])
            self.frac = torch.cat([self.frac, torch.zeros_like(self.frac[:1])])
            self.wyckoff = torch.cat([self.wyckoff, torch.zeros_like(self.wyckoff[:1])])
        # each material's first sequence: its padding mask is the material's
        self.first_seq = torch.as_tensor(tokens.seq_start[:-1], device=device)

    def __len__(self) -> int:
        return len(self.tokens)

    def n_batches(self) -> int:
        return math.ceil(len(self) / self.batch_size)

    def epoch_batches(self, rng: np.random.Generator | None) -> list[np.ndarray]:
        """Material indices of each batch of one epoch: random buckets of
        `bucket_batches` batches, each sorted by length (little padding), batches in
        random order. Without an rng: sorted by length, for evaluation."""
        length = self.tokens.length
        if rng is None:
            order = np.argsort(length, kind="stable")
        else:
            order = rng.permutation(len(self))
            bucket = self.batch_size * self.bucket_batches
            for start in range(0, len(order), bucket):
                chunk = order[start: start + bucket]
                order[start: start + bucket] = chunk[np.argsort(length[chunk],
                                                                kind="stable")]
        batches = [order[i: i + self.batch_size]
                   for i in range(0, len(order), self.batch_size)]
        if rng is not None:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def batches(self, rng: np.random.Generator | None = None) -> Iterator[Batch]:
        """Yield (inputs, targets, material indices) batches covering every material
        once."""
        batches = self.epoch_batches(rng)
        if not batches:
            return
        order = np.concatenate(batches)
        bounds = np.concatenate([[0], np.cumsum([len(b) for b in batches])])
        max_len = [int(self.tokens.length[b].max()) for b in batches]
        mat_order = torch.as_tensor(order, device=self.device)
        if self.is_wren:  # each batch's sequences, then fillers (owned by no material)
            seq_parts, owner_parts = [], []
            for batch in batches:
                counts = self.n_seq[batch]
                n_fill = -counts.sum() % SEQ_MULTIPLE
                seq_parts.append(np.concatenate([
                    expand_ranges(self.tokens.seq_start[batch], counts),
                    np.full(n_fill, self.filler)]))
                owner_parts.append(np.concatenate([
                    np.repeat(np.arange(len(batch)), counts),
                    np.full(n_fill, len(batch))]))
            seq_bounds = np.cumsum([0] + [len(part) for part in seq_parts])
            seq_order = torch.as_tensor(np.concatenate(seq_parts), device=self.device)
            owner = torch.as_tensor(np.concatenate(owner_parts), device=self.device)
        for b, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            width = max_len[b]
            mat_idx = mat_order[start:stop]
            if self.is_wren:
                seq_idx = seq_order[seq_bounds[b]: seq_bounds[b + 1]]
                elem = self.elem[seq_idx, :width]
                inputs = (elem, self.frac[seq_idx, :width],
                          self.wyckoff[seq_idx, :width], elem == 0,
                          owner[seq_bounds[b]: seq_bounds[b + 1]],
                          self.elem[self.first_seq[mat_idx], :width] == 0)
            else:
                elem = self.elem[mat_idx, :width]
                inputs = (elem, self.frac[mat_idx, :width], None, elem == 0)
            yield inputs, self.targets[mat_idx], mat_idx


# --- training -----------------------------------------------------------------------
@dataclass
class TrainConfig:
    """Optimization settings (model size lives in the model)."""

    task_type: str  # "regression" or "classification"
    epochs: int
    learning_rate: float = 3e-4
    weight_decay: float = 1e-2
    warmup_frac: float = 0.05
    robust: bool = False
    amp: bool = False  # bf16 compute, fp32 weights and optimizer (autocast on CUDA)
    seed: int = 0


def make_optimizer(params: Sequence[Tensor], cfg: TrainConfig, steps: int
                   ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (fused where the device supports it) with linear warm-up and cosine
    decay over `steps` optimizer steps."""
    try:
        optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate,
                                      weight_decay=cfg.weight_decay, fused=True)
    except (RuntimeError, TypeError):
        optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate,
                                      weight_decay=cfg.weight_decay)
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


def compute_loss(output: Tensor, targets: Tensor, cfg: TrainConfig,
                 normalizer: Normalizer) -> Tensor:
    """L1 on normalized targets (regression) or cross-entropy (classification);
    aviary's robust variants with --robust."""
    output = output.float()
    if cfg.task_type == "regression":
        normed = (targets - normalizer.mean) / normalizer.std
        if cfg.robust:
            pred, log_std = output.unbind(dim=1)
            return robust_l1_loss(pred, log_std, normed)
        return F.l1_loss(output.squeeze(1), normed)
    if cfg.robust:
        pre_logits, log_std = output.chunk(2, dim=1)
        return F.nll_loss(torch.log(sampled_softmax(pre_logits, log_std)), targets)
    return F.cross_entropy(output, targets)


def output_to_prediction(output: Tensor, cfg: TrainConfig,
                         normalizer: Normalizer) -> Tensor:
    """De-normalized predictions (regression) or class-1 probabilities."""
    output = output.float()
    if cfg.task_type == "regression":
        return output[:, 0] * normalizer.std + normalizer.mean
    logits = output[:, : output.shape[1] // 2] if cfg.robust else output
    return logits.softmax(dim=1)[:, 1]


@torch.no_grad()
def predict(model: nn.Module, data: DeviceData, cfg: TrainConfig,
            normalizer: Normalizer) -> np.ndarray:
    """Predictions for every material of `data`, in its original order."""
    model.eval()
    preds = torch.empty(len(data), device=data.device)
    for inputs, _, mat_idx in data.batches():
        with autocast(data.device, cfg.amp):
            output = model(*inputs)[0]
        preds[mat_idx] = output_to_prediction(output, cfg, normalizer)
    return preds.cpu().numpy()


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU runs bf16 matrix products natively (x86 AVX-512, ARM bf16),
    as PyTorch's oneDNN backend decides; elsewhere they are emulated and slow."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


def autocast(device: torch.device, enabled: bool) -> torch.autocast:
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                          enabled=enabled)


def score(targets: np.ndarray, preds: np.ndarray, task_type: str) -> dict[str, float]:
    """Matbench's metrics: MAE, RMSE, R^2 (regression) or ROC-AUC, accuracy, F1 from
    the class-1 probability at 0.5 (classification)."""
    from sklearn.metrics import accuracy_score, f1_score, r2_score, roc_auc_score

    if task_type == "regression":
        err = preds - targets
        return {"mae": float(np.abs(err).mean()),
                "rmse": float(np.sqrt((err**2).mean())),
                "r2": float(r2_score(targets, preds))}
    labels = preds >= 0.5
    return {"rocauc": float(roc_auc_score(targets, preds)),
            "accuracy": float(accuracy_score(targets, labels)),
            "f1": float(f1_score(targets, labels))}


@dataclass
class TrainState:
    """Everything a resumed run needs besides the data."""

    model: MatbenchTransformer
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    normalizer: Normalizer
    epoch: int = 0  # epochs completed
    train_seconds: float = 0.0
    bf16: Bf16Copy | None = None  # bf16 compute copy (amp on a CPU)


def new_train_state(model: str, data: DeviceData, cfg: TrainConfig, *,
                    frac_encoding_dims: int = 0, **model_kwargs) -> TrainState:
    """A fresh model on data's device, the normalizer fitted on data's targets
    (regression; identity for classification) and AdamW with its schedule over
    cfg.epochs epochs of data. With cfg.amp on a CPU, training runs on a Bf16Copy
    (the optimizer updates its flat fp32 master); on CUDA, under autocast.
    model_kwargs go to aviary's Wrenformer (d_model, n_attn_layers, n_attn_heads,
    dropout, embedding_aggregations, ...)."""
    normalizer = Normalizer()
    if cfg.task_type == "regression":
        normalizer.fit(data.targets.double())
    normalizer.mean = normalizer.mean.float().to(data.device)
    normalizer.std = normalizer.std.float().to(data.device)
    net = MatbenchTransformer(
        wyckoff=model == "wrenformer", frac_encoding_dims=frac_encoding_dims,
        task_dict={"target": cfg.task_type}, robust=cfg.robust,
        n_targets=[1 if cfg.task_type == "regression" else 2],
        device=str(data.device), **model_kwargs,
    ).to(data.device)
    bf16 = Bf16Copy(net) if cfg.amp and data.device.type == "cpu" else None
    optimizer, scheduler = make_optimizer(
        [bf16.master] if bf16 else list(net.parameters()), cfg,
        cfg.epochs * data.n_batches())
    return TrainState(net, optimizer, scheduler, normalizer, bf16=bf16)


def train(state: TrainState, train_data: DeviceData, val_data: DeviceData | None,
          cfg: TrainConfig, *, on_epoch_end: Callable[[int, dict], bool] | None = None,
          progress: bool = True) -> TrainState:
    """Train from state.epoch to cfg.epochs. After each epoch `on_epoch_end(epoch,
    metrics)` may return True to stop early (e.g. on SIGTERM, after checkpointing)."""
    model, optimizer, scheduler = state.model, state.optimizer, state.scheduler
    rng = np.random.default_rng(cfg.seed + state.epoch)
    val_key = "val_mae" if cfg.task_type == "regression" else "val_rocauc"
    pbar = tqdm(range(state.epoch, cfg.epochs), initial=state.epoch, total=cfg.epochs,
                desc="epochs", disable=not progress, mininterval=1, dynamic_ncols=True)
    bf16 = state.bf16  # bf16 on a CPU: a bf16 copy is faster than autocast
    if bf16:
        bf16.refresh()  # the master weights may come from a checkpoint
    net = bf16.model if bf16 else model
    for epoch in pbar:
        start = time.perf_counter()
        net.train()
        loss_sum = torch.zeros((), device=train_data.device)
        for inputs, targets, _ in train_data.batches(rng):
            with autocast(train_data.device, cfg.amp and bf16 is None):
                output = net(*inputs)[0]
            loss = compute_loss(output, targets, cfg, state.normalizer)
            if bf16:
                bf16.backward(loss)
            else:
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            optimizer.step()
            scheduler.step()
            if bf16:
                bf16.refresh()
            loss_sum += loss.detach()
        metrics = {"train_loss": float(loss_sum) / train_data.n_batches(),
                   "lr": scheduler.get_last_lr()[0]}
        state.train_seconds += time.perf_counter() - start
        if val_data is not None and len(val_data):
            val_preds = predict(model, val_data, cfg, state.normalizer)
            val_targets = val_data.targets.cpu().numpy()
            metrics[val_key] = score(val_targets, val_preds, cfg.task_type)[
                val_key[4:]]
        state.epoch = epoch + 1
        pbar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items() if k != "lr"})
        if on_epoch_end is not None and on_epoch_end(state.epoch, metrics):
            break
    pbar.close()
    return state
