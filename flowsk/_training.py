"""The one training loop every estimator uses.

:func:`train` composes three parts that can be read and tested alone: :class:`Batches`
(minibatches streamed from an array or tensor to the device), :class:`EarlyStopping` (the
validation schedule: best weights, one learning-rate cut at the first plateau, stop at the
second) and :class:`DivergenceGuard` (a non-finite loss, gradient or weight is undone).
"""
import copy
import warnings

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from tqdm.auto import tqdm

_MAX_LR_CUTS = 3
_PLATEAU_LR_FACTOR = 10
#: Arrays up to this size (as float32) are copied to the device once; larger ones (a
#: memory-mapped data set, say) are streamed batch by batch and never copied whole.
_DEVICE_COPY_LIMIT = 2**29
#: On a GPU the loop checks the loss for non-finite values every this many steps (a check is a
#: host synchronisation); on the CPU it checks every step, where a check costs nothing.
_GPU_CHECK_EVERY = 16


def resolve_device(device):
    """``"auto"`` -> CUDA when available, else CPU; anything else is passed to ``torch.device``."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or a torch.device, "
                         f"got {device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was requested but CUDA is not available; "
                         "use device='cpu' or 'auto'")
    return device


def module_device(module):
    """The device of ``module``'s first parameter or buffer (CPU for an empty module)."""
    tensor = next(iter(module.parameters()), None)
    if tensor is None:
        tensor = next(iter(module.buffers()), None)
    return torch.device("cpu") if tensor is None else tensor.device


def as_tensor(array, device):
    """``array`` as a float32 tensor on ``device``, sharing its memory where it can; a
    read-only array (a memory map opened with ``mode="r"``) is copied, as torch needs."""
    array = np.asarray(array, dtype=np.float32)
    return torch.as_tensor(array if array.flags.writeable else array.copy(), device=device)


def _finite(module):
    return all(torch.isfinite(p).all() for p in module.parameters())


def _split(n, validation_fraction, rng):
    order = rng.permutation(n)
    n_val = int(np.rint(n * validation_fraction))
    if n_val < 1 or n - n_val < 1:
        return order, order[:0]
    return order[n_val:], order[:n_val]


def param_groups(module, weight_decay):
    """Optimizer groups: the weights of linear and convolution layers decay, everything else
    (biases, ActNorm, LU factors, learned shifts) does not."""
    decay, no_decay = [], []
    for sub in module.modules():
        for name, p in sub.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            layer = isinstance(sub, (torch.nn.Linear, torch.nn.modules.conv._ConvNd))
            (decay if layer and name == "weight" else no_decay).append(p)
    groups = [{"params": no_decay, "weight_decay": 0.0}]
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    return groups


class Batches:
    """Rows of ``data`` (an array, memory-mapped or not, or a tensor) as float32 tensors on
    ``device``. Arrays up to ``_DEVICE_COPY_LIMIT`` bytes move to the device once; larger ones
    are read batch by batch (rows in ascending order, which memory maps read fastest)."""

    def __init__(self, data, device):
        self.device = device
        if isinstance(data, torch.Tensor):
            self.data = data.to(device)
        elif 4 * data.size <= _DEVICE_COPY_LIMIT:
            self.data = as_tensor(data, device)
        else:
            self.data = data

    def __len__(self):
        return len(self.data)

    def index(self, idx):
        """Row indices ``idx`` in the form :meth:`__getitem__` reads fastest: on the device for
        device-resident data (one transfer per epoch rather than one per batch)."""
        return torch.as_tensor(idx, device=self.device) if self.on_device else idx

    @property
    def on_device(self):
        return isinstance(self.data, torch.Tensor)

    def __getitem__(self, idx):
        if self.on_device:
            return self.data[torch.as_tensor(idx, device=self.device)]
        rows = np.asarray(self.data[np.sort(idx)], dtype=np.float32)
        pin = self.device.type == "cuda"
        tensor = torch.from_numpy(rows)
        return (tensor.pin_memory() if pin else tensor).to(self.device, non_blocking=pin)


class EarlyStopping:
    """Keeps the weights of the best validation epoch. After ``n_iter_no_change`` epochs
    without improvement the best weights are restored and the learning rate divided by
    ``_PLATEAU_LR_FACTOR``; after as many more, :meth:`update` says stop."""

    def __init__(self, module, n_iter_no_change):
        self.n_iter_no_change = n_iter_no_change
        self.best, self.best_epoch, self.stale, self.cut = np.inf, 0, 0, False
        self.best_state = copy.deepcopy(module.state_dict())

    def restore(self, module):
        module.load_state_dict(self.best_state)

    def update(self, epoch, val_loss, module, optimizer):
        """Record epoch ``epoch``'s validation loss; returns True when training should stop."""
        if np.isfinite(val_loss) and val_loss < self.best:
            self.best, self.best_epoch, self.stale = val_loss, epoch, 0
            self.best_state = copy.deepcopy(module.state_dict())
            return False
        self.stale += 1
        if self.stale < self.n_iter_no_change:
            return False
        if self.cut:
            return True
        self.cut, self.stale = True, 0
        self.restore(module)
        for group in optimizer.param_groups:
            group["lr"] /= _PLATEAU_LR_FACTOR
        return False


class DivergenceGuard:
    """Undoes an epoch whose loss, gradient or weights went non-finite: the best weights come
    back, the optimizer's moments are cleared and the learning rate halves; after
    ``_MAX_LR_CUTS`` halvings :meth:`recover` says stop (with a :class:`ConvergenceWarning`)."""

    def __init__(self):
        self.cuts = 0

    def recover(self, epoch, module, optimizer, stopper):
        """Undo the epoch; returns True when training should stop."""
        self.cuts += 1
        stopper.restore(module)
        optimizer.state.clear()  # Adam's moments may be non-finite too
        if self.cuts > _MAX_LR_CUTS:
            warnings.warn(f"training diverged (non-finite loss or weights) at epoch {epoch}; "
                          f"stopped and kept the best weights (epoch {stopper.best_epoch}). "
                          "Try a lower learning_rate.", ConvergenceWarning,
                          stacklevel=5)  # recover <- train <- _fit / method.fit <- fit <- caller
            return True
        for group in optimizer.param_groups:
            group["lr"] /= 2
        return False


def make_optimizer(module, learning_rate, weight_decay):
    """AdamW over :func:`param_groups` (the fused implementation on CPU and CUDA)."""
    fused = module_device(module).type in ("cpu", "cuda")
    return torch.optim.AdamW(param_groups(module, weight_decay), lr=learning_rate, fused=fused)


def train_step(module, loss_fn, batch, optimizer, params, clip_norm, check=True):
    """One optimizer step on ``batch`` with gradients clipped to norm ``clip_norm``: the
    detached loss, or None when ``check`` finds the loss or the gradient not finite (no step is
    then taken). A check is a host synchronisation on a GPU."""
    loss = loss_fn(module, batch)
    if check and not torch.isfinite(loss):
        return None
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip_norm)
    if check and not torch.isfinite(grad_norm):
        return None  # a step would make every weight NaN
    optimizer.step()
    return loss.detach()


def _train_epoch(module, loss_fn, batches, order, batch_size, optimizer, params, clip_norm):
    """One pass of :func:`train_step` over the rows ``order``; the mean loss, or NaN when a
    loss or gradient was not finite (the pass then stops early, on the CPU at that very step,
    on a GPU within ``_GPU_CHECK_EVERY`` steps)."""
    check_every = 1 if batches.device.type == "cpu" else _GPU_CHECK_EVERY
    total, order = torch.zeros((), device=batches.device), batches.index(order)
    for k, start in enumerate(range(0, len(order), batch_size)):
        batch = batches[order[start:start + batch_size]]
        loss = train_step(module, loss_fn, batch, optimizer, params, clip_norm,
                          check=k % check_every == 0)
        if loss is None:
            return float("nan")
        total = total + loss * len(batch)
    return (total / len(order)).item()


@torch.no_grad()
def _evaluate(module, loss_fn, batches, idx, batch_size):
    """Mean of ``loss_fn`` over the rows ``idx``, in chunks of ``4 * batch_size`` rows (summed
    on the device, read once)."""
    step, idx = 4 * batch_size, batches.index(idx)
    total = sum(loss_fn(module, batches[idx[s:s + step]]) * len(idx[s:s + step])
                for s in range(0, len(idx), step))
    return float(total) / len(idx)


def train(module, loss_fn, data, *, max_epochs, batch_size, learning_rate, weight_decay=0.0,
          validation_fraction=0.1, n_iter_no_change=10, clip_norm=10.0, rng, verbose=0,
          desc="fit"):
    """Fit ``module`` by minimising ``loss_fn(module, batch) -> scalar`` with AdamW.

    ``data``: array or tensor ``(n, ...)`` (pairs can be concatenated along dimension 1 and
    split in ``loss_fn``), streamed to the module's device by :class:`Batches`; ``rng`` a NumPy
    ``RandomState``. ``weight_decay`` is decoupled (AdamW) and applies only to the weights of
    linear and convolution layers (:func:`param_groups`). A validation split
    (``validation_fraction``) drives :class:`EarlyStopping`; the best weights are restored at
    the end. Gradients are clipped to norm ``clip_norm``; :class:`DivergenceGuard` undoes
    epochs that go non-finite.

    Returns ``(history, best_epoch)``; ``history`` holds ``train_loss`` and ``val_loss`` lists
    with one entry per epoch run (NaN for an epoch that diverged), so ``best_epoch`` indexes
    them.
    """
    batches = Batches(data, module_device(module))
    train_idx, val_idx = _split(len(batches), validation_fraction, rng)
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = make_optimizer(module, learning_rate, weight_decay)
    history = {"train_loss": [], "val_loss": []}
    stopper, guard = EarlyStopping(module, n_iter_no_change), DivergenceGuard()
    bar = tqdm(range(max_epochs), desc=desc, disable=verbose <= 0, leave=False)
    for epoch in bar:
        module.train()
        order = train_idx[rng.permutation(len(train_idx))]
        train_loss = _train_epoch(module, loss_fn, batches, order, batch_size, optimizer,
                                  params, clip_norm)
        if not (np.isfinite(train_loss) and _finite(module)):
            history["train_loss"].append(float("nan"))
            history["val_loss"].append(float("nan"))
            if guard.recover(epoch, module, optimizer, stopper):
                break
            continue
        module.eval()
        val_loss = (_evaluate(module, loss_fn, batches, val_idx, batch_size) if len(val_idx)
                    else train_loss)
        history["train_loss"].append(train_loss)
        history["val_loss"].append(val_loss)
        if verbose > 0:
            bar.set_postfix(train=f"{train_loss:.4g}", val=f"{val_loss:.4g}")
            if verbose > 1:
                tqdm.write(f"[{desc}] epoch {epoch}: train {train_loss:.5g}  val {val_loss:.5g}")
        if stopper.update(epoch, val_loss, module, optimizer):
            break
    stopper.restore(module)
    module.eval()
    return history, stopper.best_epoch
